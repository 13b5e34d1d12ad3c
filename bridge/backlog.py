"""Records accepted but not yet acknowledged by Kafka, and what holds them.

Two holders share one shape, so one drainer serves both: the durable
:class:`~bridge.spool.Spool` (``BRIDGE_ACK=durable``) and the in-memory
:class:`MemoryBacklog` (``BRIDGE_ACK=memory``, lost if the process dies).
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from bridge.errors import MemoryQueueFull
from bridge.routing import Destination


@dataclass(slots=True)  # read-only; not frozen for speed (see bridge.geins.Delivery)
class QueuedRecord:
    seq: int
    destination: Destination
    enqueued_at: float  # wall-clock seconds


class Backlog(Protocol):
    """A FIFO the drainer empties into Kafka."""

    #: Whether its records survive the process (the spool's): at a stop that came
    #: before the topics were created they wait for the next start instead of being
    #: published to topics Kafka would create first with its own defaults.
    outlives_the_process: bool

    @property
    def depth(self) -> int:
        """Records held."""
        ...

    @property
    def bytes(self) -> int:
        """What the records held count for the capacity (:func:`record_size`)."""
        ...

    @property
    def capacity(self) -> int:
        """The most :attr:`bytes` it may hold (BRIDGE_SPOOL_MAX_BYTES, _MEMORY_MAX_BYTES)."""
        ...

    @property
    def oldest_enqueued_at(self) -> float | None:
        """When the oldest record held was accepted (wall clock), None if empty."""
        ...

    async def oldest(
        self,
        limit: int,
        max_bytes: int,
        *,
        skip_seqs: Set[int] = frozenset(),
        skip_topics: Set[str] = frozenset(),
    ) -> list[QueuedRecord]:
        """Up to ``limit`` records (and about ``max_bytes``, at least one), oldest
        first, leaving out the records ``skip_seqs`` names and those of ``skip_topics``."""
        ...

    async def remove(self, seqs: Sequence[int]) -> None: ...


#: Readiness asks for room for one more event, not for one byte: a reviewer's spool
#: sat 111 bytes short of its limit, refusing every event, while /readyz said 200.
READY_ROOM = 64 * 1024


def has_room(used: int, limit: int) -> bool:
    """Whether a queue holding ``used`` of ``limit`` bytes has room for an event (64
    KiB, or a 16th of a smaller limit)."""
    return used + min(READY_ROOM, limit // 16) <= limit


def record_size(destination: Destination) -> int:
    """Bytes a record counts for a backlog's capacity limit."""
    return (
        len(destination.value)
        + len(destination.key)
        + len(destination.topic)
        + sum(len(n) + len(v) for n, v in destination.headers)
    )


class RecordFifo:
    """Records in seq order with the sizes they count for: the memory mode's queue,
    and the spool's in-memory copy of what it holds.

    While topics are on hold the records are kept by topic too, so that a read
    leaving them out does not walk past their records (they pile up at the head
    while the others come and go). Only then: the second bookkeeping costs every
    push and discard, so it is made by the first read that needs it and dropped
    once the FIFO is empty.
    """

    def __init__(self) -> None:
        # OrderedDict, not dict: a FIFO's head is found at once (a dict walks past the
        # slots of the records removed before it until it is resized)
        self._records: OrderedDict[int, tuple[QueuedRecord, int]] = OrderedDict()
        self._by_topic: dict[str, OrderedDict[int, tuple[QueuedRecord, int]]] | None = None
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def push(self, record: QueuedRecord, size: int) -> None:
        """Add ``record``, whose seq is higher than any held."""
        held = (record, size)
        self._records[record.seq] = held
        if self._by_topic is not None:
            _file_by_topic(self._by_topic, held)
        self.bytes += size

    def take(
        self,
        limit: int,
        max_bytes: int,
        skip_seqs: Set[int] = frozenset(),
        skip_topics: Set[str] = frozenset(),
    ) -> list[QueuedRecord]:
        """Up to ``limit`` records and about ``max_bytes`` (at least one), oldest first,
        without those of ``skip_seqs`` and ``skip_topics``."""
        taken: list[QueuedRecord] = []
        total = 0
        candidates: Iterator[tuple[QueuedRecord, int]]
        if skip_topics:
            if self._by_topic is None:
                self._by_topic = {}
                for held in self._records.values():
                    _file_by_topic(self._by_topic, held)
            by_topic = self._by_topic
            if sum(len(by_topic.get(t, ())) for t in skip_topics) <= SCAN_PAST_AT_MOST:
                # Few held: past them in seq order. A merge of one iterator per topic
                # cost 0.44 s of the event loop with 40,000 topics waiting (a review's).
                candidates = (
                    entry
                    for entry in self._records.values()
                    if entry[0].destination.topic not in skip_topics
                )
            else:
                candidates = self._merged_topics(skip_topics)
        else:
            candidates = iter(self._records.values())
        for record, size in candidates:
            if record.seq in skip_seqs:
                continue
            if len(taken) >= limit or (taken and total + size > max_bytes):
                break
            taken.append(record)
            total += size
        return taken

    def _merged_topics(self, skip_topics: Set[str]) -> Iterator[tuple[QueuedRecord, int]]:
        """The records of the topics not in ``skip_topics``, in seq order, without
        reading past those of the others (many held: a spool full of a held topic)."""
        assert self._by_topic is not None  # noqa: S101  # made by take
        return heapq.merge(
            *(
                iter(of_topic.values())
                for topic, of_topic in self._by_topic.items()
                if topic not in skip_topics
            ),
            key=_seq_of,
        )

    def discard(self, seqs: Sequence[int]) -> int:
        """Drop the records with these seqs (unknown ones are ignored); how many were held."""
        dropped = 0
        by_topic = self._by_topic
        for seq in seqs:
            held = self._records.pop(seq, None)
            if held is not None:
                dropped += 1
                self.bytes -= held[1]
                if by_topic is not None:
                    topic = held[0].destination.topic
                    of_topic = by_topic[topic]
                    del of_topic[seq]
                    if not of_topic:
                        del by_topic[topic]
        if not self._records:
            self._by_topic = None
        return dropped

    def first(self) -> QueuedRecord | None:
        held = next(iter(self._records.values()), None)
        return held[0] if held is not None else None

    def clear(self) -> None:
        self._records.clear()
        self._by_topic = None
        self.bytes = 0


