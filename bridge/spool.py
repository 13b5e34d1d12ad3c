"""The durable local queue behind ``BRIDGE_ACK=durable``: SQLite in WAL mode.

An event is appended and committed with ``synchronous=FULL`` (an fsync) before
the sender hears 2xx; the drainer removes it only after Kafka acknowledged it.
Concurrent requests share one transaction (group commit): all SQLite work runs
on one writer thread, which takes every append waiting in its queue into the
same commit, so the cost of the fsync is spread over everyone waiting for it
and a slow disk never blocks the event loop.

The writer thread also keeps a copy in memory of what the spool holds, so the
drainer reads the records it sends from there instead of reading back what was
just written; only after a restart, or once more is waiting than the copy may
hold (Kafka away), does it read the file, until the spool is empty again.

A full disk must not stop the delivery of what the spool holds: SQLite needs room
for new WAL pages even to delete rows, so once the disk was full the drainer could
not remove what Kafka had taken, and sent nothing more (a reviewer's spool on a
16 MB volume stayed at 3,136 events for minutes with Kafka up). The spool keeps a
reserve file next to the database (``spool.reserve``, RESERVE_BYTES at most) and
deletes it when a removal finds the disk full; it is made again once the spool
has been emptied and there is room (the WAL file truncated first: it keeps the size
of the largest backlog). While there is no reserve, the free space itself is the
reserve: appends that would leave less than removing what the spool holds needs
(at most the reserve's size) are refused (503 spool_full),
or a second outage filled the disk again, and with no reserve left to give up, no
removal could be made (a review's spool stayed at 10,543 events with Kafka up).

The same database remembers the idempotency keys accepted within the
de-duplication window, in the transaction that spools the event, so a key is
recorded exactly when its event became safe. At most ``max_keys`` of them: a
flood of fresh keys would otherwise fill the disk, so beyond that count the
oldest are forgotten first, as in memory (:mod:`bridge.dedup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import heapq
import logging
import math
import os
import queue
import signal
import socket
import sqlite3
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bridge.backlog import SCAN_PAST_AT_MOST, QueuedRecord, RecordFifo, record_size
from bridge.config import Settings
from bridge.errors import (
    BridgeError,
    SpoolFull,
    SpoolOpeningStopped,
    SpoolUnusable,
    SpoolWriteFailed,
    stopping,
)
from bridge.routing import Destination
from bridge.signals import STOP_SIGNALS

log = logging.getLogger(__name__)

#: A spool file from this size on is said to be checked at start, and how long it took:
#: SQLite's quick_check reads its pages out of order (measured: 25 s for 1 GB, 60 s for
#: a full 2.5 GB spool from a cold cache), and nothing is served until it is done.
SLOW_CHECK_BYTES = 256 * 1024 * 1024

#: SQLite virtual machine steps between calls of _let_signals_in while the spool
#: opens (a call costs about a microsecond; 10,000 steps far more).
PROGRESS_STEPS = 10_000


def _let_signals_in() -> int:
    """SQLite's progress handler: doing nothing in Python is enough for Python to run a
    pending signal's handler, whose exception then ends the statement. 0: go on."""
    return 0


