"""Events a spool holds from before this start: those a durable bridge left in
BRIDGE_SPOOL_DIR, found by a bridge started in another ack mode (``broker`` or
``memory``), and, in any mode, those accepted for topics the settings no longer make.

Those modes have no spool of their own, so nothing read the folder: a restart that
switched BRIDGE_ACK away from ``durable`` while Kafka was away left every event
answered 2xx and not yet published on disk, without a word (and published it weeks
later, out of order, if the bridge was ever switched back). Now they are published
in the background, by the same drainer the durable mode uses, until none is left;
the folder's lock is taken meanwhile, as a durable bridge takes it, and let go once
the spool is empty.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bridge.config import Settings
from bridge.drainer import Drainer, drain_deadline
from bridge.errors import SpoolUnusable
from bridge.metrics import Metrics
from bridge.publisher import Publisher, spawn
from bridge.routing import template_can_make
from bridge.spool import DB_NAME, Spool

log = logging.getLogger(__name__)

#: How often the background task looks whether the spool is empty yet.
EMPTY_CHECK_SECONDS = 1.0


def spool_file(settings: Settings) -> tuple[str, OSError | None] | None:
    """The spool file a durable bridge left in BRIDGE_SPOOL_DIR, if there is one (its
    write-ahead log alone counts too: it may hold the events), or may be (with the
    error of a folder it may not look into: opening it says why)."""
    path = settings.spool_dir / DB_NAME
    for candidate in (path, path.with_name(f"{DB_NAME}-wal")):
        try:
            if candidate.exists():
                return str(candidate), None
        except OSError as exc:
            return str(candidate), exc
    return None


def say_topics_from_before(spool: Spool, settings: Settings) -> None:
    """Warn of the events ``spool`` holds for topics the settings do not make now.

    An event's topic (a dead letter's too) is fixed as it is accepted: those accepted
    before a change of BRIDGE_TOPIC_TEMPLATE or BRIDGE_DEADLETTER_TOPIC, and still in
    the spool, go where the settings of then sent them, which the consumers of the
    new topics do not read (and an old dead-letter topic the new template can make is
    an event topic now)."""
    for topic, (events, letters) in sorted(spool.topics_at_open.items()):
        if letters and topic != settings.deadletter_topic:
            log.warning(
                "%d dead letters in the spool are for %s, the dead-letter topic when they "
                "were kept (BRIDGE_DEADLETTER_TOPIC is %s now): they are published there",
                letters,
                topic,
                settings.deadletter_topic or "empty",
            )
        # Exactly: a template that differs by '_' for '.' makes other topics (whose
        # creation Kafka refuses while the old ones exist: all the more to say it)
        made = template_can_make(settings.topic_template, topic, as_kafka_sees_it=False)
        if events > letters and not made:
            log.warning(
                "%d events in the spool are for %s, which BRIDGE_TOPIC_TEMPLATE %s does "
                "not make: accepted under earlier settings, they are published there",
                events - letters,
                topic,
                settings.topic_template,
            )


class LeftoverSpool:
    """Publishes what a durable bridge's spool still holds, then lets the folder go."""

    def __init__(self, publisher: Publisher, metrics: Metrics, settings: Settings) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._settings = settings
        self._spool: Spool | None = None
        self._drainer: Drainer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Events still to publish (0 once done, or when there was no spool)."""
        return self._spool.depth if self._spool is not None else 0

    @property
    def oldest_enqueued_at(self) -> float | None:
        return self._spool.oldest_enqueued_at if self._spool is not None else None

    @property
    def held_topics(self) -> list[str]:
        return self._drainer.held_topics if self._drainer is not None else []

    @property
    def dead_letters_waiting(self) -> int:
        return self._drainer.dead_letters_waiting if self._drainer is not None else 0

    def prepare(self) -> None:
        """Open the spool if one is there and holds events (before the server listens,
        as the durable mode opens its own). One that cannot be opened is said, not
        fatal: this mode does not need it to serve."""
        found = spool_file(self._settings)
        if found is None:
            return
        settings = self._settings
        spool = Spool.from_settings(
            settings, drain_only=True, on_set_aside=self._metrics.dropped_records.inc
        )
        try:
            spool.connect()
        except SpoolUnusable as exc:
            log.error("%s; BRIDGE_ACK=%s does not publish what it may hold", exc, settings.ack)
            return
        if not spool.depth:
            spool.release()
            return
        log.warning(
            "BRIDGE_SPOOL_DIR %s holds %d events a durable bridge accepted and Kafka does "
            "not have yet: BRIDGE_ACK=%s publishes them in the background, to the topics "
            "they were accepted for",
            settings.spool_dir.resolve(),
            spool.depth,
            settings.ack,
        )
        say_topics_from_before(spool, settings)
        self._spool = spool

    async def start(self, publish_after: asyncio.Future[Any] | None) -> None:
        spool = self._spool
        if spool is None:
            return
        spool.open()
        self._drainer = Drainer.from_settings(spool, self._publisher, self._metrics, self._settings)
        draining = self._drainer.start(publish_after, "leftover-spool-drainer")
        self._task = spawn(self._publish_all(spool, draining), "leftover-spool")

    async def _publish_all(self, spool: Spool, draining: asyncio.Task[None]) -> None:
        try:
            # The writer thread lowers the depth as removals commit; it signals nothing.
            while spool.depth:  # noqa: ASYNC110 (see above: no event to wait for)
                await asyncio.sleep(EMPTY_CHECK_SECONDS)
        finally:
            draining.cancel()
            await asyncio.gather(draining, return_exceptions=True)
        await spool.close()
        dropped = self._drainer.dropped if self._drainer is not None else 0
        self._spool = self._drainer = None
        if spool.set_aside or dropped:
            log.warning(
                "the events the durable spool %s held are in Kafka but %d it could not "
                "read back (kept in its table spool_unreadable) and %d Kafka refused for "
                "good that could not be kept as dead letters either (dropped, as logged); "
                "the folder is let go",
                spool.path,
                spool.set_aside,
                dropped,
            )
            return
        log.info(
            "the events the durable spool %s held are all in Kafka; the folder is let go",
            self._settings.spool_dir.resolve(),
        )

    async def stop(self, deadline: float | None = None) -> None:
        """Publish what can be until ``deadline`` (see drainer.drain_deadline); the rest
        stays in the spool for the next start, whatever its mode, and the folder is let
        go (also when the bridge stopped before it served)."""
        task, spool, drainer = self._task, self._spool, self._drainer
        if spool is None:  # none found, or all published
            return
        if task is not None and drainer is not None:  # started (not stopped before serving)
            await drainer.drain(drain_deadline(deadline, self._settings.shutdown_timeout))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await drainer.settle()
        if spool.depth:
            log.warning(
                "%d events a durable bridge accepted stay in the spool %s; they are "
                "published at the next start",
                spool.depth,
                spool.path,
            )
        await spool.close()
