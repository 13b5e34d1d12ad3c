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

    depth: int
    bytes: int
    oldest_enqueued_at: float | None

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


class MemoryBacklog:
    """A bounded in-memory FIFO: fast, and lost if the process dies."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._records: OrderedDict[int, QueuedRecord] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._next_seq = 0
        self.depth = 0
        self.bytes = 0
        self.oldest_enqueued_at: float | None = None

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
        self._records[self._next_seq] = QueuedRecord(self._next_seq, destination, now)
        self._sizes[self._next_seq] = size
        self.depth += 1
        self.bytes += size
        if self.oldest_enqueued_at is None:
            self.oldest_enqueued_at = now

    async def oldest(self, limit: int, max_bytes: int) -> list[QueuedRecord]:
        taken: list[QueuedRecord] = []
        total = 0
        for seq, record in self._records.items():
            size = self._sizes[seq]
            if len(taken) >= limit or (taken and total + size > max_bytes):
                break
            taken.append(record)
            total += size
        return taken

    async def remove(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            if self._records.pop(seq, None) is not None:
                self.depth -= 1
                self.bytes -= self._sizes.pop(seq)
        first = next(iter(self._records.values()), None)
        self.oldest_enqueued_at = first.enqueued_at if first else None
