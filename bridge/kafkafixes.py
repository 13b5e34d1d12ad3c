"""Mends to aiokafka 0.14, applied once when this module is imported (by
:mod:`bridge.publisher`, through which every Kafka client of the bridge gets its
options).

**A start cut short.**

A client's start cancelled while it bootstrapped (the bridge bounds every start with a
deadline: the producer's, the admin client's of ``bridge topics``, the readers' of the
operator commands) left the connection it had opened to a bootstrap server open and
owned by no one: ``AIOKafkaClient.bootstrap`` closes it on a Kafka error or a timeout of
its own, not on a cancellation. Its socket stayed open until the garbage collector found
it, and aiokafka's ``__del__`` then reported an "Unclosed AIOKafkaConnection" through
the event loop's exception handler: an ERROR line in the bridge's log (and a failed test
run, where warnings are errors). Some 5% of starts cut short so leaked one.

**A topic below its quorum slowing the others.** A produce request that Kafka answered
with a passing error for some of its partitions (NOT_ENOUGH_REPLICAS: a topic below its
``min.insync.replicas``) waited the producer's retry backoff (100 ms) before
``Sender._send_produce_req`` returned, and until then the sender kept the broker in
flight: no record of any other partition it leads (other topics, healthy ones) was sent
meanwhile, so each of them waited for the refused topic's next retry. Now only the
partitions whose batches go again wait the backoff (muted, as aiokafka mutes a partition
while its batch is on its way, so one batch per partition is in flight and none is
overtaken); the broker is free again as soon as it answered, as Java's producer backs
off per batch. A request that failed as a whole (no answer: a timeout, a lost
connection) still holds the broker for the backoff.

**A quota's throttle.** A broker over a client quota (producer_byte_rate,
request_percentage, per client id or user) answers with ``throttle_time_ms`` and reads
nothing more from the connection for that long (KIP-219), expecting the client to hold
back. aiokafka 0.14 ignores it and sends the next request at once: its requests, the
bridge's metadata heartbeat among them, queued behind the muted connection until they
timed out, and the bridge took a throttled Kafka for an unreachable one (unready,
"metadata refresh failed") while nothing said it was throttled. Now the sender holds
back the broker's requests for the throttle time, as Java's producer does, and tells
the producer's ``on_throttle`` (the publisher's, which counts it and says so).

**gzip's level.** aiokafka compresses a gzip batch at level 9, on the event loop: some
100 ms for a batch of 1 MB of JSON, every request waiting meanwhile. Level 6, zlib's
default and Kafka's Java producer's (compression.gzip.level), took a quarter of that
for a batch 0.6 % larger.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import Any

import aiokafka.client
import aiokafka.record.default_records
from aiokafka import codec
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import AIOKafkaConnection
from aiokafka.producer.sender import Sender, SendProduceReqHandler

#: The connections a bootstrap opened, with the task running it (a task the bootstrap
#: starts copies this context, and must not add its own connections to the list).
_opened_by: contextvars.ContextVar[tuple[asyncio.Task[Any] | None, list[AIOKafkaConnection]]] = (
    contextvars.ContextVar("_opened_by")
)

_create_conn = aiokafka.client.create_conn
_bootstrap = AIOKafkaClient.bootstrap


async def _create_conn_noted(*args: Any, **kwargs: Any) -> AIOKafkaConnection:
    conn: AIOKafkaConnection = await _create_conn(*args, **kwargs)
    opened = _opened_by.get(None)
    if opened is not None and opened[0] is asyncio.current_task():
        opened[1].append(conn)
    return conn


async def _bootstrap_closing_on_cancel(self: AIOKafkaClient) -> None:
    """``AIOKafkaClient.bootstrap``, which closes the connections it opened and did not
    keep when it ends by an exception, a cancellation included."""
    opened: list[AIOKafkaConnection] = []
    token = _opened_by.set((asyncio.current_task(), opened))
    try:
        await _bootstrap(self)
    except BaseException:
        kept = self._conns.values()
        for conn in opened:
            if conn not in kept:
                conn.close()
        raise
    finally:
        _opened_by.reset(token)


aiokafka.client.create_conn = _create_conn_noted
AIOKafkaClient.bootstrap = _bootstrap_closing_on_cancel


class _ProduceReqHandler(SendProduceReqHandler):  # type: ignore[misc]  # untyped base
    """aiokafka's handler of one produce request, which leaves the batches Kafka's
    answer sends again (``retried``) to its caller instead of waiting their backoff."""

    _to_reenqueue: list[Any]  # aiokafka's: the batches to send again after the backoff
    retried: list[Any]
    throttle_seconds: float = 0.0  # how long the broker asked the client to hold back

    def handle_response(self, response: Any) -> None:
        self.throttle_seconds = getattr(response, "throttle_time_ms", 0) / 1000
        super().handle_response(response)
        self.retried = self._to_reenqueue
        self._to_reenqueue = []  # do() waits the backoff before re-queueing these only


async def _send_produce_req_backing_off_per_batch(
    self: Sender, node_id: int, batches: dict[Any, Any]
) -> None:
    """``Sender._send_produce_req``, which frees the broker once it answered and keeps
    only the partitions whose batches go again muted, for the retry backoff."""
    handler = _ProduceReqHandler(self, batches)
    handler.retried = []
    await handler.do(node_id)
    if (throttle := handler.throttle_seconds) > 0:
        if (on_throttle := getattr(self, "on_throttle", None)) is not None:
            on_throttle(throttle)
        await asyncio.sleep(throttle)  # the broker reads none of it meanwhile (KIP-219)
    again = {batch.tp for batch in handler.retried}
    self._in_flight.remove(node_id)
    for tp in batches:
        if tp not in again:
            self._muted_partitions.remove(tp)
    if not again:
        return
    waiter = self._message_accumulator.waiter()
    if not waiter.done():  # the sender drains the batches that waited for the broker
        waiter.set_result(None)
    await asyncio.sleep(self._retry_backoff)
    for batch in handler.retried:
        self._message_accumulator.reenqueue(batch)
    # as aiokafka: an error that asked for a metadata update holds them till it came
    await self.client._maybe_wait_metadata()
    # (not when cancelled: a later batch of theirs must never go before these)
    for tp in again:
        self._muted_partitions.remove(tp)


def _sender_is_as_known() -> bool:
    """Whether aiokafka's sender has the parts the per-batch backoff relies on (0.14's):
    another version keeps its own behaviour rather than break its sender."""
    handler_init = SendProduceReqHandler.__init__.__code__.co_names
    return (
        callable(getattr(Sender, "_send_produce_req", None))
        and callable(getattr(SendProduceReqHandler, "handle_response", None))
        and "_to_reenqueue" in handler_init
        and {"_retry_backoff", "_in_flight", "_muted_partitions"}
        <= set(Sender.__init__.__code__.co_names)
    )


#: The level of the gzip codec's batches (see the module's docstring).
GZIP_LEVEL = 6


def _gzip_encode(payload: bytes, compresslevel: int | None = None) -> bytes:
    compressed: bytes = codec.gzip_encode(payload, compresslevel or GZIP_LEVEL)
    return compressed


# The batch builders call the name they imported: the Python one's, and the compiled
# one's that aiokafka uses when it is installed (it is, with the wheels).
aiokafka.record.default_records.gzip_encode = _gzip_encode
with contextlib.suppress(ImportError):
    from aiokafka.record._crecords import default_records as _compiled_records

    _compiled_records.gzip_encode = _gzip_encode

if _sender_is_as_known():
    Sender._send_produce_req = _send_produce_req_backing_off_per_batch
