"""Records accepted but not yet acknowledged by Kafka, and what holds them.

Two holders share one shape, so one drainer serves both: the durable
:class:`~bridge.spool.Spool` (``BRIDGE_ACK=durable``) and the in-memory
:class:`MemoryBacklog` (``BRIDGE_ACK=memory``, lost if the process dies).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
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

    @property
    def depth(self) -> int:
        """Records held."""
        ...

    @property
    def bytes(self) -> int:
        """What the records held count for the capacity (:func:`record_size`)."""
        ...

    @property
    def oldest_enqueued_at(self) -> float | None:
        """When the oldest record held was accepted (wall clock), None if empty."""
        ...

    async def oldest(self, limit: int, max_bytes: int) -> list[QueuedRecord]: ...

    async def remove(self, seqs: Sequence[int]) -> None: ...


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
    and the spool's in-memory copy of what it holds."""

    def __init__(self) -> None:
        self._records: OrderedDict[int, tuple[QueuedRecord, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def push(self, record: QueuedRecord, size: int) -> None:
        """Add ``record``, whose seq is higher than any held."""
        self._records[record.seq] = (record, size)
        self.bytes += size

    def take(self, limit: int, max_bytes: int) -> list[QueuedRecord]:
        """Up to ``limit`` records and about ``max_bytes`` (at least one), oldest first."""
        taken: list[QueuedRecord] = []
        total = 0
        for record, size in self._records.values():
            if len(taken) >= limit or (taken and total + size > max_bytes):
                break
            taken.append(record)
            total += size
        return taken

    def discard(self, seqs: Sequence[int]) -> int:
        """Drop the records with these seqs (unknown ones are ignored); how many were held."""
        dropped = 0
        for seq in seqs:
            held = self._records.pop(seq, None)
            if held is not None:
                dropped += 1
                self.bytes -= held[1]
        return dropped

    def first(self) -> QueuedRecord | None:
        held = next(iter(self._records.values()), None)
        return held[0] if held is not None else None

    def clear(self) -> None:
        self._records.clear()
        self.bytes = 0


class MemoryBacklog:
    """A bounded in-memory FIFO: fast, and lost if the process dies."""

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
    def full(self) -> bool:
        return self.bytes >= self._max_bytes

    def append(self, destination: Destination) -> None:
        size = record_size(destination)
        if self.bytes + size > self._max_bytes:
            raise MemoryQueueFull(
                f"{self.depth} events ({self.bytes} bytes) wait for Kafka; the limit is "
                f"{self._max_bytes} bytes (BRIDGE_MEMORY_MAX_BYTES)"
            )
        self._next_seq += 1
        now = time.time()
        self._records.push(QueuedRecord(self._next_seq, destination, now), size)
        if self.oldest_enqueued_at is None:
            self.oldest_enqueued_at = now

    async def oldest(self, limit: int, max_bytes: int) -> list[QueuedRecord]:
        return self._records.take(limit, max_bytes)

    async def remove(self, seqs: Sequence[int]) -> None:
        self._records.discard(seqs)
        first = self._records.first()
        self.oldest_enqueued_at = first.enqueued_at if first else None
