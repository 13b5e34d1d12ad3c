"""SIGTERM under load: readiness drops first, and every 2xx is in Kafka."""

from __future__ import annotations

import asyncio
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest

from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync
from tests.process import BridgeProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

WORKERS = 16


@dataclass
class Tally:
    sent: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    refused: int = 0  # 503 and the like: the sender would retry
    failed: int = 0  # no answer at all (connection refused or reset)
    readiness: list[int] = field(default_factory=list)


async def load(url: str, tally: Tally, stop: asyncio.Event) -> None:
    """Keep WORKERS senders busy until ``stop``; each delivery has a fresh key."""

    async def worker(client: httpx2.AsyncClient) -> None:
        while not stop.is_set():
            key = str(uuid.uuid4())
            tally.sent.add(key)
            try:
                response = await client.post(
                    url + "/webhooks/geins/Order/create",
                    content=b'{"id":"1"}',
                    headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": key},
                )
            except httpx2.TransportError:
                tally.failed += 1
                await asyncio.sleep(0.05)
                continue
            if response.status_code == 202:
                tally.accepted.add(key)
            else:
                tally.refused += 1

    async with httpx2.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(WORKERS)))


async def poll_readiness(url: str, tally: Tally, stop: asyncio.Event) -> None:
    async with httpx2.AsyncClient(timeout=2) as client:
        while not stop.is_set():
            try:
                tally.readiness.append((await client.get(url + "/readyz")).status_code)
            except httpx2.TransportError:
                tally.readiness.append(0)
            await asyncio.sleep(0.05)


def test_sigterm_under_load_loses_nothing(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """SIGTERM mid-load: /readyz turns 503, the process exits 0, every 2xx key is in Kafka."""
    env = {
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
        "BRIDGE_SHUTDOWN_DELAY": "1",
    }
    tally = Tally()
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:

        async def scenario() -> None:
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(load(bridge.url, tally, stop)),
                asyncio.create_task(poll_readiness(bridge.url, tally, stop)),
            ]
            await asyncio.sleep(2.0)
            accepted_before = len(tally.accepted)
            bridge.signal(signal.SIGTERM)
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*tasks)
            assert accepted_before > 0

        asyncio.run(scenario())
        code = bridge.wait(60)
        log = bridge.log()

    found = {r.key.decode() for r in read_all_sync(kafka_bootstrap, topic_prefix)}
    lost = tally.accepted - found
    print(
        f"sent={len(tally.sent)} answered_2xx={len(tally.accepted)} refused={tally.refused} "
        f"no_answer={tally.failed} found_in_kafka={len(found)} lost={len(lost)}"
    )
    assert code == 0, log
    assert not lost, f"{len(lost)} deliveries answered 202 are missing from Kafka"
    assert found <= tally.sent
    assert 503 in tally.readiness, "readiness never turned 503 during the shutdown delay"
    assert "Traceback" not in log, log
