"""One timer for many waits of the same length.

In broker mode every request waits for Kafka's acknowledgement within
``BRIDGE_PUBLISH_TIMEOUT``. ``asyncio.timeout`` costs about 5.5 µs per use
under uvloop (a Timeout object, a libuv timer started and stopped), several
percent of a request's CPU at saturation. Waits that all last the same time
expire in the order they began, so a queue checked by one periodic timer does
the same job for the price of an append, at the cost of expiring up to
:data:`TICK_SECONDS` late.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import TracebackType

#: How late a wait may expire.
TICK_SECONDS = 0.05


class Deadline:
    """One bounded wait: ``async with watchdog.bound():`` raises TimeoutError on expiry."""

    __slots__ = ("_task", "expired", "expires_at")

    def __init__(self, task: asyncio.Task[object], expires_at: float) -> None:
        self._task: asyncio.Task[object] | None = task
        self.expires_at = expires_at
        self.expired = False

    @property
    def active(self) -> bool:
        return self._task is not None

    def expire(self) -> None:
        if self._task is not None and not self.expired:
            self.expired = True
            self._task.cancel()

    async def __aenter__(self) -> Deadline:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Let go of the task at once: a finished wait may stay queued behind a
        # slower one for up to ``seconds``.
        task, self._task = self._task, None
        # Our own cancellation becomes TimeoutError, as with asyncio.timeout; one
        # requested by anybody else as well is left to propagate.
        if self.expired and exc_type is asyncio.CancelledError and task and task.uncancel() == 0:
            raise TimeoutError from exc


class Watchdog:
    """Bounds waits of ``seconds`` each, checking them every :data:`TICK_SECONDS`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._waits: deque[Deadline] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bound(self) -> Deadline:
        """A deadline ``seconds`` from now for the current task."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Watchdog.bound() outside a task")
        deadline = Deadline(task, time.monotonic() + self.seconds)
        self._waits.append(deadline)
        loop = task.get_loop()
        # A timer of another (closed) loop never fires: arm one on this loop.
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_later(TICK_SECONDS, self._tick)
        return deadline

    def _tick(self) -> None:
        waits = self._waits
        now = time.monotonic()
        while waits and (not waits[0].active or waits[0].expires_at <= now):
            waits.popleft().expire()
        # Finished waits behind a live one stay queued until it leaves; skip the
        # re-arm only when nothing is left, so an idle bridge has no timer.
        self._timer = (
            asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick) if waits else None
        )
