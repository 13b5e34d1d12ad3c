"""Which signals stop the bridge in order (``bridge serve``), and the first of them
when it comes before the bridge can act on it.

SIGTERM and SIGINT, and SIGHUP: its default action ended the process at once (a
terminal closed on ``make run``, a ``kill -HUP``) without the drain, and in memory
mode with the events already answered 202 lost. Unless SIGHUP was ignored when the
bridge started (``nohup``, a supervisor): whoever ignored it wants the bridge to
outlive a closed session, and it still does.

:func:`hold_early_stops` runs first in the ``bridge`` command, before the imports
(up to a second on a slow machine): a SIGTERM then ended the process with the
signal's default action, or, for a container's PID 1, which has none, was dropped
and the bridge served on until SIGKILL.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

#: Every signal that can stop the bridge; :func:`stop_signals` says which do now.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

#: What hold_early_stops found: the stop signals, the handlers before it, and the first
#: stop signal received since (None while none came).
_held: tuple[tuple[signal.Signals, ...], dict[int, Any]] | None = None
_received: signal.Signals | None = None


def stop_signals() -> tuple[signal.Signals, ...]:
    """The stop signals to handle, as they were before the bridge installed any handler."""
    if _held is not None:
        return _held[0]
    return tuple(
        sig
        for sig in sorted(STOP_SIGNALS)
        if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN
    )


def _remember(sig: int, frame: FrameType | None) -> None:
    global _received  # noqa: PLW0603  # one per process, set by a signal handler
    if _received is None:
        _received = signal.Signals(sig)


def hold_early_stops() -> None:
    """Remember the first stop signal from now on, for :func:`take_early_stop`."""
    global _held  # noqa: PLW0603
    signals = stop_signals()
    _held = (signals, {sig: signal.signal(sig, _remember) for sig in signals})


def take_early_stop() -> signal.Signals | None:
    """The stop signal received since :func:`hold_early_stops`, if any; the caller
    handles the stop signals from here on."""
    return _received


def release_early_stops() -> None:
    """For a command that does not serve: the handlers as they were, and a stop signal
    held meanwhile delivered again to them (Ctrl-C during the imports is a
    KeyboardInterrupt, a SIGTERM ends the process, as PID 1 too: exit 143)."""
    global _held  # noqa: PLW0603
    if _held is None:
        return
    _, previous = _held
    _held = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if _received is not None:
        signal.raise_signal(_received)
        # Still here with the default action: a container's PID 1, for which the kernel
        # drops it (a `deadletter replay` Job then ran to its end). Its exit status.
        if signal.getsignal(_received) is signal.SIG_DFL:
            raise SystemExit(128 + _received)
