"""Operator tools against Kafka: create and list topics, tail what arrives.

Not on the request path; kept apart from :mod:`bridge.publisher` so the hot
path's module stays small.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from bridge.config import Settings
from bridge.geins import ENTITY_ACTIONS
from bridge.publisher import kafka_client_options
from bridge.routing import Router

DEFAULT_REPLICATION_CAP = 3
_TOPIC_EXISTS = TopicAlreadyExistsError.errno


def known_topics(router: Router) -> list[str]:
    """Every topic the known Geins entity/action pairs map to (default account/environment)."""
    return router.known_topics([(e, a) for e, acts in ENTITY_ACTIONS.items() for a in acts])


async def create_topics(settings: Settings, topics: Sequence[str]) -> dict[str, str]:
    """Create ``topics`` if missing. Returns topic -> "created" | "exists"; raises on errors.

    Without a configured replication factor, uses min(3, number of brokers), so a
    one-broker development cluster and a production cluster both get a sensible value.
    """
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    async with asyncio.timeout(settings.kafka_connect_timeout):
        await admin.start()
    try:
        replication = settings.topic_replication_factor
        if replication is None:
            cluster = await admin.describe_cluster()
            replication = min(DEFAULT_REPLICATION_CAP, len(cluster["brokers"]))
        response = await admin.create_topics(
            [NewTopic(t, settings.topic_partitions, replication) for t in topics]
        )
        results: dict[str, str] = {}
        for name, code, *rest in response.topic_errors:
            if code == 0:
                results[name] = "created"
            elif code == _TOPIC_EXISTS:
                results[name] = "exists"
            else:
                message = rest[0] if rest and rest[0] else f"error code {code}"
                raise KafkaError(f"creating topic {name} failed: {message}")
        return results
    finally:
        await admin.close()


async def list_topics(settings: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    async with asyncio.timeout(settings.kafka_connect_timeout):
        await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if not t.startswith("__"))
    finally:
        await admin.close()


def format_record(record: Any) -> str:
    """One consumed record as a block of text a person can read."""
    key = record.key.decode(errors="replace") if record.key is not None else "<none>"
    lines = [f"--- {record.topic} [{record.partition}] @{record.offset}  key={key}"]
    lines += [f"  {name}: {value.decode(errors='replace')}" for name, value in record.headers]
    value = record.value.decode(errors="replace") if record.value is not None else "<none>"
    lines.append(f"  {value}")
    return "\n".join(lines)


async def tail(
    settings: Settings,
    topics: Sequence[str],
    *,
    pattern: str | None,
    from_beginning: bool,
    limit: int | None,
    out: TextIO | None = None,
) -> int:
    """Print records as they arrive until interrupted or ``limit`` records were shown."""
    consumer = AIOKafkaConsumer(
        *topics,
        **kafka_client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        metadata_max_age_ms=5000,  # notice new topics matching the pattern quickly
    )
    if pattern is not None:
        consumer.subscribe(pattern=re.compile(pattern).pattern)
    async with asyncio.timeout(settings.kafka_connect_timeout):
        await consumer.start()
    shown = 0
    try:
        async for record in consumer:
            print(format_record(record), file=out or sys.stdout, flush=True)
            shown += 1
            if limit is not None and shown >= limit:
                break
    finally:
        await consumer.stop()
    return shown
