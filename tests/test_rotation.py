"""Rotation of the Kafka secret files (bridge/publisher.py), with fake producers.

How a failed attempt is counted: ``refused`` when the secrets are the problem,
``failed`` when Kafka did not answer. And shutdown during a rotation: it must take
``BRIDGE_SHUTDOWN_TIMEOUT``, not that plus a rotation's own timeouts, so a
rotation still connecting is cancelled (its producer holds no records yet, and is
closed), and a replaced producer still flushing flushes alongside the current
one. The rotation against a real broker is tests/test_kafka_security.py's.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
)
from aiokafka.producer.message_accumulator import MessageAccumulator
from aiokafka.structs import TopicPartition

from bridge import publisher as publisher_module
from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.metrics import Metrics
from bridge.publisher import KafkaPublisher, spawn
from tests.polling import eventually
from tests.test_kafka_security import rotations

SETTINGS = {
    "BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9",
    "BRIDGE_KAFKA_CONNECT_TIMEOUT": "60",
    "BRIDGE_SHUTDOWN_TIMEOUT": "60",
}


class FakeProducer:
    """Just what the publisher touches while starting, handing over and stopping."""

    connects = True  # False: start() waits forever, like a broker that never answers
    fails: Exception | None = None  # raised by start()
    stopping = 0  # producers inside stop() right now
    most_stopping = 0

    def __init__(self, **_options: Any) -> None:
        listeners = SimpleNamespace(add_listener=lambda _f: None, remove_listener=lambda _f: None)
        self.client = SimpleNamespace(cluster=listeners)
        self.started = self.stopped = False

    async def start(self) -> None:
        if FakeProducer.fails is not None:
            raise FakeProducer.fails
        if not FakeProducer.connects:
            await asyncio.Event().wait()
        self.started = True

    async def stop(self) -> None:
        FakeProducer.stopping += 1
        FakeProducer.most_stopping = max(FakeProducer.most_stopping, FakeProducer.stopping)
        try:
            await asyncio.sleep(0.5)  # delivering what it holds
        finally:
            FakeProducer.stopping -= 1
        self.stopped = True


@pytest.fixture
def producers(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    made: list[FakeProducer] = []

    def make(**options: Any) -> FakeProducer:
        made.append(FakeProducer(**options))
        return made[-1]

    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", make)
    monkeypatch.setattr(FakeProducer, "connects", True)
    monkeypatch.setattr(FakeProducer, "fails", None)
    monkeypatch.setattr(FakeProducer, "most_stopping", 0)
    return made


def rotated_publisher() -> tuple[KafkaPublisher, Metrics]:
    metrics = Metrics()
    return KafkaPublisher(load_settings(environ=SETTINGS), metrics), metrics


async def test_shutdown_cancels_a_rotation_that_is_still_connecting(
    producers: list[FakeProducer],
) -> None:
    publisher, metrics = rotated_publisher()
    await publisher._connect()
    FakeProducer.connects = False
    publisher._rotation = spawn(publisher._rotate(b"changed"), "rotate")
    await eventually(lambda: len(producers) == 2, what="the rotation's producer connecting")

    async with asyncio.timeout(5):  # not the 60 s connect timeout
        await publisher.stop()

    current, connecting = producers
    assert current.stopped  # flushed and closed as in any shutdown
    assert not connecting.started
    assert connecting.stopped  # what it had opened is closed
    assert rotations(metrics, "applied") == rotations(metrics, "refused") == 0


async def test_a_replaced_producer_flushes_alongside_the_current_one(
    producers: list[FakeProducer],
) -> None:
    publisher, metrics = rotated_publisher()
    await publisher._connect()
    await publisher._rotate(b"changed")  # the new producer takes over; the old one retires
    assert rotations(metrics, "applied") == 1
    await eventually(lambda: FakeProducer.stopping == 1, what="the old producer flushing")

    await publisher.stop()

    assert all(p.stopped for p in producers)
    assert FakeProducer.most_stopping == 2  # at the same time, not one after the other


async def test_the_flush_at_shutdown_keeps_to_the_deadline_it_is_given(
    producers: list[FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain and the flush share one BRIDGE_SHUTDOWN_TIMEOUT: a flush whose deadline
    the drain used up is cut short (and the producer closed by force) at once, not
    given the whole timeout again."""
    forced: list[object] = []

    async def force_close(producer: object) -> None:
        forced.append(producer)

    publisher, _ = rotated_publisher()
    monkeypatch.setattr(publisher, "_force_close", force_close)
    await publisher._connect()
    async with asyncio.timeout(5):  # not the 60 s BRIDGE_SHUTDOWN_TIMEOUT
        await publisher.stop(time.monotonic())  # the drain used it all
    assert forced == producers