def _file_by_topic(
    by_topic: dict[str, OrderedDict[int, tuple[QueuedRecord, int]]],
    held: tuple[QueuedRecord, int],
) -> None:
    topic = held[0].destination.topic
    of_topic = by_topic.get(topic)
    if of_topic is None:
        of_topic = by_topic[topic] = OrderedDict()
    of_topic[held[0].seq] = held


#: The most rows of held topics a read goes past in seq order; with more, it merges
#: the other topics' own orders instead, whose cost grows with their number.
SCAN_PAST_AT_MOST = 10_000


def _seq_of(held: tuple[QueuedRecord, int]) -> int:
    return held[0].seq


#: What a record in the memory queue holds beyond the bytes record_size counts: its
#: Python objects (the record, its destination, a tuple and a bytes object per header,
#: the queue's entry), some 950 bytes for a Geins event with its ce_* headers. Counted
#: towards BRIDGE_MEMORY_MAX_BYTES, so that the limit bounds the memory the queue
#: takes: without it, a full queue of small events took 3.7 times the limit (a
#: review's measure), more than a sidecar's memory limit left.
MEMORY_RECORD_OVERHEAD = 1024


class MemoryBacklog:
    """A bounded in-memory FIFO: fast, and lost if the process dies."""

    outlives_the_process = False

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._records = RecordFifo()
        self._next_seq = 0
        self.oldest_enqueued_at: float | None = None

    @property
    def depth(self) -> int:
        return len(self._records)

    @property
    def bytes(self) -> int:
        return self._records.bytes

    @property
    def capacity(self) -> int:
        return self._max_bytes

    @property
    def full(self) -> bool:
        # with the room's own overhead: ready meant 63 KiB, a 64 KiB event refused
        return not has_room(self.bytes + MEMORY_RECORD_OVERHEAD, self._max_bytes)

    def append(self, destination: Destination) -> None:
        size = record_size(destination) + MEMORY_RECORD_OVERHEAD
        # An empty queue takes any event: the settings' check (a limit of at least the
        # largest record) leaves no room for the overhead, and such an event would be
        # refused for ever.
        if self.bytes + size > self._max_bytes and self._records:
            raise MemoryQueueFull(
                f"{self.depth} events ({self.bytes} bytes) wait for Kafka; the limit is "
                f"{self._max_bytes} bytes (BRIDGE_MEMORY_MAX_BYTES)"
            )
        self._next_seq += 1
        now = time.time()
        self._records.push(QueuedRecord(self._next_seq, destination, now), size)
        if self.oldest_enqueued_at is None:
            self.oldest_enqueued_at = now

    async def oldest(
        self,
        limit: int,
        max_bytes: int,
        *,
        skip_seqs: Set[int] = frozenset(),
        skip_topics: Set[str] = frozenset(),
    ) -> list[QueuedRecord]:
        return self._records.take(limit, max_bytes, skip_seqs, skip_topics)

    async def remove(self, seqs: Sequence[int]) -> None:
        self._records.discard(seqs)
        first = self._records.first()
        self.oldest_enqueued_at = first.enqueued_at if first else None
