"""Runs the app under uvicorn, with the shutdown order a load balancer needs.

On SIGTERM (or SIGINT) readiness turns 503 at once; after ``shutdown_delay``
seconds uvicorn stops accepting, lets in-flight requests finish (at most
``shutdown_timeout``), and the lifespan then flushes the producer. The process
exits 0: uvicorn would otherwise re-raise the signal after a clean shutdown,
and a supervisor would see a kill instead of an orderly exit.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from bridge.app import create_app
from bridge.config import Settings
from bridge.ingress import RuntimeState

log = logging.getLogger(__name__)


class BridgeServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: RuntimeState, shutdown_delay: float) -> None:
        super().__init__(config)
        self._state = state
        self._shutdown_delay = shutdown_delay
        self._stop_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_at is not None:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop waiting
                self.force_exit = True
            return
        log.info(
            "%s received: readiness off, stopping in %gs",
            signal.Signals(sig).name,
            self._shutdown_delay,
        )
        self._state.draining = True
        self._stop_at = time.monotonic() + self._shutdown_delay

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            return True
        return await super().on_tick(counter)


def serve(settings: Settings) -> int:
    """Serve until a signal; the exit status for the process."""
    state = RuntimeState()
    app = create_app(settings, state=state)
    # An unusable spool stops the bridge here, with a plain message (SpoolUnusable),
    # before it listens; the lifespan then reuses this connection.
    app.state.prepare()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        server_header=False,
        log_config=None,  # logging is configured by the CLI
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
    )
    server = BridgeServer(config, state, settings.shutdown_delay)
    server.run()
    return 0 if server.started else 1
