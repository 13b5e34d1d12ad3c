"""Runs the app under uvicorn, with the shutdown order a load balancer needs.

On SIGTERM (or SIGINT, or SIGHUP: see bridge.signals) readiness turns 503 at once;
after ``shutdown_delay`` seconds uvicorn stops accepting, lets in-flight requests finish (at most
``shutdown_timeout``), and the lifespan then flushes the producer. The process
exits 0: uvicorn would otherwise re-raise the signal after a clean shutdown,
and a supervisor would see a kill instead of an orderly exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge import logs, package_version
from bridge.app import create_app
from bridge.config import WEBHOOK_ADDRESS, Settings, cannot_listen, listen_addresses
from bridge.errors import ConfigError
from bridge.httpprotocol import close_after_answers, guarded_protocol
from bridge.ingress import OPS_PORT_ONLY_NAMED, RuntimeState, outcome_of
from bridge.metrics import Metrics
from bridge.signals import stop_signals, take_early_stop

log = logging.getLogger(__name__)

# uvicorn's default; asyncio's create_server calls listen() with it again.
LISTEN_BACKLOG = 2048


class BridgeServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        state: RuntimeState,
        shutdown_delay: float,
        signals_taken: Callable[[], None],
        *,
        signals: tuple[signal.Signals, ...],
        ops_port: int | None = None,
    ) -> None:
        super().__init__(config)
        self._signals = signals  # bridge.signals.stop_signals()
        self._ops_port = ops_port
        self._state = state
        self._shutdown_delay = shutdown_delay
        self._stop_at: float | None = None
        self._signals_taken = signals_taken
        self._serving: Coroutine[Any, Any, None] | None = None

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets)
        finally:
            # A stop signal while uvicorn made its event loop (StopBeforeServing)
            # leaves serve()'s coroutine made and never started: closed here, it does
            # not print "coroutine 'Server.serve' was never awaited" to stderr.
            if self._serving is not None:
                self._serving.close()

    def serve(self, sockets: list[socket.socket] | None = None) -> Coroutine[Any, Any, None]:
        self._serving = super().serve(sockets)
        return self._serving

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_at is not None:
            if sig == signal.SIGINT and not self.force_exit:  # a second Ctrl-C: stop waiting
                log.info(
                    "SIGINT again: the delay and the requests in flight are cut short; "
                    "what was accepted still goes to Kafka (within BRIDGE_SHUTDOWN_TIMEOUT)"
                )
                self.force_exit = True
                self._stop_at = min(self._stop_at, time.monotonic())
            return
        log.info(
            "%s received: readiness off, stopping in %gs",
            signal.Signals(sig).name,
            self._shutdown_delay,
        )
        self._state.draining = True
        close_after_answers(self.server_state.connections)
        self._stop_at = time.monotonic() + self._shutdown_delay

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, for the bridge's stop signals (bridge.signals: uvicorn's own list
        lacks SIGHUP), and without raising the signal again on the way out: the process
        exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self._signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._signals_taken()  # uvicorn handles them from here on (handle_exit)
        if sys.flags.dev_mode or os.environ.get("PYTHONASYNCIODEBUG"):
            # uvicorn makes its loop with debug off whatever these say: asyncio's debug
            # mode (slow callbacks, never-retrieved exceptions with where they came from)
            # could not be had for the bridge (a review)
            asyncio.get_running_loop().set_debug(True)
        await super().startup(sockets)
        if self.started:
            freeze_startup_objects()
        if self.started and sockets:  # uvicorn names the address only for sockets it bound
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                log.info(
                    "listening on http://%s%s",
                    f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                    _what_a_port_serves(port, self._ops_port),
                )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit and not self._state.app_stopping:
            # uvicorn's forced quit stops waiting for the requests in flight and skips
            # the app's shutdown: the drain and the flush of what was accepted. Its
            # tasks, the drainer's among them, were then cancelled on the way out, and
            # memory mode lost the events it had answered 202 for with Kafka back. The
            # requests are cut short as when BRIDGE_SHUTDOWN_TIMEOUT runs out (a 503
            # to retry), then the app shuts down as always. (A second Ctrl-C during
            # the app's shutdown, which uvicorn started, changes nothing.)
            requests = list(self.server_state.tasks)
            for task in requests:
                task.cancel()
            if requests:
                await asyncio.wait(requests, timeout=1.0)
            await self.lifespan.shutdown()

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            return True
        return await super().on_tick(counter)


def freeze_startup_objects() -> None:
    """Leave what start-up made (modules, the app, the Kafka client, the
    de-duplication memory's table: some 50,000 objects) out of the garbage
    collector's full collections from here on.

    A full collection walks every object the collector tracks, and the event loop
    stands still meanwhile: 35-46 ms of CPU on this project's machine in a slow hour,
    at moments the collector picks under load (tests/bench/changes.md), every request
    in flight waiting. Start-up's objects live as long as the process, so walking
    them never finds garbage; the objects made while serving are collected as before.
    Collected first, so that no garbage is frozen with them.
    """
    gc.collect()
    gc.freeze()


def _what_a_port_serves(port: int, ops_port: int | None) -> str:
    if ops_port is None:
        return ""
    if port == ops_port:
        return f" for /healthz, /readyz, {OPS_PORT_ONLY_NAMED} (BRIDGE_OPS_PORT)"
    return " for the webhooks, /healthz and /readyz"


class StartupConfigError:
    """Lets a ConfigError raised while the app starts (Kafka refusing the credentials,
    say) reach the CLI, which prints it plainly and exits 2, instead of uvicorn logging
    a traceback and exiting 3."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: ConfigError | None = None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "lifespan":
            return self.app(scope, receive, send)  # requests pass without a coroutine of ours
        return self._lifespan(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        failed: list[Message] = []

        async def hold_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                failed.append(message)  # sent below, once the exception is known
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except ConfigError as exc:
            if not failed:
                raise
            self.error = exc
            await send({"type": "lifespan.startup.failed", "message": ""})
        finally:
            if failed and self.error is None:
                await send(failed[0])


def listening_sockets(host: str, port: int, names: str = WEBHOOK_ADDRESS) -> list[socket.socket]:
    """The sockets uvicorn would bind for ``host``:``port``, bound and listening now.

    As asyncio's ``create_server``, which uvicorn calls: one socket per address the
    host resolves to (``0.0.0.0`` one, ``localhost`` maybe two), SO_REUSEADDR, and
    IPV6_V6ONLY on IPv6 ones when an IPv4 socket takes IPv4 (an empty host). An IPv6
    address alone (``::``) serves IPv4 too, as ``::ffff:a.b.c.d``, whatever the
    system's default: asyncio's V6ONLY there refused every IPv4 client.
    A ConfigError naming the address (and ``names``, its settings) if it is taken.

    Listening at once, not only bound: with SO_REUSEADDR two sockets can bind one port
    while neither listens, so two bridges started together both got past here, and
    the second failed only in uvicorn, after connecting to Kafka and draining. Linux
    checks the port again on ``listen``. Connections arriving during the startup wait
    in the backlog and are answered once the bridge serves; should a stop signal come
    before that, they are closed unanswered (nothing of them was accepted).
    """
    sockets: list[socket.socket] = []
    infos = listen_addresses(host, port, names)  # as check-config resolves them
    try:
        ipv4_too = any(info[0] == socket.AF_INET for info in infos)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(ipv4_too))
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise cannot_listen(host, port, exc, names) from None
    return sockets


class StopBeforeServing(Exception):  # a stop, not an error
    """A stop signal arrived before uvicorn took the signals over."""


class _EarlyStop:
    """Handles the stop signals until uvicorn's own handlers take over (and again
    once they give them back): the first one raises StopBeforeServing.

    Without it the default action applied, and for a container's PID 1 there is none:
    the kernel drops a signal PID 1 has no handler for. A pod deleted during the spool
    check (a minute for a full spool) then served on and was killed at the end of its
    grace period. The spool's check lets Python handlers run between SQLite's steps
    (bridge.spool, its progress handler) and is interrupted by the signal within a
    step (bridge.spool._stopped_by_signals), so the stop comes at once.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._served = False

    def __call__(self, sig: int, frame: FrameType | None) -> None:
        if self.received is None and not self._served:
            self.received = signal.Signals(sig)
            raise StopBeforeServing(self.received.name)

    def served(self) -> None:
        """uvicorn has taken the signals: when it gives them back, after its own
        shutdown, the process is on its way out, and a late signal changes nothing."""
        self._served = True

    def install(self) -> dict[int, Any]:
        return {sig: signal.signal(sig, self) for sig in self.signals}


def serve(settings: Settings) -> int:
    """Serve until a signal; the exit status for the process."""
    early = _EarlyStop(stop_signals())  # as they were before any handler of ours
    previous = early.install()
    try:
        if (held := take_early_stop()) is not None:  # during the imports (bridge.signals)
            early(held, None)
        # Bound before anything starts: uvicorn would bind only after the lifespan, so
        # a second bridge on a taken port connected to Kafka and started draining first.
        sockets = listening_sockets(settings.host, settings.port)
        try:
            if (ops := settings.ops_address()) is not None:
                sockets += listening_sockets(*ops)
            return _serve(settings, sockets, early)
        finally:
            for sock in sockets:
                sock.close()
    except BaseException:
        # What the signal interrupted may have raised something else on its way out
        # (SpoolOpeningStopped, where SQLite dropped the handler's exception): the
        # signal is the news.
        if early.received is None:
            raise
        log.info("%s received before serving: stopped, nothing was accepted", early.received.name)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(settings: Settings, sockets: list[socket.socket], early: _EarlyStop) -> int:
    # Which version wrote the log that follows (an upgrade rolled out or not yet).
    log.info("geins-kafka-bridge %s starting, BRIDGE_ACK=%s", package_version(), settings.ack)
    state = RuntimeState()
    app = create_app(settings, state=state)
    # An unusable spool stops the bridge here, with a plain message (SpoolUnusable),
    # before it listens; the lifespan then reuses this connection.
    app.state.prepare()
    if early.received is not None:
        # The signal's exception was lost on its way, and what it interrupted did not
        # say so (a belt to bridge.spool's SpoolOpeningStopped: a leftover spool that
        # could not be opened is logged, and the bridge would serve on).
        raise StopBeforeServing(early.received.name)
    metrics: Metrics = app.state.metrics
    redactor = app.state.authenticator.redactor
    logs.redact_with(redactor)  # every line, whoever logs it: no token in the log
    max_connections, beyond_file_limit = settings.connection_limit()
    for warning in (beyond_file_limit, settings.file_size_warning()):
        if warning:
            log.warning("%s", warning)
    protocol = guarded_protocol(
        read_timeout=settings.read_timeout,
        max_head_bytes=settings.head_cap(),
        max_url_bytes=settings.max_url_bytes,  # a URL over it is 414, even past the head cap
        on_refused=lambda e, seconds: metrics.record_request(
            outcome_of(e), None, e.reason, seconds
        ),
        redact=redactor.logged,
        max_connections=max_connections,
        on_idle_closed=metrics.idle_connections_closed.inc,
        ops_port=settings.ops_port,
        draining=lambda: state.draining,
    )
    startup = StartupConfigError(app)
    config = uvicorn.Config(
        startup,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol,
        ws="none",  # no WebSocket endpoint: an Upgrade header is ignored (bridge.httpprotocol)
        timeout_keep_alive=settings.keep_alive_timeout,
        lifespan="on",
        backlog=LISTEN_BACKLOG,
        interface="asgi3",  # StartupConfigError's __call__ is a plain function: no guessing
        proxy_headers=False,  # client addresses are the guard's business (BRIDGE_TRUSTED_PROXIES)
        access_log=False,
        server_header=False,
        log_config=None,  # logging is configured by the CLI
        # uvicorn takes whole seconds; int() made 0.5 a 0, which cancels in-flight
        # requests at once instead of letting them finish. Round up instead.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
    )
    server = BridgeServer(
        config,
        state,
        settings.shutdown_delay,
        early.served,
        signals=early.signals,
        ops_port=settings.ops_port,
    )
    connections = server.server_state.connections  # the protocol adds and removes itself
    metrics.open_connections.set_function(lambda: len(connections))
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn's way to say the startup failed
        if startup.error is not None:
            raise startup.error from None
        raise
    return 0 if server.started else 1
