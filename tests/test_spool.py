"""spool: durable FIFO with group commit, capacity, de-duplication, damage detection."""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import backlog as backlog_module
from bridge import spool as spool_module
from bridge.ackmodes import DurableAck
from bridge.backlog import QueuedRecord, RecordFifo
from bridge.config import load_settings
from bridge.errors import ShuttingDown, SpoolFull, SpoolUnusable, SpoolWriteFailed
from bridge.metrics import Metrics
from bridge.routing import Destination
from bridge.spool import Spool, check_folder
from tests.fakes import FakePublisher
from tests.polling import eventually


def record(i: int, size: int = 10) -> Destination:
    return Destination(
        topic="geins.order.create",
        key=f"k{i}".encode(),
        value=b"x" * size,
        headers=[("ce_id", f"k{i}".encode()), ("odd", bytes(range(256)))],
    )


def make(path: Path, *, max_bytes: int = 10**6, window: float = 3600) -> Spool:
    return Spool(path, max_bytes=max_bytes, dedup_window=window)


async def test_records_survive_reopen_in_order(tmp_path: Path) -> None:
    """What was appended is there after a restart, oldest first, byte for byte."""
    spool = make(tmp_path)
    spool.open()
    for i in range(5):
        assert await spool.append(record(i), f"k{i}")
    await spool.close()

    again = make(tmp_path)
    again.open()
    assert again.depth == 5
    oldest = await again.oldest(10, 10**6)
    assert [r.destination for r in oldest] == [record(i) for i in range(5)]
    await again.remove([oldest[0].seq, oldest[1].seq])
    assert again.depth == 3
    assert [r.destination.key for r in await again.oldest(10, 10**6)] == [b"k2", b"k3", b"k4"]
    await again.close()


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """Appends that arrive while the writer is busy share one commit (group commit): 200
    concurrent appends need at most two, the one the writer may have started on the
    first arrivals and one for all the others."""
    commits: list[float] = []
    all_queued = threading.Event()

    def on_commit(seconds: float) -> None:  # in the writer thread, after each commit
        commits.append(seconds)
        # Hold the writer until every append is queued, so that how fast this machine
        # switches threads cannot split the group. Not a verdict: set at once below.
        all_queued.wait(30)

    spool = Spool(tmp_path, max_bytes=10**7, dedup_window=3600, on_commit=on_commit)
    spool.open()
    appends = asyncio.gather(*(spool.append(record(i), f"k{i}") for i in range(200)))
    # One pass of the event loop runs every append up to its first await, and each
    # one queues its job for the writer before that.
    await asyncio.sleep(0)
    all_queued.set()
    results = await appends
    await spool.close()
    assert all(results)
    assert spool.depth == 200
    assert 1 <= len(commits) <= 2, f"{len(commits)} commits for 200 concurrent appends"


async def test_duplicate_keys_are_refused_even_within_one_commit(tmp_path: Path) -> None:
    """A key already accepted (or accepted in the same group) is a duplicate."""
    spool = make(tmp_path)
    spool.open()
    first, second = await asyncio.gather(
        spool.append(record(1), "same"), spool.append(record(2), "same")
    )
    assert (first, second) == (True, False)
    assert not await spool.append(record(3), "same")
    assert await spool.append(record(4), None)  # generated keys are never de-duplicated
    assert spool.depth == 2
    await spool.close()
    reopened = make(tmp_path)
    reopened.open()
    assert not await reopened.append(record(5), "same")  # survives a restart
    await reopened.close()


async def test_only_commits_that_wrote_events_are_timed(tmp_path: Path) -> None:
    """bridge_stage_duration_seconds{stage="spool_commit"} times group commits of
    events: a group of duplicates only, or of events refused as the spool is full,
    wrote nothing, yet counted (12,000 of them in a minute of a full spool under load,
    which looked like ordinary spool traffic on the dashboard)."""
    commits: list[float] = []
    spool = Spool(tmp_path, max_bytes=2000, dedup_window=3600, on_commit=commits.append)
    spool.open()
    assert await spool.append(record(1), "a")
    assert len(commits) == 1
    assert not await spool.append(record(1), "a")  # a duplicate
    with pytest.raises(SpoolFull):
        await spool.append(record(2, size=5000), "b")
    assert len(commits) == 1
    await spool.close()


async def test_expired_keys_are_accepted_again(tmp_path: Path) -> None:
    """After the window a key is new again; purging removes it from the record."""
    spool = make(tmp_path, window=0.05)
    spool.open()
    assert await spool.append(record(1), "k")
    await asyncio.sleep(0.1)
    assert await spool.forget_expired_keys() == 1
    assert await spool.append(record(2), "k")
    await spool.close()


async def test_full_spool_refuses_with_503(tmp_path: Path) -> None:
    """Beyond BRIDGE_SPOOL_MAX_BYTES an append is refused (retriable), never half-kept."""
    spool = make(tmp_path, max_bytes=3000)
    spool.open()
    assert await spool.append(record(1, 1000), "a")
    assert await spool.append(record(2, 1000), "b")
    with pytest.raises(SpoolFull) as info:
        await spool.append(record(3, 1000), "c")
    assert info.value.status == 503
    assert info.value.retriable
    assert await spool.append(record(4, 100), "d")  # smaller still fits
    assert spool.depth == 3
    # a retry of an event already safe is a duplicate (200), full or not
    assert not await spool.append(record(1, 1000), "a")
    with pytest.raises(SpoolFull):
        await spool.append(record(5, 1000), None)
    await spool.close()


async def test_write_failure_is_503_and_marks_unwritable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing disk write answers 503 and turns readiness off until a write succeeds.
    It is logged at ERROR when it starts, not at every failed commit (a review counted
    5,561 lines in 35 s), and at INFO when writing works again."""
    caplog.set_level(logging.INFO, logger="bridge.spool")
    spool = make(tmp_path)
    spool.open()
    assert await spool.append(record(1), "a")
    # Cap the database at its current size: the next insert fails like a full disk.
    await spool._call(lambda c: c.execute("PRAGMA max_page_count = 1"))
    for key in ("b", "c", "d"):
        with pytest.raises(SpoolWriteFailed):
            await spool.append(record(2, 100_000), key)
    assert not spool.writable
    assert [r.levelname for r in caplog.records if "spool write failed" in r.message] == ["ERROR"]
    # With nothing to purge, maintenance writes nothing, so it proves nothing: the disk
    # is still full, and readiness must stay off.
    with pytest.raises(sqlite3.OperationalError):
        await spool.forget_expired_keys()
    assert not spool.writable
    await spool._call(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    await spool.forget_expired_keys()
    assert spool.writable
    assert "the spool can be written again" in caplog.text
    assert await spool.append(record(2), "b")  # the failed key was not recorded
    await spool.close()


async def test_close_finishes_every_job_queued_before_it(tmp_path: Path) -> None:
    """Jobs queued together with the stop (an append, the drainer's removal) are done,
    not dropped with their callers left waiting; none is let in after it."""
    spool = make(tmp_path)
    spool.open()
    assert await spool.append(record(1), "a")
    (first,) = await spool.oldest(10, 10**6)
    jobs = asyncio.gather(spool.append(record(2), "b"), spool.remove([first.seq]), spool.close())
    await asyncio.wait_for(jobs, timeout=5)
    with pytest.raises(ShuttingDown, match="stopping"):  # not a disk's failure
        await spool.append(record(3), "c")

    again = make(tmp_path)
    again.open()
    assert [r.destination.key for r in await again.oldest(10, 10**6)] == [b"k2"]
    await again.close()


async def test_close_gives_up_on_a_disk_that_hangs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer thread stuck in the disk (a network volume gone) held close(), so the
    stop never ended (the README bounds it) until SIGKILL."""
    spool = make(tmp_path)
    spool.open()
    assert await spool.append(record(1), "a")
    disk = threading.Event()
    hung = asyncio.ensure_future(spool._call(lambda _: disk.wait(30)))
    await asyncio.sleep(0.05)  # the writer is in it
    try:
        await asyncio.wait_for(spool.close(wait=0.2), timeout=5)
        assert "the spool's disk did not finish its writes within 0.2 s" in caplog.text
    finally:
        disk.set()
        hung.cancel()
    thread = spool._thread
    assert thread is not None
    thread.join(5)  # the disk answers at last: the writer ends as it would have
    assert not thread.is_alive()
    await spool.close()
    again = make(tmp_path)  # a later close lets the folder's lock go (as the process's end)
    again.open()
    assert [r.destination.key for r in await again.oldest(10, 10**6)] == [b"k1"]
    await again.close()


async def test_an_unexpected_writer_error_answers_and_keeps_the_records(
    tmp_path: Path,
) -> None:
    """A bug after the commit (here in the commit callback) answers the request 503
    instead of leaving it waiting forever, and the committed record still drains."""

    calls: list[float] = []

    def broken(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 1:
            raise RuntimeError("a bug")

    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=3600, on_commit=broken)
    spool.open()
    with pytest.raises(SpoolWriteFailed):
        await asyncio.wait_for(spool.append(record(1), "a"), timeout=5)
    assert [r.destination.key for r in await spool.oldest(10, 10**6)] == [b"k1"]
    assert not await spool.append(record(1), "a")  # the retry: a duplicate, safe already
    await spool.close()


def test_damaged_file_is_a_clear_error_and_kept(tmp_path: Path) -> None:
    """A spool file that is not a database stops startup and is left untouched."""
    damaged = tmp_path / "spool.db"
    damaged.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SpoolUnusable, match="move it aside"):
        make(tmp_path).connect()
    assert damaged.read_bytes() == b"this is not sqlite" * 100