async def test_kafka_not_answering_counts_as_failed_not_refused(
    producers: list[FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe that looks for Kafka's reason finds none (nothing answered), so the
    attempt says nothing about the secrets. (Kafka refusing a password counts as
    refused: test_kafka_security.py, against a real broker.)"""

    async def no_reason(_settings: object, _options: object) -> tuple[None, None]:
        return None, None

    monkeypatch.setattr(publisher_module, "kafka_diagnosis", no_reason)
    publisher, metrics = rotated_publisher()
    await publisher._connect()
    FakeProducer.fails = KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9)]")
    await publisher._rotate(b"changed")
    assert (rotations(metrics, "failed"), rotations(metrics, "refused")) == (1, 0)
    assert publisher._producer is producers[0]  # the old connection stays in use
    await publisher.stop()


async def test_files_that_cannot_be_used_count_as_refused(
    producers: list[FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, metrics = rotated_publisher()
    await publisher._connect()

    def unreadable(_settings: object) -> dict[str, Any]:
        raise ConfigError("BRIDGE_KAFKA_SSL_CAFILE: cannot read /secrets/ca.pem")

    monkeypatch.setattr(publisher_module, "kafka_client_options", unreadable)
    await publisher._rotate(b"changed")
    assert (rotations(metrics, "refused"), rotations(metrics, "failed")) == (1, 0)
    assert len(producers) == 1  # no producer was even made
    await publisher.stop()


def refused(error: Exception) -> asyncio.Future[Any]:
    """A record's acknowledgement future as aiokafka fails it when Kafka refuses its batch."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


async def test_a_record_refused_for_good_replaces_the_producer_once(
    producers: list[FakeProducer],
) -> None:
    """Kafka refusing a batch breaks the producer's numbering of that partition (aiokafka
    issue 1017): a fresh producer takes over, once for all the batch's records, and the
    late failures of the replaced one do not replace its successor."""
    publisher, metrics = rotated_publisher()
    await publisher._connect()
    first = producers[0]
    acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    acked.set_result(None)
    publisher._after_ack(first, acked)
    assert publisher._rotation is None  # an acknowledged record says nothing

    for _ in range(3):  # the records of one refused batch
        publisher._after_ack(first, refused(MessageSizeTooLargeError()))
    await eventually(lambda: publisher._producer is not first, what="a fresh producer")
    publisher._after_ack(first, refused(OutOfOrderSequenceNumber()))
    await asyncio.sleep(0.05)

    assert len(producers) == 2
    assert metrics.registry.get_sample_value("bridge_kafka_producer_resets_total") == 1
    assert rotations(metrics, "applied") == 0  # not a secret rotation
    await publisher.stop()
    assert all(p.stopped for p in producers)


async def test_a_forced_close_leaves_no_failed_future_unretrieved() -> None:
    """Closing a producer by force fails the batches it held; nobody awaits their
    drain waiters any more (the sender did), so each was logged at ERROR ("Future
    exception was never retrieved") at every shutdown during an outage."""
    accumulator = MessageAccumulator(None, 16384, 0, 30)
    batch = accumulator._append_batch(accumulator.create_builder(), TopicPartition("t", 0))
    assert batch.append(b"k", b"v", None) is not None

    class Client:
        async def close(self) -> None:
            pass

    producer = SimpleNamespace(_message_accumulator=accumulator, client=Client(), _sender=None)
    publisher, _ = rotated_publisher()
    await publisher._force_close(producer)
    waiter = batch._drain_waiter
    assert waiter.done()
    assert not waiter._log_traceback  # retrieved already
    assert isinstance(waiter.exception(), KafkaTimeoutError)  # failed, as the records are


async def test_a_forced_close_that_cannot_fail_the_records_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failing the held records reaches into aiokafka's accumulator; when that failed
    (its internals changed), nothing said so, and the records' senders waited."""

    class Client:
        async def close(self) -> None:
            pass

    producer = SimpleNamespace(_message_accumulator=None, client=Client(), _sender=None)
    publisher, _ = rotated_publisher()
    await publisher._force_close(producer)
    assert "could not fail the records of a closed Kafka producer" in caplog.text
