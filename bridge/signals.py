"""Which signals stop the bridge in order (``bridge serve``).

SIGTERM and SIGINT, and SIGHUP: its default action ended the process at once (a
terminal closed on ``make run``, a ``kill -HUP``) without the drain, and in memory
mode with the events already answered 202 lost. Unless SIGHUP was ignored when the
bridge started (``nohup``, a supervisor): whoever ignored it wants the bridge to
outlive a closed session, and it still does.
"""

from __future__ import annotations

import signal

#: Every signal that can stop the bridge; :func:`stop_signals` says which do now.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def stop_signals() -> tuple[signal.Signals, ...]:
    """The stop signals to handle, read before the bridge installs any handler."""
    return tuple(
        sig
        for sig in sorted(STOP_SIGNALS)
        if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN
    )