async def test_a_large_spool_says_it_is_being_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Checking a full spool at start takes about a minute from a cold cache, with
    nothing served meanwhile: a large file is announced, and the time it took logged,
    so that it does not look like a hang (a liveness probe killed such a pod)."""
    spool = make(tmp_path)
    spool.open()
    await spool.append(record(1), None)
    await spool.close()
    caplog.set_level(logging.INFO, logger="bridge.spool")
    for slow_from in (spool_module.SLOW_CHECK_BYTES, 1):
        assert "checking the spool file" not in caplog.text
        monkeypatch.setattr(spool_module, "SLOW_CHECK_BYTES", slow_from)
        again = make(tmp_path)
        again.open()
        await again.close()
    assert "checking the spool file (0.0 GB) before serving" in caplog.text
    assert "spool file checked in " in caplog.text


async def test_a_spool_of_a_newer_version_is_refused_as_such_before_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool from a future version is not guessed at. Refused as damage, its message
    said to move it aside and start empty, which strands the events it holds (a
    rollback needs the newer version to empty it first), and only after the integrity
    check, a minute per 2 GB."""
    spool = make(tmp_path)
    spool.open()
    assert await spool.append(record(1), "a")
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as connection:
        connection.execute("PRAGMA user_version = 2")
    monkeypatch.setattr(spool_module, "_stopped_by_signals", None)  # the check: not reached
    with pytest.raises(SpoolUnusable) as refused:
        make(tmp_path).connect()
    assert str(refused.value) == (
        f"spool file {tmp_path / 'spool.db'} was written by a newer version of the bridge "
        "(spool schema 2; this one knows 1) and may hold accepted events that are not in "
        "Kafka yet: run the newer version until bridge_spool_depth is 0 before going back "
        "to this one (do not delete it)"
    )
    with sqlite3.connect(tmp_path / "spool.db") as connection:
        connection.execute("PRAGMA user_version = -1")
    monkeypatch.undo()
    with pytest.raises(SpoolUnusable, match="unknown spool schema version -1"):
        make(tmp_path).connect()


async def test_oldest_respects_byte_budget(tmp_path: Path) -> None:
    """A batch stops at the byte budget but always holds at least one record."""
    spool = make(tmp_path)
    spool.open()
    for i in range(3):
        await spool.append(record(i, 1000), None)
    assert len(await spool.oldest(10, 1)) == 1
    assert len(await spool.oldest(10, 2700)) == 2
    await spool.close()


async def test_expired_keys_are_purged_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Purging many expired keys takes several short transactions, and removes them all."""
    monkeypatch.setattr(spool_module, "PURGE_CHUNK", 7)
    spool = make(tmp_path, window=0.05)
    spool.open()
    await asyncio.gather(*(spool.append(record(i), f"k{i}") for i in range(30)))
    await asyncio.sleep(0.1)
    assert await spool.forget_expired_keys() == 30
    assert await spool.forget_expired_keys() == 0
    await spool.close()


async def test_removing_frees_bytes_so_traffic_can_exceed_the_capacity(tmp_path: Path) -> None:
    """The capacity bounds what is held at once, not what passes through: after
    Kafka took the records, their bytes are free again (a leak here once made
    durable mode refuse everything after BRIDGE_SPOOL_MAX_BYTES of traffic)."""
    spool = make(tmp_path, max_bytes=6000)  # four records of about 1,300 bytes
    spool.open()
    for cycle in range(10):  # 40 records in all: more than 8 x the capacity
        for i in range(4):
            assert await spool.append(record(cycle * 10 + i, 1000), f"k{cycle}-{i}")
        held = await spool.oldest(100, 10**6)
        await spool.remove([r.seq for r in held[:3]])
        assert spool.depth == 1
        assert spool.oldest_enqueued_at == held[3].enqueued_at
        await spool.remove([held[3].seq])
        assert (spool.depth, spool.bytes) == (0, 0)
        assert spool.oldest_enqueued_at is None
    await spool.close()


async def test_counters_match_the_file_after_removals(tmp_path: Path) -> None:
    """depth and bytes, kept up to date without counting rows, equal what a fresh
    open counts; removing an unknown seq changes nothing."""
    spool = make(tmp_path)
    spool.open()
    await asyncio.gather(*(spool.append(record(i, 10 * i), None) for i in range(50)))
    held = await spool.oldest(100, 10**6)
    await spool.remove([r.seq for r in held[::3]] + [10**9])
    counted = (spool.depth, spool.bytes, spool.oldest_enqueued_at)
    await spool.close()
    again = make(tmp_path)
    again.connect()
    assert (again.depth, again.bytes, again.oldest_enqueued_at) == counted
    assert counted[0] == 50 - len(held[::3])


async def test_seqs_are_never_reused_across_restarts(tmp_path: Path) -> None:
    """The spool numbers records itself (so its in-memory copy knows them); an
    emptied spool, reopened, goes on counting like AUTOINCREMENT would."""
    spool = make(tmp_path)
    spool.open()
    for i in range(3):
        await spool.append(record(i), None)
    held = await spool.oldest(10, 10**6)
    assert [r.seq for r in held] == [1, 2, 3]
    await spool.remove([r.seq for r in held])
    await spool.close()
    again = make(tmp_path)
    again.open()
    await again.append(record(9), None)
    assert [r.seq for r in await again.oldest(10, 10**6)] == [4]
    await again.close()


async def test_reads_match_the_file_whether_from_the_copy_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random appends, reads and removals, with an in-memory copy small enough to
    overflow and recover many times: every read is the oldest records of a plain
    model, and what a reopened spool reads from the file is the same."""
    monkeypatch.setattr(spool_module, "COPY_MAX_RECORDS", 7)
    rng = random.Random(7)  # noqa: S311  # a reproducible mix of operations, not secrets
    spool = make(tmp_path, max_bytes=10**8)
    spool.open()
    model: list[tuple[int, bytes]] = []  # (seq, key) of what the spool should hold
    sent = 0
    for _ in range(400):
        action = rng.random()
        if action < 0.5:
            burst = rng.randint(1, 6)
            size = rng.randint(1, 50)
            keys = range(sent, sent + burst)
            assert all(
                await asyncio.gather(*(spool.append(record(i, size), f"k{i}") for i in keys))
            )
            sent += burst
            model += [(0, f"k{i}".encode()) for i in keys]  # seqs learnt at the next read
        else:
            limit = rng.randint(1, 10)
            held = await spool.oldest(limit, 10**6)
            assert [r.destination.key for r in held] == [key for _, key in model[:limit]]
            model[: len(held)] = [(r.seq, r.destination.key) for r in held]
            gone = rng.sample(held, rng.randint(0, len(held)))
            await spool.remove([r.seq for r in gone])
            model = [entry for entry in model if entry[0] not in {r.seq for r in gone}]
        assert spool.depth == len(model)
    memory_view = await spool.oldest(10**4, 10**8)
    await spool.close()
    again = make(tmp_path)
    again.open()
    file_view = await again.oldest(10**4, 10**8)
    await again.close()
    assert [(r.seq, r.destination, r.enqueued_at) for r in memory_view] == [
        (r.seq, r.destination, r.enqueued_at) for r in file_view
    ]
    assert [r.destination.key for r in file_view] == [key for _, key in model]


