"""KafkaPublisher around a producer's replacement, with fake producers (the real
broker's side is in test_kafka_end_to_end.py): a send waiting on the replaced
producer moves to the new one, without losing its caller's deadline or a record it
appended, and a record refused as out of order waits for the replacement."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

import aiokafka.cluster
import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidTimestampError,
    KafkaConnectionError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    TopicAuthorizationFailedError,
)

import bridge.publisher as publisher_module
from bridge.ackmodes import BrokerAck
from bridge.config import load_settings
from bridge.errors import PayloadTooLarge, PublishTimeout, Unavailable
from bridge.metrics import Metrics
from bridge.publisher import KafkaPublisher
from bridge.routing import Destination
from tests.fakes import TOKEN

DESTINATION = Destination(topic="t", key=b"k", value=b"v", headers=[])


class FakeProducer:
    """What KafkaPublisher uses of an AIOKafkaProducer. ``send`` waits for metadata
    until ``metadata`` is set (never, on a producer being closed), then appends."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[object], None]] = []
        cluster = SimpleNamespace(
            add_listener=self.listeners.append,
            remove_listener=self.listeners.remove,
            partitions_for_topic=lambda _: None,  # unknown topic: send() is used
        )
        self.client = SimpleNamespace(cluster=cluster)
        self.metadata = asyncio.Event()
        self.sends = 0
        self.appended: list[asyncio.Future[Any]] = []
        self.alone: list[bool] = []  # whether each appended record went in a batch of its own

    def metadata_refreshed(self) -> None:
        """aiokafka completed a metadata refresh: it calls its cluster's listeners."""
        for listener in list(self.listeners):
            listener(self.client.cluster)

    async def send(self, topic: str, **_: Any) -> asyncio.Future[Any]:
        self.sends += 1
        await self.metadata.wait()  # aiokafka's _wait_on_metadata
        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.appended.append(acked)  # add_message: in a batch now, no await after it
        self.alone.append(False)
        return acked

    async def partitions_for(self, topic: str) -> set[int]:
        await self.metadata.wait()
        return {0, 1, 2}

    async def stop(self) -> None:
        pass

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        """A batch of its own: the record in it alone, closed to the others."""
        assert batch.closed
        assert len(batch.records) == 1
        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.appended.append(acked)
        self.alone.append(True)
        return acked


class FakeBatch:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed = False

    def append(self, **record: Any) -> object:
        assert not self.closed
        self.records.append(record)
        return object()

    def close(self) -> None:
        self.closed = True


def publisher(timeout: float = 2, ack: str = "broker") -> KafkaPublisher:
    settings = load_settings(
        environ={
            "BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9",
            "BRIDGE_PUBLISH_TIMEOUT": str(timeout),
            "BRIDGE_ACK": ack,
        }
    )
    return KafkaPublisher(settings, Metrics())


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_send_waiting_on_a_replaced_producer_goes_through_the_new_one() -> None:
    """The replaced producer flushes and closes, and never brings the metadata its
    send waits for: that send used to wait until the caller's deadline (a 503)."""
    pub = publisher()
    old, new = FakeProducer(), FakeProducer()
    pub._use(old, b"")
    task = asyncio.create_task(pub.hand_over(DESTINATION))
    await turns()
    assert old.sends == 1
    new.metadata.set()
    pub._use(new, b"")
    acked = await asyncio.wait_for(task, 1)
    assert new.appended == [acked]
    assert old.appended == []


@pytest.mark.parametrize("after", [1, 2, 3])
async def test_a_deadline_passing_as_the_send_moves_is_kept(after: int) -> None:
    """The caller's deadline passing just as the producer is replaced ends the call
    with the deadline's error. With the send in a task of its own, a cancellation at
    that moment was taken for the replacement's, and the send went on through the
    new producer with no deadline left (reviewer: still waiting 4 s after a 2 s one)."""
    pub = publisher(timeout=2)
    old, new = FakeProducer(), FakeProducer()  # neither brings metadata
    pub._use(old, b"")
    task = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    pub._use(new, b"")
    await turns(after)
    for wait in list(pub._deadlines._waits):
        wait.expire()  # what the watchdog does when the deadline passes
    done, _ = await asyncio.wait([task], timeout=1)
    assert done, "publish went on past its deadline"
    with pytest.raises(PublishTimeout):
        task.result()
    assert new.appended == []


async def test_a_record_appended_as_the_deadline_passes_is_handed_over() -> None:
    """A send that appended its record is a hand-over, whatever deadline passes after
    it: the caller gets the record's future. With a task in between, the caller was
    told 'not handed over' (TimeoutError) about a record the producer held, and the
    drainer handed it over a second time."""
    pub = publisher()
    producer = FakeProducer()
    pub._use(producer, b"")
    outcome: list[str] = []

    async def probe() -> None:  # as the drainer's probe
        try:
            async with asyncio.timeout(None) as deadline:
                waiting.set_result(deadline)
                await pub.hand_over(DESTINATION)
        except TimeoutError:
            outcome.append("not handed over")
        else:
            outcome.append("handed over")

    waiting: asyncio.Future[asyncio.Timeout] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(probe())
    deadline = await waiting
    await turns()
    producer.metadata.set()  # the metadata comes...
    await asyncio.sleep(0)  # ...the send appends...
    if not task.done():
        deadline.reschedule(asyncio.get_running_loop().time())  # ...as the deadline passes
    await task
    assert len(producer.appended) == 1
    assert outcome == ["handed over"]


