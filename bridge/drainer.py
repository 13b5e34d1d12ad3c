"""Empties a backlog (the spool, or the in-memory queue) into Kafka, oldest first.

One background task per process. It hands a batch of the oldest records to
the producer, waits (bounded) for Kafka's acknowledgements, and removes from
the backlog exactly the records Kafka acknowledged. A record whose send is
still pending when the wait ends is not sent again: aiokafka keeps retrying
it, and sending a copy would only duplicate it once Kafka is back. Failures
back off exponentially, up to a bound, and delivery resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bridge.backlog import Backlog, QueuedRecord
from bridge.errors import BridgeError, PayloadTooLarge
from bridge.metrics import Metrics
from bridge.publisher import Publisher
from bridge.routing import Destination

log = logging.getLogger(__name__)

BATCH_RECORDS = 500
BATCH_BYTES = 4 * 1024 * 1024
MIN_BACKOFF = 0.1
MAX_BACKOFF = 5.0
IDLE_POLL = 1.0
#: After a round that did not fill a batch, wait this long before the next, so that
#: records arriving meanwhile share one round. At a steady 2,000 events/s a round per
#: event or two (a read and a removal through the spool's writer thread, a Kafka
#: request) competed with the requests for the one core: durable p50 at 2,000/s went
#: from 1.15 to 0.74 ms with this pause (tests/bench/changes.md). No answer waits for
#: it (the event is already safe), and an event after a quiet spell goes at once.
ROUND_PAUSE = 0.010


class Drainer:
    def __init__(
        self,
        backlog: Backlog,
        publisher: Publisher,
        metrics: Metrics,
        *,
        ack_timeout: float,
        deadletter_topic: str,
    ) -> None:
        self._backlog = backlog
        self._deadletter_topic = deadletter_topic
        self._publisher = publisher
        self._metrics = metrics
        self._ack_timeout = ack_timeout
        self._wake = asyncio.Event()
        # seq -> (ack future, when it was handed to the producer)
        self._pending: dict[int, tuple[asyncio.Future[Any], float]] = {}
        # seqs Kafka acknowledged whose removal from the backlog failed
        self._unremoved: list[int] = []
        # pending seqs already counted as a timeout (once each, however long they wait)
        self._late: set[int] = set()
        # Records Kafka refused as too large in a batch with others: Kafka refuses the
        # whole batch for one record over the topic's max.message.bytes, so each is
        # sent once more alone before it counts as too large (a dead letter).
        self._suspects: dict[int, QueuedRecord] = {}

    def wake(self) -> None:
        """Something was appended: look at the backlog now."""
        self._wake.set()

    async def run(self) -> None:
        backoff = MIN_BACKOFF
        while True:
            try:
                complete = await self._round()
            except Exception as exc:
                # The backlog cannot be read or written now (the spool's disk is full,
                # say). Nothing here may end the task: it is the only way accepted
                # events reach Kafka, so it keeps trying until the backlog works again.
                log.error("cannot move the backlog to Kafka (%s); trying again", exc)
                complete = False
            if complete:
                backoff = MIN_BACKOFF
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _round(self) -> bool:
        """One read, send and removal; False when it should back off."""
        if self._unremoved:  # nothing else is read until their removal succeeds
            await self._remove(self._unremoved)
        if self._suspects:  # each alone, before anything else is read (and resent)
            suspect = next(iter(self._suspects.values()))
            done, complete = await self._deliver([suspect], alone=True)
            if complete:
                del self._suspects[suspect.seq]
            await self._remove(done)
            return complete
        self._wake.clear()  # before reading, so an append after the read wakes us
        records = await self._backlog.oldest(BATCH_RECORDS, BATCH_BYTES)
        if not records:
            try:
                async with asyncio.timeout(IDLE_POLL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            return True
        acked, complete = await self._deliver(records)
        await self._remove(acked)
        if complete and len(records) < BATCH_RECORDS:
            await asyncio.sleep(ROUND_PAUSE)
        return complete

    async def _remove(self, seqs: list[int]) -> None:
        """Remove records Kafka has from the backlog. Should that fail, they are kept
        in ``_unremoved`` and removed first next round: read back, they would be sent
        again."""
        self._unremoved = seqs
        await self._backlog.remove(seqs)
        self._unremoved = []

    async def drain(self, deadline: float) -> None:
        """Wait until the backlog is empty or ``deadline`` (monotonic) passed."""
        while self._backlog.depth and time.monotonic() < deadline:
            self.wake()
            await asyncio.sleep(0.05)

    async def _deliver(
        self, records: list[QueuedRecord], *, alone: bool = False
    ) -> tuple[list[int], bool]:
        """Send what is not already pending; return (acknowledged seqs, all acked?).

        ``alone``: the one record went in a batch of its own, so a refusal as too
        large is its own.
        """
        settled: list[int] = []  # refused for good, and dealt with
        waiting = await self._hand_over(records, settled)
        if waiting:
            await asyncio.wait(waiting.values(), timeout=self._ack_timeout)
        acked: list[int] = []
        sizes = {r.seq: len(r.destination.value) for r in records}
        for seq, future in waiting.items():
            if not future.done():  # still in aiokafka's hands: leave it pending
                if seq not in self._late:
                    self._late.add(seq)
                    self._metrics.record_publish_error("timeout")
                continue
            _, sent_at = self._pending.pop(seq)
            self._late.discard(seq)
            failure = (
                asyncio.CancelledError("the producer dropped the record")
                if future.cancelled()
                else future.exception()
            )
            if failure is None:
                acked.append(seq)
                self._metrics.record_published(sizes[seq], time.perf_counter() - sent_at)
                continue
            error = self._publisher.failure(failure)
            if isinstance(error, PayloadTooLarge):
                record = next(r for r in records if r.seq == seq)
                if not alone:
                    self._suspects[seq] = record
                elif await self._set_aside(record, error):
                    settled.append(seq)
            else:
                log.warning("Kafka did not take a queued record: %s", error.detail)
        done = acked + settled
        return done, len(done) == len(records)

    async def _hand_over(
        self, records: list[QueuedRecord], settled: list[int]
    ) -> dict[int, asyncio.Future[Any]]:
        """The ack futures of ``records``, handed over now or before, in order, up to
        the first that cannot be handed over yet."""
        waiting: dict[int, asyncio.Future[Any]] = {}
        try:
            async with asyncio.timeout(self._ack_timeout):  # one deadline for the batch
                for record in records:
                    pending = self._pending.get(record.seq)
                    if pending is None:
                        try:
                            future = await self._publisher.hand_over(record.destination)
                        except PayloadTooLarge as exc:
                            if await self._set_aside(record, exc):
                                settled.append(record.seq)
                            continue
                        pending = (future, time.perf_counter())
                        self._pending[record.seq] = pending
                    waiting[record.seq] = pending[0]
        except (BridgeError, TimeoutError) as exc:
            # Stop here rather than send later records ahead of this one.
            if isinstance(exc, BridgeError):
                detail = exc.detail
            else:
                detail = "no metadata or buffer space"
                self._metrics.record_publish_error("timeout")
            log.warning("cannot hand records to Kafka yet: %s", detail)
        return waiting

    async def _set_aside(self, record: QueuedRecord, error: BridgeError) -> bool:
        """A record Kafka will never take (too large for the topic) must not block the
        ones behind it: it goes to the dead-letter topic, or, if even that refuses it,
        is dropped with an error. True when it may leave the backlog."""
        original = record.destination
        if self._deadletter_topic and original.topic != self._deadletter_topic:
            letter = Destination(
                topic=self._deadletter_topic,
                key=original.key,
                value=original.value,
                headers=[
                    *original.headers,
                    ("x-bridge-reason", b"kafka_rejected"),
                    ("x-bridge-detail", error.detail.encode()),
                    ("x-bridge-original-topic", original.topic.encode()),
                ],
            )
            try:
                await self._publisher.publish(letter)
            except PayloadTooLarge:
                pass
            except BridgeError as exc:
                log.warning("cannot set aside a record Kafka refused yet: %s", exc.detail)
                return False
            else:
                log.error(
                    "Kafka refused the record with key %s for %s (%s); it is on %s",
                    original.key.decode(errors="replace"),
                    original.topic,
                    error.detail,
                    self._deadletter_topic,
                )
                self._metrics.dead_letters.labels("kafka_rejected").inc()
                return True
        log.error(
            "Kafka refused the record with key %s for %s (%s) and it cannot be kept as a "
            "dead letter either: dropped",
            original.key.decode(errors="replace"),
            original.topic,
            error.detail,
        )
        self._metrics.dropped_records.inc()
        return True