async def test_the_key_record_is_bounded_by_count_oldest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of fresh keys within the window cannot fill the disk: beyond max_keys
    the oldest are forgotten first (in chunks), so their retries pass again, while
    the newest are still recognised. The count survives a restart."""
    monkeypatch.setattr(spool_module, "PURGE_CHUNK", 7)
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=3600, max_keys=20)
    spool.open()
    for i in range(50):  # one at a time: accepted in this order
        assert await spool.append(record(i), f"k{i}")
    assert spool.keys == 50
    assert await spool.forget_expired_keys() == 30
    assert spool.keys == 20
    assert spool.keys_forgotten_early == 30  # all of them inside the window
    assert await spool.forget_expired_keys() == 0
    assert not await spool.append(record(49), "k49")  # the newest: still a duplicate
    assert not await spool.append(record(30), "k30")
    assert await spool.append(record(29), "k29")  # forgotten: accepted again
    await spool.close()
    with sqlite3.connect(tmp_path / spool_module.DB_NAME) as db:
        assert db.execute("SELECT count(*) FROM seen").fetchone() == (21,)

    again = Spool(tmp_path, max_bytes=10**6, dedup_window=3600, max_keys=20)
    again.open()
    assert again.keys == 21
    assert await again.forget_expired_keys() == 1
    assert not await again.append(record(29), "k29")  # the newest stays
    await again.close()


async def test_keys_the_window_let_go_are_not_counted_as_forgotten_early(
    tmp_path: Path,
) -> None:
    """bridge_dedup_keys_forgotten_early_total counts what the count bound cut short,
    not expired keys beyond it purged in the same round."""
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=0.3, max_keys=3)
    spool.open()
    for i in range(5):
        assert await spool.append(record(i), f"k{i}")
    await asyncio.sleep(0.4)
    assert await spool.forget_expired_keys() == 5
    assert spool.keys_forgotten_early == 0
    await spool.close()


async def test_a_key_accepted_again_after_its_window_counts_once(tmp_path: Path) -> None:
    """An expired key not purged yet is replaced when accepted again, not added: it
    must not count twice, or the count bound would forget keys still in the window."""
    # A window long enough that the keys accepted again are surely still in it at the
    # end, on a slow machine too.
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=2.0, max_keys=10)
    spool.open()
    for i in range(10):
        assert await spool.append(record(i), f"k{i}")
    await asyncio.sleep(2.1)  # all expired, none purged yet
    for i in range(10):
        assert await spool.append(record(i), f"k{i}")  # accepted again
    assert spool.keys == 10
    assert await spool.forget_expired_keys() == 0  # nothing over the bound, nothing expired
    assert not await spool.append(record(3), "k3")  # still a duplicate
    await spool.close()


async def test_a_second_spool_on_the_same_folder_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    """Two bridges on one spool folder would publish its records twice: the second
    is refused with an error naming the folder, and the folder is free again once
    the first closed its spool."""
    first = make(tmp_path)
    first.open()
    assert await first.append(record(1), "k1")
    second = make(tmp_path)
    with pytest.raises(SpoolUnusable, match=f"spool folder {tmp_path} is in use"):
        second.connect()
    assert second.depth == 0  # it never read the file
    await first.close()

    second.connect()
    assert second.depth == 1
    await second.close()


async def test_the_folder_is_logged_once_when_the_spool_is_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the spool is, absolute (a relative BRIDGE_SPOOL_DIR is resolved), is said
    once at startup: events answered 2xx live there until Kafka has them."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="bridge.spool")
    spool = make(Path("here"))
    spool.connect()  # as the server prepares it before listening...
    spool.open()  # ...then starts it: said once
    await spool.close()
    lines = [r.getMessage() for r in caplog.records if "folder" in r.getMessage()]
    assert lines == [f"spool: events are kept in the folder {tmp_path / 'here'}"]


def test_a_refused_spool_leaves_the_folder_free(tmp_path: Path) -> None:
    """A spool that failed to open (here a damaged file) holds no lock afterwards."""
    (tmp_path / "spool.db").write_bytes(b"this is not sqlite" * 100)
    for _ in range(2):  # the second attempt is refused for the file, not the lock
        with pytest.raises(SpoolUnusable, match="move it aside"):
            make(tmp_path).connect()


@pytest.mark.parametrize(
    "where", ["copy", "copy-many-held", "file", "file-many-held", "file-without-index"]
)
async def test_reads_leave_out_the_seqs_and_topics_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The drainer's reads leave out the records it handed over already and those of
    the topics on hold, and still give the oldest others, in order, from the in-memory
    copy, from the file (past few held records in order, or by its topic index past
    many), or from the file without an index (a spool opened with no room to make it)."""
    if where.endswith("many-held"):  # past SCAN_PAST_AT_MOST: each topic's own order
        monkeypatch.setattr(backlog_module, "SCAN_PAST_AT_MOST", 0)
        monkeypatch.setattr(spool_module, "SCAN_PAST_AT_MOST", 0)
    if not where.startswith("copy"):
        monkeypatch.setattr(spool_module, "COPY_MAX_RECORDS", 3)
    if where == "file-without-index":
        monkeypatch.setattr(spool_module, "_index_by_topic", lambda connection: False)
    rng = random.Random(11)  # noqa: S311  # a reproducible mix, not secrets
    topics = ["geins.a.create", "geins.b.create", "geins.c.create"]
    spool = make(tmp_path, max_bytes=10**8)
    spool.open()
    for i in range(60):
        destination = record(i)
        destination.topic = rng.choice(topics)
        assert await spool.append(destination, f"k{i}")
    everything = await spool.oldest(10**4, 10**8)
    assert len(everything) == 60
    for _ in range(40):
        skip_topics = frozenset(rng.sample(topics, rng.randint(0, 2)))
        skip_seqs = frozenset(r.seq for r in rng.sample(everything, rng.randint(0, 20)))
        limit = rng.randint(1, 30)
        read = await spool.oldest(limit, 10**8, skip_seqs=skip_seqs, skip_topics=skip_topics)
        expected = [
            r.seq
            for r in everything
            if r.seq not in skip_seqs and r.destination.topic not in skip_topics
        ][:limit]
        assert [r.seq for r in read] == expected
        assert [r.destination for r in read] == [
            r.destination for r in everything if r.seq in set(expected)
        ]
    await spool.close()


