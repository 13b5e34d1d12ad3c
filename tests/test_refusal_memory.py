"""Refused deliveries must be freed as they are answered, not left in reference cycles
holding their body until the cyclic collector comes by (a review found Spool.append's,
then the others below: a sidecar refusing large events grew past its memory limit).

Each test runs a refusal through the app with the collector off, then collects with
DEBUG_SAVEALL: any Delivery, Event or Destination in gc.garbage was freed only by the
cyclic collector (its body with it; bytes are not tracked, so they never count toward
the collector's thresholds, and a storm of large refused bodies grows RSS)."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.structs import TopicPartition

from bridge.app import create_app
from bridge.backlog import MemoryBacklog
from bridge.config import Settings, load_settings
from bridge.drainer import Drainer
from bridge.errors import PayloadTooLarge, Unavailable
from bridge.geins import Delivery, Event
from bridge.metrics import Metrics
from bridge.publisher import KafkaPublisher
from bridge.routing import Destination
from tests.fakes import FakePublisher, call_asgi
from tests.test_publisher import FakeHandover, FakeProducer

PAD = b"x" * (300 * 1024)


def body(entity: bytes = b"Order", action: bytes = b"create") -> bytes:
    return b'{"entity":"%s","action":"%s","pad":"%s"}' % (entity, action, PAD)


def settings(tmp_path: Path, **env: str) -> Settings:
    return load_settings(
        environ={
            "BRIDGE_TOKENS": "test-token",
            "BRIDGE_SPOOL_DIR": str(tmp_path),
            "BRIDGE_SHUTDOWN_TIMEOUT": "0.2",
            "BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9",
            **env,
        }
    )


def fake_kafka_publisher(
    config: Settings,
    refuse_with: type[BaseException] | None = None,
    *,
    real_batches: bool = False,
) -> KafkaPublisher:
    """The real KafkaPublisher over a fake producer whose records all take the fast way
    in: never acknowledged (a stall) or, with ``refuse_with``, refused by Kafka; with
    ``real_batches``, each in a batch of aiokafka's own (MessageBatch, which keeps its
    records' futures) that Kafka refuses."""
    pub = KafkaPublisher(config, Metrics())

    async def start() -> None:
        producer = FakeProducer()
        pub._use(producer, b"")
        handover = FakeHandover()
        appended = handover.append

        def append(*args: Any) -> asyncio.Future[Any]:
            acked = appended(*args)
            handover.appended.clear()  # the fake's own list would keep them alive
            if refuse_with is not None:
                asyncio.get_running_loop().call_soon(refuse, acked, refuse_with)
            return acked

        def append_in_a_batch(
            topic: str, key: bytes, value: bytes, headers: Any
        ) -> asyncio.Future[Any]:
            # as aiokafka does: a batch per partition, the record's future in it
            batch = MessageBatch(TopicPartition(topic, 0), BatchBuilder(1 << 21, 0), 30, 0)
            acked: asyncio.Future[Any] = batch.append(key, value, None, headers=headers)
            handover.last_batch = batch
            # Kafka refuses the batch (a denied ACL): aiokafka fails every future of it
            asyncio.get_running_loop().call_soon(refuse_batch, batch)
            return acked

        handover.append = append_in_a_batch if real_batches else append  # type: ignore[method-assign]
        pub._handover = handover  # type: ignore[assignment]
        pub._answered()

    pub.start = start  # type: ignore[method-assign]
    return pub


def refuse_batch(batch: MessageBatch) -> None:
    batch.failure(TopicAuthorizationFailedError())
    batch.future.exception()  # retrieved, as the producer's sender does


def refuse(acked: asyncio.Future[Any], error: type[BaseException]) -> None:
    if not acked.done():
        acked.set_exception(error())


def deliverer(app: Any, payload: bytes, key: str | None = None) -> Callable[[], Awaitable[Any]]:
    def deliver() -> Awaitable[Any]:
        headers = [
            (b"authorization", b"Bearer test-token"),
            (b"x-idempotency-key", (key or uuid.uuid4().hex).encode()),
        ]
        return call_asgi(app, "POST", "/webhooks/geins", headers=headers, body_chunks=[payload])

    return deliver