async def test_a_record_refused_as_out_of_order_goes_again_once_replaced() -> None:
    """After Kafka refused a record for good, the producer cannot send to that
    partition (OutOfOrderSequenceNumber) until it is replaced. A record refused that
    way is sent again through the replacement (Kafka wrote nothing of it), and a
    replacement that has to wait (just after the last one) is made when it may be,
    not at the next heartbeat."""
    pub = publisher(timeout=5)
    broken, fresh = FakeProducer(), FakeProducer()
    broken.metadata.set()
    fresh.metadata.set()
    pub._use(broken, b"")
    pub._broken = broken
    pub._reset_not_before = time.monotonic() + 0.2  # a reset was made just now
    started: list[float] = []

    async def reset() -> None:
        started.append(time.monotonic())
        pub._replace(fresh, b"")
        pub._rotation = None

    pub._reset = reset  # type: ignore[method-assign]  # connecting a fake
    pub._retire = lambda _: asyncio.sleep(0)  # type: ignore[assignment,method-assign]
    task = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    [refused] = broken.appended
    refused.set_exception(OutOfOrderSequenceNumber())
    pub._reset_soon()  # what _after_ack does: too soon, so it must come back by itself
    await turns()
    assert not task.done()  # waits for the fresh producer, not a 503
    await asyncio.sleep(0.4)
    assert started, "no reset was made once it was allowed"
    [resent] = fresh.appended
    resent.set_result(None)
    await asyncio.wait_for(task, 1)


async def test_publish_refuses_at_once_while_kafka_has_not_answered() -> None:
    """Once Kafka has answered nothing for UNANSWERED_AFTER_SECONDS (the bridge is
    unready by then), broker mode answers 503 at once: every delivery used to wait the
    whole publish timeout (5 s) for the same 503, holding a concurrency place, and was
    counted as a timeout, never as not_connected."""
    pub = publisher(timeout=30)
    producer = FakeProducer()
    producer.metadata.set()
    pub._use(producer, b"")
    pub._answered_until = time.monotonic() - 1  # failing heartbeats
    pub._refreshed_at -= publisher_module.STALE_AFTER_SECONDS + 1
    pub._metadata_at = -math.inf  # nor any metadata response
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"no answer from Kafka for 25 s") as refused:
        await pub.publish(DESTINATION)
    # the sender reads it: where Kafka is, is none of its business
    assert pub._settings.kafka_bootstrap not in refused.value.detail
    assert time.monotonic() - started < 1
    assert producer.sends == 0
    assert pub._metrics.publish_errors.labels("not_connected")._value.get() == 1


async def test_acknowledgements_keep_publish_going_through_a_slow_refresh() -> None:
    """Kafka acknowledging records is an answer: one metadata refresh that timed out
    made the metadata stale, and every delivery got a 503 until the next refresh came
    back, while Kafka took records all along (reviewer: 141 of 1,355 refused)."""
    pub = publisher(timeout=5)
    producer = FakeProducer()
    producer.metadata.set()
    pub._use(producer, b"")
    pub._answered_until = time.monotonic() - 1
    pub._refreshed_at -= publisher_module.STALE_AFTER_SECONDS + 1
    pub._metadata_at = -math.inf  # nor any metadata response
    earlier: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    earlier.set_result(None)
    pub._after_ack(producer, earlier)  # a record acknowledged just now
    assert not pub.connected  # unready (stale metadata), as before
    task = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    assert producer.sends == 1
    producer.appended[0].set_result(None)
    await asyncio.wait_for(task, 1)