async def test_the_index_by_topic_exists_only_while_held_topics_need_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each append would pay for the index by topic (a second insert), so it is made
    only when reads have left out held topics for INDEX_AFTER_SECONDS while the file
    holds more than the in-memory copy (not for a topic left out a moment, as a probe's
    is at a start: a review's second-long stall of appends), and dropped once the spool
    is empty."""
    monkeypatch.setattr(spool_module, "COPY_MAX_RECORDS", 3)
    monkeypatch.setattr(spool_module, "INDEX_AFTER_SECONDS", 0.2)
    spool = make(tmp_path)
    spool.open()

    def indexed() -> bool:
        with sqlite3.connect(spool.path) as reader:
            return spool_module._has_topic_index(reader)

    for i in range(10):
        assert await spool.append(record(i), f"k{i}")
    await spool.oldest(5, 10**6)
    assert not indexed()  # no topic held
    held = frozenset({"geins.widget.create"})
    await spool.oldest(5, 10**6, skip_topics=held)
    assert not indexed()  # left out a moment only
    await spool.oldest(5, 10**6)  # (a read without: the time starts again)
    await spool.oldest(5, 10**6, skip_topics=held)
    await asyncio.sleep(0.25)
    await spool.oldest(5, 10**6, skip_topics=held)
    assert indexed()
    everything = await spool.oldest(100, 10**8)
    await spool.remove([r.seq for r in everything])
    assert not indexed()
    await spool.close()


async def test_a_read_by_topic_leaves_the_skipped_seqs_out_in_its_sql(tmp_path: Path) -> None:
    """Reads by topic (many rows of held topics, the index made) fetched each topic's
    oldest ``limit`` plus as many as were skipped, the rows of the records in flight or
    parked included, values and all: a parked record is one too large for Kafka. They
    are left out in the SQL, as the reads in seq order leave them out."""
    spool = make(tmp_path)
    spool.open()
    for i in range(8):
        destination = record(i)
        destination.topic = "geins.held.create" if i % 2 else "geins.order.create"
        assert await spool.append(destination, f"k{i}")
    await spool.close()
    with sqlite3.connect(spool.path) as reader:
        order = [
            seq for (seq,) in reader.execute("SELECT seq FROM spool WHERE topic LIKE '%order%'")
        ]
        skipped = spool_module._not_skipped(set(order[:2]))  # in flight, or parked
        rows = spool_module._oldest_by_topic(reader, 2, {"geins.held.create"}, *skipped)
        assert [row[0] for row in rows] == order[2:4]


def test_a_read_past_a_few_held_records_does_not_merge_every_topic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one topic held and thousands of others waiting, a read merged one iterator
    per topic: 0.44 s of the event loop for 40,000 topics (a review's). Past a few held
    records it reads in seq order."""
    merges: list[int] = []
    merge = heapq.merge

    def counted(*iterables: Any, **options: Any) -> Any:
        merges.append(len(iterables))
        return merge(*iterables, **options)

    monkeypatch.setattr(heapq, "merge", counted)  # the module backlog merges with
    fifo = RecordFifo()
    for seq in range(1, 2001):
        destination = record(seq)
        destination.topic = "geins.held.create" if seq <= 5 else f"geins.t{seq}.create"
        fifo.push(QueuedRecord(seq, destination, 0.0), 1)
    taken = fifo.take(500, 10**6, skip_topics=frozenset({"geins.held.create"}))
    assert [r.seq for r in taken] == list(range(6, 506))
    assert merges == []


@pytest.mark.parametrize("scan_past", [0, 10_000])
def test_the_fifo_by_topic_keeps_up_with_pushes_and_discards(
    monkeypatch: pytest.MonkeyPatch, scan_past: int
) -> None:
    """RecordFifo, the memory mode's queue and the spool's copy: reads that leave out
    topics (kept by topic from the first such read on) stay the oldest others in order
    through random pushes and discards, and the bookkeeping ends with the FIFO empty;
    whether they go past the held records in order or merge the others' orders."""
    monkeypatch.setattr(backlog_module, "SCAN_PAST_AT_MOST", scan_past)
    rng = random.Random(5)  # noqa: S311  # a reproducible mix, not secrets
    topics = ["geins.a.create", "geins.b.create", "geins.c.create"]
    fifo = RecordFifo()
    model: list[QueuedRecord] = []
    seq = 0
    for _ in range(600):
        action = rng.random()
        if action < 0.4:
            seq += 1
            destination = record(seq)
            destination.topic = rng.choice(topics)
            queued = QueuedRecord(seq, destination, 0.0)
            fifo.push(queued, 1)
            model.append(queued)
        elif action < 0.7 and model:
            gone = {r.seq for r in rng.sample(model, rng.randint(1, min(5, len(model))))}
            assert fifo.discard(sorted(gone)) == len(gone)
            model = [r for r in model if r.seq not in gone]
        else:
            skip_topics = frozenset(rng.sample(topics, rng.randint(0, 2)))
            skip_seqs = frozenset(r.seq for r in model if rng.random() < 0.2)
            limit = rng.randint(1, 8)
            expected = [
                r.seq
                for r in model
                if r.seq not in skip_seqs and r.destination.topic not in skip_topics
            ][:limit]
            assert [r.seq for r in fifo.take(limit, 10**6, skip_seqs, skip_topics)] == expected
        assert len(fifo) == len(model)
    fifo.discard([r.seq for r in model])
    assert len(fifo) == 0
    assert fifo._by_topic is None


async def test_the_reserve_file_is_made_and_retried_at_most_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool keeps a reserve file next to the database (given up when the disk is
    full, see test_faults). Without room for it, making it again is tried when the
    spool empties, but not at every emptying (every drainer round at a trickle)."""
    spool = make(tmp_path)
    spool.open()
    reserve = tmp_path / spool_module.RESERVE_NAME
    assert reserve.stat().st_blocks * 512 >= spool_module.RESERVE_MIN_BYTES  # allocated
    await spool.close()
    reserve.unlink()
    tries: list[int] = []

    def no_room(fd: int, offset: int, length: int) -> None:
        tries.append(length)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    spool = make(tmp_path)
    spool.open()
    try:
        for i in range(3):  # three emptyings
            assert await spool.append(record(i), f"k{i}")
            await spool.remove([r.seq for r in await spool.oldest(10, 10**6)])
        assert len(tries) == 1  # at the start only
        assert not reserve.exists()  # no part of one left
    finally:
        await spool.close()


class _Disk:
    """os.statvfs of the spool's folder, with as many bytes free as a test says."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path: object) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, 1 << 20, 0, self.free // 4096, 0, 0, 0, 0, 255))


async def test_a_reserve_file_not_made_for_another_reason_is_not_said_as_no_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of file descriptors (EMFILE), the reserve file could not be made either, and
    the line said "no room ... on its disk": the operator went to look at a disk with
    room to spare (a connections review)."""

    def out_of_descriptors(fd: int, offset: int, length: int) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "posix_fallocate", out_of_descriptors)
    caplog.set_level(logging.INFO)
    spool = make(tmp_path)
    spool.open()
    await spool.close()
    assert "cannot make the spool's reserve file" in caplog.text, caplog.text
    assert "no room" not in caplog.text, caplog.text


async def test_without_a_reserve_appends_leave_the_room_removals_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With no reserve file (no room to make it), the free space is the reserve: an
    append that would leave less free than removing what the spool holds needs is
    refused (503 spool_full, the spool unready), a retry of an accepted key still gets
    its duplicate, and deliveries are taken again once there is room. Appending on, a
    second outage filled the disk with no reserve left to give up, and nothing could be
    removed any more."""

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    disk = _Disk(free=10**9)
    monkeypatch.setattr(os, "statvfs", disk)
    caplog.set_level(logging.INFO)
    spool = make(tmp_path)
    spool.open()
    try:
        assert "no room on its disk for the spool's reserve file" in caplog.text
        assert not spool.disk_low
        assert await spool.append(record(1), "a")
        disk.free = 1000  # less than two copies, and the room to remove them
        with pytest.raises(SpoolFull, match="kept so that what Kafka takes can be removed"):
            await spool.append(record(2, 100), "b")
        assert spool.disk_low
        assert not await spool.append(record(1), "a")  # 200 duplicate, as ever
        disk.free = 10**9
        await spool.forget_expired_keys()  # the maintenance round sees the room
        assert not spool.disk_low
        assert await spool.append(record(2, 100), "b")
    finally:
        await spool.close()
    assert caplog.text.count("it has no reserve file: deliveries are refused") == 1


async def test_without_a_reserve_each_event_is_weighed_and_readiness_follows_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each event of a group is weighed alone: a large one that does not fit is refused,
    a small one beside it is taken (the whole group was refused by its total, and
    readiness flapped with each group). Once the spool is emptied, readiness follows
    the free room at once, not at the reserve's next try a minute later."""

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    disk = _Disk(free=200_000)
    monkeypatch.setattr(os, "statvfs", disk)
    spool = make(tmp_path)
    spool.open()
    try:
        big, small = spool.append(record(1, 150_000), "big"), spool.append(record(2), "small")
        outcomes = await asyncio.gather(big, small, return_exceptions=True)
        assert isinstance(outcomes[0], SpoolFull)
        assert outcomes[1] is True
        # Ready: more room than removing what it holds needs, and a page's worth. Not
        # room for any event: a larger one is refused while ready (a 64 KiB one here).
        # Asking for room for 64 KiB made a small volume's drained spool (its file
        # keeping the backlog's size) unready for good, though small events fit.
        assert not spool.disk_low
        with pytest.raises(SpoolFull):
            await spool.append(record(3, 64 * 1024 - 400), "64k")
        disk.free = 1000
        with pytest.raises(SpoolFull):
            await spool.append(record(4), "other")
        assert spool.disk_low
        disk.free = 10**9  # the drain made room
        await spool.remove([r.seq for r in await spool.oldest(10, 10**6)])
        assert spool.depth == 0
        assert not spool.disk_low
    finally:
        await spool.close()


async def test_an_emptied_spool_gives_its_log_back_to_make_the_reserve_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the spool is empty, the WAL file is truncated before the reserve is made
    again: it keeps the size of the largest backlog, which on a small volume is the
    room the reserve needs (a review's 12 MB volume held a 7.4 MB database and a 4.4
    MB WAL, and the reserve never came back)."""
    monkeypatch.setattr(spool_module, "RESERVE_RETRY_SECONDS", 0.0)
    real = os.posix_fallocate
    room = {"now": False}

    def fallocate(fd: int, offset: int, length: int) -> None:
        if not room["now"]:
            raise OSError(28, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    spool = make(tmp_path, max_bytes=10**8)
    spool.open()
    wal = tmp_path / "spool.db-wal"
    reserve = tmp_path / spool_module.RESERVE_NAME
    try:
        for i in range(200):
            assert await spool.append(record(i, 2000), f"k{i}")
        assert wal.stat().st_size > 400_000
        assert not reserve.exists()
        room["now"] = True
        while spool.depth:
            await spool.remove([r.seq for r in await spool.oldest(100, 10**7)])
        assert wal.stat().st_size == 0
        assert reserve.exists()
        assert spool._reserve_made
    finally:
        await spool.close()


def test_a_write_ahead_log_without_its_database_is_refused(tmp_path: Path) -> None:
    """A spool.db emptied or gone beside a non-empty spool.db-wal (a partial copy or
    restore): SQLite would start a new database and drop the log, which after a crash
    may hold every event accepted since the last checkpoint. The spool refuses to
    open, naming both files, and leaves them as they are."""
    wal = tmp_path / "spool.db-wal"
    wal.write_bytes(b"\x37\x7f\x06\x82" + bytes(4000))
    for database in ("empty", "missing"):
        db = tmp_path / "spool.db"
        if database == "empty":
            db.write_bytes(b"")
        else:
            db.unlink()
        with pytest.raises(SpoolUnusable, match=r"write-ahead log .* holds 4004 bytes"):
            make(tmp_path).connect()
        assert wal.stat().st_size == 4004
        assert not db.exists() or db.stat().st_size == 0


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_the_spools_files_are_for_the_bridges_user_only(tmp_path: Path) -> None:
    """The spool holds event bodies (customer and order data): its database, the WAL
    and shared-memory files SQLite makes beside it, and the reserve are 0600, the
    folder the bridge makes 0700, whatever the umask lets through (022: 0644 before).
    A spool an earlier version made 0644 is made 0600 when opened."""
    old_umask = os.umask(0o022)
    try:
        folder = tmp_path / "spool"
        spool = make(folder)
        spool.open()
        try:
            assert await spool.append(record(1), "k1")  # the WAL is written
            names = {p.name: _mode(p) for p in folder.iterdir() if p.name != "spool.lock"}
            assert names == {
                "spool.db": 0o600,
                "spool.db-wal": 0o600,
                "spool.db-shm": 0o600,
                spool_module.RESERVE_NAME: 0o600,
            }
            assert _mode(folder) == 0o700
        finally:
            await spool.close()
        for path in folder.iterdir():  # as an earlier version left them
            path.chmod(0o644)
        with sqlite3.connect(folder / "spool.db") as held:  # keeps -wal and -shm there
            held.execute("PRAGMA journal_mode=WAL")
            spool = make(folder)
            spool.open()
            try:
                assert {
                    p.name: _mode(p)
                    for p in folder.iterdir()
                    if p.name != "spool.lock" and not p.name.endswith("-journal")
                } == {
                    "spool.db": 0o600,
                    "spool.db-wal": 0o600,
                    "spool.db-shm": 0o600,
                    spool_module.RESERVE_NAME: 0o600,
                }
                assert spool.depth == 1
            finally:
                await spool.close()
    finally:
        os.umask(old_umask)


def test_the_start_check_gives_the_signal_wakeup_descriptor_back(tmp_path: Path) -> None:
    """The check borrows Python's signal wakeup descriptor (to interrupt SQLite on
    SIGTERM) and gives back the one that was set, with its thread gone."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno())
    spool = make(tmp_path)
    try:
        spool.connect()
        assert signal.set_wakeup_fd(writer.fileno()) == writer.fileno()
        assert "spool-check-signals" not in [t.name for t in threading.enumerate()]
    finally:
        signal.set_wakeup_fd(previous)
        asyncio.run(spool.close())
        reader.close()
        writer.close()