@contextlib.contextmanager
def _stopped_by_signals(connection: sqlite3.Connection) -> Iterator[None]:
    """A stop signal (bridge.signals) interrupts ``connection``'s statement at once.

    The progress handler lets Python's handlers in between SQLite's steps, but
    quick_check walks each table in one step: 2.4 s for a cold 1 GB spool, most of the
    minute for 2.5 GB, while a pod being deleted waited. A signal that has a Python
    handler is also written to the wakeup file descriptor, as it arrives; a thread that
    reads it calls ``connection.interrupt()`` (SQLite's way to end a statement from
    another thread), and the statement ends with "interrupted" while the handler runs.
    Only in the main thread (where signals are handled) and not inside a running event
    loop, whose own wakeup descriptor this would take."""
    if threading.current_thread() is not threading.main_thread() or _loop_running():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # as set_wakeup_fd requires
    try:
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter's main thread after all
        reader.close()
        writer.close()
        yield
        return

    def interrupt_on_stop() -> None:
        while received := reader.recv(64):  # empty: the writer was closed, done
            if STOP_SIGNALS.intersection(received):
                connection.interrupt()

    watcher = threading.Thread(target=interrupt_on_stop, name="spool-check-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        writer.close()
        watcher.join(timeout=5)
        reader.close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


DB_NAME = "spool.db"
#: Locked (flock) by the bridge using the folder, for as long as its spool is open.
LOCK_NAME = "spool.lock"
SCHEMA_VERSION = 1
#: Most expired keys deleted in one transaction.
PURGE_CHUNK = 1000
#: Largest number of appends committed in one transaction.
MAX_GROUP = 1024
#: Bounds of the in-memory copy of the spool. In normal operation it holds only
#: what Kafka has not acknowledged yet, a few hundred records.
COPY_MAX_RECORDS = 10_000
COPY_MAX_BYTES = 8 * 1024 * 1024
#: The reserve file, given up when a removal finds the disk full.
RESERVE_NAME = "spool.reserve"
#: Its size: a 64th of BRIDGE_SPOOL_MAX_BYTES, within these bounds (16 MiB for the
#: default 1 GiB). At least what a checkpoint of a full WAL (SQLite checkpoints at
#: 1,000 pages, 4 MiB) may add to the database, and a removal's own WAL pages: with
#: 1 MiB, a review's 6 MB disk of 200 KB events stayed stuck with Kafka up, the WAL
#: (4.3 MB) unable to go into the database.
RESERVE_BYTES = 16 * 1024 * 1024
RESERVE_MIN_BYTES = 8 * 1024 * 1024
#: How long after a failure to make the reserve (no room) it is tried again.
RESERVE_RETRY_SECONDS = 60.0
#: Without a reserve file, free room under which the spool is unready (disk_low)
#: even with nothing in it: less than an event of a few pages.
PAGE_ROOM = 64 * 1024
#: The mode of the spool's files: they hold event bodies (customer and order data), for
#: the bridge's user only. SQLite gives the -wal and -shm files the database's mode.
FILE_MODE = 0o600
#: The mode of a spool folder the bridge makes.
FOLDER_MODE = 0o700
#: How long a stop waits for the writer thread to finish the jobs queued before it
#: (the drainer's last removals, in milliseconds on a disk that works). A disk that
#: hangs (a network volume gone) held the stop, and the process, until SIGKILL.
CLOSE_WAIT_SECONDS = 5.0
#: A job of the writer thread that has made no progress this long: the disk hangs (a
#: network volume gone). The spool is unready, and appends are refused at once, until
#: it goes on. Progress is SQLite's (its progress handler): a long job that works, an
#: index of a large backlog on a slow volume, goes on stepping; one waiting for the
#: disk does not.
STUCK_AFTER_SECONDS = 10.0


@dataclass(slots=True)
class _Append:
    destination: Destination
    dedup_key: str | None
    size: int
    future: asyncio.Future[bool]


@dataclass(slots=True)
class _Call:
    """Any other job for the writer thread: run ``fn(connection)``."""

    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


_STOP = object()
# About a page: a tiny row may still find room in a page that is already there while
# a real event finds none. Not an idempotency key: HTTP header values hold no NUL.
_PROBE_KEY = "\x00spool-write-probe-" + "x" * 4096


def _freed_bytes(connection: sqlite3.Connection) -> int:
    """The bytes of the database's free pages, which it reuses before it grows; 0 if
    they cannot be read now."""
    try:
        (pages,) = connection.execute("PRAGMA freelist_count").fetchone()
        (size,) = connection.execute("PRAGMA page_size").fetchone()
    except sqlite3.Error:
        return 0
    return int(pages) * int(size)


def check_folder(directory: Path) -> None:
    """Raise :class:`SpoolUnusable` unless ``directory`` is a folder the bridge can
    write in, or one it can make (a trial folder is made in the nearest parent
    there, and removed: as root, os.access says yes to any folder not on a
    read-only mount, and check-config passed BRIDGE_SPOOL_DIR=/proc/x, which serve
    then refused, a review): the spool asks this before opening, and
    ``check-config`` of BRIDGE_SPOOL_DIR, so both refuse the same."""
    try:
        existing = directory  # the folder itself, or the nearest of its parents there
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():  # a file (BRIDGE_SPOOL_DIR=/etc/passwd), or below one
            raise SpoolUnusable(
                f"spool folder {directory} cannot be used ({existing} is not a folder)"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            if existing == directory:
                raise SpoolUnusable(
                    f"spool folder {directory} is not writable (a read-only file system?)"
                )
            raise SpoolUnusable(
                f"spool folder {directory} cannot be made: {existing} is not writable"
            )
        if existing != directory:
            # Only for a folder still to be made: one that is there is opened as it
            # is (a trial in it fails on a full disk, and a bridge must start to
            # drain its spool). Only the making counts: a parent that keeps what is
            # made in it (chattr +a, a security policy) refused a folder the bridge
            # could make and use (a review).
            made = tempfile.mkdtemp(prefix=".bridge-check-", dir=existing)
            with contextlib.suppress(OSError):
                os.rmdir(made)
    except OSError as exc:  # a parent that cannot be looked into, say
        raise SpoolUnusable(f"spool folder {directory} cannot be used ({exc})") from None


def _holds_events(connection: sqlite3.Connection) -> bool:
    try:
        return bool(connection.execute("SELECT EXISTS (SELECT 1 FROM spool)").fetchone()[0])
    except sqlite3.Error:  # a layout this version cannot read: as if it held some
        return True


def _newer(path: Path, version: int, holds: bool) -> str:
    """Why a spool a newer version wrote is refused, and what to do: once that
    version emptied it, the advice to run it until it is empty was a crash loop."""
    said = (
        f"spool file {path} was written by a newer version of the bridge (spool "
        f"schema {version}; this one knows {SCHEMA_VERSION})"
    )
    if holds:
        return (
            f"{said} and may hold accepted events that are not in Kafka yet: run the "
            "newer version until bridge_spool_depth is 0 before going back to this one "
            "(do not delete it)"
        )
    return (
        f"{said} and holds no event: to go back to this version, move {path.name} "
        f"and its {path.name}-wal and {path.name}-shm files aside (the "
        "de-duplication keys go with them: a Geins retry of an event accepted before "
        "may be published again)"
    )


def log_without_its_database(path: Path) -> str | None:
    """Why a write-ahead log without its database (``path`` missing or empty) is
    refused: SQLite would start a new database and drop the log, and right after a
    crash the log may hold every event accepted since the last checkpoint (a review's
    emptied spool.db lost 199 that way, without a word). SQLite itself never leaves it
    so: the database has its first page before the log has any."""
    wal = path.with_name(f"{path.name}-wal")
    try:
        logged = wal.stat().st_size
    except FileNotFoundError:
        return None
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        empty = True
    if not (empty and logged):
        return None
    return (
        f"spool file {path} is missing or empty, but its write-ahead log {wal} "
        f"holds {logged} bytes, which may be accepted events not in Kafka yet: put "
        "back the spool.db that belongs with it (the files spool.db, spool.db-wal "
        "and spool.db-shm go together), or move the log aside to start empty"
    )


def spool_refusal(directory: Path) -> str | None:
    """What opening the spool in ``directory`` would refuse, read without opening it
    (for check-config): a log without its database, or a spool of a newer version."""
    try:
        refusal = log_without_its_database(directory / DB_NAME)
    except OSError:  # not this check's to say: serve's open says it
        refusal = None
    return refusal or newer_spool(directory)


def newer_spool(directory: Path) -> str | None:
    """What opening the spool in ``directory`` would refuse, when a newer version of
    the bridge wrote it (for check-config: a rollback's crash loop, told before it).

    Read without taking the folder (a running bridge may hold it) and without making
    a file there (a read-only connection makes the -wal and -shm files, as whoever
    runs this: a bridge of another user could then not open them): the file itself
    in SQLite's immutable mode, and its write-ahead log as a file (_version_in_log),
    where a newer version killed before its first checkpoint left its version. A log
    with content counts as holding events.
    """
    path = directory / DB_NAME
    wal = path.with_name(f"{DB_NAME}-wal")
    try:
        if not path.is_file():
            return None
        log_size = wal.stat().st_size if wal.exists() else 0
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if log_size:
                logged = _version_in_log(wal)
                version = version if logged is None else logged
            if version <= SCHEMA_VERSION:
                return None
            return _newer(path, version, bool(log_size) or _holds_events(connection))
        finally:
            connection.close()
    except (OSError, sqlite3.Error):  # not this check's to say: serve's open says it
        return None


_WAL_MAGIC = frozenset({0x377F0682, 0x377F0683})
_VERSION_AT = 60  # the database header's user_version, in its first page


def _version_in_log(wal: Path) -> int | None:
    """The spool's version as the last committed copy of the database's first page
    in its write-ahead log says (None when the log holds none). Frame headers only
    are read (SQLite's WAL format: a 32-byte header, then frames of a 24-byte header
    and a page): those of the log's current generation (its salts), whole, up to the
    last that commits a transaction. Checksums are not verified (a whole log's worth
    of Python): a frame torn by a crash could be misread, if it was page 1's."""
    with wal.open("rb") as log_file:
        size = os.fstat(log_file.fileno()).st_size
        head = log_file.read(32)
        if len(head) < 32:
            return None
        magic, _, page_size, _, salt1, salt2 = struct.unpack(">6I", head[:24])
        if magic not in _WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
            return None
        latest: int | None = None  # page 1's version in the latest frame holding it
        committed: int | None = None
        offset = 32
        while offset + 24 + page_size <= size:
            log_file.seek(offset)
            frame = log_file.read(24 + _VERSION_AT + 4)
            page, commits, frame_salt1, frame_salt2 = struct.unpack(">4I", frame[:16])
            if (frame_salt1, frame_salt2) != (salt1, salt2):
                break  # a frame of an earlier generation: the log ends before it
            if page == 1:
                (latest,) = struct.unpack(">i", frame[24 + _VERSION_AT : 24 + _VERSION_AT + 4])
            if commits and latest is not None:
                committed = latest
            offset += 24 + page_size
        return committed


class Spool:
    """A crash-safe FIFO of Kafka records, plus the accepted-keys record."""

    outlives_the_process = True  # see Backlog

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        dedup_window: float,
        max_keys: int = 5_000_000,
        on_commit: Callable[[float], None] | None = None,
        on_set_aside: Callable[[int], None] | None = None,
        drain_only: bool = False,
    ) -> None:
        """``drain_only``: a spool another ack mode only empties (:mod:`bridge.leftover`):
        no reserve file made, nor deliveries said to be refused for want of one.
        ``on_set_aside``: told how many rows it could not read back (see
        _set_aside), from the writer thread."""
        self._on_set_aside = on_set_aside
        #: Rows it could not read back, set aside since it opened (see _set_aside)
        self.set_aside = 0
        #: Keys forgotten inside the de-duplication window because ``max_keys`` newer
        #: ones came (bridge_dedup_keys_forgotten_early_total).
        self.keys_forgotten_early = 0
        self._set_aside_failed: list[int] = []  # the seqs whose set-aside failed, as logged
        self.path = directory / DB_NAME
        self._drain_only = drain_only
        self._directory = directory
        self._max_bytes = self.capacity = max_bytes
        self._dedup_window = dedup_window
        self._max_keys = max_keys
        self._on_commit = on_commit
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: sqlite3.Connection | None = None
        self._lock_fd: int | None = None  # the open lock file, while this spool owns the folder
        self._loop: asyncio.AbstractEventLoop | None = None
        # Owned by the writer thread; read (racily, for gauges) by everyone.
        self.depth = 0
        self.bytes = 0
        self.keys = 0  # accepted keys remembered, expired ones not purged yet included
        # What _key_time counts from: a time on the wall clock, and the monotonic then
        self._key_clock = (time.time(), time.monotonic())
        #: What the spool held when it was opened: topic -> (events, dead letters among them)
        self.topics_at_open: dict[str, tuple[int, int]] = {}
        self.oldest_enqueued_at: float | None = None
        self.writable = True
        #: Why the spool takes no event for good: its files are not at its path any more
        self.lost_files: str | None = None
        self._files: dict[Path, tuple[int, int]] = {}  # see _file_identities
        self._wal = directory / (DB_NAME + "-wal")
        # Owned by the writer thread. When ``_copy_complete``, ``_copy`` holds every
        # record in the file; otherwise it is empty and the file is read.
        self._copy = RecordFifo()
        self._copy_complete = False
        # The file has spool_by_topic (made only while needed: see _read_oldest), and
        # whether making it was tried since the spool was last empty.
        self._topic_index = False
        self._topic_index_tried = False
        # since when (monotonic) reads have left topics out, without a pause
        self._skipping_since: float | None = None
        self._last_seq = 0
        self._closed = False  # set by close(): no job may be queued after the stop
        self._reserve = directory / RESERVE_NAME
        self._reserve_bytes = min(RESERVE_BYTES, max(RESERVE_MIN_BYTES, max_bytes // 64))
        self._reserve_made = False  # the reserve file is there (owned by the writer thread)
        self._reserve_next_try = 0.0  # after a failure to make it: not before (monotonic)
        # The disk's free room as the writer thread last read it: a scrape reads this,
        # not the disk, so that a hung volume cannot stop the event loop. With the
        # pages the database freed (_reusable), which it fills again before it grows.
        self._disk_free = math.nan
        self._reusable = 0
        self._job_began: float | None = None  # when the writer thread took its current job
        # How long the last job went without progress, when that made it stuck; and
        # whether the current job made a commit that waited for the disk (fsync)
        self._last_job_stalled: float | None = None
        self._synced = False
        #: Without a reserve, the disk has no more free room than removing what the
        #: spool holds needs (owned by the writer thread; read by readiness).
        self.disk_low = False

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        on_commit: Callable[[float], None] | None = None,
        on_set_aside: Callable[[int], None] | None = None,
        drain_only: bool = False,
    ) -> Spool:
        """The spool in BRIDGE_SPOOL_DIR, with the settings' limits."""
        return cls(
            settings.spool_dir,
            max_bytes=settings.spool_max_bytes,
            dedup_window=settings.dedup_window,
            max_keys=settings.spool_max_keys,
            on_commit=on_commit,
            on_set_aside=on_set_aside,
            drain_only=drain_only,
        )

    # --- lifecycle -------------------------------------------------------------------

    def connect(self) -> None:
        """Open (or create) the database; :class:`SpoolUnusable` if it cannot be used.

        Called before the server listens, so a bad spool stops startup with a plain
        message. A file that cannot be read may hold events that were answered 2xx,
        so it is never replaced.

        Takes the folder's lock first, held until :meth:`close` (or the process's
        end): a second bridge on the same folder would drain, and so publish, the
        same records twice and share the accepted-keys record.
        """
        if self._connection is None:
            self._connection = self._open_connection()

    def release(self) -> None:
        """Close a spool that was connected and never opened: the database, and the
        folder's lock."""
        if self._thread is not None:
            raise RuntimeError("the spool was opened: close() it")
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
            self._connection = None
        self._unlock()

    def open(self) -> None:
        """Connect (if not done yet) and start the writer thread."""
        self.connect()
        connection, self._connection = self._connection, None
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="spool-writer", daemon=True
        )
        self._thread.start()

    def _open_connection(self) -> sqlite3.Connection:
        check_folder(self._directory)
        try:
            self._directory.mkdir(FOLDER_MODE, parents=True, exist_ok=True)
            self._lock()
            try:
                self._check_wal_has_its_database()
                connection = self._connect()
            except BaseException:
                self._unlock()
                raise
            if self._drain_only:  # an existing reserve is kept, to give up if need be
                self._reserve_made = self._reserve.exists()
            else:
                self._make_reserve()
            self._reusable = _freed_bytes(connection)
            self._files = self._file_identities()
            # Without a reserve, a disk without its room is said by /readyz from the
            # start, not at the first 503.
            self._check_room(read_disk=True)
            # Said once, absolute: events answered 2xx live here until Kafka has them,
            # and a relative BRIDGE_SPOOL_DIR depends on where the bridge was started.
            if not self._drain_only:
                log.info("spool: events are kept in the folder %s", self._directory.resolve())
            return connection
        except OSError as exc:
            raise SpoolUnusable(f"spool folder {self._directory} cannot be used ({exc})") from None
        except sqlite3.OperationalError as exc:  # e.g. disk full, read-only, locked
            if str(exc) == "interrupted":  # only a stop signal does it (_stopped_by_signals)
                raise SpoolOpeningStopped(f"the opening of {self.path} was stopped") from None
            raise SpoolUnusable(f"spool file {self.path} cannot be opened: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise SpoolUnusable(
                f"spool file {self.path} cannot be opened ({exc}). It may hold accepted "
                "events that are not in Kafka yet: move it aside (keep a copy to inspect "
                "with sqlite3) and start again with an empty spool"
            ) from None

    def _check_wal_has_its_database(self) -> None:
        if (refusal := log_without_its_database(self.path)) is not None:
            raise SpoolUnusable(refusal)

    def _lock(self) -> None:
        """Take the folder's lock, or raise SpoolUnusable if another process holds it.

        flock, not a pid file: the kernel drops it when its holder dies, even by
        SIGKILL, so a crash never leaves the folder locked.
        """
        if self._lock_fd is not None:
            return
        path = self._directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolUnusable(
                f"spool folder {self._directory} is in use by another bridge (it holds "
                f"{path}); each bridge needs a BRIDGE_SPOOL_DIR of its own"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _file_identities(self) -> dict[Path, tuple[int, int]]:
        """The folder's and its files' (device, inode), as they are now: the folder,
        its lock, the database and its write-ahead log (when there is one)."""
        found: dict[Path, tuple[int, int]] = {}
        for path in (self._directory, self._directory / LOCK_NAME, self.path, self._wal):
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                found[path] = (info.st_dev, info.st_ino)
        return found

    def _check_files(self) -> str | None:
        """Stop taking events once the files at the spool's path are no longer the ones
        it has open (deleted by a clean-up job, the folder moved aside and made again, a
        volume unmounted lazily): SQLite writes on into the files it holds, which no
        start will find, and the bridge answered 202 for events lost with them. For
        good (``lost_files``, returned): what it holds still goes to Kafka, nothing new
        comes in. About 10 µs: a stat() of the folder and of each file."""
        if self.lost_files is not None or not self._files:
            return self.lost_files
        try:
            now = self._file_identities()
        except OSError as exc:  # not a verdict: a commit says whether the disk works
            log.debug("cannot look at the spool's files: %s", exc)
            return None
        gone = [
            "the folder" if path == self._directory else path.name
            for path, identity in self._files.items()
            if now.get(path) != identity
        ]
        if gone:
            self.lost_files = (
                f"the spool's files are no longer at {self._directory} (deleted, or "
                f"replaced: {', '.join(gone)}); what this bridge still holds is not kept "
                "there, and it takes no event until it is restarted"
            )
            self._set_writable(False, self.lost_files)
        return self.lost_files

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the lock
            self._lock_fd = None

    def _make_private(self) -> None:
        """Make the database file (empty: SQLite takes it for a new database) with
        FILE_MODE before SQLite does (it would make it 0644, less the umask), and give
        the files of a spool made by an earlier version that mode."""
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        for path in (
            self.path,
            *(Path(f"{self.path}{s}") for s in ("-wal", "-shm")),
            self._reserve,
        ):
            try:
                if path.stat().st_mode & 0o777 != FILE_MODE:
                    path.chmod(FILE_MODE)
                    log.info("spool: %s is made readable by the bridge's user only", path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # not the bridge's own file, say: it can still be used
                log.warning(
                    "spool: cannot make %s readable by the bridge's user only (%s)", path, exc
                )

    def _connect(self) -> sqlite3.Connection:
        self._make_private()
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            # Debian's SQLite zeroes every page a delete frees (SECURE_DELETE), so each
            # removal wrote the records' pages to the WAL again: as much as their
            # appends, and more room than a full disk has. FAST zeroes only within
            # pages written anyway; what the free pages still hold was published.
            connection.execute("PRAGMA secure_delete=FAST")
            size = self.path.stat().st_size
            if size >= SLOW_CHECK_BYTES:  # or it looks like a hang (see deploy/README.md)
                log.info(
                    "checking the spool file (%.1f GB) before serving: about a minute per "
                    "2 GB from a cold disk cache",
                    size / 1e9,
                )
            # Before the check, which takes a minute per 2 GB: a rollback over a spool a
            # newer version wrote is said at once, and not as damage (moving the file
            # aside, the advice for a damaged one, would strand its events).
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SpoolUnusable(_newer(self.path, version, _holds_events(connection)))
            started = time.monotonic()
            # A Python call every few thousand SQLite steps lets a signal's handler run
            # during the check (bridge.server._EarlyStop): SIGTERM stops a bridge that
            # has not served yet. quick_check walks each table in one step, so the
            # signal also interrupts the statement itself (_stopped_by_signals).
            connection.set_progress_handler(_let_signals_in, PROGRESS_STEPS)
            with _stopped_by_signals(connection):
                check = connection.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            if size >= SLOW_CHECK_BYTES:
                log.info("spool file checked in %.1f s", time.monotonic() - started)
            if version not in (0, SCHEMA_VERSION):  # a negative one: not a version we wrote
                raise sqlite3.DatabaseError(f"unknown spool schema version {version}")
            connection.executescript(
                """
                CREATE TABLE IF NOT EXISTS spool (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    topic TEXT NOT NULL,
                    key BLOB NOT NULL,
                    value BLOB NOT NULL,
                    headers BLOB NOT NULL,
                    size INTEGER NOT NULL,
                    enqueued_at REAL NOT NULL
                );
                CREATE TABLE IF NOT EXISTS seen (
                    key TEXT PRIMARY KEY,
                    accepted_at REAL NOT NULL
                ) WITHOUT ROWID;
                CREATE INDEX IF NOT EXISTS seen_by_time ON seen (accepted_at);
                """
            )
            self._topic_index = _has_topic_index(connection)
            if version != SCHEMA_VERSION:  # written once: opening must not need free space
                connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            depth, size, last_row = connection.execute(
                # A size that is no integer (a damaged row) counts as 0, as a removal
                # takes it: sum() took '40x' as 40, and bytes never went back to 0.
                "SELECT count(*), "
                "coalesce(sum(CASE WHEN typeof(size) = 'integer' THEN size ELSE 0 END), 0), "
                "coalesce(max(seq), 0) FROM spool"
            ).fetchone()
            (last_ever,) = connection.execute(
                "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'spool'"
            ).fetchone()
            oldest = _oldest_enqueued_at(connection)
            (keys,) = connection.execute("SELECT count(*) FROM seen").fetchone()
            (latest_key,) = connection.execute("SELECT max(accepted_at) FROM seen").fetchone()
            topics = _topics_held(connection) if depth else {}
            connection.set_progress_handler(None, 0)
        except BaseException:
            connection.close()
            raise
        self.depth, self.bytes, self.oldest_enqueued_at = depth, size, oldest
        self.keys = keys
        self._key_clock = (max(time.time(), latest_key or 0.0), time.monotonic())
        self.topics_at_open = topics
        # Seqs are given here, not by SQLite, so the in-memory copy knows them; never
        # reused, like AUTOINCREMENT's own.
        self._last_seq = max(last_row, last_ever)
        self._copy.clear()
        self._copy_complete = depth == 0
        if depth:
            log.info("spool %s holds %d events (%d bytes) from before", self.path, depth, size)
        return connection

    async def close(self, wait: float = CLOSE_WAIT_SECONDS) -> None:
        """Finish queued work, close the database and release the folder's lock; or
        give up on a disk that does not finish within ``wait`` seconds."""
        if self._thread is not None:
            self._closed = True
            self._jobs.put(_STOP)
            thread = self._thread
            await asyncio.to_thread(thread.join, wait)
            if thread.is_alive():
                # The thread holds the database and the folder's lock: both are let go
                # as the process ends. What was committed is kept by SQLite; records
                # whose removal did not run are sent again at the next start.
                log.error(
                    "the spool's disk did not finish its writes within %g s; stopping "
                    "without closing the spool %s (what it committed is kept; records "
                    "Kafka has whose removal did not run are sent again at the next start)",
                    wait,
                    self._directory,
                )
                return
            self._thread = None
        self.release()  # the connection too, if it was connected and never opened

    # --- what the event loop calls ---------------------------------------------------

    async def append(self, destination: Destination, dedup_key: str | None) -> bool:
        """Commit ``destination`` durably. False if ``dedup_key`` was already accepted.

        Raises :class:`SpoolFull`, :class:`SpoolWriteFailed` or, once closed,
        :class:`ShuttingDown` (all 503).
        """
        if self._closed:
            raise stopping()
        if (stuck := self.stuck()) is not None:  # it would wait as long as the disk
            raise SpoolWriteFailed(stuck)
        if self.lost_files is not None:
            raise SpoolWriteFailed(self.lost_files)
        size = record_size(destination)
        # Refused here without a trip to the writer thread, unless the key may be a
        # retry of an event already safe: the writer checks that first (200 duplicate).
        if dedup_key is None and self.bytes + size > self._max_bytes:
            raise self._full()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Append(destination, dedup_key, size, future))
        try:
            return await future
        finally:
            # A refusal (the future's exception) has this frame in its traceback: the
            # frame kept the future, a cycle that held each refused delivery's body
            # (twice, with the frames above) until the cyclic collector came by, and a
            # full spool refusing large events grew the bridge past its memory limit.
            del future

    def stuck_for(self) -> float | None:
        """Seconds the writer thread's current job has gone without progress, once
        STUCK_AFTER_SECONDS have passed (None before, or when it is idle)."""
        began = self._job_began
        if began is None:
            return None
        running = time.monotonic() - began
        return running if running >= STUCK_AFTER_SECONDS else None

    def stuck(self) -> str | None:
        """Why the spool waits (see stuck_for), as readiness and a refusal say it; or
        why it did until its last job (a disk slow at every write, 12 s an fsync, made
        /readyz 503 only for the last 2 s of each, which no probe saw: now until a job
        goes without such a wait)."""
        stuck = self.stuck_for()
        if stuck is not None:
            return f"the spool's disk has not finished a write for {stuck:.0f} s"
        if (stalled := self._last_job_stalled) is not None:
            return f"the spool's disk took {stalled:.0f} s to finish its last write"
        return None

    def _full(self) -> SpoolFull:
        return SpoolFull(
            f"the spool holds {self.bytes} bytes; the limit is {self._max_bytes} "
            "(BRIDGE_SPOOL_MAX_BYTES). Kafka is probably unreachable"
        )

    async def oldest(
        self,
        limit: int,
        max_bytes: int,
        *,
        skip_seqs: Set[int] = frozenset(),
        skip_topics: Set[str] = frozenset(),
    ) -> list[QueuedRecord]:
        """Up to ``limit`` records (and about ``max_bytes``), oldest first, leaving out
        the records ``skip_seqs`` names and those of ``skip_topics``."""
        return await self._call(  # type: ignore[no-any-return]  # _call is untyped by design
            lambda c: self._read_oldest(c, limit, max_bytes, skip_seqs, skip_topics)
        )

    async def remove(self, seqs: Sequence[int]) -> None:
        """Forget records Kafka acknowledged."""
        if seqs:
            await self._call(lambda c: self._remove(c, seqs))

    async def forget_expired_keys(self) -> int:
        """Drop accepted keys older than the de-duplication window, then the oldest
        beyond ``max_keys``; proves writability.

        Works in chunks of PURGE_CHUNK keys, each its own job for the writer thread,
        so appends waiting meanwhile are committed between chunks instead of behind
        one long delete (at 2,000 events/s a 5-second round expires 10,000 keys).
        """
        removed = 0
        while True:
            chunk: int = await self._call(self._purge)
            removed += chunk
            if chunk < PURGE_CHUNK:
                return removed

    async def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._closed:
            raise stopping()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Call(fn, future))
        try:
            return await future
        finally:
            del future  # see append

    # --- the writer thread -----------------------------------------------------------

    def _run(self, connection: sqlite3.Connection) -> None:
        # After the stop, the jobs still queued are done before the thread ends: each
        # has a coroutine waiting for it (a removal left undone would send its records
        # again), and close() lets no new job in.
        stopping = False
        connection.set_progress_handler(self._progressing, PROGRESS_STEPS)
        try:
            while True:
                try:
                    job = self._jobs.get_nowait() if stopping else self._jobs.get()
                except queue.Empty:
                    return
                if job is _STOP:
                    stopping = True
                    continue
                self._job_began = time.monotonic()  # read by stuck_for, from the loop
                try:
                    if isinstance(job, _Append):
                        group = [job]
                        stopping |= self._gather_group(group)
                        try:
                            if (lost := self._check_files()) is not None:
                                self._resolve([(a.future, SpoolWriteFailed(lost)) for a in group])
                            else:
                                self._commit_appends(connection, group)
                        except Exception:  # a bug: no request may wait forever for it
                            self._after_unexpected_error([item.future for item in group])
                    else:
                        self._run_call(connection, job)
                finally:
                    self._job_done()
                    self._job_began, self._synced = None, False
        finally:
            connection.close()

    def _progressing(self) -> int:
        """SQLite's progress handler, every PROGRESS_STEPS steps of a statement: the
        job goes on (see stuck_for). 0: go on."""
        if self._job_began is not None:
            self._job_began = time.monotonic()
        return 0

    def _gather_group(self, group: list[_Append]) -> bool:
        """Take every append already waiting into ``group``; True if a stop came too.

        Other jobs found meanwhile run after the group (they are never urgent).
        """
        later: list[Any] = []
        stop = False
        while len(group) < MAX_GROUP:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Append):
                group.append(job)
            elif job is _STOP:
                stop = True
            else:
                later.append(job)
        for job in later:
            self._jobs.put(job)
        return stop

    def _key_time(self) -> float:
        """The time accepted keys are stamped with, and their window measured by: the
        wall clock as it was when the spool was opened (or the newest key's stamp, if
        later), moved on by the monotonic clock. On the wall clock itself, an NTP step
        forward while the bridge ran expired every key at once (a Geins retry published
        again), and one back made the newest keys the oldest (forgotten first at
        BRIDGE_SPOOL_MAX_KEYS). Only between two runs does the wall clock count."""
        wall, ticks = self._key_clock
        return wall + (time.monotonic() - ticks)

    def _commit_appends(self, connection: sqlite3.Connection, group: list[_Append]) -> None:
        started = time.perf_counter()
        now, key_time = time.time(), self._key_time()  # enqueued_at, the keys' stamp
        results: list[bool | BridgeError] = []
        added_bytes = 0
        added: list[tuple[QueuedRecord, int]] = []
        room = self._room()
        try:
            connection.execute("BEGIN IMMEDIATE")
            # One statement per kind for the whole group, not three per record: the
            # Python around each execute() costs more than SQLite's work, and this
            # thread holds the GIL the event loop needs meanwhile.
            already, expired = self._known_among(
                connection,
                [item.dedup_key for item in group if item.dedup_key is not None],
                key_time,
            )
            rows: list[tuple[object, ...]] = []
            seen_rows: list[tuple[str, float]] = []
            for item in group:
                key = item.dedup_key
                if key is not None and key in already:
                    results.append(False)
                    continue
                over = self.bytes + added_bytes + item.size > self._max_bytes
                refusal = self._full() if over else room(added_bytes, item.size)
                if refusal is not None:
                    results.append(refusal)
                    continue
                d = item.destination
                self._last_seq += 1  # a rolled-back group leaves a gap, which is harmless
                added.append((QueuedRecord(self._last_seq, d, now), item.size))
                rows.append(
                    (
                        self._last_seq,
                        d.topic,
                        d.key,
                        d.value,
                        orjson.dumps(_headers_json(d.headers)),
                        item.size,
                        now,
                    )
                )
                if key is not None:
                    already.add(key)  # a second copy in the same group is a duplicate
                    seen_rows.append((key, key_time))
                added_bytes += item.size
                results.append(True)
            if rows:
                connection.executemany(
                    "INSERT INTO spool (seq, topic, key, value, headers, size, enqueued_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            if seen_rows:
                connection.executemany(
                    "INSERT OR REPLACE INTO seen (key, accepted_at) VALUES (?, ?)", seen_rows
                )
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(connection)
            self._set_writable(False, str(exc))
            # One error each: a request's refusal is its own to add to (the pipeline
            # does, for a dead letter it could not keep): one shared, each client's
            # answer held the refusals of those answered before it.
            because = f"the spool cannot be written ({exc})"
            self._resolve([(item.future, SpoolWriteFailed(because)) for item in group])
            return
        except BaseException:  # not SQLite's: no transaction may stay open after it
            _rollback(connection)
            raise
        if rows:  # a commit that wrote nothing (all duplicates, or full) proves nothing
            self._fsynced()
        self._count_appended(added, added_bytes, sum(k not in expired for k, _ in seen_rows))
        self._keep_copies(added)
        if rows and self._on_commit is not None:  # (one that wrote nothing is no commit of events)
            self._on_commit(time.perf_counter() - started)
        self._resolve([(item.future, result) for item, result in zip(group, results, strict=True)])

    def _count_appended(
        self, added: list[tuple[QueuedRecord, int]], added_bytes: int, new_keys: int
    ) -> None:
        self.depth += len(added)
        self.bytes += added_bytes
        self.keys += new_keys
        if added and self.oldest_enqueued_at is None:
            self.oldest_enqueued_at = added[0][0].enqueued_at
        self._check_room()  # what is left now, for readiness

    def _after_unexpected_error(self, futures: list[asyncio.Future[bool]]) -> None:
        log.exception("the spool writer failed unexpectedly")
        # Whether the group was committed is unknown: the file is the truth, so the
        # drainer reads it instead of the copy, and the senders retry (a committed
        # key answers 200 duplicate then).
        self._copy.clear()
        self._copy_complete = False
        because = "the spool writer failed unexpectedly"  # one error each, as above
        self._resolve([(future, SpoolWriteFailed(because)) for future in futures])

    def _known_among(
        self, connection: sqlite3.Connection, keys: list[str], now: float
    ) -> tuple[set[str], set[str]]:
        """Which of ``keys`` were accepted within the de-duplication window, and which
        are still recorded from before it (accepted again, their row is replaced, not
        added: they must not count twice against ``max_keys``)."""
        if self._dedup_window <= 0 or not keys:
            return set(), set()
        # MAX_GROUP keys at most: well under SQLite's limit of 32,766 parameters.
        marks = ",".join("?" * len(keys))
        rows = connection.execute(
            f"SELECT key, accepted_at FROM seen WHERE key IN ({marks})",  # noqa: S608  # only placeholders
            keys,
        )
        cutoff = now - self._dedup_window
        recent: set[str] = set()
        expired: set[str] = set()
        for key, accepted_at in rows:
            (recent if accepted_at >= cutoff else expired).add(key)
        return recent, expired

    def _keep_copies(self, committed: list[tuple[QueuedRecord, int]]) -> None:
        if not self._copy_complete:
            return
        for record, size in committed:
            self._copy.push(record, size)
        if len(self._copy) > COPY_MAX_RECORDS or self._copy.bytes > COPY_MAX_BYTES:
            # Kafka is not keeping up: read the file from now on, until it is empty.
            self._copy.clear()
            self._copy_complete = False

    def _read_oldest(
        self,
        connection: sqlite3.Connection,
        limit: int,
        max_bytes: int,
        skip_seqs: Set[int],
        skip_topics: Set[str],
    ) -> list[QueuedRecord]:
        if self._copy_complete:
            return self._copy.take(limit, max_bytes, skip_seqs, skip_topics)
        records: list[QueuedRecord] = []
        total = 0
        rows: Iterable[tuple[Any, ...]]
        now = time.monotonic()
        if not skip_topics:
            self._skipping_since = None
        elif self._skipping_since is None:
            self._skipping_since = now
        skipping_for = 0.0 if self._skipping_since is None else now - self._skipping_since
        if (
            skip_topics
            and not self._topic_index
            and not self._topic_index_tried
            and skipping_for >= INDEX_AFTER_SECONDS
        ):
            # Topics on hold while more waits than the in-memory copy holds: their rows
            # would be read past in every round, more of them each time. An index by
            # topic lets a read skip them, but costs every append a second insert
            # (about 5 µs of CPU per event in durable mode): made now, dropped once the
            # spool is empty again. Not for topics left out a moment (a probe each, at a
            # start, as the producer learns their metadata): built then, it held every
            # append for a second at each restart over a million events (a review).
            self._topic_index_tried = True
            self._topic_index = _index_by_topic(connection)
        not_skipped, skipped = _not_skipped(skip_seqs)
        if skip_topics and self._topic_index and _holds_many(connection, skip_topics):
            # each topic's oldest, past those left out as read (more than SQL_SKIP_MAX)
            per_topic = limit + (0 if not_skipped else len(skip_seqs))
            rows = _oldest_by_topic(connection, per_topic, skip_topics, not_skipped, skipped)
        elif skip_topics:  # few held, or no index (no room to make it): past them in order
            marks = ",".join("?" * len(skip_topics))
            also = f" AND {not_skipped}" if not_skipped else ""
            rows = connection.execute(
                f"{_SELECT_RECORDS} WHERE topic NOT IN ({marks}){also} ORDER BY seq",  # ?s only
                (*skip_topics, *skipped),
            )
        else:  # read lazily, as far as needed past the skipped seqs
            where = f" WHERE {not_skipped}" if not_skipped else ""
            rows = connection.execute(f"{_SELECT_RECORDS}{where} ORDER BY seq", skipped)
        unreadable: dict[int, str] = {}
        for row in rows:
            seq = row[0]
            if seq in skip_seqs:
                continue
            try:
                record = _record(row)
            except (ValueError, TypeError, AttributeError, UnicodeError) as exc:
                unreadable[seq] = str(exc)
                continue
            size = row[5]
            if len(records) >= limit or (records and total + size > max_bytes):
                break
            total += size
            records.append(record)
        if unreadable:
            self._set_aside(connection, unreadable)
        return records

    def _set_aside(self, connection: sqlite3.Connection, unreadable: dict[int, str]) -> None:
        """Move rows that cannot be read back (a damaged byte PRAGMA quick_check does not
        see, a foreign row) to the table spool_unreadable of the same file, and say so.
        One such row stopped every delivery for good: each read of the oldest failed,
        while the bridge went on answering 202 until the spool was full."""
        seqs = sorted(unreadable)
        try:  # copied and deleted in one transaction: never kept twice
            self._remove_making_room(connection, seqs, keep_in="spool_unreadable")
        except sqlite3.Error as exc:  # read past again next time: the others go on
            if self._set_aside_failed != seqs:  # said once, not at every round
                self._set_aside_failed = seqs
                log.error(
                    "spool: cannot set aside unreadable rows %s of %s: %s", seqs, self.path, exc
                )
            return
        log.error(
            "spool: %d accepted event(s) in %s cannot be read back (%s: %s) and are set "
            "aside in its table spool_unreadable, not published: the others go on",
            len(seqs),
            self.path,
            ", ".join(f"seq {seq}" for seq in seqs[:10]),
            unreadable[seqs[0]],
        )
        self.set_aside += len(seqs)
        if self._on_set_aside is not None:
            self._on_set_aside(len(seqs))

    def _remove(self, connection: sqlite3.Connection, seqs: Sequence[int]) -> None:
        self._remove_making_room(connection, seqs)
        if self.depth == 0:
            self._remake_reserve(connection)

    def _remove_making_room(
        self, connection: sqlite3.Connection, seqs: Sequence[int], keep_in: str | None = None
    ) -> None:
        """_remove_rows, giving up the reserve file when the disk is too full for it: a
        removal, and a set-aside too (which copies the rows before it deletes them)."""
        try:
            self._remove_rows(connection, seqs, keep_in=keep_in)
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc) or not self._give_up_reserve(exc):
                raise
            self._remove_rows(connection, seqs, keep_in=keep_in)

    def _remake_reserve(self, connection: sqlite3.Connection) -> None:
        """Make the reserve again, the spool being empty: first give the WAL file's
        room back (it keeps the size of the largest backlog, which on a volume smaller
        than the spool may grow is the room the reserve needs)."""
        if (
            not self._reserve_made
            and not self._drain_only
            and time.monotonic() >= self._reserve_next_try
        ):
            with contextlib.suppress(sqlite3.Error):  # busy or failed: it is tried again
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._make_reserve()
        self._check_room()  # emptied: readiness need not wait for the reserve's next try

    def _make_reserve(self) -> None:
        """Make the reserve file, if there is room for it (else try again next time)."""
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                # Blocks allocated now (a sparse file would give nothing back)
                os.posix_fallocate(fd, 0, self._reserve_bytes)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._reserve.unlink()  # a part of it is no reserve
            if self._reserve_next_try == 0.0:  # said once, not at every try
                log.warning(
                    "%s the spool's reserve file (%d bytes) (%s): the free room is kept "
                    "instead, deliveries being refused while it is all that removing what "
                    "the spool holds needs; %s",
                    # not every failure is the disk's: out of file descriptors, say (a
                    # review: EMFILE said as "no room")
                    "no room on its disk for" if exc.errno == errno.ENOSPC else "cannot make",
                    self._reserve_bytes,
                    exc,
                    "make room, or give the spool a larger volume"
                    if exc.errno == errno.ENOSPC
                    else "see the error",
                )
            # Not at every emptying (every drainer round at a trickle): once a minute
            self._reserve_next_try = time.monotonic() + RESERVE_RETRY_SECONDS
            return
        if self._reserve_next_try != 0.0:
            log.info("the spool's reserve file is made again")
        self._reserve_made = True
        self._reserve_next_try = 0.0

    def _give_up_reserve(self, exc: sqlite3.OperationalError) -> bool:
        """Delete the reserve file to make room; False if there was none."""
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            self._reserve_made = False
            return False
        self._reserve_made = False
        full = getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_IOERR_WRITE
        log.warning(
            "the spool's disk %s: its reserve file (%d bytes) is given up so that the "
            "events Kafka took can be removed; it is made again once the spool is empty",
            # SQLite tells a quota's EDQUOT and a failing disk's EIO alike
            "is full"
            if full
            else f"refused a write ({exc}: a disk quota full, or the disk failing)",
            self._reserve_bytes,
        )
        return True

    def disk_free_bytes(self) -> float:
        """Room on the spool's disk for what the spool may still take (the
        bridge_spool_disk_free_bytes gauge): its free bytes, and the pages the database
        freed as Kafka took their events, which SQLite fills again before it grows the
        file (a drained backlog left its file that large, and BridgeSpoolDiskShort fired
        for ever on an empty spool). As the writer thread last read it: at the open, at
        each maintenance round, and at each commit while there is no reserve file. NaN
        when it cannot be read."""
        return self._disk_free

    def _free_bytes(self) -> int | None:
        """Free room on the spool's disk, for its user; None if unknown."""
        try:
            stat = os.statvfs(self._directory)
        except OSError:
            self._disk_free = math.nan
            return None
        free: int = stat.f_bavail * stat.f_frsize
        self._disk_free = float(free + self._reusable)
        return free

    def _kept(self, holding: int) -> int:
        """Room to keep free, without a reserve file, for removing ``holding`` bytes of
        events: their deletes' WAL pages and its checkpoint, about twice their bytes,
        never more than the reserve's size."""
        return min(self._reserve_bytes, 2 * holding)

    def _room(self) -> Callable[[int, int], SpoolFull | None]:
        """For a group of appends: whether one more event of ``size`` bytes, after
        ``added`` bytes of the group, leaves the room removals need (written twice: to
        the WAL, then the database); the refusal if not. Always fine with a reserve."""
        free = None if self._reserve_made else self._free_bytes()
        if free is None:  # a reserve, or nothing known: the commit says if there is room
            return lambda added, size: None

        def check(added: int, size: int) -> SpoolFull | None:
            kept = self._kept(self.bytes + added + size)
            if free - 2 * (added + size) >= kept:
                return None
            return SpoolFull(
                f"the spool's disk has {free - 2 * added} bytes free, and {kept} are kept "
                "so that what Kafka takes can be removed. Kafka is probably unreachable, "
                "or the volume is smaller than BRIDGE_SPOOL_MAX_BYTES needs"
            )

        return check

    def _check_room(self, *, read_disk: bool = False) -> None:
        """Whether the disk has, without a reserve file, no more than the room removing
        what the spool holds needs: said by readiness and the log (disk_low). With a
        reserve, the disk is read only when ``read_disk`` asks (for the gauge)."""
        free = self._free_bytes() if read_disk or not self._reserve_made else None
        if self._reserve_made or free is None:
            self._say_disk_low(False)
        else:
            self._say_disk_low(free < self._kept(self.bytes) + PAGE_ROOM)

    def _say_disk_low(self, low: bool) -> None:
        if low == self.disk_low or self._drain_only:  # no delivery to refuse there
            return
        self.disk_low = low
        if low:
            log.warning(
                "the spool's disk is nearly full, and it has no reserve file: deliveries "
                "are refused while the room to remove what the spool holds is all that "
                "is left (at most %d bytes, the reserve's size)",
                self._reserve_bytes,
            )
        else:
            log.info("the spool's disk has room again: deliveries are accepted")

    def _fsynced(self) -> None:
        """A commit that wrote, and waited for the disk (synchronous=FULL), went through."""
        self._set_writable(True)
        self._synced = True

    def _set_writable(self, writable: bool, why: str = "") -> None:
        """Say when writing starts failing (ERROR, once) and works again (INFO), not at
        every failed commit: at 150 requests a second a full disk logged 5,561 ERROR
        lines in 35 s. Each refused delivery has its own line (bridge.ingress)."""
        if writable == self.writable or (writable and self.lost_files is not None):
            return
        self.writable = writable
        if writable:
            log.info("the spool can be written again")
        else:
            log.error("spool write failed: %s", why)

    def _remove_rows(
        self, connection: sqlite3.Connection, seqs: Sequence[int], keep_in: str | None = None
    ) -> None:
        """Delete the rows ``seqs`` (copied first, in the same transaction, to the table
        ``keep_in`` when given: see _set_aside)."""
        # Losing a removal in a crash only means sending that record again, which
        # at-least-once allows: this commit need not wait for the disk.
        connection.execute("PRAGMA synchronous=NORMAL")
        try:
            connection.execute("BEGIN IMMEDIATE")
            if keep_in is not None:
                connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {keep_in} AS SELECT * FROM spool WHERE 0"  # noqa: S608  # our own name
                )
            sizes: list[int] = []
            # execute(), not executemany(): executemany discards what RETURNING
            # returns, and the sizes are what frees the capacity. The counters are
            # updated from the deleted rows rather than recounted: count(*) reads
            # the whole table, and while Kafka catches up the table is large.
            for start in range(0, len(seqs), MAX_GROUP):
                chunk = seqs[start : start + MAX_GROUP]
                marks = ",".join("?" * len(chunk))
                if keep_in is not None:
                    connection.execute(
                        f"INSERT INTO {keep_in} SELECT * FROM spool WHERE seq IN ({marks})",  # noqa: S608  # our own name, placeholders
                        tuple(chunk),
                    )
                rows = connection.execute(
                    f"DELETE FROM spool WHERE seq IN ({marks}) RETURNING size",  # noqa: S608  # only placeholders
                    tuple(chunk),
                ).fetchall()
                # (a damaged row's size that is no number: 0, as sum(size) took it)
                sizes += (size if isinstance(size, int) else 0 for (size,) in rows)
            oldest = _oldest_enqueued_at(connection)
            connection.execute("COMMIT")
        except BaseException:  # any: no transaction may stay open (every append failed)
            _rollback(connection)
            raise
        finally:
            connection.execute("PRAGMA synchronous=FULL")
        self.depth -= len(sizes)
        self.bytes -= sum(sizes)
        self.oldest_enqueued_at = oldest
        self._copy.discard(seqs)
        if self.depth == 0:
            self._copy_complete = True  # the (empty) copy holds everything again
            self._topic_index_tried = False
            if self._topic_index:  # not needed until topics are held with a large backlog
                self._topic_index = not _drop_topic_index(connection)

    def _purge(self, connection: sqlite3.Connection) -> int:
        self._check_files()  # said within a round even while nothing is appended
        cutoff = self._key_time() - max(self._dedup_window, 0)
        try:
            # Each DELETE commits on its own (autocommit), so the count follows each:
            # counted after both, a failure of the second left the first's keys
            # counted for ever (bridge_dedup_keys too high, and every later round
            # forgot that many keys more than the bound asks).
            removed: int = connection.execute(
                "DELETE FROM seen WHERE key IN "
                "(SELECT key FROM seen WHERE accepted_at < ? LIMIT ?)",
                (cutoff, PURGE_CHUNK),
            ).rowcount
            self.keys = max(self.keys - removed, 0)
            excess = min(self.keys - self._max_keys, PURGE_CHUNK - removed)
            if excess > 0:
                over: int = connection.execute(
                    "DELETE FROM seen WHERE key IN "
                    "(SELECT key FROM seen ORDER BY accepted_at LIMIT ?)",
                    (excess,),
                ).rowcount
                self.keys = max(self.keys - over, 0)
                # None of them expired: those went first, and fewer than a chunk did.
                self.keys_forgotten_early += over
                removed += over
            # A DELETE that matched nothing wrote nothing, so it proves nothing: on a
            # full disk it succeeds, on a slow one it is quick. Only a commit that wrote
            # (fsynced: synchronous=FULL) may say writable, or quick, again.
            probe = removed == 0 and (not self.writable or self._last_job_stalled is not None)
            if probe:
                _write_probe(connection)
        except sqlite3.Error as exc:
            self._set_writable(False, str(exc))
            self._check_room(read_disk=True)  # the gauge's reading: most wanted now
            raise
        if removed or probe:
            self._fsynced()
        if self.depth == 0:
            self._remake_reserve(connection)
        self._reusable = _freed_bytes(connection)
        self._check_room(read_disk=True)  # also the gauge's reading, every round
        return removed

    def _run_call(self, connection: sqlite3.Connection, job: _Call) -> None:
        try:
            result = job.fn(connection)
        except Exception as exc:  # handed to the awaiting coroutine, which decides
            self._resolve([(job.future, exc)])
        else:
            self._resolve([(job.future, result)])

    def _job_done(self) -> None:
        """Keep what stuck() says after this job: that it waited on the disk, until a
        job whose commit waited for the disk (an append's, or the maintenance round's,
        every 5 s: see _purge) finishes without such a wait. A read, or a removal (not
        fsynced), tells nothing of it: one after each slow commit made a disk slow at
        every write ready again at once. Also before a job's outcome is sent: who hears
        of it finds this said."""
        began = self._job_began
        if began is None:
            return
        waited = time.monotonic() - began
        if waited >= STUCK_AFTER_SECONDS:
            self._last_job_stalled = waited
        elif self._synced:
            self._last_job_stalled = None

    def _resolve(self, outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
        self._job_done()
        assert self._loop is not None  # noqa: S101  # open() set it before the thread started
        # Closed: a writer that close() gave up on (a hung disk) finished after the
        # bridge stopped; nobody waits for these any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, outcomes)


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in outcomes:
        if future.done():  # the awaiting request was cancelled (client gone)
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite failed for want of disk space: SQLITE_FULL (ENOSPC), or a write
    refused otherwise (SQLITE_IOERR_WRITE), which a disk quota's EDQUOT is: the reserve
    given up frees quota as it frees disk."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE) or "full" in str(exc)


def _oldest_enqueued_at(connection: sqlite3.Connection) -> float | None:
    """When the head of the queue was appended (by seq: the FIFO order, and a
    primary-key lookup where min(enqueued_at) would read every row)."""
    row = connection.execute("SELECT enqueued_at FROM spool ORDER BY seq LIMIT 1").fetchone()
    if row is None or not isinstance(row[0], float | int):  # none, or a damaged row's
        return None
    return float(row[0])


def _write_probe(connection: sqlite3.Connection) -> None:
    """Commit a row of about a page (fsynced, like an append) and delete it again;
    raises if the spool cannot be written."""
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT OR REPLACE INTO seen (key, accepted_at) VALUES (?, 0)", (_PROBE_KEY,)
        )
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)
        raise
    connection.execute("DELETE FROM seen WHERE key = ?", (_PROBE_KEY,))


