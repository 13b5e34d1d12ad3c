"""When the sender hears 2xx: the three ack modes (``BRIDGE_ACK``).

- ``durable`` (default): after the event is committed to the local spool on disk;
  a background drainer moves it to Kafka. Survives crashes and Kafka outages.
- ``broker``: after Kafka acknowledged it (acks=all). No local state; 503 while
  Kafka is unreachable.
- ``memory``: after it was queued in memory; a background drainer moves it to
  Kafka. Fast, but queued events are lost if the process dies.

Each mode also de-duplicates by idempotency key: ``deliver`` returns False for a
key already accepted within the window, and a key is recorded only once its
event was accepted by the mode's own guarantee.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from bridge.backlog import Backlog, MemoryBacklog, has_room
from bridge.config import Settings
from bridge.dedup import SeenKeys
from bridge.drainer import Drainer, drain_deadline, named, topics_made
from bridge.errors import PublishTimeout, Unavailable, stopping
from bridge.leftover import LeftoverSpool, say_topics_from_before
from bridge.metrics import Metrics
from bridge.publisher import DENIED_ANSWER, Publisher, landed, spawn
from bridge.routing import Destination
from bridge.spool import Spool

log = logging.getLogger(__name__)

#: How often expired keys are purged from the spool (and its writability proven).
MAINTENANCE_SECONDS = 5.0


class AckMode(Protocol):
    """What must happen to a record before the sender hears 2xx."""

    name: str

    @property
    def backlog(self) -> Backlog | None:
        """What waits for Kafka after the answer (None in broker mode): its depth
        and age are the spool gauges."""
        ...

    @property
    def remembered_keys(self) -> int:
        """Idempotency keys remembered for de-duplication (the bridge_dedup_keys gauge)."""
        ...

    @property
    def keys_forgotten_early(self) -> int:
        """Keys forgotten inside BRIDGE_DEDUP_WINDOW because the key limit was reached
        (the bridge_dedup_keys_forgotten_early_total counter)."""
        ...

    #: The events a durable bridge's spool held, which this mode publishes (None in
    #: durable mode, whose own spool is its backlog): the spool gauges count them too.
    leftover: LeftoverSpool | None

    @property
    def held_topics(self) -> list[str]:
        """Topics whose waiting events are held back now (the bridge_topics_held gauge);
        none in broker mode, where nothing waits."""
        ...

    @property
    def dead_letters_waiting(self) -> int:
        """Events Kafka refused for good whose dead letters cannot be kept yet (the
        bridge_dead_letters_waiting gauge)."""
        ...

    def prepare(self) -> None:
        """Open what must work before the server listens (raises SpoolUnusable)."""
        ...

    async def start(self, publish_after: asyncio.Future[Any] | None = None) -> None:
        """Start serving; nothing is published before ``publish_after`` (the creation of
        the topics, BRIDGE_CREATE_TOPICS) is done, so that Kafka does not create them
        first with its own defaults."""
        ...

    async def stop(self, deadline: float | None = None) -> None:
        """Publish what waits for Kafka until ``deadline`` (monotonic; by default
        BRIDGE_SHUTDOWN_TIMEOUT from now), the time the producer's flush has too."""
        ...

    async def deliver(self, destination: Destination, dedup_key: str | None) -> bool:
        """True once the record is safe by this mode's guarantee; False for a duplicate.

        Raises a BridgeError (503) when it cannot be made safe. The caller has checked
        that the record fits the producer (``Pipeline``).
        """
        ...

    async def keep(self, destination: Destination) -> None:
        """Store a dead letter with the same guarantee (no de-duplication)."""
        ...

    @property
    def ready(self) -> bool:
        """Whether deliveries can be accepted now (what /readyz reports)."""
        ...

    @property
    def unready_reason(self) -> str | None:
        """Why deliveries cannot be accepted now, for /readyz's body; None when ready."""
        ...


