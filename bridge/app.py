"""Builds the ASGI application: every long-lived object is made here, once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge import kafkaadmin
from bridge.ackmodes import AckMode, DurableAck, make_ack_mode
from bridge.auth import TokenAuthenticator
from bridge.backlog import Backlog
from bridge.config import Settings
from bridge.errors import NotFound
from bridge.guards import ClientAddress, Guard, RateLimiter, parse_networks, port_of
from bridge.ingress import (
    OPS_PORT_ONLY,
    OPS_PORT_ONLY_NAMED,
    ErrorAnswer,
    GuardRefusal,
    RuntimeState,
    WebhookDispatch,
    WebhookEndpoint,
    http_exception_as_problem,
    is_webhook_path,
    operation_routes,
    webhook_routes,
)
from bridge.leftover import LeftoverSpool
from bridge.metrics import Metrics
from bridge.openapi import openapi_document
from bridge.pipeline import Pipeline
from bridge.publisher import KafkaPublisher, Publisher, spawn
from bridge.routing import Router

log = logging.getLogger(__name__)


class BridgeApp(Starlette):
    """Starlette, with the webhook path taken straight to its endpoint.

    Operations endpoints go through Starlette's middleware and router as usual.
    Webhook deliveries, the traffic that matters, skip that stack (two
    middlewares and a regex router, a quarter of the CPU per request when
    profiled): the guard, then :class:`WebhookDispatch`. The webhook routes stay
    in the router too, so the app describes itself the same either way.

    With an operations port (BRIDGE_OPS_PORT), /metrics and /openapi.json are answered
    there only, and the webhooks on BRIDGE_PORT only: the other port answers them 404.
    /healthz and /readyz answer on both, for load balancers that check the port they
    send traffic to (GKE's, an AWS target group's); the probes use the operations
    port, whose connections BRIDGE_MAX_CONNECTIONS does not count. The guard's size
    limits apply on both ports; its allow-list, rate limit and concurrency cap to
    webhook paths only, as ever.
    """

    _outer: Guard | None = None
    _webhook: WebhookDispatch | None = None
    _ops_port: int | None = None
    _refusal: GuardRefusal
    _answer: ErrorAnswer

    def fast_path(
        self,
        guard: Callable[[ASGIApp], Guard],
        webhook: WebhookDispatch,
        refusal: GuardRefusal,
        answer: ErrorAnswer,
        ops_port: int | None,
    ) -> Guard:
        """Put ``guard`` in front of everything and ``webhook`` behind it; the guard.
        ``refusal`` answers, logs and counts a webhook sent to ``ops_port``, ``answer``
        answers the 404 of an operations-only path on the webhook port."""
        self._webhook = webhook
        self._refusal = refusal
        self._answer = answer
        self._ops_port = ops_port
        outer = guard(self._dispatch)
        self._outer = outer
        return outer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A coroutine function, as servers and test clients check to tell ASGI 3.
        if self._outer is None:
            await super().__call__(scope, receive, send)
        else:
            await self._outer(scope, receive, send)

    # A plain function that returns the next layer's coroutine: a layer that only
    # passes a request on costs no coroutine of its own (nor a step through it
    # each time the request resumes).
    def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        if self._webhook is not None and scope["type"] == "http":
            webhook = is_webhook_path(scope["path"])
            if self._ops_port is not None:
                elsewhere = self._served_elsewhere(scope, send, webhook)
                if elsewhere is not None:
                    return elsewhere
            if webhook:
                return self._webhook(scope, receive, send)
        return super().__call__(scope, receive, send)

    def _served_elsewhere(
        self, scope: Scope, send: Send, webhook: bool
    ) -> Coroutine[Any, Any, None] | None:
        """The 404 of a path the other port serves, or None (BRIDGE_OPS_PORT is set)."""
        if port_of(scope) == self._ops_port:
            if webhook:  # a Geins URL with the wrong port: logged and counted
                error = NotFound(WEBHOOKS_NOT_ON_OPS_PORT)
                return self._refusal(scope, send, error, time.perf_counter())
        elif scope["path"] in OPS_PORT_ONLY:
            # Not logged nor counted, as Starlette's own 404s: scanners knock here.
            return self._answer.send_or_drop(scope, send, NotFound(OPERATIONS_ON_OPS_PORT))
        return None


#: The 404's detail for a webhook sent to the operations port.
WEBHOOKS_NOT_ON_OPS_PORT = (
    "this is the operations port (BRIDGE_OPS_PORT): webhooks are served on BRIDGE_PORT"
)
#: The 404's detail for /metrics or /openapi.json on BRIDGE_PORT when the operations
#: endpoints have their own port.
OPERATIONS_ON_OPS_PORT = (
    f"{OPS_PORT_ONLY_NAMED} are served on the operations port (BRIDGE_OPS_PORT)"
)


async def _creating_topics(
    settings: Settings, router: Router, publisher: Publisher
) -> asyncio.Task[None]:
    """Start BRIDGE_CREATE_TOPICS, before anything is published (the spool's events from
    the last run too: Kafka would create a topic first with its own partitions and
    replicas), and wait for it while Kafka is connected: no longer than a connection may
    take, as a stop signal waits for the startup (a slow controller kept it over a
    minute, an admin request and the wait for the topics to appear, past the stop's
    grace period). The drain waits for the task returned all the same."""
    if not publisher.connected:
        log.warning("Kafka is not reachable yet: the topics are created once it is")
    topics = spawn(_create_topics(settings, router, publisher), "create-topics")
    if publisher.connected:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.kafka_connect_timeout):
                await asyncio.shield(topics)
        if not topics.done():
            log.warning(
                "BRIDGE_CREATE_TOPICS: Kafka has not finished creating the topics within "
                "%g s (BRIDGE_KAFKA_CONNECT_TIMEOUT): serving meanwhile, publishing nothing "
                "until they are made",
                settings.kafka_connect_timeout,
            )
    return topics


async def _create_topics(
    settings: Settings, router: Router, publisher: Publisher | None = None
) -> None:
    """BRIDGE_CREATE_TOPICS, once ``publisher`` (if given) is connected. A failure is
    logged, not fatal: the topics may exist already, or be someone else's to make."""
    # connected is a property of the metadata's age: there is no event to wait on.
    while publisher is not None and not publisher.connected:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    try:
        created = await kafkaadmin.create_topics(
            settings, kafkaadmin.default_topics(settings, router)
        )
    except kafkaadmin.TopicsNotCreated as exc:  # some: the others' outcomes are said too
        created = exc.results
        failed = sum(v.startswith("failed") for v in created.values())
        which = "the topics" if failed == len(created) else f"{failed} of {len(created)} topics"
        log.error("BRIDGE_CREATE_TOPICS: %s could not be created: %s", which, exc)
    except Exception as exc:
        log.error("BRIDGE_CREATE_TOPICS: the topics could not be created: %s", exc)
        return
    log.info(
        "topics: %d created, %d already there, %d not created",
        sum(v == "created" for v in created.values()),
        sum(v.startswith("exists") for v in created.values()),
        sum(v.startswith("failed") for v in created.values()),
    )
    for name, result in sorted(created.items()):
        if result.startswith("exists: "):  # too small a limit for the largest event
            log.warning("topic %s: %s", name, result.removeprefix("exists: "))