async def test_the_free_room_gauge_reads_the_disk_in_the_writer_thread_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bridge_spool_disk_free_bytes ran os.statvfs on the event loop at each scrape: a
    volume that hangs (a stale network mount) stopped every request with the scrape.
    The writer thread reads it (at the open, each maintenance round), the gauge its
    last reading."""
    disk = _Disk(free=5 * 4096)
    readers: list[str] = []

    def statvfs(path: object) -> os.statvfs_result:
        readers.append(threading.current_thread().name)
        return disk(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    spool = make(tmp_path)
    spool.open()
    try:
        assert spool.disk_free_bytes() == 5 * 4096
        disk.free = 7 * 4096
        readers.clear()
        assert spool.disk_free_bytes() == 5 * 4096  # no disk read from the loop
        assert readers == []
        await spool.forget_expired_keys()
        assert spool.disk_free_bytes() == 7 * 4096
        assert set(readers) == {"spool-writer"}
    finally:
        await spool.close()


async def test_the_free_room_counts_the_pages_a_drained_backlog_left_for_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite keeps the pages of removed events in its file (for the next ones): after a
    backlog of 90% of BRIDGE_SPOOL_MAX_BYTES drained, the volume's free bytes stayed
    below what the spool may take, and BridgeSpoolDiskShort (free < max - bytes) fired
    for ever on an empty spool, on a volume sized as deploy/README.md says (twice the
    limit and the reserve). Those pages count as room."""
    max_bytes = 4 * 1024 * 1024
    folder = tmp_path / "spool"
    spool = Spool(folder, max_bytes=max_bytes, dedup_window=0)
    volume = 2 * max_bytes + spool._reserve_bytes + 6 * 1024 * 1024

    def used() -> int:
        return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())

    def statvfs(path: object) -> os.statvfs_result:
        return _Disk(free=volume - used())(path)

    def disk_short() -> bool:  # the alert's condition
        return spool.disk_free_bytes() < spool.capacity - spool.bytes

    monkeypatch.setattr(os, "statvfs", statvfs)
    spool.open()
    try:
        assert not disk_short()
        event = Destination("geins.order.create", b"k", b"x" * 2000, [])
        while spool.bytes < 0.9 * max_bytes:  # Kafka away: a backlog
            await asyncio.gather(*(spool.append(event, None) for _ in range(50)))
        while spool.depth:  # Kafka back: drained
            await spool.remove([r.seq for r in await spool.oldest(500, 10**9)])
        await spool.forget_expired_keys()  # the maintenance round reads the disk
        assert volume - used() < max_bytes  # the file kept its pages
        assert not disk_short()
    finally:
        await spool.close()


