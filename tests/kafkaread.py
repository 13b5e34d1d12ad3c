"""Reading back what reached the real broker (integration tests only)."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.kafkaadmin import read_to_end


def read_all_sync(bootstrap: str, prefix: str, *, within: float = 30.0) -> list[Any]:
    """Every record on every topic whose name starts with ``prefix``."""

    async def read() -> list[Any]:
        async with asyncio.timeout(within):
            return await read_to_end({"bootstrap_servers": bootstrap}, prefix=prefix)

    return asyncio.run(read())
