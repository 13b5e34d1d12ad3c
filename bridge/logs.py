"""Logging: JSON lines by default (one object per record), or plain text for people.

Records may carry structured fields through ``extra={"fields": {...}}``; they
become top-level keys in JSON. Nothing logs query strings or request headers
other than the idempotency key, and the serving bridge puts a :class:`Redacting`
filter on the handler (:func:`redact_with`): every token it has used is replaced by
``<token>`` in each line's message, fields and traceback, whoever logs it (a
refusal's path, a topic held back, the Kafka client).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import logging
import math
import os
import queue
import select
import stat
import sys
import termios
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.redaction import Redactor

_RESERVED = {"time", "level", "logger", "message"}
#: The record attribute (set through ``extra=``) of a line whose fields were redacted
#: as they were made: the Redactor's ``logged`` that did it.
REDACTED_WITH = "redacted_with"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: v for k, v in fields.items() if k not in _RESERVED})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        try:
            return orjson.dumps(line, default=str).decode()
        except TypeError:  # text that is not UTF-8: a path from the environment, say
            return orjson.dumps(_utf8(line), default=str).decode()


def _utf8(value: Any) -> Any:
    """``value`` with its text made UTF-8: a byte the environment or the file system
    gave as a surrogate (a path that is not UTF-8) as the escape \\udcff. orjson
    refuses surrogates: the line was lost to "--- Logging error ---", and an error
    at startup became a traceback."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_utf8(str(k)): _utf8(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_utf8(v) for v in value]
    return _utf8(str(value)) if not isinstance(value, int | float | bool | type(None)) else value


class TextFormatter(logging.Formatter):
    """One line per record for people: the message, then the fields as ``key=value``.

    Messages and fields carry what clients sent (a path, a key), and uvicorn
    decodes ``%0A`` in a path to a line break: control characters are escaped
    (``\\n``), and a field value with a space, quote or ``=`` is quoted, so no
    client can forge a line or a field. A traceback keeps its lines, each
    indented, so a line that starts in the first column is always a record's.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, with the message escaped and the traceback indented
        record.message = printable(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{printable(str(k))}={_value(v)}" for k, v in fields.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for extra in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if extra:
                text += "".join("\n    " + printable(line) for line in extra.splitlines())
        return text


def printable(text: str) -> str:
    """``text`` with every non-printable character (line breaks, escape sequences,
    bidi overrides) written as a Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _value(value: object) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return '"' + printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