async def left_in_cycles(deliver: Callable[[], Awaitable[Any]], status: int) -> list[str]:
    """What one more refused delivery leaves for the cyclic collector (call it inside
    the app's lifespan). Without logging: pytest's log capture keeps each record, and
    the exception in its arguments, alive, which hid a cycle from gc.garbage (where
    the bridge formats a record and lets it go)."""
    gc.collect()
    gc.disable()
    logging.disable(logging.CRITICAL)
    try:
        assert (await deliver()).status == status
        for _ in range(3):  # the loop lets go of the handles that woke the request
            await asyncio.sleep(0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return [
            type(o).__name__ for o in gc.garbage if isinstance(o, Delivery | Event | Destination)
        ]
    finally:
        logging.disable(logging.NOTSET)
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("ack", ["durable", "memory", "broker"])
def test_a_refused_delivery_is_freed_without_the_cyclic_collector(tmp_path: Path, ack: str) -> None:
    """A full spool's refusal came back through a future that the refusal's own
    traceback held (frame -> future -> exception -> traceback -> frame): each refused
    delivery's body, twice, waited for the cyclic collector, and a sidecar refusing
    900 KB events with its spool full grew to ~400 MB against its 256Mi limit (a
    review's measure). Kafka away: the spool, the queue or Kafka refuses."""
    app = create_app(
        settings(
            tmp_path,
            BRIDGE_ACK=ack,
            BRIDGE_SPOOL_MAX_BYTES=str(2 * 1024**2),
            BRIDGE_MEMORY_MAX_BYTES=str(2 * 1024**2),
        ),
        publisher=FakePublisher(connected=False, fail_with=Unavailable("Kafka is away")),
        metrics=Metrics(),
    )
    deliver = deliverer(app, body() + b" " * (600 * 1024))

    async def run() -> list[str]:
        async with app.router.lifespan_context(app):
            for _ in range(3):  # the spool or the queue fills
                answer = await deliver()
            assert answer.status == 503
            return await left_in_cycles(deliver, 503)

    assert asyncio.run(run()) == []


@pytest.mark.parametrize("ack", ["durable", "memory", "broker"])
def test_a_refused_unknown_type_is_freed_without_the_cyclic_collector(
    tmp_path: Path, ack: str
) -> None:
    """BRIDGE_STRICT_TYPES: geins._resolve_type_uncached binds the UnknownEventType to a
    local (``unknown``) and raises it: frame -> exception -> traceback -> frame, and the
    frames above it (parse_delivery, Pipeline.handle, the endpoint) hold the Delivery
    and its body."""
    app = create_app(
        settings(tmp_path, BRIDGE_ACK=ack, BRIDGE_STRICT_TYPES="true"),
        publisher=FakePublisher(),
        metrics=Metrics(),
    )
    deliver = deliverer(app, body(b"Foo", b"bar"))

    async def run() -> list[str]:
        async with app.router.lifespan_context(app):
            assert (await deliver()).status == 422
            return await left_in_cycles(deliver, 422)

    assert asyncio.run(run()) == []


def test_a_broker_publish_timeout_is_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    """Broker mode, Kafka taking no record (a stall): KafkaPublisher.publish binds its
    PublishTimeout to a local (``timeout``) and raises it, a cycle through the publish
    frame and every frame above (BrokerAck.deliver, Pipeline.handle, the endpoint):
    each 503's Delivery, Event and body wait for the cyclic collector."""
    config = settings(tmp_path, BRIDGE_ACK="broker", BRIDGE_PUBLISH_TIMEOUT="0.1")
    app = create_app(config, publisher=fake_kafka_publisher(config), metrics=Metrics())
    deliver = deliverer(app, body())

    async def run() -> list[str]:
        async with app.router.lifespan_context(app):
            assert (await deliver()).status == 503
            return await left_in_cycles(deliver, 503)

    assert asyncio.run(run()) == []


def test_a_broker_retry_of_a_timed_out_event_is_freed_without_the_cyclic_collector(
    tmp_path: Path,
) -> None:
    """A retry waiting for its first copy's landing (BrokerAck._await_landing) gets the
    PublishTimeout ``retry_later``, bound to a local and raised: the same cycle."""
    config = settings(tmp_path, BRIDGE_ACK="broker", BRIDGE_PUBLISH_TIMEOUT="0.1")
    pub = fake_kafka_publisher(config)
    app = create_app(config, publisher=pub, metrics=Metrics())
    deliver = deliverer(app, body(), key="the-same-key")

    async def run() -> list[str]:
        async with app.router.lifespan_context(app):
            assert (await deliver()).status == 503  # times out; its batch may land still
            pub._answered()  # Kafka answers metadata: the retry waits for the landing
            return await left_in_cycles(deliver, 503)

    assert asyncio.run(run()) == []


@pytest.mark.parametrize("real_batches", [False, True], ids=["fake batch", "aiokafka's batch"])
def test_a_record_kafka_refuses_in_broker_mode_is_freed_without_the_cyclic_collector(
    tmp_path: Path, real_batches: bool
) -> None:
    """Broker mode, Kafka refusing the record (a denied ACL, say): ``await acked`` in
    KafkaPublisher.publish raises the future's exception, whose traceback holds the
    publish frame, which held ``acked``: the Destination (the body) in a cycle. And
    aiokafka's MessageBatch keeps its records' futures: the frame kept the batch too
    (a review's test; the fake batch has no futures)."""
    config = settings(tmp_path, BRIDGE_ACK="broker")
    pub = fake_kafka_publisher(
        config, refuse_with=TopicAuthorizationFailedError, real_batches=real_batches
    )
    app = create_app(config, publisher=pub, metrics=Metrics())
    deliver = deliverer(app, body())

    async def run() -> list[str]:
        async with app.router.lifespan_context(app):
            assert (await deliver()).status == 503
            pub._answered()
            # (the next refusal replaces the handover's last batch: the first's cycle
            # is garbage then, the second's left for the next)
            return await left_in_cycles(deliver, 503)

    # Logging off for the whole run: the cycle found may be the first delivery's, and
    # pytest's log capture kept its log record, and the exception, alive
    logging.disable(logging.CRITICAL)
    try:
        left = asyncio.run(run())
    finally:
        logging.disable(logging.NOTSET)
    assert left == []


async def test_a_record_the_drainer_cannot_set_aside_is_freed_without_the_cyclic_collector(
    tmp_path: Path,
) -> None:
    """The drainer (memory mode) sets aside a record Kafka refused as too large; its
    dead letter's publish times out (Kafka slow): the publish frame's cycle keeps the
    frames above it, _set_aside, _collect and _deliver, whose ``records`` is the whole
    round's batch of records."""
    config = settings(tmp_path, BRIDGE_ACK="memory", BRIDGE_PUBLISH_TIMEOUT="0.1")
    pub = fake_kafka_publisher(config)
    await pub.start()
    backlog = MemoryBacklog(config.memory_max_bytes)
    drainer = Drainer.from_settings(backlog, pub, Metrics(), config)
    handed_over = pub.hand_over

    async def hand_over(destination: Destination) -> asyncio.Future[Any]:
        if destination.topic == "geins.order.create":  # the dead letter goes on
            raise PayloadTooLarge("the record is larger than Kafka accepts")
        return await handed_over(destination)

    pub.hand_over = hand_over  # type: ignore[method-assign]
    backlog.append(Destination(topic="geins.order.create", key=b"k", value=body(), headers=[]))
    records = await backlog.oldest(10, 10 * 1024**2)
    gc.collect()
    gc.disable()
    try:
        await drainer._deliver(records)
        # Then the dead letter's batch fails (Kafka gives up on it), and the record
        # leaves the backlog (the drainer's next round set it aside, or a stop).
        pub._handover.batch.future.set_exception(KafkaTimeoutError())  # type: ignore[union-attr]
        await backlog.remove([r.seq for r in records])
        del records
        for _ in range(3):
            await asyncio.sleep(0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        in_cycles = [type(o).__name__ for o in gc.garbage if isinstance(o, Destination)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    await pub.stop()
    assert in_cycles == []


def test_a_broker_503_does_not_keep_its_body_while_its_batch_may_land(tmp_path: Path) -> None:
    """After a publish timeout's 503, KafkaPublisher.publish puts
    ``partial(self._published_late, destination, started)`` on the batch's future: the
    Destination (the whole body) lives on after the answer until Kafka settles the
    batch (up to BRIDGE_KAFKA_REQUEST_TIMEOUT and its retries), beside the producer's
    own copy in the batch, though only its length is read."""
    config = settings(tmp_path, BRIDGE_ACK="broker", BRIDGE_PUBLISH_TIMEOUT="0.1")
    app = create_app(config, publisher=fake_kafka_publisher(config), metrics=Metrics())
    deliver = deliverer(app, body())

    async def run() -> list[int]:
        async with app.router.lifespan_context(app):
            assert (await deliver()).status == 503  # its batch is still in the producer
            for _ in range(3):
                await asyncio.sleep(0)
            gc.collect()
            return [
                len(o.value)
                for o in gc.get_objects()
                if isinstance(o, Destination) and len(o.value) > len(PAD)
            ]

    assert asyncio.run(run()) == []
