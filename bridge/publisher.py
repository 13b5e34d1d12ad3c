"""The Kafka side: one idempotent aiokafka producer per process.

The only module on the request path that imports aiokafka. Every await on the
broker has a deadline (aiokafka can otherwise wait forever while the broker is
unreachable with idempotence on), and the background tasks it owns report
their death loudly instead of vanishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from bridge.config import Settings
from bridge.errors import (
    BridgeError,
    ConfigError,
    PayloadTooLarge,
    PublishFailed,
    PublishTimeout,
    Unavailable,
)
from bridge.metrics import Metrics
from bridge.routing import Destination

log = logging.getLogger(__name__)

#: How often the producer's view of the cluster is refreshed to prove it is alive.
HEARTBEAT_SECONDS = 5.0
#: Metadata older than this makes the bridge unready.
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS
#: Room for headers and record overhead on top of the largest accepted body.
RECORD_OVERHEAD_BYTES = 64 * 1024
_COMPRESSION_LIBRARY = {"lz4": "cramjam", "zstd": "cramjam", "snappy": "cramjam"}


class Publisher(Protocol):
    """What the rest of the bridge uses of :class:`KafkaPublisher`; unit tests pass fakes."""

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, destination: Destination) -> asyncio.Future[Any]: ...

    async def publish(self, destination: Destination) -> None: ...

    def failure(self, exc: BaseException) -> BridgeError: ...


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by the producer, the admin client and consumers."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.kafka_client_id,
    }


def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a background task whose unexpected death is logged, not swallowed."""
    task = asyncio.get_running_loop().create_task(coro, name=name)

    def _report(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("background task %s died", name, exc_info=done.exception())

    task.add_done_callback(_report)
    return task


class KafkaPublisher:
    """Publishes :class:`Destination` records and reports whether Kafka is reachable."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        library = _COMPRESSION_LIBRARY.get(settings.kafka_compression)
        if library and importlib.util.find_spec(library) is None:
            raise ConfigError(
                f"BRIDGE_KAFKA_COMPRESSION={settings.kafka_compression} needs the "
                f"'{library}' package: pip install 'aiokafka[{settings.kafka_compression}]'"
            )
        self._settings = settings
        self._metrics = metrics
        self._timeout = settings.publish_timeout
        self._producer: AIOKafkaProducer | None = None
        self._fresh_until = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        """True while the producer runs and its cluster metadata is recent."""
        return self._producer is not None and time.monotonic() < self._fresh_until

    async def start(self) -> None:
        """Connect once, waiting at most ``kafka_connect_timeout``; keep trying in the
        background if Kafka is not there yet (the bridge answers 503 meanwhile)."""
        if not await self._connect():
            log.warning(
                "Kafka at %s is not reachable yet; retrying in the background",
                self._settings.kafka_bootstrap,
            )
        self._tasks.append(spawn(self._keep_connected(), "kafka-keep-connected"))

    async def _connect(self) -> bool:
        producer = AIOKafkaProducer(
            **kafka_client_options(self._settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=self._settings.kafka_linger_ms,
            compression_type=None
            if self._settings.kafka_compression == "none"
            else self._settings.kafka_compression,
            max_request_size=self._settings.max_body_bytes + RECORD_OVERHEAD_BYTES,
        )
        try:
            async with asyncio.timeout(self._settings.kafka_connect_timeout):
                await producer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("connecting to Kafka failed: %r", exc)
            with contextlib.suppress(Exception):  # best effort: it never fully started
                async with asyncio.timeout(self._settings.kafka_connect_timeout):
                    await producer.stop()
            return False
        self._producer = producer
        self._fresh_until = time.monotonic() + STALE_AFTER_SECONDS
        log.info("connected to Kafka at %s", self._settings.kafka_bootstrap)
        return True

    async def _keep_connected(self) -> None:
        backoff = 0.5
        while True:
            if self._producer is None:
                if await self._connect():
                    backoff = 0.5
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                continue
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await self._heartbeat(self._producer)

    async def _heartbeat(self, producer: AIOKafkaProducer) -> None:
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                await producer.client.fetch_all_metadata()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("Kafka metadata refresh failed: %r", exc)
        else:
            self._fresh_until = time.monotonic() + STALE_AFTER_SECONDS

    async def send(self, destination: Destination) -> asyncio.Future[Any]:
        """Hand a record to the producer; the returned future resolves on Kafka's ack.

        Waits at most ``publish_timeout`` for metadata and buffer space. Raises a
        BridgeError when the record cannot be handed over. Cancelling this call
        withdraws the record; once it returned, the record may land even if the
        caller stops waiting, which is why consumers get the idempotency key as
        message key.
        """
        producer = self._producer
        if producer is None:
            self._metrics.record_publish_error("not_connected")
            raise Unavailable("not connected to Kafka yet")
        try:
            async with asyncio.timeout(self._timeout):
                return await producer.send(  # type: ignore[no-any-return]  # aiokafka is untyped
                    destination.topic,
                    value=destination.value,
                    key=destination.key,
                    headers=destination.headers,
                )
        except TimeoutError:
            self._metrics.record_publish_error("timeout")
            raise PublishTimeout(
                f"Kafka took more than {self._timeout:g} s to take a record for "
                f"{destination.topic} (metadata or buffer space)"
            ) from None
        except Exception as exc:
            raise self.failure(exc) from None

    def failure(self, exc: BaseException) -> BridgeError:
        """The BridgeError for an exception from the producer (and count it)."""
        if isinstance(exc, BridgeError):
            return exc
        if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
            self._metrics.record_publish_error("too_large")
            return PayloadTooLarge(
                "the record is larger than Kafka accepts (check the topic's max.message.bytes)"
            )
        self._metrics.record_publish_error("kafka_error")
        if isinstance(exc, KafkaError):
            return PublishFailed(f"Kafka refused the record: {type(exc).__name__}")
        log.error("unexpected error from the Kafka producer", exc_info=exc)
        return PublishFailed(f"the Kafka client failed: {type(exc).__name__}")

    async def publish(self, destination: Destination) -> None:
        """Return once Kafka acknowledged the record (acks=all), or raise a BridgeError."""
        started = time.perf_counter()
        acked = await self.send(destination)
        try:
            async with asyncio.timeout(max(0.0, started + self._timeout - time.perf_counter())):
                await asyncio.shield(acked)
        except TimeoutError:
            self._metrics.record_publish_error("timeout")
            raise PublishTimeout(
                f"Kafka did not acknowledge the record for {destination.topic} "
                f"within {self._timeout:g} s"
            ) from None
        except Exception as exc:
            raise self.failure(exc) from None
        self._metrics.record_published(len(destination.value), time.perf_counter() - started)

    async def stop(self) -> None:
        """Flush what is in flight within ``shutdown_timeout``, then close."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout):
                await producer.stop()
        except TimeoutError:
            log.error(
                "Kafka producer did not flush within %ss; unacknowledged records were "
                "answered 503 and will be retried by the sender",
                self._settings.shutdown_timeout,
            )
