"""Waiting in tests for something that happens in the background: poll, with a deadline.

One loop for the whole suite, so that every wait has a bound and says what it
waited for when the bound runs out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T], done: Callable[[T], bool], *, within: float, every: float
) -> T:
    """Call ``probe`` every ``every`` seconds until ``done`` accepts what it returns or
    ``within`` seconds have passed; the last result either way (the caller says what
    a result that is still not done means)."""
    deadline = time.monotonic() + within
    result = probe()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(every)
        result = probe()
    return result


async def eventually(
    condition: Callable[[], bool], *, within: float = 5.0, every: float = 0.01, what: str = ""
) -> None:
    """Wait, without blocking the event loop, until ``condition()`` is true; fail the
    test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within:g} s: {what or condition}"
        await asyncio.sleep(every)