class BrokerAck:
    name = "broker"
    backlog = None

    def __init__(
        self, publisher: Publisher, settings: Settings, leftover: LeftoverSpool | None = None
    ) -> None:
        self._publisher = publisher
        self.leftover = leftover
        self._seen = SeenKeys(settings.dedup_window, settings.dedup_max_keys)
        # key -> future of the delivery now publishing it (True once acknowledged),
        # so a concurrent retry waits for it instead of publishing a second copy.
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        # key -> batch future of a record answered 503 (publish timeout) that may still
        # land: a retry waits for Kafka's verdict instead of publishing a second copy.
        self._landing: dict[str, asyncio.Future[Any]] = {}
        self._landing_wait = settings.publish_timeout
        self._publish_after: asyncio.Future[Any] | None = None

    def prepare(self) -> None:
        if self.leftover is not None:
            self.leftover.prepare()

    async def start(self, publish_after: asyncio.Future[Any] | None = None) -> None:
        self._publish_after = publish_after
        if self.leftover is not None:
            await self.leftover.start(publish_after)

    def _refuse_before_the_topics(self) -> None:
        """Unavailable while the topics are being created (see AckMode.start)."""
        if self._publish_after is not None:
            if not self._publish_after.done():
                raise Unavailable(
                    "the topics are being created (BRIDGE_CREATE_TOPICS): retry shortly"
                )
            if not topics_made(self._publish_after):  # a stop cancelled their creation
                raise stopping()
            self._publish_after = None

    async def stop(self, deadline: float | None = None) -> None:
        if self.leftover is not None:
            await self.leftover.stop(deadline)

    @property
    def ready(self) -> bool:
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        if not self._publisher.connected:
            # Not the ACL itself: /readyz may be served on the webhook port.
            return "Kafka is not connected" if self._publisher.denied is None else DENIED_ANSWER
        # Not stalled either: Kafka answering metadata yet taking no record (below its
        # quorum, say) makes each request wait the whole publish timeout for a 503.
        if self._publisher.stalled:
            return "Kafka takes no record (a publish timed out, and none was taken since)"
        if self._publisher.clock_refused:
            return "Kafka refuses the records' timestamps: the bridge's clock is off (see the log)"
        if self._publish_after is not None and not self._publish_after.done():
            return "the topics are being created (BRIDGE_CREATE_TOPICS)"
        return None

    @property
    def remembered_keys(self) -> int:
        return len(self._seen)

    @property
    def keys_forgotten_early(self) -> int:
        return self._seen.forgotten_early

    @property
    def held_topics(self) -> list[str]:
        return self.leftover.held_topics if self.leftover is not None else []

    @property
    def dead_letters_waiting(self) -> int:
        return self.leftover.dead_letters_waiting if self.leftover is not None else 0

    async def keep(self, destination: Destination) -> None:
        self._refuse_before_the_topics()
        await self._publisher.publish(destination)

    async def deliver(self, destination: Destination, dedup_key: str | None) -> bool:
        self._refuse_before_the_topics()
        if dedup_key is None:
            await self._publisher.publish(destination)
            return True
        # One bound for all the waiting on earlier copies of this event, whatever their
        # number: retries waiting in turn were held (2k-1) times the publish timeout.
        loop = asyncio.get_running_loop()
        until = loop.time() + self._landing_wait
        while True:
            if self._seen.seen(dedup_key):
                return False
            first = self._inflight.get(dedup_key)
            if first is not None:
                await asyncio.wait({first}, timeout=max(0.0, until - loop.time()))
                if not first.done():
                    raise PublishTimeout(
                        "an earlier delivery of this event is still waiting for Kafka: "
                        f"this one was not sent, the first was not settled in "
                        f"{self._landing_wait:g} s"
                    )
                if first.result():
                    return False
                continue  # the first attempt failed: this one tries again
            landing = self._landing.get(dedup_key)
            if landing is None:
                break
            await self._await_landing(dedup_key, landing, until)
            # landed: a duplicate (seen above); refused or given up on: publish again
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight[dedup_key] = mine
        try:
            await self._publisher.publish(destination)
        except PublishTimeout as timeout:
            mine.set_result(False)  # its waiters run later, once the landing is known
            if timeout.landing is not None and self._seen.enabled:
                self._remember_if_it_lands(timeout.landing, dedup_key)
            raise
        except BaseException:
            mine.set_result(False)
            raise
        else:
            self._seen.remember(dedup_key)
            mine.set_result(True)
        finally:
            del self._inflight[dedup_key]
        return True

    def _remember_if_it_lands(self, landing: asyncio.Future[Any], dedup_key: str) -> None:
        """Remember the key of a record answered 503 (its acknowledgement took longer than
        BRIDGE_PUBLISH_TIMEOUT) once Kafka takes it after all: the sender's retry is then
        a duplicate (200), not a second copy. Without it, a Kafka outage in broker mode
        left one copy per attempt that had timed out, and then the retry's. Until Kafka
        settles it, a retry waits for it (:meth:`_await_landing`)."""
        self._landing[dedup_key] = landing
        landing.add_done_callback(lambda _: self._settle(dedup_key, landing))

    def _settle(self, dedup_key: str, landing: asyncio.Future[Any]) -> None:
        """Kafka's verdict on a timed-out record: its key is remembered if it landed."""
        if self._landing.get(dedup_key) is landing:
            del self._landing[dedup_key]
            if landed(landing):
                self._seen.remember(dedup_key)

    async def _await_landing(
        self, dedup_key: str, landing: asyncio.Future[Any], until: float
    ) -> None:
        """Wait, until ``until`` (the loop's time: BRIDGE_PUBLISH_TIMEOUT after the retry
        came), for a timed-out earlier copy to land or fail.

        A retry that came while it was still queued was published as well: two copies
        of one event once Kafka took both. Still unsettled, the retry gets a 503 of its
        own and is not published: it would only queue behind its first copy, on the same
        partition. Not shielded from the wait's end: the future is aiokafka's batch's.
        """
        # Kafka answering nothing (an outage): the 503 comes at once, as for a fresh key;
        # waiting for the first copy would hold a request for the whole wait each retry.
        self._publisher.refuse_at_once()
        remaining = max(0.0, until - asyncio.get_running_loop().time())
        await asyncio.wait({landing}, timeout=remaining)
        if landing.done():
            self._settle(dedup_key, landing)  # its callback may not have run yet
            return
        retry_later = PublishTimeout(
            "an earlier delivery of this event timed out and may still land in Kafka: "
            f"it was not sent again, Kafka has not settled the first in {self._landing_wait:g} s"
        )
        retry_later.landing = landing
        try:
            raise retry_later
        finally:
            del retry_later  # see Spool.append


