"""Counting what reached Kafka: the sum of end offsets over a prefix's topics.

Each subject writes to topics of its own prefix, created fresh by the harness,
with an idempotent or plain (never transactional) producer: there are no
control records, so a partition's end offset minus its start offset is its
number of records.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Callable, Collection, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

_DEADLINE = 30.0


class KafkaProbe:
    """A long-lived consumer (no group) and admin client on their own event loop."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._runner = asyncio.Runner()
        self._consumer: Any = None
        self._admin: Any = None

    async def _clients(self) -> tuple[Any, Any]:
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            self._admin = admin
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False
            )
            await consumer.start()
            self._consumer = consumer
        return self._admin, self._consumer

    def create_topics(self, names: Sequence[str], partitions: int) -> None:
        async def create() -> None:
            admin, _ = await self._clients()
            for name in names:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [NewTopic(name, num_partitions=partitions, replication_factor=1)]
                    )

        self._runner.run(asyncio.wait_for(create(), _DEADLINE))

    async def _partitions(
        self, prefix: str, without: Collection[str]
    ) -> tuple[Any, list[TopicPartition]]:
        """The consumer, and the partitions of the topics whose name starts with
        ``prefix``, but those named in ``without``."""
        admin, consumer = await self._clients()
        described = await admin.describe_topics()
        partitions = [
            TopicPartition(t["topic"], p["partition"])
            for t in described
            if t["topic"].startswith(prefix) and t["topic"] not in without
            for p in t["partitions"]
        ]
        return consumer, partitions

    def count(self, prefix: str, *, without: Collection[str] = ()) -> int:
        """Records on every topic whose name starts with ``prefix``, but those named in
        ``without``."""

        async def count() -> int:
            consumer, partitions = await self._partitions(prefix, without)
            if not partitions:
                return 0
            end = await consumer.end_offsets(partitions)
            start = await consumer.beginning_offsets(partitions)
            return sum(int(end[tp]) - int(start[tp]) for tp in partitions)

        return self._runner.run(asyncio.wait_for(count(), _DEADLINE))

    def repeated_keys(self, prefix: str, *, without: Collection[str] = ()) -> int:
        """Records on the topics whose name starts with ``prefix`` (but those named in
        ``without``) whose key an earlier record of their partition had: each request
        carries a fresh key, so a loss hidden by a duplicate, which the counts cannot
        tell from the right number, shows here. Per partition: a key's records share
        one (the key picks it, with Kafka's partitioner, in the bridge's producer and
        the naive bridge's alike). Every partition is read at once, each key kept as
        its 8-byte hash (``hash()``: the same for equal keys within this process), and
        one partition's hashes at a time become a set (some 70 bytes a record: about
        30 MB for a 10-minute soak's largest partition). Reading stops with
        TimeoutError when no partition moves for 30 s (a broker gone mid-read)."""

        async def read() -> int:
            consumer, partitions = await self._partitions(prefix, without)
            if not partitions:
                return 0
            end = await consumer.end_offsets(partitions)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            hashes = {tp: array("q") for tp in partitions}
            left = {tp for tp in partitions if await consumer.position(tp) < end[tp]}
            moved = time.monotonic()
            try:
                while left:
                    if time.monotonic() - moved > _DEADLINE:
                        raise TimeoutError(f"no record of {sorted(left)} for {_DEADLINE:g} s")
                    fetched = await asyncio.wait_for(
                        consumer.getmany(*left, timeout_ms=1000), _DEADLINE
                    )
                    if fetched:
                        moved = time.monotonic()
                    for tp, records in fetched.items():
                        kept = hashes[tp]
                        for record in records:
                            if record.offset < end[tp]:
                                kept.append(hash(record.key))
                        if await consumer.position(tp) >= end[tp]:
                            left.discard(tp)
            finally:
                consumer.unsubscribe()
            return sum(len(kept) - len(set(kept)) for kept in hashes.values())

        return self._runner.run(read())

    def settle(
        self,
        prefix: str,
        expected: int,
        *,
        without: Collection[str] = (),
        max_wait: float,
        quiet: float = 3.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> tuple[int, float]:
        """Poll the count until it equals ``expected`` (and stays so briefly), or stops
        moving for ``quiet`` seconds, or ``max_wait`` passes. Returns (count, seconds)."""
        started = time.monotonic()
        last = -1
        changed = started
        while True:
            current = self.count(prefix, without=without)
            now = time.monotonic()
            if current != last:
                last, changed = current, now
            if current == expected and now - changed >= 0.3:
                break
            if current != expected and now - changed >= quiet:
                break
            if now - started >= max_wait:
                break
            sleep(0.2)
        return last, time.monotonic() - started

    def close(self) -> None:
        async def close() -> None:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._admin is not None:
                await self._admin.close()

        with contextlib.suppress(TimeoutError, OSError):
            self._runner.run(asyncio.wait_for(close(), 10))
        self._runner.close()