def _rollback(connection: sqlite3.Connection) -> None:
    try:
        connection.execute("ROLLBACK")
    except sqlite3.Error:
        log.debug("rollback after a failed spool transaction failed too", exc_info=True)


def _headers_json(headers: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    # latin-1 maps every byte to one code point, so any header value round-trips.
    return [(name, value.decode("latin-1")) for name, value in headers]


#: Every column but the numbers as bytes, whatever type a damaged byte made of it:
#: Python's sqlite3 raised on a TEXT it could not decode as UTF-8 while fetching the
#: row, before _record could set it aside (and a BLOB flipped to TEXT is its bytes).
_SELECT_RECORDS = (
    "SELECT seq, CAST(topic AS BLOB), CAST(key AS BLOB), CAST(value AS BLOB), "
    "CAST(headers AS BLOB), size, enqueued_at FROM spool"
)


def _record(row: tuple[Any, ...]) -> QueuedRecord:
    """A spooled row (as _SELECT_RECORDS reads it) as its record; ValueError, TypeError,
    AttributeError or UnicodeError if it is not one the spool wrote (the table is not
    STRICT: a damaged byte may change a column's type, which PRAGMA quick_check does
    not look at)."""
    seq, topic_bytes, key, value, headers, size, enqueued_at = row
    topic = topic_bytes.decode("utf-8") if isinstance(topic_bytes, bytes) else None
    if not (
        isinstance(topic, str)
        and isinstance(key, bytes)
        and isinstance(value, bytes)
        and isinstance(size, int)
        and isinstance(enqueued_at, float | int)
    ):
        raise TypeError("not a record's topic, key, value, size and time")
    pairs = orjson.loads(headers)
    if not isinstance(pairs, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        for pair in pairs
    ):  # (an object's keys of two characters unpacked as a name and a value)
        raise TypeError("headers that are not pairs of a name and a text")
    destination = Destination(
        topic=topic, key=key, value=value, headers=[(n, v.encode("latin-1")) for n, v in pairs]
    )
    return QueuedRecord(seq, destination, enqueued_at)


def _topics_held(connection: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """topic -> (events, dead letters among them: the records with an x-bridge-reason
    header, which the bridge writes on every dead letter).

    Counted as the rows stream by, not by GROUP BY: SQLite sorted the whole table for
    it in a temporary file (327 MiB for a million events), on the spool's own volume
    where the deployments put SQLITE_TMPDIR, and a spool that had filled its disk
    could not be opened again (a review)."""
    counts: dict[bytes, list[int]] = {}
    rows = connection.execute(
        "SELECT CAST(topic AS BLOB), instr(headers, ?) > 0 FROM spool", (b'"x-bridge-reason"',)
    )
    for topic, letter in rows:
        count = counts.get(topic)
        if count is None:
            count = counts[topic] = [0, 0]
        count[0] += 1
        count[1] += letter
    # (as bytes: a damaged topic that is not UTF-8 stopped the spool's opening)
    return {
        (topic or b"").decode("utf-8", "replace"): (events, letters)
        for topic, (events, letters) in counts.items()
    }


def _has_topic_index(connection: sqlite3.Connection) -> bool:
    (found,) = connection.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'spool_by_topic'"
    ).fetchone()
    return bool(found)


def _index_by_topic(connection: sqlite3.Connection) -> bool:
    """Index the spool by topic, so that a read can leave out the topics on hold
    without reading their rows; False if there is no room to make it now (the reads
    then step past those rows instead)."""
    try:
        connection.execute("CREATE INDEX IF NOT EXISTS spool_by_topic ON spool (topic, seq)")
    except sqlite3.Error as exc:
        log.warning("spool: cannot index the events by topic (%s); reading without", exc)
        return False
    log.info("spool: indexed the events by topic, to read past the topics on hold")
    return True


def _drop_topic_index(connection: sqlite3.Connection) -> bool:
    try:
        connection.execute("DROP INDEX IF EXISTS spool_by_topic")
    except sqlite3.Error as exc:  # kept; dropped the next time the spool is empty
        log.warning("spool: cannot drop the index by topic (%s)", exc)
        return False
    return True


def _holds_many(connection: sqlite3.Connection, topics: Set[str]) -> bool:
    """Whether the rows of ``topics`` are more than a read should go past in seq order
    (SCAN_PAST_AT_MOST; counted by the topic index, and no further): the walk of every
    other topic's own order costs two queries a topic, a second with 20,000 topics
    waiting (a review's), on the thread every append waits for."""
    marks = ",".join("?" * len(topics))  # only placeholders go into the query's text
    query = f"SELECT count(*) FROM (SELECT 1 FROM spool WHERE topic IN ({marks}) LIMIT ?)"  # noqa: S608
    (held,) = connection.execute(query, (*topics, SCAN_PAST_AT_MOST + 1)).fetchone()
    return bool(held > SCAN_PAST_AT_MOST)


#: Most seqs a read of the spool file leaves out in its SQL (a NOT IN list of the rowid),
#: so that their rows are not read at all; past it they are left out as read. Read past,
#: each row's value was loaded and copied: a record parked for its dead letter is one
#: Kafka refused as too large, and 40 of 900 KB made every read take 12.6 ms of the
#: writer thread, each round (a review). A round's records in flight are at most
#: BATCH_RECORDS (500), and parked ones are few.
SQL_SKIP_MAX = 1000
#: How long reads must have left topics out (held) before the spool indexes its rows by
#: topic (see _read_oldest).
INDEX_AFTER_SECONDS = 5.0


def _not_skipped(skip_seqs: Set[int]) -> tuple[str, tuple[int, ...]]:
    """``seq NOT IN (?, ...)`` and its parameters for ``skip_seqs``; nothing when there
    are none or more than SQL_SKIP_MAX."""
    if not skip_seqs or len(skip_seqs) > SQL_SKIP_MAX:
        return "", ()
    return f"seq NOT IN ({','.join('?' * len(skip_seqs))})", tuple(skip_seqs)


def _oldest_by_topic(
    connection: sqlite3.Connection,
    per_topic: int,
    skip_topics: Set[str],
    not_skipped: str = "",
    skipped: tuple[int, ...] = (),
) -> Iterable[tuple[Any, ...]]:
    """The oldest ``per_topic`` rows of each topic not in ``skip_topics``, in seq order:
    the rows of the topics on hold, however many, are not read, nor those of the seqs
    ``not_skipped`` (see _not_skipped) leaves out (records in flight, parked ones)."""
    also = f" AND {not_skipped}" if not_skipped else ""
    topics: list[str] = []
    (topic,) = connection.execute("SELECT min(topic) FROM spool").fetchone()
    while topic is not None:  # one step of the index per topic, not per row
        if topic not in skip_topics:
            topics.append(topic)
        (topic,) = connection.execute(
            "SELECT min(topic) FROM spool WHERE topic > ?", (topic,)
        ).fetchone()
    return heapq.merge(
        *(
            connection.execute(
                f"{_SELECT_RECORDS} WHERE topic = ?{also} ORDER BY seq LIMIT ?",  # ?s only
                (topic, *skipped, per_topic),
            ).fetchall()
            for topic in topics
        ),
        key=lambda row: row[0],
    )
