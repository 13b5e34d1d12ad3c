"""Soak: a bounded run of valid, invalid and hostile traffic against the real server.

Memory must stay flat, no file descriptor may leak, every valid 2xx must be in
Kafka. SOAK_SECONDS lengthens the run (default 40 s, loopback only: the suite's 15
minutes; the flat-memory target of a long run is `make bench`'s, BENCH_SOAK_SECONDS).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import uuid
from pathlib import Path

import httpx2
import pytest

from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync
from tests.process import BridgeProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "40"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def hostile_client(url: str, accepted: set[str], stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311  # picks request kinds, not secrets
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            kind = rng.random()
            key = str(uuid.uuid4())
            try:
                if kind < 0.6:  # valid
                    response = await client.post(
                        "/webhooks/geins/Order/create",
                        content=b'{"id":"%d"}' % rng.randrange(10**6),
                        headers={**AUTH, "x-Idempotency-Key": key},
                    )
                    if response.status_code in (200, 202):
                        accepted.add(key)
                elif kind < 0.7:
                    await client.post("/webhooks/geins", content=b"{broken", headers=AUTH)
                elif kind < 0.8:
                    await client.post("/webhooks/geins/Order/create", content=b"{}",
                                      headers={"Authorization": "Bearer wrong"})  # fmt: skip
                elif kind < 0.85:
                    await client.post("/webhooks/geins", content=b"x" * 2_000_000, headers=AUTH)
                elif kind < 0.9:
                    await client.get("/webhooks/geins/" + "%00" * rng.randrange(50), headers=AUTH)
                elif kind < 0.95:
                    await client.request("DELETE", "/webhooks/geins", headers=AUTH)
                else:
                    await client.post(
                        "/webhooks/geins/Voucher/" + "a" * 80, content=b"[1]", headers=AUTH
                    )
            except httpx2.TransportError:
                await asyncio.sleep(0.01)


async def slow_loris(port: int, stop: asyncio.Event) -> None:
    """Half-open connections that trickle headers, over and over."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"POST /webhooks/geins HTTP/1.1\r\nX-A: 1\r\n")
            await asyncio.sleep(0.5)
        except OSError:
            pass
        finally:
            sock.close()


def test_soak_mixed_traffic(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """Minutes of mixed traffic: RSS flat, no fd leak, every 2xx in Kafka."""
    env = {
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
        "BRIDGE_DEADLETTER_TOPIC": topic_prefix + ".deadletter",
        "BRIDGE_READ_TIMEOUT": "1",
    }
    accepted: set[str] = set()
    samples: list[tuple[int, int]] = []
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
        assert bridge.proc is not None
        pid = bridge.proc.pid
        baseline_fds = open_fds(pid)

        async def scenario() -> None:
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(hostile_client(bridge.url, accepted, stop, seed))
                for seed in range(6)
            ]
            tasks.append(asyncio.create_task(slow_loris(bridge.port, stop)))
            for _ in range(int(SOAK_SECONDS)):
                await asyncio.sleep(1)
                samples.append((rss_kib(pid), open_fds(pid)))
            stop.set()
            await asyncio.gather(*tasks)

        asyncio.run(scenario())
        settle_fds = open_fds(pid)
        for _ in range(50):  # connections close asynchronously after the last request
            if settle_fds <= baseline_fds + 5:
                break
            asyncio.run(asyncio.sleep(0.1))
            settle_fds = open_fds(pid)
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(30) == 0
        log = bridge.log()
    found = {r.key.decode() for r in read_all_sync(kafka_bootstrap, topic_prefix)}
    third = len(samples) // 3
    early = max(rss for rss, _ in samples[:third])
    late = max(rss for rss, _ in samples[-third:])
    print(
        f"[soak {SOAK_SECONDS:g}s] accepted={len(accepted)} found={len(found & accepted)} "
        f"lost={len(accepted - found)} rss_kib early_max={early} late_max={late} "
        f"peak={max(r for r, _ in samples)} fds baseline={baseline_fds} "
        f"max={max(f for _, f in samples)} after={settle_fds}"
    )
    assert len(accepted) > 100
    assert accepted <= found
    assert late - early < 16 * 1024, "memory kept growing under steady traffic"
    assert settle_fds <= baseline_fds + 5, "file descriptors leaked"
    assert "Traceback" not in log
