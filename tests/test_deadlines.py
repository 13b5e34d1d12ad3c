"""The shared watchdog bounds waits like asyncio.timeout, within a tick."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.deadlines import Watchdog
from tests.polling import eventually


async def test_a_wait_past_its_deadline_raises_timeout_error() -> None:
    watchdog = Watchdog(0.1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with watchdog.bound():
            await asyncio.sleep(10)
    waited = time.monotonic() - started
    assert waited >= 0.1  # not before its deadline (how late is the machine's business)


async def test_a_wait_that_ends_in_time_is_left_alone() -> None:
    watchdog = Watchdog(0.2)
    async with watchdog.bound():
        await asyncio.sleep(0.01)
    # Until the watchdog's timer has run past the deadline and stopped, however late
    # the machine makes it: nothing may have cancelled this task.
    await eventually(lambda: watchdog._timer is None, within=30, what="the timer stops")
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_the_timer_stops_when_nothing_waits() -> None:
    watchdog = Watchdog(0.05)
    async with watchdog.bound():
        pass
    await eventually(lambda: watchdog._timer is None, within=30, what="the timer stops")
    assert not watchdog._waits


async def test_finished_waits_behind_a_slow_one_do_not_keep_their_task() -> None:
    watchdog = Watchdog(0.3)

    async def quick() -> None:
        async with watchdog.bound():
            await asyncio.sleep(0)

    async def slow() -> None:
        async with watchdog.bound():
            await asyncio.sleep(10)

    slow_task = asyncio.create_task(slow())
    await asyncio.sleep(0)
    await asyncio.gather(*(quick() for _ in range(100)))
    assert all(not d.active for d in list(watchdog._waits)[1:])
    with pytest.raises(TimeoutError):
        await slow_task


async def test_a_cancellation_from_elsewhere_still_propagates() -> None:
    watchdog = Watchdog(5)

    async def wait() -> None:
        async with watchdog.bound():
            await asyncio.sleep(10)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_both_ways_the_outer_cancellation_wins() -> None:
    watchdog = Watchdog(0.05)

    async def wait() -> None:
        async with watchdog.bound():
            try:
                await asyncio.sleep(10)
            finally:
                asyncio.current_task().cancel()  # type: ignore[union-attr]  # somebody else, too

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(wait())


def test_a_watchdog_keeps_working_on_a_new_event_loop() -> None:
    watchdog = Watchdog(0.05)

    async def bounded_sleep(seconds: float) -> None:
        async with watchdog.bound():
            await asyncio.sleep(seconds)

    # The first loop closes with a tick still pending.
    asyncio.run(bounded_sleep(0))
    with pytest.raises(TimeoutError):
        asyncio.run(bounded_sleep(10))