async def test_the_free_room_gauge_follows_the_disk_while_the_spool_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read by the maintenance round once it succeeded: while the disk is full (the
    spool unwritable, its reserve file there, so no commit reads the disk) every round
    failed before its reading, and the gauge kept the one from before the disk filled
    for the whole incident (a review's test)."""
    disk = _Disk(free=10**9)
    monkeypatch.setattr(os, "statvfs", disk)
    spool = make(tmp_path)
    spool.open()
    try:
        await spool.forget_expired_keys()
        assert spool.disk_free_bytes() >= 10**9 - 4096
        disk.free = 0  # another tenant fills the volume; the spool's commits fail
        spool._set_writable(False, "database or disk is full")

        def full(connection: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(spool_module, "_write_probe", full)
        with pytest.raises(sqlite3.OperationalError):
            await spool.forget_expired_keys()
        assert spool.disk_free_bytes() < 10**6
    finally:
        await spool.close()


async def test_the_key_count_follows_each_delete_of_a_purge(tmp_path: Path) -> None:
    """A purge's two DELETEs commit one by one: when the second (the keys over
    max_keys) failed, the first's expired keys stayed counted (a review's note)."""
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=1.0, max_keys=15)
    spool.open()
    for i in range(10):
        assert await spool.append(record(i), f"old{i}")
    await asyncio.sleep(1.1)  # expired
    for i in range(20):
        assert await spool.append(record(i), f"new{i}")
    assert spool.keys == 30

    class SecondDeleteFails:
        def __init__(self, connection: sqlite3.Connection) -> None:
            self._connection = connection

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if "ORDER BY accepted_at" in sql:
                raise sqlite3.OperationalError("disk I/O error")
            return self._connection.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._connection, name)

    with pytest.raises(sqlite3.OperationalError):  # in the writer thread, as a round
        await spool._call(lambda c: spool._purge(SecondDeleteFails(c)))  # type: ignore[arg-type]
    assert spool.keys == 20  # the ten expired ones are gone, and counted so
    with sqlite3.connect(tmp_path / spool_module.DB_NAME) as db:
        assert db.execute("SELECT count(*) FROM seen").fetchone() == (20,)
    await spool.close()


async def test_a_newer_versions_emptied_spool_is_refused_with_the_way_back(
    tmp_path: Path,
) -> None:
    """Once the newer version emptied the spool, the advice to run it until it is empty
    (and not to delete the file) was a crash loop with no way out (a review's test)."""
    spool = make(tmp_path)
    spool.open()
    assert await spool.append(record(1), "k1")
    [first] = await spool.oldest(10, 10**6)
    await spool.remove([first.seq])  # the newer version delivered everything
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as connection:
        connection.execute("PRAGMA user_version = 2")  # as a newer version leaves it
    with pytest.raises(SpoolUnusable) as refused:
        make(tmp_path).connect()
    said = str(refused.value)
    assert "holds no event" in said
    assert "move spool.db and its spool.db-wal and spool.db-shm files aside" in said
    assert "do not delete it" not in said


async def test_a_row_the_spool_cannot_read_back_is_set_aside_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row whose headers cannot be decoded (a damaged byte quick_check does not see)
    made every read of the oldest fail: the drainer published nothing for good, the
    rows around it and every event accepted after it included, while the bridge went
    on answering 202 (a review's test)."""
    spool = make(tmp_path)
    spool.open()
    for i in range(3):
        assert await spool.append(record(i), f"k{i}")
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as connection:  # the second row garbled
        connection.execute("UPDATE spool SET headers = ? WHERE seq = 2", (b'[["ce_id","k1"\x00',))
    set_aside: list[int] = []
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=3600, on_set_aside=set_aside.append)
    spool.open()
    assert await spool.append(record(3), "k3")
    assert [r.destination.key for r in await spool.oldest(10, 10**6)] == [b"k0", b"k2", b"k3"]
    assert set_aside == [1]
    assert spool.depth == 3  # the set-aside row is no longer waiting
    assert "cannot be read back" in caplog.text
    assert "seq 2" in caplog.text
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:  # kept, for whoever looks
        assert db.execute("SELECT seq FROM spool_unreadable").fetchall() == [(2,)]


def test_a_quota_or_a_refused_write_is_taken_for_a_full_disk() -> None:
    """SQLite reports ENOSPC as SQLITE_FULL, but EDQUOT (a disk quota) as
    SQLITE_IOERR_WRITE: the reserve was never given up for it (a review's note)."""
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    quota = sqlite3.OperationalError("disk I/O error")
    quota.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE
    other = sqlite3.OperationalError("database is locked")
    other.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert spool_module._disk_full(full)
    assert spool_module._disk_full(quota)
    assert not spool_module._disk_full(other)


