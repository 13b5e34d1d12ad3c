"""leftover: a durable bridge's spool, found by a bridge started in another ack mode."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bridge import spool as spool_module
from bridge.ackmodes import make_ack_mode
from bridge.app import create_app
from bridge.config import Settings, load_settings
from bridge.errors import PayloadTooLarge, SpoolUnusable, Unavailable
from bridge.metrics import Metrics
from bridge.routing import Destination
from bridge.spool import RESERVE_NAME, Spool
from tests.fakes import FakePublisher
from tests.polling import eventually


def settings(folder: Path, **env: str) -> Settings:
    return load_settings(
        environ={"BRIDGE_TOKENS": "test-token-long-enough", "BRIDGE_SPOOL_DIR": str(folder), **env}
    )


def event(key: str) -> Destination:
    return Destination(topic="geins.order.create", key=key.encode(), value=b"{}", headers=[])


def make_spool(folder: Path) -> Spool:
    return Spool(folder, max_bytes=10**7, dedup_window=7200)


async def left_by_a_durable_bridge(folder: Path, *keys: str) -> None:
    """What a durable bridge leaves as it stops with Kafka away: events answered 202
    that are not in Kafka yet."""
    spool = make_spool(folder)
    spool.open()
    for key in keys:
        assert await spool.append(event(key), key)
    await spool.close()


def folder_is_free(folder: Path) -> bool:
    """Whether a durable bridge could take the folder now (its lock is not held)."""
    spool = Spool(folder, max_bytes=10**7, dedup_window=7200, drain_only=True)  # unsaid
    try:
        spool.connect()
    except SpoolUnusable:
        return False
    spool.release()
    return True


@pytest.mark.parametrize("ack", ["broker", "memory"])
async def test_a_switch_away_from_durable_publishes_what_the_spool_held(
    tmp_path: Path, ack: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Restarted with BRIDGE_ACK=broker or memory over a spool that still held events
    answered 202, the bridge left them on disk without a word (nothing reads the folder
    in those modes). They are published in the background, said once, and the folder
    is let go once they all are."""
    await left_by_a_durable_bridge(tmp_path, "a", "b")
    publisher = FakePublisher()
    mode = make_ack_mode(settings(tmp_path, BRIDGE_ACK=ack), publisher, Metrics())
    caplog.set_level(logging.INFO)
    mode.prepare()
    assert "holds 2 events a durable bridge accepted" in caplog.text
    assert not folder_is_free(tmp_path)  # taken, as a durable bridge takes it
    await mode.start()
    try:
        await eventually(lambda: {d.key for d in publisher.records} == {b"a", b"b"})
        await eventually(lambda: folder_is_free(tmp_path))
    finally:
        await mode.stop()
    assert "are all in Kafka; the folder is let go" in caplog.text
    await left_by_a_durable_bridge(tmp_path)  # a durable bridge finds it empty
    spool = make_spool(tmp_path)
    spool.connect()
    assert spool.depth == 0
    spool.release()


class RefusingB(FakePublisher):
    """Kafka refusing the record with key b"b" for good, as too large for its topic
    and for the dead letters' alike."""

    async def hand_over(self, destination: Destination) -> asyncio.Future[Any]:
        if destination.key == b"b":
            await asyncio.sleep(0)
            raise PayloadTooLarge("the record is larger than the topic takes")
        return await super().hand_over(destination)


@pytest.mark.parametrize("lost", ["unreadable", "refused"])
async def test_what_a_drain_lost_is_not_said_to_be_in_kafka(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, lost: str
) -> None:
    """Of the events b was lost: a row the leftover spool could not read back (set aside
    in spool_unreadable), or a record Kafka refused for good whose dead letter failed
    too (dropped). Counted and logged as each happened, but the end of the drain said
    all the spool held was in Kafka (two reviews' tests)."""
    await left_by_a_durable_bridge(tmp_path, "a", "b", "c")
    if lost == "unreadable":
        with sqlite3.connect(tmp_path / "spool.db") as connection:  # b's row garbled
            connection.execute("UPDATE spool SET headers = ? WHERE seq = 2", (b"[[\x00",))
    publisher = FakePublisher() if lost == "unreadable" else RefusingB()
    metrics = Metrics()
    mode = make_ack_mode(settings(tmp_path, BRIDGE_ACK="broker"), publisher, metrics)
    caplog.set_level(logging.INFO)
    mode.prepare()
    await mode.start()
    try:
        await eventually(lambda: folder_is_free(tmp_path))
    finally:
        await mode.stop()
    assert {d.key for d in publisher.records} == {b"a", b"c"}
    assert metrics.registry.get_sample_value("bridge_dropped_records_total") == 1
    assert "all in Kafka" not in caplog.text
    unreadable, dropped = (1, 0) if lost == "unreadable" else (0, 1)
    assert (
        f"are in Kafka but {unreadable} it could not read back (kept in its table "
        f"spool_unreadable) and {dropped} Kafka refused for good"
    ) in caplog.text