class Redacting(logging.Filter):
    """Replaces the tokens ``redactor`` knows in a record's message, fields, traceback
    and stack: a handler's filter, so that it sees every logger's records. Fields
    that ``redactor`` redacted as they were made (the record's REDACTED_WITH is its
    ``logged``: a refusal's, cut to length) are left as they are: redacting them again
    would only double the work of each refusal."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor
        if not redactor:
            return True
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: the handler reports it
            return True
        redacted = redactor.redact(message)
        if redacted is not message:
            record.msg, record.args = redacted, ()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and getattr(record, REDACTED_WITH, None) != redactor.logged:
            record.fields = {k: self._value(v) for k, v in fields.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.redact(record.stack_info)
        return True

    def _value(self, value: object) -> object:
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.redactor.redact(value if isinstance(value, str) else str(value))


def redact_with(redactor: Redactor) -> None:
    """Keep ``redactor``'s tokens out of every line the root logger's handlers write
    (see :class:`Redacting`); replaces the filter an earlier call put there."""
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, Redacting)]:
            handler.removeFilter(old)
        handler.addFilter(Redacting(redactor))


def configure(level: str, fmt: str, *, background: bool = False) -> None:
    """Send every logger (uvicorn's too) to stderr in the chosen format; written by a
    thread of its own when ``background`` (the serving bridge: see WrittenApart)."""
    stream = sys.stderr
    if stream is None:  # fd 2 closed: lines go nowhere, as asked (not to a dead thread)
        stream = open(os.devnull, "w")  # noqa: SIM115 - the process's stderr from now on
    if fmt == "json" and isinstance(stream, io.TextIOWrapper):
        # JSON lines are UTF-8 (RFC 8259), whatever the locale: backslashreplace's \\xe4
        # is no JSON escape, and latin-1's byte 0xE4 no UTF-8.
        # (errors kept: strict, a path not UTF-8 printed bare was a traceback)
        stream.reconfigure(encoding="utf-8", errors="backslashreplace")
    handler: logging.Handler = WrittenApart(stream) if background else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    before, root.handlers[:] = root.handlers[:], [handler]
    for old in before:  # replaced first: a line logged meanwhile is not put in a dead queue
        if isinstance(old, WrittenApart):
            old.close()
    root.setLevel(level.upper())
    # Python's warnings (a library's RuntimeWarning, say) in the same format and
    # through the same redaction: written bare to stderr, they broke a JSON log's lines.
    logging.captureWarnings(True)
    # aiokafka reports every retry at ERROR; the bridge reports what matters itself.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    handler.addFilter(OncePerInterval("aiokafka", AIOKAFKA_REPEAT_SECONDS))
    handler.addFilter(demote_unknown_topic)


#: What aiokafka logs at ERROR when Kafka does not know a topic it was asked about.
_UNKNOWN_TOPIC = "Topic %s not found in cluster metadata"


def demote_unknown_topic(record: logging.LogRecord) -> bool:
    """aiokafka's ERROR about a topic Kafka does not know yet, a WARNING: it comes with
    the first event of every new type while a broker that creates topics on first use
    creates it (and during a replay that succeeds). When the topic stays missing the
    bridge says so itself (a topic held back, 503s in broker mode)."""
    if record.msg == _UNKNOWN_TOPIC and record.name == "aiokafka.cluster":
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


#: aiokafka logs a failed connection or metadata request at ERROR each time it
#: tries again: about 10 lines a second during an outage, with one event waiting.
AIOKAFKA_REPEAT_SECONDS = 60.0


class OncePerInterval(logging.Filter):
    """Lets a record of ``prefix``'s loggers through once per ``seconds`` for each
    of their messages (the format string, whatever its arguments), so that a
    library's retry loop cannot flood the log while the bridge's own lines say
    what is going on. A handler's filter: a logger's would miss its children's."""

    def __init__(self, prefix: str, seconds: float) -> None:
        super().__init__()
        self._prefix, self._dotted = prefix, prefix + "."
        self._seconds = seconds
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self._prefix and not record.name.startswith(self._dotted):
            return True
        key = (record.name, record.msg)
        last = self._last.get(key)
        if last is not None and record.created - last < self._seconds:
            return False
        if len(self._last) > 1000:  # messages are a library's constants; bounded anyway
            self._last.clear()
        self._last[key] = record.created
        return True


#: Most lines, and bytes of them, a WrittenApart handler holds for a stderr that is not
#: read fast enough; past either, lines are dropped (and counted). A line is at most a
#: few KB (a refusal's values are cut at 1,024 characters), a traceback some more.
WRITE_QUEUE_LINES = 10_000
WRITE_QUEUE_BYTES = 4 << 20
#: The longest a flush waits for the lines held to be written (a reader that stalled),
#: but at the end of serve (see write_in_place).
FLUSH_WAIT_SECONDS = 5.0
#: How long the writer lets lines pile up after the first before it writes them: one
#: write (and one wake-up of its thread) per line cost a refusal flood some 25 % more
#: CPU per request (a review).
WRITE_GATHER_SECONDS = 0.002


class _LastWords(str):
    """A line put_line queued: emit never drops it to make room."""

    __slots__ = ()


class WrittenApart(logging.Handler):
    """Writes its lines in place while ``stream`` takes them at once, else from a
    thread of its own, so that a stderr whose reader falls behind (journald under
    pressure, a container runtime's log pipe, a paused `| less`) cannot stop the event
    loop: the loop blocked in write() once the 64 KiB pipe was full, /healthz with
    it, and some 250 refused deliveries (401s, no token needed) filled it (a review).
    Lines are formatted, filtered and redacted in the caller, as before; at most
    WRITE_QUEUE_LINES (and WRITE_QUEUE_BYTES) wait for the thread, and what comes past
    them is dropped and said (with how many) once the reader catches up. A reader gone
    for good (EPIPE) loses the lines, as it did."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        self._lines: queue.Queue[str | None] = queue.Queue(WRITE_QUEUE_LINES)  # None: stop
        # Its own lock, not the handler's: logging.shutdown flushes a handler holding
        # that one, and a writer waiting for it never wrote what it held (a review).
        self._count_lock = threading.Lock()
        self._bytes = 0  # of the lines queued
        self._dropped = 0  # since the last line that said so
        self._closed = False
        try:  # what _room_for asks the kernel about
            self._fd: int | None = stream.fileno()
            mode = os.fstat(self._fd).st_mode
        except (AttributeError, OSError, ValueError):  # no file behind it (a test's)
            self._fd, mode = None, 0
        terminal = self._fd is not None and os.isatty(self._fd)
        # A file or /dev/null takes any line at once: always in place. A terminal never
        # is: select() says it is writable with a byte of room, and a longer line
        # blocked the event loop in write() until its reader came back (a review:
        # `docker run -t`, its reader stalled, /healthz with it).
        self._takes_all = stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not terminal)
        self._terminal = terminal
        self._pipe_size = 0  # a pipe's capacity: an empty one takes a line that long
        if self._fd is not None and stat.S_ISFIFO(mode):
            try:
                self._pipe_size = fcntl.fcntl(self._fd, fcntl.F_GETPIPE_SZ)
            except OSError:
                self._pipe_size = select.PIPE_BUF
        if self._fd is not None:
            # A parent that made it non-blocking (some supervisors do; the description
            # is shared) had write() fail with EAGAIN or write part of a line, which
            # Python's text layer loses without a word (a review: 609 of 1,500 lines
            # out, half lines run together). Blocking, as the writer thread expects.
            with contextlib.suppress(OSError):
                os.set_blocking(self._fd, True)
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        # in place once the writer has ended, or while nothing waits for it
        if self._closed or (not self._lines.unfinished_tasks and self._room_for(line)):
            self._write_in_place(line)
            return
        if len(line) > WRITE_QUEUE_BYTES:  # never fits: not the lines waiting for it
            with self._count_lock:
                self._dropped += 1
            return
        # Full: the oldest lines waiting make room (dropped, and said), not this one:
        # dropping the newest lost what came after a flood (its ERRORs, the stop's own
        # lines) while the reader lagged (a review). (No end of the writer is among
        # them: close() puts it after _closed is set, under the lock emit holds.)
        while True:
            with self._count_lock:
                if self._bytes + len(line) <= WRITE_QUEUE_BYTES and not self._lines.full():
                    self._bytes += len(line)
                    break
            if not self._drop_oldest():  # none but last words (or the writer took them)
                with self._count_lock:
                    self._dropped += 1
                return
        try:
            self._lines.put_nowait(line)
        except queue.Full:  # last words (put_line) took the place meanwhile
            with self._count_lock:
                self._bytes -= len(line)
                self._dropped += 1

    def _drop_oldest(self) -> bool:
        """Take the oldest line waiting out of the queue, dropped and counted, unless it
        is last words (put_line's), which stay where they are; False when there is none
        but those. In place, under the queue's own lock: taken out and put back, last
        words lost their order, and their put back could wait for the writer (a
        review)."""
        lines = self._lines
        queued: collections.deque[str | None] = lines.queue  # (typeshed: Any)
        with lines.mutex:
            for n, waiting in enumerate(queued):
                if waiting is not None and not isinstance(waiting, _LastWords):
                    del queued[n]
                    lines.not_full.notify()
                    break
            else:
                return False
        with self._count_lock:
            self._bytes -= len(waiting)
            self._dropped += 1
        lines.task_done()
        return True

    def _room_for(self, line: str) -> bool:
        """Whether ``line`` can be written at once without blocking: the stream takes
        at least PIPE_BUF bytes now (a pipe or socket with room, a file), and the line
        is no longer; or an empty pipe that holds the line (an ERROR's traceback is
        longer than PIPE_BUF, and the line most worth having); or a file. Written in
        place then, as before: a process killed (SIGKILL, the OOM killer) lost the
        lines the thread had not written yet, its last ones (a test's kill lost the
        ERROR it looked for), and each line cost a thread hand-off."""
        if self._takes_all:
            return True
        if self._fd is None or self._terminal:
            return False
        most = len(line) * 4  # bytes (UTF-8: 4 a character at most)
        try:
            if most <= select.PIPE_BUF:
                return bool(select.select([], [self._fd], [], 0)[1])
            if most > self._pipe_size:
                return False
            unread = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
            return not int.from_bytes(unread, sys.byteorder)
        except (OSError, ValueError):
            return False

    def _write_in_place(self, line: str) -> None:
        """Write ``line`` now (what was dropped before it said first)."""
        with self._count_lock:
            dropped, self._dropped = self._dropped, 0
        said = self._said_dropped(dropped) if dropped else ""  # (dropped before it)
        self._put_out(said + line, 1 + dropped)

    def _put_out(self, text: str, lines: int) -> None:
        """Write ``text``; the ``lines`` it stands for (those a line of it says were
        dropped included) count as dropped if the write fails."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:  # the reader gone for good
            pass
        except (OSError, ValueError):  # a full disk under `2> file`, stderr closed
            with self._count_lock:
                self._dropped += lines

    @property
    def writing(self) -> bool:
        return self._writer.is_alive()

    def put_line(self, line: str) -> None:
        """Write ``line`` (formatted already) after those held, waiting for room as long
        as it takes (and the writer runs: a dead one would make it wait for ever): a
        command's last words."""
        with self._count_lock:
            self._bytes += len(line) + 1
        while self.writing:
            try:
                self._lines.put(_LastWords(line + "\n"), timeout=0.1)
                return
            except queue.Full:
                continue

    def _write(self) -> None:
        stopping = False
        while not stopping:
            taken = [self._lines.get()]
            if taken[0] is not None:
                time.sleep(WRITE_GATHER_SECONDS)
            while len(taken) < 256:  # one write for what has piled up
                try:
                    taken.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            lines = [line for line in taken if line is not None]
            stopping = len(lines) < len(taken)
            with self._count_lock:
                self._bytes -= sum(map(len, lines))
                dropped = 0
                if self._lines.qsize() < WRITE_QUEUE_LINES // 2:  # caught up, or half
                    dropped, self._dropped = self._dropped, 0
            # (the oldest lines are dropped: before these)
            said = self._said_dropped(dropped) if dropped else ""
            try:
                self._put_out(said + "".join(lines), len(lines) + dropped)
            finally:
                for _ in taken:
                    self._lines.task_done()

    def _said_dropped(self, dropped: int) -> str:
        record = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d log lines were dropped: stderr's reader did not keep up",
                "args": (dropped,),
                "fields": {"dropped": dropped},
            }
        )
        return self.format(record) + "\n"

    def flush(self, wait: float | None = None) -> bool:  # type: ignore[override]
        """Wait for the lines held to be written, ``wait`` seconds at most
        (FLUSH_WAIT_SECONDS unless given; math.inf: as long as it takes); whether they
        were. (logging ignores what it returns.)"""
        until = time.monotonic() + (FLUSH_WAIT_SECONDS if wait is None else wait)
        while self._lines.unfinished_tasks and self.writing and time.monotonic() < until:
            time.sleep(0.005)
        return not self._lines.unfinished_tasks

    def close(self) -> None:
        """Write what is held (see flush), then end the thread; one whose reader stalls
        keeps writing (a daemon: it ends with the process)."""
        if self._writer.is_alive() and self.flush():
            with self.lock:  # type: ignore[union-attr]
                self._closed = True
            self._lines.put(None)
            self._writer.join(FLUSH_WAIT_SECONDS)
        super().close()


def write_in_place() -> None:
    """Write what serve's log writer holds, however long its reader takes (as when the
    lines were written in place: a supervisor's SIGKILL bounds the wait; with 5 s at
    most a stalled reader lost the stop's lines, a review), then write the lines in
    the caller from now on: a thread still writing to stderr as the interpreter exits
    can abort it (SIGABRT: the stream's lock held at shutdown)."""
    root = logging.getLogger()
    for n, handler in enumerate(root.handlers):
        if isinstance(handler, WrittenApart):
            handler.flush(math.inf)
            plain = logging.StreamHandler(handler.stream)
            plain.setFormatter(handler.formatter)
            plain.setLevel(handler.level)
            for kept in handler.filters:
                plain.addFilter(kept)
            root.handlers[n] = plain  # first: a line of another thread meanwhile has a place
            handler.close()


def put_last(line: str) -> bool:
    """Write ``line`` (formatted) after the lines a handler writing apart holds, however
    long its reader takes; False when none does (the caller prints it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, WrittenApart) and handler.writing:
            handler.put_line(line)
            handler.flush(math.inf)
            return True
    return False