async def damaged_spool(
    tmp_path: Path, column: str, value: object, *, events: int = 3, more: tuple[str, ...] = ()
) -> tuple[Spool, list[int]]:
    """A spool of ``events`` events whose second row's ``column`` is ``value`` (and the
    statements ``more`` run too), reopened: what it sets aside goes to the list."""
    spool = make(tmp_path)
    spool.open()
    for i in range(events):
        assert await spool.append(record(i), f"k{i}")
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as connection:
        connection.execute(f"UPDATE spool SET {column} = ? WHERE seq = 2", (value,))  # noqa: S608  # the test's own names
        for statement in more:
            connection.execute(statement)
        assert connection.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    set_aside: list[int] = []
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=3600, on_set_aside=set_aside.append)
    spool.open()
    return spool, set_aside


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("size", "x"),  # the table is not STRICT: a damaged byte can make it TEXT
        ("enqueued_at", "x"),
        ("headers", b'[["ce_id",1]]'),  # decodes, but a value is no string
        ("headers", b'[["ce_id",null]]'),
        ("headers", b'{"ab":"c"}'),  # an object: its key "ab" unpacked as a pair
        ("headers", b'[["ce_id","k1","x"]]'),
    ],
)
async def test_a_row_with_a_damaged_column_is_set_aside_too(
    tmp_path: Path, column: str, value: object
) -> None:
    """Each stopped the drainer for good as undecodable headers did (TypeError,
    AttributeError); a damaged enqueued_at left a removal's transaction open, and every
    later append failed (a review's tests)."""
    spool, set_aside = await damaged_spool(tmp_path, column, value)
    try:
        got = await spool.oldest(10, 10**6)
        assert [r.destination.key for r in got] == [b"k0", b"k2"]
        assert set_aside == [1]
        await spool.remove([got[0].seq])
        assert await spool.append(record(9), "k9")
    finally:
        await spool.close()


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (sqlite3.SQLITE_FULL, "disk is full"),
        (sqlite3.SQLITE_IOERR_WRITE, "disk refused a write (disk I/O error: a disk quota full"),
    ],
)
async def test_a_set_aside_on_a_full_disk_gives_up_the_reserve(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
    said: str,
) -> None:
    """A set-aside copies the rows before it deletes them: on a full disk it failed at
    every round while the reserve file, there for this, stayed (a removal gave it up).
    And a failing disk's write error is not said to be a full disk."""
    spool, set_aside = await damaged_spool(tmp_path, "headers", b"garbage")
    real = spool._remove_rows
    failures = 0

    def full_once(*args: Any, **kwargs: Any) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            error = sqlite3.OperationalError(
                "database or disk is full" if code == sqlite3.SQLITE_FULL else "disk I/O error"
            )
            error.sqlite_errorcode = code
            raise error
        real(*args, **kwargs)

    monkeypatch.setattr(spool, "_remove_rows", full_once)
    try:
        got = await spool.oldest(10, 10**6)
        assert [r.destination.key for r in got] == [b"k0", b"k2"]
        assert set_aside == [1]
        assert not (tmp_path / spool_module.RESERVE_NAME).exists()
        assert f"the spool's {said}" in caplog.text
    finally:
        await spool.close()


async def test_a_set_aside_that_fails_keeps_no_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy to spool_unreadable committed on its own, before the removal: one that
    failed copied the row again at every read (a review's test). Now one transaction,
    and any failure in it is rolled back."""
    spool, set_aside = await damaged_spool(tmp_path, "headers", b"garbage")
    real = spool_module._oldest_enqueued_at
    calls = 0

    def failing_once(connection: sqlite3.Connection) -> float | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(connection)

    monkeypatch.setattr(spool_module, "_oldest_enqueued_at", failing_once)
    try:
        assert [r.destination.key for r in await spool.oldest(10, 10**6)] == [b"k0", b"k2"]
        assert set_aside == []  # failed, rolled back: still in the spool
        assert await spool.append(record(9), "k9")  # no transaction left open
        assert [r.destination.key for r in await spool.oldest(10, 10**6)] == [b"k0", b"k2", b"k9"]
        assert set_aside == [1]
    finally:
        await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT seq FROM spool_unreadable").fetchall() == [(2,)]


@pytest.mark.parametrize("size", ["40x", 40.5])
async def test_an_emptied_spool_holds_no_bytes_after_a_set_aside(
    tmp_path: Path, size: object
) -> None:
    """sum(size) at open took a damaged '40x' as 40 (40.5 as 40.5, and the total as a
    float), while its removal freed 0: bytes stayed above 0 once the spool was empty
    (a review's test)."""
    spool, set_aside = await damaged_spool(tmp_path, "size", size)
    try:
        got = await spool.oldest(10, 10**6)
        assert set_aside == [1]
        await spool.remove([r.seq for r in got])
        assert spool.depth == 0
        assert spool.bytes == 0
        assert isinstance(spool.bytes, int)
    finally:
        await spool.close()


async def test_a_column_that_is_not_utf8_text_opens_and_reads(tmp_path: Path) -> None:
    """A TEXT that is not UTF-8 (a damaged topic; a key or value whose type code flipped
    from BLOB to TEXT) made Python's sqlite3 raise as it fetched the row, before the
    row could be set aside: the spool did not open (a topic), or no read of the oldest
    ever succeeded again. Read as bytes: the topic's row is set aside, the key's and
    value's are delivered as their bytes (a review's test)."""
    spool, set_aside = await damaged_spool(
        tmp_path,
        "topic",
        b"gei\x01\xff",
        events=4,
        more=(
            "UPDATE spool SET topic = CAST(topic AS TEXT) WHERE seq = 2",
            "UPDATE spool SET key = CAST(x'6b01ff' AS TEXT) WHERE seq = 3",
        ),
    )
    try:
        got = await spool.oldest(10, 10**6)
        assert [r.destination.key for r in got] == [b"k0", b"k\x01\xff", b"k3"]
        assert set_aside == [1]
    finally:
        await spool.close()


async def test_a_long_job_that_goes_on_is_not_a_hung_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that runs long but makes progress (an index of a large backlog on a slow
    volume) is no hung disk: timed from the job's start, it made the bridge unready and
    refuse deliveries (a review's note). SQLite's progress handler moves the stamp;
    a job waiting on the disk (here, in Python) moves nothing."""
    monkeypatch.setattr(spool_module, "STUCK_AFTER_SECONDS", 0.3)
    spool = make(tmp_path)
    spool.open()
    seen: list[float | None] = []

    def long_but_going_on(connection: sqlite3.Connection) -> None:
        started = time.monotonic()
        while time.monotonic() - started < 1.0:  # a statement of many steps, several times
            connection.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)"
                " SELECT count(*) FROM n"
            ).fetchone()
            seen.append(spool.stuck_for())

    def waiting(_: sqlite3.Connection) -> None:
        time.sleep(0.6)
        seen.append(spool.stuck_for())

    try:
        await spool._call(long_but_going_on)
        assert seen
        assert all(s is None for s in seen), seen
        seen.clear()
        await spool._call(waiting)
        assert seen[0] is not None
        assert seen[0] >= 0.3
    finally:
        await spool.close()


async def test_a_disk_slow_at_every_write_stays_unready_between_its_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fsync taking 12 s: /readyz was 503 only for the last 2 s of each (stuck
    counted the current job alone), and deliveries took 12-24 s for their 202, which no
    readiness probe saw (a review's find). Stuck until a job goes without the wait."""
    monkeypatch.setattr(spool_module, "STUCK_AFTER_SECONDS", 0.3)
    spool = make(tmp_path)
    spool.open()
    try:
        await spool._call(lambda _: time.sleep(0.4))  # a write the disk held
        await eventually(lambda: spool.stuck_for() is None)  # the writer is idle (its job
        # is answered just before the thread is done with it)
        assert spool.stuck() == "the spool's disk took 0 s to finish its last write"
        with pytest.raises(SpoolWriteFailed, match="took 0 s to finish its last write"):
            await spool.append(Destination(topic="t", key=b"k", value=b"v", headers=[]), "k")
        await spool.forget_expired_keys()  # the next round, with the disk quick again
        await eventually(lambda: spool.stuck() is None)
        assert await spool.append(Destination(topic="t", key=b"k", value=b"v", headers=[]), "k")
    finally:
        await spool.close()


def _stepping_wall_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The spool's time.time() reads the returned list's one item, which the test steps
    as NTP would; its other clocks run as they do."""
    wall = [time.time()]
    monkeypatch.setattr(
        spool_module,
        "time",
        SimpleNamespace(
            monotonic=time.monotonic, perf_counter=time.perf_counter, time=lambda: wall[0]
        ),
    )
    return wall


def _order(n: int) -> Destination:
    return Destination(topic="t", key=f"k{n}".encode(), value=b"x", headers=[])


async def test_a_wall_clock_step_forward_does_not_expire_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container started with its clock 3 h behind, then NTP corrected it: every key
    accepted before expired at once, and Geins' retry was published again (a review's
    find). The window runs on the monotonic clock within one run."""
    wall = _stepping_wall_clock(monkeypatch)
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=7200)
    spool.open()
    try:
        assert await spool.append(_order(1), "order-1")
        wall[0] += 3 * 3600
        assert not await spool.append(_order(1), "order-1")  # a duplicate still
    finally:
        await spool.close()


async def test_a_wall_clock_step_back_does_not_forget_the_newest_keys_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After NTP stepped back a clock an hour ahead, the keys accepted next were the
    "oldest": at BRIDGE_SPOOL_MAX_KEYS the newest were forgotten first (a review's
    find), where the README says the oldest go."""
    wall = _stepping_wall_clock(monkeypatch)
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=7200, max_keys=100)
    spool.open()
    try:
        for n in range(100):
            assert await spool.append(_order(n), f"old-{n}")
        wall[0] -= 3600
        assert await spool.append(_order(0), "new-0")
        await spool.forget_expired_keys()  # one key over the bound: the oldest goes
        assert not await spool.append(_order(0), "new-0")
        assert await spool.append(_order(0), "old-0")
    finally:
        await spool.close()


async def test_keys_stamped_ahead_by_an_earlier_run_keep_their_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose clock was an hour ahead stamped its keys then; the next run, its clock
    corrected, measures from the newest stamp on: those keys are not an hour younger
    than the ones it accepts, and still duplicates."""
    wall = _stepping_wall_clock(monkeypatch)
    wall[0] += 3600
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=7200)
    spool.open()
    assert await spool.append(_order(1), "ahead")
    await spool.close()
    wall[0] -= 3600
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=7200, max_keys=1)
    spool.open()
    try:
        assert await spool.append(_order(2), "later")
        await spool.forget_expired_keys()  # one over the bound: "ahead" is the oldest
        assert await spool.append(_order(1), "ahead")
        assert not await spool.append(_order(2), "later")
    finally:
        await spool.close()