def frozen_monotonic(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The publisher's time.monotonic() reads the returned list's one item (1000 at
    first), which the test moves on; its other clocks run as they do."""
    clock = [1000.0]
    monkeypatch.setattr(
        publisher_module,
        "time",
        SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter, time=time.time),
    )
    return clock


async def test_one_timed_out_refresh_does_not_make_the_bridge_unready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worst case of one metadata refresh that times out: the last good refresh
    at 0, the next starts a heartbeat later and times out a heartbeat after that, the
    one after it starts after one more sleep and answers just inside its own timeout.
    At three heartbeats of freshness /readyz (and the drainer) turned unready before
    that answer, while Kafka was fine. Two refreshes in a row that fail still do."""
    beat = publisher_module.HEARTBEAT_SECONDS
    clock = frozen_monotonic(monkeypatch)
    pub = publisher()
    producer = FakeProducer()
    answers: list[BaseException | None] = []

    async def force_metadata_update() -> bool:
        if (answer := answers.pop(0)) is not None:
            raise answer
        return True

    producer.client.force_metadata_update = force_metadata_update
    pub._use(producer, b"")  # a good answer at 1000
    start = clock[0]
    clock[0] = start + 2 * beat  # the next refresh (started at 1 beat) timed out
    answers.append(TimeoutError())
    await pub._heartbeat(producer)
    clock[0] = start + 4 * beat - 0.01  # the one after it, nearly out of time itself
    assert pub.connected
    answers.append(None)
    await pub._heartbeat(producer)
    assert pub.connected
    fresh_at = clock[0]
    for failed in (2, 4):  # two in a row that time out
        clock[0] = fresh_at + failed * beat
        answers.append(TimeoutError())
        await pub._heartbeat(producer)
    clock[0] = fresh_at + 5 * beat  # the third is still out
    assert not pub.connected


def refusing(pub: KafkaPublisher, broken: FakeProducer, fresh: FakeProducer) -> None:
    """``broken`` in use; a reset puts ``fresh`` in its place (as a refusal asks)."""
    broken.metadata.set()
    fresh.metadata.set()
    pub._use(broken, b"")

    async def reset() -> None:
        pub._replace(fresh, b"")
        pub._rotation = None

    pub._reset = reset  # type: ignore[method-assign]  # connecting a fake
    pub._retire = lambda _: asyncio.sleep(0)  # type: ignore[assignment,method-assign]


async def test_a_record_refused_with_a_shared_batch_goes_again_alone_until_it_lands() -> None:
    """A batch Kafka refused as too large may be too large only for its other records:
    the record goes again alone once the producer is replaced; refused then as out of
    order (another batch broke the fresh producer), alone again. A resend into a
    shared batch had been refused as too large once more: a 413 for a small record
    (review: 82 of 819)."""
    pub = publisher(timeout=5)
    first, second, third = FakeProducer(), FakeProducer(), FakeProducer()
    refusing(pub, first, second)
    task = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    first.appended[0].set_exception(MessageSizeTooLargeError())  # with its batch
    for _ in range(50):
        await turns()
        if second.appended:
            break
    assert second.alone == [True]
    pub._reset = lambda: _replace_with(pub, third)  # type: ignore[method-assign]
    second.appended[0].set_exception(OutOfOrderSequenceNumber())
    for _ in range(50):
        await turns()
        if third.appended:
            break
    assert third.alone == [True]
    third.appended[0].set_result(None)
    await asyncio.wait_for(task, 1)
    assert pub._metrics.publish_errors.labels("too_large")._value.get() == 1


async def _replace_with(pub: KafkaPublisher, producer: FakeProducer) -> None:
    producer.metadata.set()
    pub._replace(producer, b"")
    pub._rotation = None


async def test_a_record_refused_as_too_large_alone_is_too_large_at_once() -> None:
    """Refused alone (its batch held it only), the refusal is the record's own: a 413
    without waiting for the fresh producer and sending it again, which broke that one
    too (two resets per such record, the partition's other records waiting)."""
    pub = publisher(timeout=5)
    broken, fresh = FakeProducer(), FakeProducer()
    refusing(pub, broken, fresh)
    handover = pub._handover
    assert handover is not None

    def fast_way(*_: Any) -> asyncio.Future[Any]:  # the record opened a batch of its own
        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        broken.appended.append(acked)
        handover.last_batch = SimpleNamespace(record_count=1)
        return acked

    handover.append = fast_way  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    broken.appended[0].set_exception(MessageSizeTooLargeError())
    with pytest.raises(PayloadTooLarge):
        await asyncio.wait_for(task, 1)
    assert fresh.appended == []


async def test_a_producer_broken_while_a_rotation_fails_is_replaced_at_once() -> None:
    """A record refused while a secret rotation was connecting left the reset to the
    rotation; the rotation failed (Kafka refused the new secrets) and nothing replaced
    the broken producer until the next heartbeat: the record waited its whole deadline
    for a 503 (a review's find)."""
    pub = publisher(timeout=3)
    broken, fresh = FakeProducer(), FakeProducer()
    refusing(pub, broken, fresh)

    async def refused_secrets(**_: Any) -> str:
        await asyncio.sleep(0.05)
        return publisher_module.REFUSED

    pub._start_producer = refused_secrets  # type: ignore[method-assign]
    pub._rotation = asyncio.create_task(pub._rotate(b"new"))
    task = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    broken.appended[0].set_exception(OutOfOrderSequenceNumber())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if fresh.appended:
            break
    assert fresh.alone == [True], "the broken producer was not replaced"
    fresh.appended[0].set_result(None)
    await asyncio.wait_for(task, 1)


async def test_a_rotation_cancelled_by_stop_starts_no_reset() -> None:
    """stop() cancels a rotation still connecting; a producer broken meanwhile must not
    be reset from the rotation's end, by a task stop() does not know of."""
    pub = publisher(timeout=3)
    broken, fresh = FakeProducer(), FakeProducer()
    refusing(pub, broken, fresh)
    resets: list[str] = []

    async def reset() -> None:
        resets.append("reset")

    pub._reset = reset  # type: ignore[method-assign]

    async def connecting(**_: Any) -> str:
        await asyncio.Event().wait()
        return publisher_module.REFUSED

    pub._start_producer = connecting  # type: ignore[method-assign]
    pub._rotation = asyncio.create_task(pub._rotate(b"new"))
    await turns()
    pub._broken = broken  # refused a record meanwhile
    pub._flush_and_close = lambda *_: asyncio.sleep(0)  # type: ignore[method-assign]
    await pub.stop()
    await asyncio.sleep(0.05)
    assert resets == []
    assert pub._rotation is None


def connecting_after_refused_secrets(
    pub: KafkaPublisher, fresh: FakeProducer, starts: list[str], failure: BaseException | None
) -> asyncio.Event:
    """A rotation whose secrets Kafka refuses (or whose connecting raises ``failure``),
    then a reset that connects ``fresh`` once the returned event is set."""
    release = asyncio.Event()

    async def start_producer(*, explain: bool = False, **_: Any) -> Any:
        starts.append("rotation" if explain else "reset")
        if explain:
            await asyncio.sleep(0.02)
            if failure is not None:
                raise failure
            return publisher_module.REFUSED
        await release.wait()
        fresh.metadata.set()
        return fresh, b""

    pub._start_producer = start_producer  # type: ignore[method-assign]
    pub._flush_and_close = lambda *_: asyncio.sleep(0)  # type: ignore[method-assign]
    return release


@pytest.mark.parametrize(
    "failure", [None, ValueError("Server sent wrong signature!")], ids=["refused", "raised"]
)
async def test_the_reset_after_a_failed_rotation_is_known_and_stopped(
    failure: BaseException | None,
) -> None:
    """The reset a failed rotation asks for is the task stop() cancels and the one
    later heartbeats wait for: it was forgotten (a second reset could start beside
    it, and its producer came after stop()), and a rotation that raised asked for
    none (the broken producer stayed, rotation after rotation)."""
    pub = publisher(timeout=3)
    broken, fresh = FakeProducer(), FakeProducer()
    broken.metadata.set()
    pub._use(broken, b"")
    starts: list[str] = []
    release = connecting_after_refused_secrets(pub, fresh, starts, failure)
    pub._rotation = asyncio.create_task(pub._rotate(b"new"))
    await turns()
    pub._broken = broken  # Kafka refused a record of it while the rotation connects
    await asyncio.sleep(0.1)
    assert starts == ["rotation", "reset"]
    assert pub._rotation is not None  # the reset, known
    assert not pub._rotation.done()
    pub._reset_soon()  # the next heartbeat
    await turns()
    assert starts == ["rotation", "reset"]  # no second reset beside it
    await pub.stop()
    release.set()
    await asyncio.sleep(0.05)
    assert pub._producer is None  # nothing connected after stop()


async def test_a_producer_broken_by_an_outage_is_replaced_as_soon_as_kafka_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch aiokafka gave up on during an outage (KafkaTimeoutError after 40 s,
    LeaderNotAvailable) breaks the producer's numbering as a refusal does, so it is
    replaced; but it is no refusal "for good", and the failed tries to replace it while
    Kafka is away are one warning, not an ERROR each with a back-off growing to 10 s:
    Kafka back, the stuck partitions waited up to that for the next try (2,100 503s of
    a full spool after Kafka returned, in a review). A heartbeat that Kafka answers
    now starts the replacement at once."""
    caplog.set_level(logging.DEBUG, logger="bridge.publisher")
    pub = publisher(timeout=3)
    broken, fresh = FakeProducer(), FakeProducer()
    broken.metadata.set()
    fresh.metadata.set()
    kafka_back = False

    async def force_metadata_update() -> bool:
        return kafka_back  # False: no broker answered

    broken.client.force_metadata_update = force_metadata_update
    pub._use(broken, b"")
    tries: list[bool] = []

    async def start_producer(**_: Any) -> Any:
        tries.append(kafka_back)
        return (fresh, b"") if kafka_back else publisher_module.FAILED

    pub._start_producer = start_producer  # type: ignore[method-assign]
    pub._retire = lambda _: asyncio.sleep(0)  # type: ignore[assignment,method-assign]
    expired: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    expired.set_exception(KafkaTimeoutError())
    pub._after_ack(broken, expired)
    for _ in range(100):  # the first try, then its back-off (0.5 s), then the second
        await asyncio.sleep(0.02)
        if len(tries) == 2:
            break
    assert tries == [False, False]
    assert pub._producer is broken
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(
        level == logging.WARNING and "Kafka did not take a record" in message
        for level, message in lines
    )
    assert not any("refused a record for good" in message for _, message in lines)
    failed = [level for level, m in lines if m.startswith("could not connect a fresh")]
    assert failed == [logging.WARNING, logging.DEBUG]  # said once
    assert not any(level >= logging.ERROR for level, _ in lines)
    kafka_back = True
    pub._reset_not_before = time.monotonic() + 60  # a long back-off still to wait
    await pub._heartbeat(broken)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if pub._producer is fresh:
            break
    assert pub._producer is fresh, "not replaced when Kafka answered again"
    assert pub._metrics.producer_resets._value.get() == 1


async def test_an_outage_is_logged_when_it_starts_each_minute_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed heartbeat was a WARNING every 5 s all through an outage (720 lines an
    hour saying the same); now the first of a run, one a minute, and Kafka's return. A
    Kafka failing every other refresh gets no more than a warning a minute either (each
    failure after an answer was a new run: a warning and an "again" line each)."""
    caplog.set_level(logging.DEBUG, logger="bridge.publisher")
    pub = publisher()
    producer = FakeProducer()
    kafka_back = False

    async def force_metadata_update() -> bool:
        return kafka_back  # False: no broker answered

    producer.client.force_metadata_update = force_metadata_update
    pub._use(producer, b"")

    def said(level: int) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == level and r.name == "bridge.publisher"
        ]

    def a_minute_on() -> None:
        pub._refreshed_at -= 61
        pub._refresh_failure_said -= 61

    for _ in range(5):
        await pub._heartbeat(producer)
    [first] = said(logging.WARNING)
    assert first.startswith("Kafka metadata refresh failed: KafkaError")
    assert len(said(logging.DEBUG)) == 4
    a_minute_on()
    await pub._heartbeat(producer)
    assert said(logging.WARNING)[1:] == [
        "Kafka has answered no metadata refresh for 61 s: "
        "KafkaError('Unable to get cluster metadata over all known brokers')"
    ]
    kafka_back = True
    await pub._heartbeat(producer)
    await pub._heartbeat(producer)
    assert said(logging.INFO) == [
        "Kafka answers metadata requests again, after 61 s without an answer"
    ]
    for _ in range(3):  # flapping, within the minute: said at DEBUG only
        kafka_back = False
        await pub._heartbeat(producer)
        kafka_back = True
        await pub._heartbeat(producer)
    assert len(said(logging.WARNING)) == 2
    assert len(said(logging.INFO)) == 1
    a_minute_on()
    kafka_back = False
    await pub._heartbeat(producer)  # a minute after the last warning: said again
    assert said(logging.WARNING)[2].startswith("Kafka metadata refresh failed")