class _DrainedAck:
    """Shared by the modes that answer first and publish in the background."""

    def __init__(self, publisher: Publisher, metrics: Metrics, settings: Settings) -> None:
        self._publisher = publisher
        self._settings = settings
        self._metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self.drainer: Drainer

    def _drainer_of(self, backlog: Backlog) -> Drainer:
        return Drainer.from_settings(backlog, self._publisher, self._metrics, self._settings)

    @property
    def held_topics(self) -> list[str]:
        return self.drainer.held_topics

    @property
    def dead_letters_waiting(self) -> int:
        return self.drainer.dead_letters_waiting

    def _full_because(self) -> str:
        """Why the backlog filled, as far as the bridge can tell: topics whose events
        Kafka does not take (a denied ACL, a missing topic) fill it as surely as Kafka
        away does, and "Kafka is probably unreachable" sent the operator elsewhere.
        The backlog's own drainer's, not the mode's properties: a leftover spool's held
        topics and parked records do not fill the memory queue."""
        held = self.drainer.held_topics
        waiting = self.drainer.dead_letters_waiting
        because = []
        if held:
            because.append(
                f"Kafka takes no event of {named(held)} (see the log and bridge_topics_held)"
            )
        if waiting:
            # parked: their topics go on, so none is held (it said Kafka was away: a review)
            because.append(
                f"{waiting} events too large for their topics wait for the dead-letter topic "
                "(see the log and bridge_dead_letters_waiting)"
            )
        return "; ".join(because) or "Kafka is probably unreachable"

    def _background_reason(self) -> str | None:
        """Unready once the drainer (or durable's spool maintenance) stopped. Their loops
        catch whatever they can meet, so one that ended on its own is a bug: it was only
        logged, and readiness said 200 while nothing moved the backlog to Kafka."""
        for task in self._tasks:
            if task.done():
                return f"the background task {task.get_name()} stopped (see the log)"
        return None

    def _start_drainer(self, publish_after: asyncio.Future[Any] | None) -> None:
        self._tasks.append(self.drainer.start(publish_after, f"{type(self).__name__}-drainer"))

    async def _stop_drainer(self, deadline: float | None) -> None:
        await self.drainer.drain(drain_deadline(deadline, self._settings.shutdown_timeout))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.drainer.settle()


