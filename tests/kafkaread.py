"""Reading back what reached the real broker (integration tests only)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


async def partitions_with_prefix(bootstrap: str, prefix: str) -> list[TopicPartition]:
    """Every partition of every topic whose name starts with ``prefix``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics()
    finally:
        await admin.close()
    return sorted(
        TopicPartition(t["topic"], p["partition"])
        for t in described
        if t["topic"].startswith(prefix)
        for p in t["partitions"]
    )


async def read_all(bootstrap: str, prefix: str, *, deadline: float = 30.0) -> list[Any]:
    """Every record on every topic whose name starts with ``prefix``, oldest first.

    Reads up to the end offsets seen at the start, so it returns exactly what was
    acknowledged before the call: no waiting for records that may never come.
    """
    async with asyncio.timeout(deadline):
        partitions = await partitions_with_prefix(bootstrap, prefix)
        if not partitions:
            return []
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            records: list[Any] = []
            while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
                batches = await consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    records.extend(batch)
            return records
        finally:
            await consumer.stop()


def read_all_sync(bootstrap: str, prefix: str, *, timeout: float = 30.0) -> list[Any]:
    return asyncio.run(read_all(bootstrap, prefix, deadline=timeout))