def _age(enqueued_at: float | None) -> float:
    """Seconds since ``enqueued_at`` (0 for an empty backlog). Takes the value once: the
    spool's writer thread may empty the backlog between two reads of the attribute.
    Never below 0: the stamps are on the wall clock (a spool's outlive the process),
    and a step back of it (NTP) made the age negative."""
    return max(0.0, time.time() - enqueued_at) if enqueued_at is not None else 0.0


def _oldest(waiting: list[Backlog | LeftoverSpool]) -> float | None:
    """When the oldest of what ``waiting`` holds was enqueued (None when all are empty);
    each attribute read once (a writer thread may empty a spool meanwhile)."""
    times = [w.oldest_enqueued_at for w in waiting]
    return min((t for t in times if t is not None), default=None)


def _gauges_read_at_scrape(
    metrics: Metrics, publisher: Publisher, ack_mode: AckMode, state: RuntimeState
) -> None:
    metrics.kafka_connected.set_function(lambda: float(publisher.connected))
    metrics.kafka_stalled.set_function(lambda: float(publisher.stalled))
    metrics.ready.set_function(lambda: float(ack_mode.ready and not state.draining))
    metrics.dedup_keys.set_function(lambda: ack_mode.remembered_keys)
    metrics.dedup_keys_forgotten_early.set_function(lambda: ack_mode.keys_forgotten_early)
    metrics.topics_held.set_function(lambda: len(ack_mode.held_topics))
    metrics.dead_letters_waiting.set_function(lambda: ack_mode.dead_letters_waiting)
    backlog = ack_mode.backlog
    if backlog is not None:
        # So that an alert can watch it fill (bridge_spool_bytes alone has no scale).
        metrics.spool_max_bytes.set(backlog.capacity)
        metrics.spool_bytes.set_function(lambda: backlog.bytes)
    # What waits for Kafka: the backlog, and a durable bridge's spool another mode is
    # publishing (its depth going to 0 is what an operator waits for).
    waiting = [w for w in (backlog, ack_mode.leftover) if w is not None]
    if waiting:
        metrics.spool_depth.set_function(lambda: sum(w.depth for w in waiting))
        metrics.spool_oldest_age.set_function(lambda: _age(_oldest(waiting)))
    if isinstance(ack_mode, DurableAck):  # as the spool's writer thread last read it
        metrics.spool_disk_free.set_function(ack_mode.spool.disk_free_bytes)