class DurableAck(_DrainedAck):
    name = "durable"
    leftover: LeftoverSpool | None = None

    def __init__(self, publisher: Publisher, metrics: Metrics, settings: Settings) -> None:
        super().__init__(publisher, metrics, settings)
        self.spool = Spool.from_settings(
            settings,
            on_commit=lambda seconds: metrics.observe_stage("spool_commit", seconds),
            on_set_aside=metrics.dropped_records.inc,
        )
        self.backlog: Backlog = self.spool
        self.drainer = self._drainer_of(self.spool)
        self._max_bytes = settings.spool_max_bytes

    def prepare(self) -> None:
        """Open the spool before serving (raises SpoolUnusable)."""
        self.spool.connect()
        say_topics_from_before(self.spool, self._settings)

    async def start(self, publish_after: asyncio.Future[Any] | None = None) -> None:
        self.spool.open()
        self._start_drainer(publish_after)
        self._tasks.append(spawn(self._maintain(), "spool-maintenance"))

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_SECONDS)
            try:
                await self.spool.forget_expired_keys()
            except Exception as exc:  # the spool marks itself unwritable; keep probing
                log.error("spool maintenance failed: %s", exc)

    async def stop(self, deadline: float | None = None) -> None:
        await self._stop_drainer(deadline)
        if self.spool.depth and self.spool.lost_files is not None:
            log.error(
                "%d events Kafka did not take are not kept for the next start: %s (moved "
                "aside rather than deleted, those files hold them: a bridge started on "
                "that folder publishes them)",
                self.spool.depth,
                self.spool.lost_files,
            )
        elif self.spool.depth:
            log.warning(
                "%d events stay in the spool %s; they are published at the next start",
                self.spool.depth,
                self.spool.path,
            )
        await self.spool.close()

    @property
    def ready(self) -> bool:
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        spool = self.spool
        if (stuck := spool.stuck()) is not None:
            return stuck
        if not spool.writable:
            return "the spool cannot be written (see the log)"
        if spool.disk_low:
            return "the spool's disk has too little room left"
        if not has_room(spool.bytes, self._max_bytes):
            return f"the spool is full (BRIDGE_SPOOL_MAX_BYTES): {self._full_because()}"
        return self._background_reason()

    @property
    def remembered_keys(self) -> int:
        return self.spool.keys

    @property
    def keys_forgotten_early(self) -> int:
        return self.spool.keys_forgotten_early

    async def deliver(self, destination: Destination, dedup_key: str | None) -> bool:
        appended = await self.spool.append(destination, dedup_key)
        if appended:
            self.drainer.wake()
        return appended

    async def keep(self, destination: Destination) -> None:
        await self.deliver(destination, None)


