"""How long a bridge takes to stop, for the grace periods deploy/ gives it."""

from __future__ import annotations

import math
from collections.abc import Mapping

from bridge.config import Settings
from bridge.drainer import SETTLE_SECONDS
from bridge.publisher import FORCE_CLOSE_SECONDS
from bridge.spool import CLOSE_WAIT_SECONDS


def shutdown_seconds(env: Mapping[str, str]) -> float:
    """The longest a bridge with these BRIDGE_* settings takes from SIGTERM to its exit:
    BRIDGE_SHUTDOWN_DELAY (bridge/server.py), the in-flight requests (uvicorn's graceful
    timeout: BRIDGE_SHUTDOWN_TIMEOUT rounded up), the drain and the producer's flush (one
    more BRIDGE_SHUTDOWN_TIMEOUT, bridge/app.py), the removal of what Kafka acknowledged
    late and the spool's close, given up on after SETTLE_SECONDS (bridge/drainer.py) and
    CLOSE_WAIT_SECONDS (bridge/spool.py) when its disk hangs, and the forced close of a
    producer whose flush ran out of that time (bridge/publisher.py)."""

    def setting(name: str) -> float:
        value = env.get(f"BRIDGE_{name.upper()}", Settings.model_fields[name].default)
        return float(value)

    timeout = setting("shutdown_timeout")
    return (
        setting("shutdown_delay")
        + math.ceil(timeout)
        + timeout
        + SETTLE_SECONDS
        + CLOSE_WAIT_SECONDS
        + FORCE_CLOSE_SECONDS
    )
