"""Hands a record to aiokafka's accumulator without ``producer.send()``'s detours.

``AIOKafkaProducer.send`` costs about 14 µs of Python per record: two
coroutines, a metadata look-up, a size estimate, sets and lists of partitions
built anew for the partitioner, a ``TopicPartition``, a debug log call and a
third coroutine to reach the accumulator. When the topic's partitions are
known, :class:`DirectHandover` does the same thing in a plain function: it
picks the partition (Kafka's rule, :mod:`bridge.partitioner`), then appends
the record to the partition's open batch in aiokafka's accumulator, or opens
one, exactly as ``send`` would. The sender task, retries, idempotence and the
per-record acknowledgement future stay aiokafka's.

This reaches into the accumulator's internals (``_batches``,
``_append_batch``) and the client's set of topics to keep metadata for
(``_topics``, see :meth:`DirectHandover._track`), so it checks at start that
they are there (and gives the fast way up for ``send()`` at the first TypeError or
AttributeError they raise), and the aiokafka version is pinned to a minor release in
pyproject.toml. Whenever the fast way does not apply (unknown topic, a record
too large, a full batch, the producer closing or failed) it answers None and
the caller uses ``producer.send``, which waits for metadata or raises the
right error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition

from bridge.partitioner import partition_index

log = logging.getLogger(__name__)

_NEEDED = ("_batches", "_append_batch", "_closed", "_exception", "create_builder")

#: A topic no record went to for this long is dropped from the topics the client asks
#: Kafka about (as Java's producer does after metadata.max.idle.ms, 5 minutes): its
#: first record after that waits for its metadata once more. Kept, every topic ever
#: used (one per {account} and {environment} with such a template) made each metadata
#: refresh larger for the process's life, and a refresh asks Kafka to create the
#: topics it names: one an operator deleted came back within seconds, with the
#: broker's defaults, though nothing was sent to it.
TOPIC_IDLE_SECONDS = 300.0
#: How often, at most, the idle topics are looked for (at a metadata update).
IDLE_CHECK_SECONDS = 60.0
#: Metadata updates further apart than this (the heartbeat asks every 5 s) mean Kafka
#: was away: appends went on with the partitions known before, unstamped (see _learn).
UPDATE_GAP_SECONDS = 30.0


class DirectHandover:
    """Appends records to a producer's accumulator; one per producer."""

    def __init__(self, producer: AIOKafkaProducer, max_request_size: int) -> None:
        self._accumulator: Any = getattr(producer, "_message_accumulator", None)
        self._client = producer.client
        self.enabled = (
            self._accumulator is not None
            and all(hasattr(self._accumulator, name) for name in _NEEDED)
            and isinstance(getattr(self._client, "_topics", None), set)
        )
        if not self.enabled:
            log.warning("aiokafka's internals changed shape: every record goes through send()")
        self._cluster = producer.client.cluster
        self._max_request_size = max_request_size
        # topic -> its partitions, in partition order; forgotten at each metadata update
        self._partitions: dict[str, tuple[TopicPartition, ...]] = {}
        self._cluster.add_listener(self._forget)
        # topic -> when a record for it was last appended (at its first after each
        # metadata update: see _learn), for _forget_idle
        self._used: dict[str, float] = {}
        self._idle_checked = self._updated_at = time.monotonic()
        #: The batch (aiokafka's MessageBatch) of the last record appended; None when
        #: the last append answered None. Read at once by whoever appended, it tells
        #: whether a batch Kafka refused held that record alone.
        self.last_batch: Any = None

    def _forget(self, _cluster: object) -> None:
        self._partitions.clear()
        self._forget_idle()

    def _forget_idle(self) -> None:
        """Drop the topics no record went to for TOPIC_IDLE_SECONDS from those the client
        asks Kafka about; never the last one (none left, aiokafka asks for every topic
        of the cluster). Called at a successful metadata update only: never during an
        outage, when a topic's batches may still wait for their leader."""
        now = time.monotonic()
        if now - self._updated_at > UPDATE_GAP_SECONDS:
            # The first update after an outage: the stamps are as old as it, though
            # records went on (an outage of 5 minutes made every topic idle); looked at
            # again once appends have stamped them afresh.
            self._idle_checked = now
        self._updated_at = now
        if now - self._idle_checked < IDLE_CHECK_SECONDS:
            return
        self._idle_checked = now
        idle = [topic for topic, at in self._used.items() if now - at >= TOPIC_IDLE_SECONDS]
        if not idle:
            return
        # Nor a topic whose records still wait in the producer (for a leader, say).
        waiting = {tp.topic for tp, batches in self._accumulator._batches.items() if batches}
        topics = getattr(self._client, "_topics", None)
        for topic in idle:
            if topic in waiting:
                continue
            del self._used[topic]
            if isinstance(topics, set) and len(topics) > 1:
                topics.discard(topic)

    def _track(self, topic: str) -> None:
        """Have the client keep this topic's metadata from now on, as ``send()`` would.

        aiokafka asks Kafka for the metadata of the topics ``send()`` registered
        (of every topic until there is one), and forgets the others at each
        refresh. A topic known at start and only ever appended to here would
        vanish from the cluster view at the first refresh after ``send()``
        registered another topic: its records then took the slow way again, and
        a batch already waiting for it, after a leader change, waited for a
        leader nobody asked about until it expired. The metadata is known at this
        point, so no refresh is needed now.
        """
        # Read each time: the client's set_topics() replaces the set.
        self._client._topics.add(topic)

    def knows(self, topic: str) -> bool:
        """True when records for ``topic`` were appended since the last metadata update."""
        return topic in self._partitions

    def close(self) -> None:
        self._cluster.remove_listener(self._forget)

    def append(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any] | None:
        """The record's acknowledgement future, or None: send it with ``producer.send``.

        An aiokafka whose internals changed in a way the start-up check cannot see (a
        method's arguments, say: the version allows patch releases) raises a TypeError
        or AttributeError here before the record is appended: every record became a
        503. The fast way is then given up for ``send()``, said once.
        """
        if not self.enabled:
            self.last_batch = None
            return None
        try:
            return self._append(topic, key, value, headers)
        except (TypeError, AttributeError) as exc:
            self._give_up(exc)
            return None

    def _give_up(self, exc: Exception) -> None:
        self.enabled = False
        self.last_batch = None
        log.warning(
            "aiokafka's internals changed shape (%s: %s): every record goes through "
            "send() from now on",
            type(exc).__name__,
            exc,
        )

    def _append(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any] | None:
        accumulator = self._accumulator
        self.last_batch = None
        if accumulator._closed or accumulator._exception is not None:
            return None
        partitions = self._partitions.get(topic) or self._learn(topic)
        if partitions is None:
            return None
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self._max_request_size:
            return None  # send() refuses it with MessageSizeTooLargeError
        tp = partitions[partition_index(key, len(partitions))]
        if accumulator._batches.get(tp):
            # Join the partition's open batch; when it is full, send() waits for
            # the sender to take it, aiokafka's own back-pressure.
            last = accumulator._batches[tp][-1]
            joined: asyncio.Future[Any] | None = last.append(key, value, None, headers=headers)
            if joined is not None:
                self.last_batch = last
            return joined
        # No open batch for the partition: open one (which wakes the sender). A
        # fresh batch takes any record that passed the size check.
        batch = accumulator._append_batch(accumulator.create_builder(), tp)
        opened: asyncio.Future[Any] = batch.append(key, value, None, headers=headers)
        self.last_batch = batch
        return opened

    def _learn(self, topic: str) -> tuple[TopicPartition, ...] | None:
        """``topic``'s partitions in partition order, kept until the next metadata
        update; None while the producer knows none."""
        known = self._cluster.partitions_for_topic(topic)
        if not known:
            return None
        partitions = tuple(TopicPartition(topic, p) for p in sorted(known))
        self._partitions[topic] = partitions
        self._used[topic] = time.monotonic()
        self._track(topic)
        return partitions

    def batch_of_send(self, topic: str, key: bytes, acked: asyncio.Future[Any]) -> Any:
        """The batch ``producer.send()`` put the record of ``acked`` in, or None when that
        cannot be told. Call it as soon as send() returned: nothing ran since it
        appended the record, so the record is the last of the last batch of its
        partition (the one Kafka's rule gives its key, as send()'s partitioner does)."""
        if not self.enabled:
            return None
        # Never raises: send() queued the record already, and a failure here made the
        # caller send it again (a duplicate), as a review found.
        try:
            partitions = self._partitions.get(topic) or self._learn(topic)
            if partitions is None:
                return None
            last = self._last_batch(partitions[partition_index(key, len(partitions))])
            futures = getattr(last, "_msg_futures", None)
            return last if futures and futures[-1][0] is acked else None
        except (TypeError, AttributeError, IndexError, KeyError) as exc:
            self._give_up(exc)
            return None

    def batch_of_send_batch(self, topic: str, partition: int, builder: Any) -> Any:
        """The batch ``producer.send_batch(builder, ...)`` made of ``builder``, or None;
        call it as soon as send_batch() returned (see batch_of_send)."""
        if not self.enabled:
            return None
        try:  # never raises (see batch_of_send)
            last = self._last_batch(TopicPartition(topic, partition))
        except (TypeError, AttributeError, IndexError, KeyError) as exc:
            self._give_up(exc)
            return None
        return last if getattr(last, "_builder", None) is builder else None

    def _last_batch(self, tp: TopicPartition) -> Any:
        pending = self._accumulator._batches.get(tp)
        return pending[-1] if pending else None