async def test_what_is_left_at_a_stop_stays_for_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka away for the whole run: the events stay in the spool, said at the stop,
    and the folder is let go for the next start, in any mode."""
    await left_by_a_durable_bridge(tmp_path, "a")
    publisher = FakePublisher(fail_with=Unavailable("not connected to Kafka"), connected=False)
    mode = make_ack_mode(
        settings(tmp_path, BRIDGE_ACK="broker", BRIDGE_SHUTDOWN_TIMEOUT="0.2"), publisher, Metrics()
    )
    mode.prepare()
    await mode.start()
    await mode.stop()
    assert publisher.records == []
    assert "1 events a durable bridge accepted stay in the spool" in caplog.text
    spool = make_spool(tmp_path)
    spool.connect()
    assert spool.depth == 1
    spool.release()


def test_the_lifespan_publishes_them_and_an_empty_spool_is_let_go_unsaid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the app as serve runs it (prepare, then the lifespan): the events are
    published, by the stop at the latest. An empty spool is let go at once, unsaid (no
    "events are kept in the folder" either: this mode keeps none there)."""
    empty, full = tmp_path / "empty", tmp_path / "full"
    asyncio.run(left_by_a_durable_bridge(empty))
    asyncio.run(left_by_a_durable_bridge(full, "a", "b", "c"))
    caplog.clear()
    caplog.set_level(logging.INFO)
    app = create_app(settings(empty, BRIDGE_ACK="broker"), publisher=FakePublisher())
    app.state.prepare()
    assert folder_is_free(empty)
    assert not [r for r in caplog.records if r.name.startswith(("bridge.spool", "bridge.leftover"))]

    publisher = FakePublisher()
    app = create_app(settings(full, BRIDGE_ACK="memory"), publisher=publisher)
    app.state.prepare()
    with TestClient(app):
        pass
    assert sorted(d.key for d in publisher.records) == [b"a", b"b", b"c"]
    assert folder_is_free(full)


def test_a_spool_another_bridge_holds_is_left_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A durable bridge still running on the folder drains it itself: this one says so
    and serves (it does not need the spool)."""
    asyncio.run(left_by_a_durable_bridge(tmp_path, "a"))
    owner = make_spool(tmp_path)
    owner.connect()
    try:
        publisher = FakePublisher()
        app = create_app(settings(tmp_path, BRIDGE_ACK="broker"), publisher=publisher)
        app.state.prepare()
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
        assert publisher.records == []
        assert "is in use by another bridge" in caplog.text
        assert "BRIDGE_ACK=broker does not publish what it may hold" in caplog.text
    finally:
        owner.release()


@pytest.mark.parametrize("ack", ["durable", "broker"])
async def test_events_held_for_topics_the_settings_no_longer_make_are_named(
    tmp_path: Path, ack: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A topic is fixed as an event is accepted: after a restart with another
    BRIDGE_TOPIC_TEMPLATE or BRIDGE_DEADLETTER_TOPIC, the events and dead letters the
    spool held went to the old topics, which nothing named (and an old dead-letter
    topic the new template makes is an event topic now)."""
    spool = make_spool(tmp_path)
    spool.open()
    assert await spool.append(event("a"), "a")
    letter = Destination("geins.deadletter", b"d", b"{}", [("x-bridge-reason", b"body_not_json")])
    assert await spool.append(letter, None)
    await spool.close()
    kafka_away = FakePublisher(fail_with=Unavailable("not connected to Kafka"), connected=False)
    same = make_ack_mode(
        settings(tmp_path, BRIDGE_ACK=ack, BRIDGE_SHUTDOWN_TIMEOUT="0.1"), kafka_away, Metrics()
    )
    same.prepare()
    assert "in the spool are for" not in caplog.text
    await same.start()
    await same.stop()
    new = settings(
        tmp_path,
        BRIDGE_ACK=ack,
        BRIDGE_TOPIC_TEMPLATE="shop.{entity}",
        BRIDGE_DEADLETTER_TOPIC="shop-deadletter",
    )
    mode = make_ack_mode(new, FakePublisher(), Metrics())
    mode.prepare()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        "1 dead letters in the spool are for geins.deadletter, the dead-letter topic when "
        "they were kept (BRIDGE_DEADLETTER_TOPIC is shop-deadletter now): they are "
        "published there"
    ) in warned
    assert (
        "1 events in the spool are for geins.order.create, which BRIDGE_TOPIC_TEMPLATE "
        "shop.{entity} does not make: accepted under earlier settings, they are published "
        "there"
    ) in warned
    await mode.start()
    await mode.stop()