async def test_a_fresh_producer_ends_a_run_of_failed_refreshes() -> None:
    """A producer replaced while the heartbeats fail (a reset once Kafka is back)
    starts with the cluster's metadata: the run ends there, not at the next heartbeat,
    whose "again" line then read a few seconds where the outage lasted a minute."""
    pub = publisher()
    broken, fresh = FakeProducer(), FakeProducer()
    pub._use(broken, b"")
    pub._refresh_failed(KafkaTimeoutError())
    assert pub._refresh_failing
    pub._retire = lambda _: asyncio.sleep(0)  # type: ignore[assignment,method-assign]
    pub._replace(fresh, b"")
    assert not pub._refresh_failing
    assert pub.connected


class FakeHandover:
    """The fast way in (DirectHandover): every record joins one open batch."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.batch = SimpleNamespace(future=loop.create_future(), record_count=2)
        self.last_batch: Any = None
        self.appended: list[asyncio.Future[Any]] = []

    def append(self, *_: Any) -> asyncio.Future[Any]:
        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.appended.append(acked)
        self.last_batch = self.batch
        return acked

    def knows(self, _: str) -> bool:
        return True

    def close(self) -> None:
        pass


def fast_way_in(
    timeout: float, ack: str = "broker"
) -> tuple[KafkaPublisher, FakeProducer, FakeHandover]:
    """A publisher using a fake producer whose records all take the fast way in, into
    one open batch (call it from the event loop)."""
    pub = publisher(timeout=timeout, ack=ack)
    producer = FakeProducer()
    pub._use(producer, b"")
    handover = FakeHandover()
    pub._handover = handover  # type: ignore[assignment]
    return pub, producer, handover


async def test_a_batch_given_up_on_after_its_requests_timed_out_breaks_the_producer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Broker mode: a request stops waiting at its deadline, which cancels its record's
    future, so aiokafka giving up on the record's batch later in a long outage went
    unseen, and the producer it broke was replaced only once Kafka refused a record as
    out of order after its return. The batch is watched once its records time out: the
    producer counts as broken when aiokafka gives up on it, and is replaced as soon as
    Kafka answers."""
    caplog.set_level(logging.INFO, logger="bridge.publisher")
    pub, producer, handover = fast_way_in(timeout=0.05)
    tries: list[str] = []

    async def start_producer(**_: Any) -> Any:
        tries.append("reset")
        return publisher_module.FAILED  # Kafka still away

    pub._start_producer = start_producer  # type: ignore[method-assign]
    for _ in range(2):  # two records of one batch time out
        with pytest.raises(PublishTimeout):
            await pub.publish(DESTINATION)
    assert all(acked.cancelled() for acked in handover.appended)
    assert pub._broken is None  # nothing known of the batch yet
    handover.batch.future.set_exception(KafkaTimeoutError())  # aiokafka gives up on it
    await turns()
    assert pub._broken is producer
    assert tries == ["reset"]
    said = [r.getMessage() for r in caplog.records if "Kafka did not take a record" in r.msg]
    assert len(said) == 1
    assert handover.batch.future.remove_done_callback(pub._watch) == 0  # ran once, gone
    await pub.stop()


