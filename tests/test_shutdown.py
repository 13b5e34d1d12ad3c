"""SIGTERM under load: readiness drops first, and every 2xx is in Kafka."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx2
import pytest

from bridge import package_version
from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync
from tests.loadgen import Tally, load
from tests.polling import eventually
from tests.process import BridgeProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def poll_readiness(url: str, seen: list[int], stop: asyncio.Event) -> None:
    async with httpx2.AsyncClient(timeout=2) as client:
        while not stop.is_set():
            try:
                seen.append((await client.get(url + "/readyz")).status_code)
            except httpx2.TransportError:
                seen.append(0)
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("ack", "stop_signal"),
    [("durable", signal.SIGTERM), ("broker", signal.SIGTERM), ("memory", signal.SIGHUP)],
)
def test_sigterm_under_load_loses_nothing(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, ack: str, stop_signal: signal.Signals
) -> None:
    """SIGTERM mid-load: /readyz turns 503, the process exits 0, every 2xx key is in Kafka.
    SIGHUP (the terminal closed) does the same: it killed the bridge at once, and in
    memory mode the events it had answered 202 for and not yet sent were lost."""
    env = {
        "BRIDGE_ACK": ack,
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
        "BRIDGE_SHUTDOWN_DELAY": "1",
    }
    tally = Tally()
    readiness: list[int] = []
    hang_up = stop_signal == signal.SIGHUP
    with BridgeProcess(env, tmp_path / "bridge.log", hang_up=hang_up) as bridge:
        process = bridge.proc
        assert process is not None

        async def scenario() -> None:
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(load(lambda: bridge.url, tally, stop)),
                asyncio.create_task(poll_readiness(bridge.url, readiness, stop)),
            ]
            # under load: deliveries answered and more in flight
            await eventually(lambda: len(tally.accepted) >= 100, within=30, every=0.05)
            accepted_before = len(tally.accepted)
            bridge.signal(stop_signal)
            # the load goes on through the shutdown delay and the drain, until it exits
            await eventually(lambda: process.poll() is not None, within=30, every=0.05)
            stop.set()
            await asyncio.gather(*tasks)
            assert accepted_before > 0

        asyncio.run(scenario())
        code = bridge.wait(60)
        log = bridge.log()

    found = {r.key.decode() for r in read_all_sync(kafka_bootstrap, topic_prefix)}
    lost = tally.accepted - found
    print(tally.summary(found))
    assert code == 0, log
    assert not lost, f"{len(lost)} deliveries answered 202 are missing from Kafka"
    assert found <= tally.sent
    assert 503 in readiness, "readiness never turned 503 during the shutdown delay"
    assert "Traceback" not in log, log
    assert f"{stop_signal.name} received: readiness off" in log, log
    assert f"geins-kafka-bridge {package_version()} starting, BRIDGE_ACK={ack}" in log, log