def create_app(
    settings: Settings,
    *,
    publisher: Publisher | None = None,
    metrics: Metrics | None = None,
    state: RuntimeState | None = None,
) -> BridgeApp:
    """The bridge as an ASGI app. Tests inject a fake ``publisher`` and their own ``metrics``."""
    metrics = metrics or Metrics()
    publisher = publisher or KafkaPublisher(settings, metrics)
    state = state or RuntimeState()
    router = Router.from_settings(settings)
    ack_mode = make_ack_mode(settings, publisher, metrics)
    authenticator = TokenAuthenticator(
        settings.tokens,
        allow_unauthenticated=settings.allow_unauthenticated,
        tokens_file=settings.tokens_file,
        refuse_file=settings.token_in_names,
    )
    pipeline = Pipeline(
        router,
        ack_mode,
        metrics,
        strict_types=settings.strict_types,
        deadletter_topic=settings.deadletter_topic,
        secrets=authenticator.redactor,  # every token used since start, the file's too
        record_limit=settings.max_event_record_bytes(),
        dedup=settings.dedup_window > 0,
    )
    openapi = orjson.dumps(openapi_document(settings))
    answer = ErrorAnswer(settings.retry_after)
    # answers, logs (without tokens) and counts a refused request
    refusal = GuardRefusal(answer, metrics, authenticator.redactor.logged)
    endpoint = WebhookEndpoint(
        pipeline,
        authenticator,
        metrics,
        answer,
        max_body_bytes=settings.max_body_bytes,
        max_bodies_bytes=settings.max_bodies_bytes,
        access_log=settings.access_log,
    )
    guard = partial(
        Guard,
        refuse=refusal,
        is_webhook=is_webhook_path,
        max_headers=settings.max_headers,
        max_header_bytes=settings.max_header_bytes,
        max_url_bytes=settings.max_url_bytes,
        max_concurrency=settings.max_concurrency,
        allowed_networks=parse_networks(settings.allowed_networks),
        client_address=ClientAddress(parse_networks(settings.trusted_proxies)),
        rate_limiter=RateLimiter(settings.rate_limit, settings.rate_burst)
        if settings.rate_limit
        else None,
        ops_port=settings.ops_port,
    )
    _gauges_read_at_scrape(metrics, publisher, ack_mode, state)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await publisher.start()
        topics: asyncio.Task[None] | None = None
        if settings.create_topics:
            topics = await _creating_topics(settings, router, publisher)
        await ack_mode.start(publish_after=topics)
        tokens_watch = (
            spawn(authenticator.watch(), "tokens-file-watch")
            if authenticator.tokens_file is not None
            else None
        )
        if ack_mode.name == "broker" and not publisher.connected:
            # A new user's review: "accepting deliveries" while every one got a 503.
            log.info("serving (ack=broker): deliveries are answered 503 until Kafka is reachable")
        elif ack_mode.name == "broker" and topics is not None and not topics.done():
            log.info("serving (ack=broker): deliveries are answered 503 until the topics are made")
        else:
            log.info("accepting deliveries (ack=%s)", ack_mode.name)
        try:
            yield
        finally:
            state.draining = state.app_stopping = True
            for task in (topics, tokens_watch):
                if task is not None:
                    task.cancel()
            # One BRIDGE_SHUTDOWN_TIMEOUT for the drain and the flush together: after a
            # drain that emptied the backlog the flush has nothing left to wait for, and
            # after one that ran out of time Kafka is not answering anyway.
            deadline = time.monotonic() + settings.shutdown_timeout
            try:
                await ack_mode.stop(deadline)  # drains what it can while Kafka is connected
            finally:
                await publisher.stop(deadline)  # the flush, whatever the drain met

    app = BridgeApp(
        routes=[*webhook_routes(endpoint), *operation_routes(metrics, ack_mode, state, openapi)],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception_as_problem},
    )
    app.router.redirect_slashes = False  # see ingress.webhook_routes
    in_front = app.fast_path(
        guard, WebhookDispatch(endpoint, refusal), refusal, answer, settings.ops_port
    )
    metrics.inflight.set_function(lambda: in_front.in_progress)
    app.state.runtime = state
    app.state.metrics = metrics
    app.state.prepare = ack_mode.prepare
    app.state.authenticator = authenticator
    return app