async def test_events_for_the_dotted_topics_after_a_switch_to_underscores_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """geins.{entity}.{action} changed for geins_{entity}_{action}: the spool's events
    still go to geins.order.create, unsaid, as the check took the two for one (as
    Kafka's collision check does: so the new topics cannot even be created while the
    old ones exist). A review's test."""
    await left_by_a_durable_bridge(tmp_path, "a")
    new = settings(tmp_path, BRIDGE_TOPIC_TEMPLATE="geins_{entity}_{action}")
    mode = make_ack_mode(new, FakePublisher(), Metrics())
    mode.prepare()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        "1 events in the spool are for geins.order.create, which BRIDGE_TOPIC_TEMPLATE "
        "geins_{entity}_{action} does not make: accepted under earlier settings, they are "
        "published there"
    ) in warned
    await mode.start()
    await mode.stop()


async def test_memory_mode_with_a_leftover_spool_stops_within_one_shutdown_timeout(
    tmp_path: Path,
) -> None:
    """The memory queue's drain and the leftover spool's each took a
    BRIDGE_SHUTDOWN_TIMEOUT of their own, one after the other: with Kafka away the stop
    took two, and the producer's flush, whose deadline the lifespan set before both,
    none. They share the lifespan's deadline now."""
    await left_by_a_durable_bridge(tmp_path, "a")
    publisher = FakePublisher(fail_with=Unavailable("Kafka is away"), connected=False)
    app = create_app(
        settings(tmp_path, BRIDGE_ACK="memory", BRIDGE_SHUTDOWN_TIMEOUT="1"), publisher=publisher
    )
    app.state.prepare()
    with TestClient(app) as client:
        answer = client.post(
            "/webhooks/geins",
            content=b'{"entity":"Order","action":"create"}',
            headers={"Authorization": "Bearer test-token-long-enough"},
        )
        assert answer.status_code == 202
        began = time.monotonic()
    assert time.monotonic() - began < 1.5


def test_a_drained_spool_is_not_given_a_reserve_nor_said_to_refuse_deliveries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The leftover spool was opened as a durable one: on a nearly full disk it made a
    reserve file and logged that deliveries were refused, which in broker mode touch no
    spool; and since spool.db stays after its drain, at every later start."""
    asyncio.run(left_by_a_durable_bridge(tmp_path, "a"))
    (tmp_path / RESERVE_NAME).unlink()

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    monkeypatch.setattr(
        os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 1 << 20, 0, 1, 0, 0, 0, 0, 255))
    )
    caplog.set_level(logging.INFO)
    mode = make_ack_mode(settings(tmp_path, BRIDGE_ACK="broker"), FakePublisher(), Metrics())
    mode.prepare()
    asyncio.run(mode.stop())  # never started (a stop before serving): lets the folder go
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [m for m in said if "refused" in m or "reserve" in m] == []
    assert "holds 1 events a durable bridge accepted" in caplog.text
    assert not (tmp_path / RESERVE_NAME).exists()
    assert folder_is_free(tmp_path)


def test_a_spool_folder_it_may_not_look_into_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder it may not look into (a durable bridge's, 0700 for another user) was
    taken for one without a spool, without a word (simulated: the tests run as root)."""
    asyncio.run(left_by_a_durable_bridge(tmp_path, "a"))
    real_exists = Path.exists

    def exists(self: Path, *, follow_symlinks: bool = True) -> bool:
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self)

    monkeypatch.setattr(Path, "exists", exists)
    monkeypatch.setattr(
        spool_module,
        "check_folder",
        lambda folder: (_ for _ in ()).throw(
            SpoolUnusable(f"spool folder {folder} cannot be used (Permission denied)")
        ),
    )
    mode = make_ack_mode(settings(tmp_path, BRIDGE_ACK="broker"), FakePublisher(), Metrics())
    mode.prepare()
    assert "cannot be used (Permission denied); BRIDGE_ACK=broker does not publish" in caplog.text


@pytest.mark.parametrize("ack", ["broker", "memory"])
def test_the_spool_gauges_count_what_a_leftover_spool_still_holds(tmp_path: Path, ack: str) -> None:
    """bridge_spool_depth read 0 in broker and memory mode while a durable bridge's
    spool still held events Kafka (away) could not take: the README's "once the spool
    is empty (bridge_spool_depth 0)" could not be followed, and BridgeSpoolOld could
    not fire (a review's test)."""
    asyncio.run(left_by_a_durable_bridge(tmp_path, "a", "b", "c"))
    metrics = Metrics()
    kafka_away = FakePublisher(fail_with=Unavailable("not connected to Kafka"), connected=False)
    app = create_app(
        settings(tmp_path, BRIDGE_ACK=ack, BRIDGE_SHUTDOWN_TIMEOUT="0.1"),
        publisher=kafka_away,
        metrics=metrics,
    )
    app.state.prepare()
    with TestClient(app):
        assert metrics.registry.get_sample_value("bridge_spool_depth") == 3
        age = metrics.registry.get_sample_value("bridge_spool_oldest_age_seconds")
        assert age is not None
        assert age > 0