async def test_a_batch_is_watched_once_however_many_of_its_records_time_out() -> None:
    pub, _, handover = fast_way_in(timeout=0.02)
    for _ in range(3):
        with pytest.raises(PublishTimeout):
            await pub.publish(DESTINATION)
    assert handover.batch.future.remove_done_callback(pub._watch) == 1
    await pub.stop()


async def test_an_acknowledgement_in_the_turn_its_deadline_fires_is_a_success() -> None:
    """The deadline's cancel landed on a record Kafka had just taken, in the same turn
    of the loop: a 503, and its key unrecorded, so the retry was published again."""
    pub, _, handover = fast_way_in(timeout=5)
    task = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    handover.appended[0].set_result(None)  # Kafka's acknowledgement...
    handover.batch.future.set_result(None)
    pub._deadlines._waits[0].expire()  # ...and the deadline, before the request runs again
    await task
    assert pub._metrics.registry.get_sample_value("bridge_published_records_total") == 1
    await pub.stop()


class SlowWayHandover(FakeHandover):
    """Every record goes through send(), and its batch is found after it."""

    def append(self, *_: Any) -> asyncio.Future[Any] | None:  # type: ignore[override]
        self.last_batch = None
        return None

    def batch_of_send(self, _topic: str, _key: bytes, acked: asyncio.Future[Any]) -> Any:
        self.appended.append(acked)
        return self.batch


async def test_a_record_sent_the_slow_way_that_lands_after_its_503_is_known() -> None:
    """A record that went through send() (the partition's batch full, say) and timed
    out: its batch is the landing, so its key is recorded and it counts as published
    once Kafka takes it. Neither happened: retries were published again."""
    pub = publisher(timeout=0.05)
    producer = FakeProducer()
    producer.metadata.set()
    pub._use(producer, b"")
    handover = SlowWayHandover()
    pub._handover = handover  # type: ignore[assignment]
    with pytest.raises(PublishTimeout) as timed_out:
        await pub.publish(DESTINATION)
    assert handover.appended == producer.appended
    landing = timed_out.value.landing
    assert landing is handover.batch.future
    published = "bridge_published_records_total"
    assert not pub._metrics.registry.get_sample_value(published)
    landing.set_result(None)
    await turns()
    assert pub._metrics.registry.get_sample_value(published) == 1
    await pub.stop()


@pytest.mark.parametrize(
    ("failure", "refused"),
    [
        (TopicAuthorizationFailedError(), True),
        (OutOfOrderSequenceNumber(), True),
        (MessageSizeTooLargeError(), True),
        (KafkaTimeoutError(), False),
        (LeaderNotAvailableError(), False),
        (asyncio.CancelledError(), False),
    ],
)
def test_a_refusal_is_kafkas_answer_a_timeout_is_not(failure: BaseException, refused: bool) -> None:
    assert publisher_module.refused_by_kafka(failure) is refused


async def test_any_metadata_response_is_an_answer() -> None:
    """aiokafka's own metadata requests (for a topic it has no metadata for, which
    Kafka answers "unknown topic") count as Kafka answering: a topic missing on a
    broker that does not create topics was held only when a heartbeat had answered
    within the last second, and probed every second until then."""
    pub = publisher()
    producer = FakeProducer()
    pub._use(producer, b"")
    pub._answered_at = 0.0  # no acknowledgement nor heartbeat since
    pub._metadata_at -= 2  # the producer's start, two seconds ago
    second_ago = time.perf_counter() - 1
    assert not pub.answered_since(second_ago)
    producer.metadata_refreshed()
    assert pub.answered_since(second_ago)
    assert not pub.answered_since(time.perf_counter() + 1)


