"""De-duplication by idempotency key for the ack modes without a spool.

``durable`` mode keeps accepted keys in the spool's database instead (they
survive restarts there). This in-memory record is bounded twice: by age (the
de-duplication window) and by count (the oldest keys go first), so a flood of
fresh keys costs a bounded amount of memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class SeenKeys:
    """Keys accepted within the last ``window`` seconds, at most ``max_keys`` of them."""

    def __init__(
        self, window: float, max_keys: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._max_keys = max_keys
        self._clock = clock
        self._accepted: OrderedDict[str, float] = OrderedDict()  # oldest first
        #: Keys forgotten inside the window because ``max_keys`` newer ones came: a
        #: retry of one is published again (bridge_dedup_keys_forgotten_early_total).
        self.forgotten_early = 0

    def __len__(self) -> int:
        """Keys still in the window (the gauge reads this when no traffic expires them)."""
        self._expire(self._clock())
        return len(self._accepted)

    @property
    def enabled(self) -> bool:
        """False with a window of 0: nothing is ever remembered."""
        return self._window > 0

    def seen(self, key: str) -> bool:
        if not self.enabled:
            return False
        at = self._accepted.get(key)
        return at is not None and at >= self._clock() - self._window

    def remember(self, key: str) -> None:
        if not self.enabled:
            return
        now = self._clock()
        self._accepted[key] = now
        self._accepted.move_to_end(key)
        self._expire(now)

    def _expire(self, now: float) -> None:
        """Forget the keys older than the window, and the oldest beyond ``max_keys``."""
        cutoff = now - self._window
        while self._accepted:
            oldest_key, oldest_at = next(iter(self._accepted.items()))
            if oldest_at >= cutoff:
                if len(self._accepted) <= self._max_keys:
                    break
                self.forgotten_early += 1
            del self._accepted[oldest_key]