class MemoryAck(_DrainedAck):
    name = "memory"

    def __init__(
        self,
        publisher: Publisher,
        metrics: Metrics,
        settings: Settings,
        leftover: LeftoverSpool | None = None,
    ) -> None:
        super().__init__(publisher, metrics, settings)
        self.backlog = MemoryBacklog(settings.memory_max_bytes)
        self.drainer = self._drainer_of(self.backlog)
        self.leftover = leftover
        self._seen = SeenKeys(settings.dedup_window, settings.dedup_max_keys)
        self._stopping = False

    def prepare(self) -> None:
        if self.leftover is not None:
            self.leftover.prepare()

    async def start(self, publish_after: asyncio.Future[Any] | None = None) -> None:
        self._start_drainer(publish_after)
        if self.leftover is not None:
            await self.leftover.start(publish_after)

    @property
    def held_topics(self) -> list[str]:
        held = self.drainer.held_topics
        if self.leftover is not None:
            held = sorted({*held, *self.leftover.held_topics})
        return held

    @property
    def dead_letters_waiting(self) -> int:
        waiting = self.drainer.dead_letters_waiting
        if self.leftover is not None:
            waiting += self.leftover.dead_letters_waiting
        return waiting

    async def stop(self, deadline: float | None = None) -> None:
        self._stopping = True
        deadline = drain_deadline(deadline, self._settings.shutdown_timeout)
        try:
            if self.leftover is None:
                await self._stop_drainer(deadline)
            else:  # one deadline for both: one after the other took two
                # Both to their end, whatever the other met: a failure raised at once
                # left the queue's drain running under the producer's flush.
                outcomes = await asyncio.gather(
                    self._stop_drainer(deadline),
                    self.leftover.stop(deadline),
                    return_exceptions=True,
                )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
        finally:
            self._say_what_is_lost()

    def _say_what_is_lost(self) -> None:
        if self.backlog.depth:
            # Those handed over are flushed next by the publisher's stop: they may land.
            handed_over = min(self.drainer.handed_over, self.backlog.depth)
            log.error(
                "%d accepted events were not acknowledged by Kafka at shutdown "
                "(BRIDGE_ACK=memory): %d still queued in memory are lost, %d handed to the "
                "Kafka client land only if its final flush gets them through",
                self.backlog.depth,
                self.backlog.depth - handed_over,
                handed_over,
            )

    @property
    def ready(self) -> bool:
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        if self.backlog.full:
            return f"the memory queue is full (BRIDGE_MEMORY_MAX_BYTES): {self._full_because()}"
        return self._background_reason()

    @property
    def remembered_keys(self) -> int:
        return len(self._seen)

    @property
    def keys_forgotten_early(self) -> int:
        return self._seen.forgotten_early

    async def deliver(self, destination: Destination, dedup_key: str | None) -> bool:
        if dedup_key is not None and self._seen.seen(dedup_key):
            return False
        if self._stopping:
            # A request uvicorn starts after the app's shutdown began (one pipelined
            # behind a request cut short, say): queued now, after the drain, it was
            # answered 202 and lost without a word. The spool refuses alike once closed.
            raise stopping()
        self.backlog.append(destination)
        if dedup_key is not None:
            self._seen.remember(dedup_key)
        self.drainer.wake()
        return True

    async def keep(self, destination: Destination) -> None:
        await self.deliver(destination, None)


def make_ack_mode(settings: Settings, publisher: Publisher, metrics: Metrics) -> AckMode:
    if settings.ack == "durable":
        return DurableAck(publisher, metrics, settings)
    # The other modes publish what a durable bridge left in BRIDGE_SPOOL_DIR.
    leftover = LeftoverSpool(publisher, metrics, settings)
    if settings.ack == "broker":
        return BrokerAck(publisher, settings, leftover)
    return MemoryAck(publisher, metrics, settings, leftover)