async def test_a_replaced_broken_producer_leaves_no_back_off_behind() -> None:
    """A rotation replacing a broken producer whose reset was backing off left the
    back-off set: the next break inherited it, and its first failed try was logged at
    DEBUG instead of the warning said once."""
    pub = publisher()
    broken, rotated = FakeProducer(), FakeProducer()
    pub._use(broken, b"")
    pub._broken = broken
    pub._reset_backoff = 0.5  # a failed try
    pub._retire = lambda _: asyncio.sleep(0)  # type: ignore[assignment,method-assign]
    pub._replace(rotated, b"new")
    assert pub._reset_backoff == 0.0


async def test_a_request_to_kafka_waits_at_most_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka's default, 40 s, held the partitions a hung broker led that long after
    Kafka had given them to other brokers (a three-broker cluster, SIGSTOP)."""
    made: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, **options: Any) -> None:
            made.append(options)

        async def start(self) -> None:
            raise KafkaTimeoutError()

        async def stop(self) -> None:
            pass

    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", Recorder)
    settings = load_settings(
        environ={"BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9", "BRIDGE_KAFKA_REQUEST_TIMEOUT": "7.5"}
    )
    pub = KafkaPublisher(settings, Metrics())
    assert await pub._start_producer() == publisher_module.FAILED
    assert made[0]["request_timeout_ms"] == 7500


async def test_a_record_timing_out_with_kafka_taking_none_makes_the_bridge_stalled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Broker mode below a cluster's quorum: Kafka answers metadata but takes no record,
    and /readyz said 200 while each request waited the whole publish timeout for a 503.
    A timeout with no record answered since it began is a stall. It lasts until Kafka
    takes a record published after it began: the late acknowledgement of one sent
    before ended it, and readiness flapped (a reviewer's cluster committed a record
    sent as two of three brokers died, while refusing every new one). It also ends
    STALLED_FOR_SECONDS after the last such timeout, and comes back at the next one:
    one stall, said once."""
    monkeypatch.setattr(publisher_module, "STALLED_FOR_SECONDS", 0.2)
    caplog.set_level(logging.INFO, logger="bridge.publisher")
    pub, _, handover = fast_way_in(timeout=0.05)
    assert not pub.stalled
    with pytest.raises(PublishTimeout):
        await pub.publish(DESTINATION)
    assert pub.stalled
    handover.batch.future.set_result(None)  # the batch lands after its request gave up
    await turns()
    assert pub.stalled  # sent before the stall: it tells nothing of Kafka now

    await asyncio.sleep(0.25)  # no traffic: ready again, for the next request to probe
    assert not pub.stalled
    handover.batch = SimpleNamespace(future=asyncio.get_running_loop().create_future())
    with pytest.raises(PublishTimeout):  # and stalled again: the same stall
        await pub.publish(DESTINATION)
    assert pub.stalled

    taken = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    handover.appended[-1].set_result(None)  # Kafka takes one published since
    await taken
    assert not pub.stalled
    said = [
        (r.levelname, r.getMessage()[:30]) for r in caplog.records if r.name == "bridge.publisher"
    ]
    assert said == [
        ("WARNING", "Kafka at 127.0.0.1:9 took no r"),
        ("INFO", "Kafka takes records again: a s"),
    ]
    await pub.stop()


async def test_a_timeout_while_kafka_takes_other_records_is_no_stall() -> None:
    """One slow topic or partition among others Kafka takes: not the bridge's trouble."""
    pub, _, handover = fast_way_in(timeout=0.1)
    slow = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    taken = asyncio.create_task(pub.publish(DESTINATION))
    await turns()
    handover.appended[1].set_result(None)  # Kafka took the second one
    await taken
    with pytest.raises(PublishTimeout):
        await slow
    assert not pub.stalled
    await pub.stop()


async def test_a_timeout_before_the_hand_over_is_no_stall() -> None:
    """A record that never got into a batch (its topic's metadata never came: a topic
    missing where Kafka does not create them) tells nothing of Kafka taking records."""
    pub = publisher(timeout=0.05)
    producer = FakeProducer()  # no metadata: send() waits
    pub._use(producer, b"")
    with pytest.raises(PublishTimeout):
        await pub.publish(DESTINATION)
    assert producer.sends == 1
    assert not pub.stalled
    await pub.stop()


async def test_a_metadata_refresh_a_heartbeat_gave_up_on_keeps_kafka_connected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One hung broker of three: the heartbeat's refresh drew it first and gave up
    after its 5 s, before aiokafka asked another broker, which answered; the metadata
    counted as stale, so the bridge turned unready while the others answered."""
    clock = frozen_monotonic(monkeypatch)
    pub = publisher()
    producer = FakeProducer()
    pub._use(producer, b"")
    clock[0] += publisher_module.STALE_AFTER_SECONDS + 1  # no heartbeat got an answer since
    assert not pub.connected
    producer.metadata_refreshed()
    clock[0] += 1
    assert pub.connected  # aiokafka's own refresh came back a second ago
    clock[0] += publisher_module.STALE_AFTER_SECONDS
    assert not pub.connected


async def test_a_metadata_refresh_a_heartbeat_gave_up_on_keeps_deliveries_trying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same refresh, and no heartbeat nor record answered for 25 s: deliveries were
    refused at once ("no answer from Kafka") while the bridge said it was ready, Kafka
    answering aiokafka's refreshes (a review's test)."""
    clock = frozen_monotonic(monkeypatch)
    pub = publisher()
    producer = FakeProducer()
    pub._use(producer, b"")
    clock[0] += publisher_module.UNANSWERED_AFTER_SECONDS
    producer.metadata_refreshed()
    clock[0] += 1
    assert pub.connected
    pub.refuse_at_once()  # tries Kafka
    clock[0] += publisher_module.UNANSWERED_AFTER_SECONDS
    assert not pub.connected
    with pytest.raises(Unavailable, match="no answer from Kafka"):
        pub.refuse_at_once()