def _delete_files(folder: Path) -> None:
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        (folder / name).unlink(missing_ok=True)


def _replace_folder(folder: Path) -> None:
    folder.rename(folder.with_name("moved-aside"))
    folder.mkdir()


def _delete_the_wal(folder: Path) -> None:
    (folder / "spool.db-wal").unlink()


@pytest.mark.parametrize("lose", [_delete_files, _replace_folder, _delete_the_wal])
async def test_a_spool_whose_files_are_gone_takes_no_more_events(
    tmp_path: Path, lose: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Its files deleted (a clean-up job), its folder moved aside and made again, or its
    write-ahead log deleted (taken for a temporary file): SQLite wrote on into the files
    it held, which no start finds, and the bridge answered 202 durable for events lost
    with them, /readyz 200, nothing logged (a review's find). Refused (503) from then on,
    said once; what it holds still drains."""
    folder = tmp_path / "spool"
    spool = Spool(folder, max_bytes=10**6, dedup_window=7200)
    spool.open()
    try:
        assert await spool.append(_order(1), "before")
        lose(folder)
        with pytest.raises(SpoolWriteFailed, match="no longer at"):
            await spool.append(_order(2), "after")
        assert not spool.writable
        await spool.forget_expired_keys()  # its write probe does not make it writable
        assert not spool.writable
        with pytest.raises(SpoolWriteFailed, match="no longer at"):
            await spool.append(_order(3), "later")
        assert [r.destination.key for r in await spool.oldest(10, 10**6)] == [b"k1"]
    finally:
        await spool.close()
    said = [r for r in caplog.records if "no longer at" in r.getMessage()]
    assert [r.levelname for r in said] == ["ERROR"]


async def test_a_read_after_a_stalled_write_does_not_make_a_slow_disk_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slow at every fsync reads from the page cache at once: the drainer's
    oldest(), which follows every commit, cleared the state it is no write of, and
    /readyz was 200 again right after each slow write (a review's find)."""
    monkeypatch.setattr(spool_module, "STUCK_AFTER_SECONDS", 0.3)
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=3600)
    spool.open()
    try:
        assert await spool.append(_order(1), "k1")

        def slow_write(connection: object) -> None:  # a commit whose fsync took 0.4 s
            time.sleep(0.4)

        await spool._call(slow_write)
        await eventually(lambda: spool.stuck_for() is None)
        assert spool.stuck() is not None
        await spool.oldest(10, 10**6)  # the drainer reads what was appended: no write
        await eventually(lambda: spool.stuck_for() is None)
        assert spool.stuck() is not None, "a read cleared a slow disk's unreadiness"
    finally:
        await spool.close()


async def test_a_no_op_maintenance_round_is_no_write_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A maintenance round with no expired key writes nothing (a DELETE of no row
    commits nothing) and told nothing of the disk's writes, yet cleared the state: it
    writes a probe now, while the disk was slow (a review's find)."""
    monkeypatch.setattr(spool_module, "STUCK_AFTER_SECONDS", 0.3)
    spool = Spool(tmp_path, max_bytes=10**6, dedup_window=3600)
    spool.open()
    try:
        await spool._call(lambda _: time.sleep(0.4))
        await eventually(lambda: spool.stuck_for() is None)
        wal = tmp_path / "spool.db-wal"
        before = wal.stat().st_size, wal.stat().st_mtime_ns
        await spool.forget_expired_keys()  # no key to expire
        await eventually(lambda: spool.stuck_for() is None)
        wrote = (wal.stat().st_size, wal.stat().st_mtime_ns) != before
        assert wrote or spool.stuck() is not None, "cleared by a round that wrote nothing"
    finally:
        await spool.close()


async def test_a_durable_bridge_on_a_disk_slow_at_every_write_is_ready_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit's scenario end to end: every write (commit of an append, removal of
    what Kafka took) waits 0.4 s on the disk (the 12 s fsync, scaled to a 0.3 s
    STUCK_AFTER_SECONDS). Right after a delivery's slow commit, the drainer reads the
    record (a quick job) and readiness says 200 again, while the removal that follows
    waits as long: unready only for the tail of each write (a review's find)."""
    monkeypatch.setattr(spool_module, "STUCK_AFTER_SECONDS", 0.3)
    for name in ("_commit_appends", "_remove"):
        original = getattr(Spool, name)

        def slow(self: Spool, *args: object, _original: object = original) -> object:
            time.sleep(0.4)
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(Spool, name, slow)
    publisher = FakePublisher()
    settings = load_settings(
        environ={"BRIDGE_TOKENS": "test-token", "BRIDGE_SPOOL_DIR": str(tmp_path)}
    )
    mode = DurableAck(publisher, Metrics(), settings)
    mode.prepare()
    await mode.start()
    try:
        assert await mode.deliver(_order(1), "k1")  # its commit waited 0.4 s
        await eventually(lambda: bool(publisher.records))  # the drainer read it: no write
        assert mode.unready_reason is not None, "ready while every write stalls"
    finally:
        await mode.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="os.access answers root so (the trouble)")
def test_check_folder_refuses_a_spool_folder_that_cannot_be_made_as_root() -> None:
    """As root (CI, many containers) os.access says yes to any folder not on a read-only
    mount: BRIDGE_SPOOL_DIR=/proc/x passed `bridge check-config`, and `bridge serve`
    then exited 2 (cannot be used, No such file or directory): a review."""
    with pytest.raises(SpoolUnusable, match="cannot be used"):
        check_folder(Path("/proc/geins-bridge-spool"))


def test_a_parent_that_keeps_what_is_made_in_it_does_not_refuse_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_folder makes a trial folder in the nearest existing parent and removes it;
    a parent where a folder can be made but not removed (`chattr +a`, a security
    policy granting create but not rmdir) failed the removal, and the spool folder the
    bridge could make and use was refused (a review). os.rmdir fails as it does there."""
    parent = tmp_path / "parent"
    parent.mkdir()

    def rmdir(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "rmdir", rmdir)
    check_folder(parent / "spool")  # the folder serve would make: it can
