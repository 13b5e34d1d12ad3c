"""A small load generator for the real-process tests: fresh keys, counted answers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx2

from tests.fakes import TOKEN


@dataclass
class Tally:
    """What the senders saw, to compare with what reached Kafka."""

    sent: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    refused: int = 0  # an answer other than 2xx: the sender would retry
    failed: int = 0  # no answer at all (connection refused or reset)
    statuses: dict[int, int] = field(default_factory=dict)

    def summary(self, found: set[str]) -> str:
        lost = self.accepted - found
        return (
            f"sent={len(self.sent)} answered_2xx={len(self.accepted)} refused={self.refused} "
            f"no_answer={self.failed} found_in_kafka={len(found)} lost={len(lost)}"
        )


async def load(
    url: Callable[[], str],
    tally: Tally,
    stop: asyncio.Event,
    *,
    workers: int = 16,
    pause: float = 0.0,
) -> None:
    """Send POSTs with fresh keys from ``workers`` senders until ``stop``.

    ``url`` is asked before each request, so a test can restart the bridge on
    another port mid-load. ``pause`` spaces each sender's requests (a fixed rate).
    """

    async def sender(client: httpx2.AsyncClient) -> None:
        while not stop.is_set():
            key = str(uuid.uuid4())
            tally.sent.add(key)
            try:
                response = await client.post(
                    url() + "/webhooks/geins/Order/create",
                    content=b'{"id":"1"}',
                    headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": key},
                )
            except httpx2.TransportError:
                tally.failed += 1
                await asyncio.sleep(0.05)
                continue
            tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
            if response.status_code in (200, 202):
                tally.accepted.add(key)
            else:
                tally.refused += 1
            if pause:
                await asyncio.sleep(pause)

    async with httpx2.AsyncClient(timeout=15) as client:
        await asyncio.gather(*(sender(client) for _ in range(workers)))