async def test_a_stall_holds_while_deliveries_are_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole cluster down: once Kafka had answered nothing for 25 s, deliveries were
    refused at once, no timeout renewed the stall, and it lapsed 20 s after the last
    one: /readyz said 200 when the controller's metadata came back before the
    quorum, and every delivery waited its whole timeout for a 503 (a reviewer's
    cluster). Each delivery refused so holds the stall as a timeout does."""
    monkeypatch.setattr(publisher_module, "STALLED_FOR_SECONDS", 0.2)
    pub, _, _ = fast_way_in(timeout=0.05)
    with pytest.raises(PublishTimeout):
        await pub.publish(DESTINATION)
    pub._answered_until = time.monotonic() - 1  # Kafka answered nothing for 25 s
    for _ in range(3):
        await asyncio.sleep(0.1)
        with pytest.raises(Unavailable):
            await pub.publish(DESTINATION)
        assert pub.stalled  # 0.3 s after the timeout: held by the refusals
    await asyncio.sleep(0.25)
    assert not pub.stalled
    await pub.stop()


async def test_an_answer_to_a_record_sent_before_a_stall_cuts_its_hold_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At low traffic behind a load balancer, a routine failover's one timeout kept a
    lone bridge unready STALLED_FOR_SECONDS (20 s) after Kafka had recovered and
    committed that very record. Such an answer leaves two publish timeouts of the hold:
    time enough for the records sent since to time out, and renew it, if Kafka still
    takes none."""
    monkeypatch.setattr(publisher_module, "STALLED_FOR_SECONDS", 5)
    pub, _, handover = fast_way_in(timeout=0.05)
    with pytest.raises(PublishTimeout):
        await pub.publish(DESTINATION)
    handover.batch.future.set_result(None)  # Kafka commits it after all
    await turns()
    assert pub.stalled  # sent before: not proof that Kafka takes records now
    await asyncio.sleep(0.12)
    assert not pub.stalled  # after two timeouts, not 5 s
    await pub.stop()


async def test_stalls_are_told_in_broker_mode_only() -> None:
    """Elsewhere only the drainer's set-asides and replays publish with a deadline, and
    the records the drainer sends, which go around publish(), would never end one."""
    pub, _, _ = fast_way_in(timeout=0.05, ack="durable")
    with pytest.raises(PublishTimeout):
        await pub.publish(DESTINATION)
    assert not pub.stalled
    await pub.stop()


def test_a_kafka_timeout_is_no_refusal() -> None:
    """A wait for buffer space behind a partition that takes nothing ends in aiokafka's
    KafkaTimeoutError: it was said "Kafka refused the record: KafkaTimeoutError" and
    counted as kafka_error, sending the operator after the record, not the partition."""
    pub = publisher(timeout=30)
    error = pub.failure(KafkaTimeoutError())
    assert isinstance(error, PublishTimeout)  # its 503 says so too, not "refused"
    assert error.landing is None  # never queued: it cannot land
    assert error.detail == "Kafka did not take the record in time (KafkaTimeoutError)"
    assert pub._metrics.publish_errors.labels("timeout")._value.get() == 1
    assert pub._metrics.publish_errors.labels("kafka_error")._value.get() == 0


class _HangingProducer:
    """An aiokafka producer whose flush never ends (Kafka holds its batches)."""

    class _Accumulator:
        _batches: dict[Any, Any] = {}  # noqa: RUF012 - read only, by _force_close
        _pending_batches: set[Any] = set()  # noqa: RUF012

        def fail_all(self, exc: BaseException) -> None:
            pass

    def __init__(self) -> None:
        self._message_accumulator = self._Accumulator()
        self.client = SimpleNamespace(close=self._closed)
        self.closed = False

    async def _closed(self) -> None:
        self.closed = True

    async def stop(self) -> None:
        await asyncio.Event().wait()


async def test_stop_keeps_its_deadline_with_a_replaced_producer_still_flushing() -> None:
    """A producer replaced shortly before the stop (a secret rotation, a reset) flushed
    with a BRIDGE_SHUTDOWN_TIMEOUT of its own from its replacement: stop(deadline)
    overran its deadline by up to a whole timeout (3.0 s for 0.2 s in a review's test),
    which deploy/'s grace periods do not count. Its flush ends with the current one's."""
    settings = load_settings(
        environ={"BRIDGE_TOKENS": "t" * 16, "BRIDGE_ACK": "memory", "BRIDGE_SHUTDOWN_TIMEOUT": "3"}
    )
    publisher = KafkaPublisher(settings, Metrics())
    replaced = _HangingProducer()
    retiring = publisher_module.spawn(publisher._retire(replaced), "kafka-retire-producer")
    publisher._retiring.add(retiring)
    retiring.add_done_callback(publisher._retiring.discard)
    await asyncio.sleep(0.05)  # flushing
    began = time.monotonic()
    await publisher.stop(began + 0.2)
    assert time.monotonic() - began < 1.0
    assert replaced.closed  # closed all the same


class DeniedThenAwayProducer:
    """A producer whose starts fail as ``failures`` says, in turn."""

    failures: ClassVar[list[BaseException]] = []

    def __init__(self, **_: object) -> None:
        pass

    async def start(self) -> None:
        raise DeniedThenAwayProducer.failures.pop(0)

    async def stop(self) -> None:
        pass


async def test_a_denial_followed_by_an_outage_is_said_as_the_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka's authorizer denied the producer (an ACL missing), then no broker answered:
    /readyz and every 503 still said "Kafka refuses the bridge" (a review's test)."""
    settings = load_settings(
        environ={
            "BRIDGE_TOKENS": TOKEN,
            "BRIDGE_ACK": "broker",
            "BRIDGE_KAFKA_CONNECT_TIMEOUT": "1",
        }
    )
    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", DeniedThenAwayProducer)
    DeniedThenAwayProducer.failures = [
        ClusterAuthorizationFailedError(),
        KafkaConnectionError("Unable to bootstrap from [('localhost', 9092)]"),
    ]
    publisher = KafkaPublisher(settings, Metrics())
    assert not await publisher._connect(at_startup=True)
    assert BrokerAck(publisher, settings).unready_reason == "Kafka refuses the bridge (see its log)"
    assert not await publisher._connect()  # the background's next try: no broker
    assert BrokerAck(publisher, settings).unready_reason == "Kafka is not connected"


async def test_a_second_outage_within_a_minute_is_said_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A second outage within the minute of the first one's warning, long enough for
    Kafka to count as away (bridge_kafka_connected 0), left no line at INFO or above,
    not even its end: the warnings' once-a-minute limit took it for a Kafka that fails
    every other refresh (a review's flapping broker)."""
    caplog.set_level(logging.DEBUG, logger="bridge.publisher")
    pub = publisher(ack="durable")
    producer = FakeProducer()
    kafka_back = False

    async def force_metadata_update() -> bool:
        return kafka_back

    producer.client.force_metadata_update = force_metadata_update
    pub._use(producer, b"")

    def said() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.INFO and r.name == "bridge.publisher"
        ]

    # Outage 1: 25 s; warned at its start, its end said at INFO.
    await pub._heartbeat(producer)
    pub._refreshed_at -= 25
    pub._refresh_failure_said -= 25
    kafka_back = True
    await pub._heartbeat(producer)
    assert len(said()) == 2, said()  # the warning and "answers ... again"

    # 30 s later (55 s after the warning), outage 2: also 25 s, past STALE_AFTER_SECONDS.
    pub._refresh_failure_said -= 30
    kafka_back = False
    await pub._heartbeat(producer)
    pub._refreshed_at -= publisher_module.STALE_AFTER_SECONDS + 5
    pub._metadata_at = -math.inf
    assert not pub.connected  # bridge_kafka_connected 0: Kafka counted as away
    await pub._heartbeat(producer)  # still within the minute of the first warning
    kafka_back = True
    await pub._heartbeat(producer)
    # The outage the metrics showed must leave a trace at INFO or above.
    assert len(said()) > 2, f"outage 2 left no line at INFO or above: {said()}"


async def test_a_wall_clock_step_back_does_not_keep_a_silent_kafka_connected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka stamps its metadata refreshes on the wall clock, and the publisher read
    that stamp as an age: after NTP stepped the clock back an hour, a Kafka that then
    answered nothing stayed connected (/readyz 200 in broker mode) and deliveries waited
    the whole publish timeout for their 503, for the hour (a review's find)."""
    mono, wall = [1000.0], [time.time()]
    clocks = SimpleNamespace(
        monotonic=lambda: mono[0], perf_counter=time.perf_counter, time=lambda: wall[0]
    )
    monkeypatch.setattr(publisher_module, "time", clocks)
    monkeypatch.setattr(aiokafka.cluster, "time", clocks)
    pub = publisher()
    producer = FakeProducer()
    cluster = aiokafka.cluster.ClusterMetadata()
    producer.client.cluster = cluster
    pub._use(producer, b"")
    answer = SimpleNamespace(
        API_VERSION=1, brokers=[(0, "k", 9092, None)], controller_id=0, topics=[]
    )
    cluster.update_metadata(answer)  # a refresh aiokafka completed, stamped now
    wall[0] -= 3600  # NTP steps the clock back an hour (it was ahead)
    mono[0] += 60  # and Kafka answers nothing for a minute
    wall[0] += 60
    assert not pub.connected
    with pytest.raises(Unavailable, match="no answer from Kafka"):
        pub.refuse_at_once()
    cluster.update_metadata(answer)  # Kafka answers again
    assert pub.connected


def test_the_metadata_listener_keeps_no_producer_alive() -> None:
    """The listener the publisher adds to a producer's cluster view held the producer:
    a cycle (producer, cluster, listener) that kept a replaced producer until the cyclic
    collector came by, and the first one, frozen with the startup's objects
    (gc.freeze), for good (a review's find)."""

    async def replaced() -> weakref.ReferenceType[FakeProducer]:
        pub = publisher()
        producer = FakeProducer()
        pub._use(producer, b"")
        pub._use(FakeProducer(), b"")  # a reset or a rotation replaced it
        return weakref.ref(producer)

    gc.disable()
    try:
        gone = asyncio.run(replaced())
        assert gone() is None  # freed by its reference count, without the collector
    finally:
        gc.enable()


def test_refused_timestamps_count_as_the_clocks_only_while_no_record_lands() -> None:
    """Kafka refusing records' timestamps with none landing is the bridge host's clock
    (broker mode unready); records landing meanwhile make it one topic's tight
    message.timestamp.*.max.ms, which must not take the bridge out of rotation. It
    lapses without traffic, so the traffic that comes back tries the clock again. Only
    a delivery's refusal counts (publish): a leftover spool's drainer retrying a held
    topic (failure() alone) kept the bridge unready for good (a review)."""
    pub = publisher()
    order = Destination(topic="geins.order.create", key=b"k", value=b"{}", headers=[])
    refused = pub.failure(InvalidTimestampError())
    assert "timestamp" in refused.detail
    assert not pub.clock_refused  # a drainer's: not the deliveries'

    def delivery_refused() -> None:  # as publish() says it in broker mode
        pub.failure(InvalidTimestampError())
        pub._clock_refused_at = time.perf_counter()

    delivery_refused()
    assert pub.clock_refused
    pub._published(order, time.perf_counter())  # another record landed: not the clock
    assert not pub.clock_refused
    delivery_refused()
    assert not pub.clock_refused  # one landed within CLOCK_REFUSED_FOR_SECONDS
    pub._landed_at -= publisher_module.CLOCK_REFUSED_FOR_SECONDS
    assert pub.clock_refused  # none since
    pub._clock_refused_at -= publisher_module.CLOCK_REFUSED_FOR_SECONDS
    assert not pub.clock_refused  # no refusal for that long: lapsed
