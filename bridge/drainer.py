"""Empties a backlog (the spool, or the in-memory queue) into Kafka, oldest first.

One background task per process. It hands a batch of the oldest records to
the producer, waits (bounded) for Kafka's acknowledgements, and removes from
the backlog exactly the records Kafka acknowledged. A record whose send is
still pending when the wait ends is not sent again: aiokafka keeps retrying
it, and sending a copy would only duplicate it once Kafka is back.

Trouble with one topic holds back that topic only. A topic whose records cannot
be handed over (it does not exist and Kafka does not create it, an ACL denies
it), are not acknowledged in time (a partition without a leader or without
enough replicas) or are refused (other than as too large, see ``_set_aside``) is
put on hold: its records stay in the backlog, in order, and are tried again
after the hold (1 s, doubling up to HOLD_MAX), while the records of every other
topic go on. Until one of its records is acknowledged again, a round sends only
one record of that topic (a probe) and does not wait for its acknowledgement; it
is collected as it comes; no other record of the topic goes until the probe's
outcome is known, so a topic's records keep their order. The first record of a
topic the producer has no metadata for yet goes the same way. A probe is handed
over by a task of its own: its wait for metadata (up to HAND_OVER_WAIT) delays no
round of the other topics. Holds are for a topic's trouble only: while Kafka as a
whole is away (the publisher is not connected, or Kafka answered nothing since the
record that failed was handed over) there are none (nor does a probe
handed over hold back its topic), and the drainer
backs off as it does when the backlog fails (a spool on a full disk), up to
MAX_BACKOFF; delivery resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka.errors import OutOfOrderSequenceNumber

from bridge.backlog import Backlog, QueuedRecord
from bridge.config import Settings
from bridge.deadletter import set_aside
from bridge.errors import KAFKA_REJECTED, BridgeError, PayloadTooLarge, PublishTimeout
from bridge.metrics import Metrics
from bridge.publisher import Publisher, landed, refused_by_kafka, spawn
from bridge.routing import Destination

log = logging.getLogger(__name__)

BATCH_RECORDS = 500
BATCH_BYTES = 4 * 1024 * 1024
MIN_BACKOFF = 0.1
MAX_BACKOFF = 5.0
#: While stopping, how often the drain looks again (and Kafka, away, is tried again).
STOPPING_RETRY_SECONDS = 0.05
#: The end of a stop's deadline a backlog that outlives the process keeps for the
#: acknowledgements of what is in flight (at most a quarter of what the drain has):
#: handed over up to the deadline, a batch Kafka wrote whose acknowledgement came after
#: the stop stayed in the spool and was sent again at the next start (a review: 500
#: duplicates when a deploy stopped a catch-up).
ACK_RESERVE_SECONDS = 1.0
#: How long a stop waits for the removal of what Kafka acknowledged late (see settle).
SETTLE_SECONDS = 1.0
IDLE_POLL = 1.0
#: The first hold of a topic; each hold after it without an acknowledgement between
#: is twice as long, up to HOLD_MAX.
HOLD_MIN = 1.0
HOLD_MAX = 10.0
#: Most parked records whose dead letters are tried at once (the others wait their turn):
#: each try is a task and a copy of a record too large for its topic in the producer.
PARKED_TRIES_AT_ONCE = 8
#: A topic's holds are said at WARNING at most this often (else at DEBUG): a topic an
#: ACL denies was two lines every 10 s, 17,000 a day (a review's count).
HOLD_SAID_EVERY = 60.0
#: The longest one hand-over may take (metadata of a topic the producer does not know
#: yet, or room in a partition's queue) before its topic is put on hold; at most the
#: acknowledgement timeout.
HAND_OVER_WAIT = 1.0
#: After a round that did not fill a batch, wait this long before the next, so that
#: records arriving meanwhile share one round. At a steady 2,000 events/s a round per
#: event or two (a read and a removal through the spool's writer thread, a Kafka
#: request) competed with the requests for the one core: durable p50 at 2,000/s went
#: from 1.15 to 0.74 ms with this pause (tests/bench/changes.md). No answer waits for
#: it (the event is already safe), and an event after a quiet spell goes at once.
ROUND_PAUSE = 0.010
#: While only records of held topics are left, at most one read per this pause: an
#: append of another topic's record goes within it (it waited up to IDLE_POLL), and a
#: stream of appends to a held topic does not make a read each.
HELD_ROUND_PAUSE = 0.05


def topics_made(publish_after: asyncio.Future[Any] | None) -> bool:
    """Whether the creation of the topics (BRIDGE_CREATE_TOPICS; None without it) is
    over, done or failed: not still going, nor cancelled by a stop that came first."""
    return publish_after is None or (publish_after.done() and not publish_after.cancelled())


def named(topics: list[str], most: int = 3) -> str:
    """``topics`` for a log line or a reason: the first ``most``, and how many more
    (hundreds of topics held made one line of all of them)."""
    more = len(topics) - most
    return ", ".join(topics[:most]) + (f" and {more} more" if more > 0 else "")


def drain_deadline(deadline: float | None, shutdown_timeout: float) -> float:
    """The end of a drain at a stop: ``deadline`` (monotonic; the lifespan's, which the
    producer's flush shares), or BRIDGE_SHUTDOWN_TIMEOUT from now without one."""
    return time.monotonic() + shutdown_timeout if deadline is None else deadline


class _Round:
    """The acknowledgements a round waits for: how many are still to come, and the
    future set once none is."""

    __slots__ = ("done", "left")

    def __init__(self, left: int, done: asyncio.Future[None]) -> None:
        self.left = left
        self.done = done


class _Parked:
    """A record Kafka refused for good whose dead letter could not be kept: parked out
    of its topic's way, its dead letter tried again at ``retry_at`` (monotonic)."""

    __slots__ = ("error", "landing", "record", "retry_at", "trying", "wait")

    def __init__(
        self,
        record: QueuedRecord,
        error: BridgeError,
        wait: float,
        landing: asyncio.Future[Any] | None,
    ) -> None:
        self.record = record
        self.error = error
        self.wait = wait
        self.retry_at = time.monotonic() + wait
        self.trying = False  # its dead letter is being published
        # The last copy of its dead letter, when its publish timed out with the copy
        # still in the producer's hands (a dead-letter topic below its quorum): it may
        # land yet, and no other copy goes while it may (each would land too).
        self.landing = landing

    @property
    def copy_in_flight(self) -> bool:
        """Its dead letter's last copy is in the producer's hands, and may land yet."""
        return self.landing is not None and not self.landing.done()

    @property
    def copy_landed(self) -> bool:
        """Its dead letter's last copy landed after all: the record is kept."""
        return self.landing is not None and landed(self.landing)


class _Pending:
    """A record handed to the producer whose acknowledgement has not been seen yet."""

    __slots__ = ("acked", "acked_at", "late", "record", "round", "sent_at")

    def __init__(self, record: QueuedRecord, acked: asyncio.Future[Any]) -> None:
        self.record = record
        self.acked = acked
        self.sent_at = time.perf_counter()
        # When the acknowledgement came: a round collects its records once they all
        # came (or its wait ran out), and timing each then gave every record of a
        # round the latency of its slowest (one slow partition made the p50 a maximum).
        # The one callback a record gets also counts it for its round (see
        # Drainer._await_acks): asyncio.wait's own cost as much again.
        self.acked_at: float | None = None
        self.round: _Round | None = None  # the round waiting for it, if one is
        acked.add_done_callback(self._stamp)
        self.late = False  # counted as a timeout already (once, however long it waits)

    def _stamp(self, _: asyncio.Future[Any]) -> None:
        self.acked_at = time.perf_counter()
        waiting = self.round
        if waiting is not None:
            self.round = None
            waiting.left -= 1
            if not waiting.left and not waiting.done.done():
                waiting.done.set_result(None)


class Drainer:
    def __init__(
        self,
        backlog: Backlog,
        publisher: Publisher,
        metrics: Metrics,
        *,
        ack_timeout: float,
        deadletter_topic: str,
    ) -> None:
        self._backlog = backlog
        self._deadletter_topic = deadletter_topic
        self._publisher = publisher
        self._metrics = metrics
        self._ack_timeout = ack_timeout
        self._hand_over_wait = min(HAND_OVER_WAIT, ack_timeout)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()  # set by drain: a stop began
        self._tried_while_stopping = False  # Kafka away: a round tried since the stop
        self._pending: dict[int, _Pending] = {}
        # seqs Kafka acknowledged whose removal from the backlog failed
        self._unremoved: list[int] = []
        # seqs the round under way is done with (acknowledged, or kept as dead letters),
        # until _remove_finished takes them. Kept here, not in the round's locals: a
        # stop that cancels the round in an await between (a dead letter's publish)
        # leaves them to settle(); lost with the locals, they stayed in the backlog,
        # sent again at the next start (a review's test).
        self._finished: list[int] = []
        # Records Kafka refused as too large in a batch with others: Kafka refuses the
        # whole batch for one record over the topic's max.message.bytes, so each is
        # sent once more alone before it counts as too large (a dead letter): the
        # oldest of each topic, while no other record of that topic is in flight.
        self._suspects: dict[int, QueuedRecord] = {}
        # topic -> (held until, on the monotonic clock; length of that hold). A topic
        # stays here after its hold ends, until one of its records is acknowledged.
        self._holds: dict[str, tuple[float, float]] = {}
        self._hold_said: dict[str, float] = {}  # topic -> when a hold of it was last said
        # topic -> the seq of its probe, from the hand-over until the outcome is known
        self._probing: dict[str, int] = {}
        # probes being handed over, and records being set aside (see _start_set_aside)
        self._probe_tasks: set[asyncio.Task[None]] = set()
        # Records Kafka refused for good whose dead letter could not be kept (the
        # dead-letter topic missing, denied, below its quorum), by seq: parked, out of
        # reads, while their topic's other records go on (it held the whole topic, for
        # as long as the dead-letter topic could take nothing). What is tried again is
        # the dead letter, not the record (which went to Kafka again, refused again,
        # and replaced the producer each time), with a backoff (see _retry_parked).
        self._parked: dict[int, _Parked] = {}
        # seqs a probe settled (set aside as too large): removed next round, and not read
        # again until then (a second probe would keep a second dead letter)
        self._settled_by_probes: set[int] = set()
        # The last round found only records of topics on hold (none in flight for
        # another topic): a drain at shutdown has nothing more to wait for.
        self._only_held_left = False
        # Topics held for a trouble that passes, which a drain at shutdown tries again
        # rather than end (see drain): a refusal of the producer's own making
        # (OutOfOrderSequenceNumber: its numbering broke, and a fresh producer replaces
        # it), or no metadata for the topic yet (Kafka is creating it) or no room in the
        # producer's buffer within HAND_OVER_WAIT
        self._held_passing: set[str] = set()
        # Those of them a drain at shutdown last tried again, until one of their records
        # is acknowledged: named if the deadline passes (see drain)
        self._retried_at_stop: set[str] = set()
        self._away_backoff = MIN_BACKOFF  # while Kafka is away
        self._handing_over = True  # until the end of a stop's drain (see drain)
        self._publish_after: asyncio.Future[Any] | None = None  # see start()
        #: Records Kafka refused for good whose dead letter failed too: lost (as logged)
        self.dropped = 0

    @classmethod
    def from_settings(
        cls, backlog: Backlog, publisher: Publisher, metrics: Metrics, settings: Settings
    ) -> Drainer:
        """The drainer of ``backlog`` the settings describe (each ack mode's, and that of
        a durable bridge's spool another mode publishes)."""
        return cls(
            backlog,
            publisher,
            metrics,
            ack_timeout=settings.publish_timeout,
            deadletter_topic=settings.deadletter_topic,
        )

    def wake(self) -> None:
        """Something was appended: look at the backlog now."""
        self._wake.set()

    @property
    def handed_over(self) -> int:
        """Records handed to the producer whose acknowledgement has not come yet."""
        return len(self._pending)

    @property
    def held_topics(self) -> list[str]:
        """The topics in trouble: on hold now, or tried again since and not yet
        acknowledged."""
        return sorted(self._holds)

    @property
    def dead_letters_waiting(self) -> int:
        """Records Kafka refused for good whose dead letters cannot be kept yet (see
        _parked): they wait in the backlog, their topics' other records going on."""
        return len(self._parked)

    def _on_hold_now(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(topic for topic, (until, _) in self._holds.items() if until > now)

    def _kept_for_the_next_start(self) -> bool:
        """A stop came before the topics were created and the backlog outlives the
        process: what it holds waits for the next start (see Backlog)."""
        return self._backlog.outlives_the_process and not topics_made(self._publish_after)

    def start(self, publish_after: asyncio.Future[Any] | None, name: str) -> asyncio.Task[None]:
        """The task that runs the drainer once ``publish_after`` (the creation of the
        topics, BRIDGE_CREATE_TOPICS) is over, so that Kafka does not create them first
        with its own defaults; not at all when a stop came first and the backlog
        outlives the process (nor does :meth:`drain` then publish)."""
        self._publish_after = publish_after  # now: a stop may come before the task runs
        return spawn(self._run_after(publish_after), name)

    async def _run_after(self, publish_after: asyncio.Future[Any] | None) -> None:
        if publish_after is not None:
            await asyncio.wait({publish_after})  # however it ends: it logs its own failure
            if self._kept_for_the_next_start():
                return
        await self.run()

    async def run(self) -> None:
        """Move the backlog to Kafka until cancelled."""
        backoff = MIN_BACKOFF
        try:
            while True:
                try:
                    await self._round()
                except Exception as exc:
                    # The backlog cannot be read or written now (the spool's disk is
                    # full, say). Nothing here may end the task: it is the only way
                    # accepted events reach Kafka, so it keeps trying until the backlog
                    # works again.
                    log.error("cannot move the backlog to Kafka (%s); trying again", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                else:
                    backoff = MIN_BACKOFF
        finally:
            # Withdrawn: a probe cancelled while it waits was not handed over, and
            # stays in the backlog.
            for task in self._probe_tasks:
                task.cancel()

    async def _round(self) -> None:
        """One read, send and removal, and the pause after it."""
        if not self._handing_over:  # the end of a stop: what is in flight lands meanwhile
            await asyncio.sleep(STOPPING_RETRY_SECONDS)
            return
        if self._unremoved:  # nothing else is read until their removal succeeds
            await self._remove(self._unremoved)
        if self._settled_by_probes:
            settled = list(self._settled_by_probes)
            await self._remove(settled)
            self._settled_by_probes.difference_update(settled)
        if not self._publisher.connected:
            await self._round_while_kafka_is_away()
            return
        self._away_backoff = MIN_BACKOFF
        self._tried_while_stopping = False  # back: a next spell away tries again
        if self._parked:
            self._retry_parked()
        # Before the other records of their topics; the other topics go on in the same
        # round (a topic's too-large record held them all back: 2 to 3.5 s on a
        # review's broker, for good if the topic then had other trouble).
        sent_suspects = await self._deliver_suspects() if self._suspects else False
        self._wake.clear()  # before reading, so an append after the read wakes us
        held = self._on_hold_now()
        records = await self._backlog.oldest(
            BATCH_RECORDS,
            BATCH_BYTES,
            skip_seqs=self._in_flight(),  # handed over already (or a suspect): not again
            skip_topics=self._waiting_topics(held),
        )
        self._only_held_left = False
        if records:
            await self._deliver(records)
            await self._remove_finished()
            if len(records) < BATCH_RECORDS:
                await asyncio.sleep(ROUND_PAUSE)
            return
        if self._pending:  # acknowledgements of held topics may have come meanwhile
            await self._collect()
            # a probe's acknowledgement, say: its topic's records go now
            if await self._remove_finished():
                return
            held = self._on_hold_now()  # with the holds of the refusals just seen
        if sent_suspects and self._suspects:
            return  # the next of each topic goes now, not after a pause
        if self._backlog.depth > len(self._pending) and held:
            # What is left waits for a hold to end (or for Kafka), or for a new record
            # of another topic.
            waiting = {p.record.destination.topic for p in self._pending.values()}
            waiting.update(self._probing, self._suspect_topics())
            self._only_held_left = waiting <= held  # nothing but held topics to wait for
            await self._sleep_unless_woken(self._until_a_hold_ends())
            await asyncio.sleep(HELD_ROUND_PAUSE)
            return
        await self._sleep_unless_woken(IDLE_POLL)

    async def _sleep_unless_woken(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _deliver_suspects(self) -> bool:
        """Send the oldest suspect of each topic that is not on hold, not being probed
        and has no record in flight, so that it is alone in its batch (the topic's
        other records wait, see _waiting_topics); whether one of them moved on (is
        done with, in flight or a probe), so that the next may go at once."""
        held = self._on_hold_now()
        busy = {pending.record.destination.topic for pending in self._pending.values()}
        oldest: dict[str, QueuedRecord] = {}
        for seq in sorted(self._suspects):
            record = self._suspects[seq]
            topic = record.destination.topic
            if topic not in oldest and topic not in busy:
                oldest[topic] = record
        ready = [
            record
            for topic, record in oldest.items()
            if topic not in held and topic not in self._probing
        ]
        if not ready:
            return False
        await self._deliver(ready)
        moved = bool(self._finished)  # acknowledged (no suspects any more, see _collect)
        for record in ready:
            pending = self._pending.get(record.seq)
            if pending is not None:  # acknowledged late: the round that collects it comes
                pending.acked.add_done_callback(lambda _: self.wake())
            moved = moved or pending is not None or record.destination.topic in self._probing
        await self._remove_finished()
        # Not when each failed at once with nothing holding its topic (Kafka silent):
        # sent again straight away, that was a tight loop.
        return moved

    def _oldest_suspect_of(self, topic: str) -> int | None:
        return min(
            (seq for seq, record in self._suspects.items() if record.destination.topic == topic),
            default=None,
        )

    def _suspect_topics(self) -> set[str]:
        return {record.destination.topic for record in self._suspects.values()}

    def _waiting_topics(self, held: frozenset[str]) -> frozenset[str]:
        """The topics a read leaves out: those on hold, those being probed (their records
        wait for the probe's outcome) and those of suspects (which go alone first)."""
        if not self._probing and not self._suspects:
            return held
        return held.union(self._probing, self._suspect_topics())

    async def _round_while_kafka_is_away(self) -> None:
        """No holds (every topic would be held; none is to blame): hand over what the
        producer takes, at most a batch in flight, and back off."""
        self._holds.clear()
        # Nor probation for a probe handed over: unacknowledged for the whole outage,
        # it held back its topic's records, which were then never tried, nor counted
        # as failing. They go to the producer after it (in order on its partition).
        for topic, seq in list(self._probing.items()):
            if seq in self._pending:
                del self._probing[topic]
        self._only_held_left = False
        if self._pending:
            await self._collect()
            # Kafka takes records though it counts as away (one broker hung)
            if await self._remove_finished():
                self._tried_while_stopping = False
        if self._tried_while_stopping:
            # Tried at the stop and Kafka took nothing: not again until it is back
            # (connected says it, without a record), or takes what was handed over.
            # A read each retry handed one record to a producer that refused it, a
            # batch of the spool read 20 times a second.
            await asyncio.sleep(STOPPING_RETRY_SECONDS)
            return
        self._tried_while_stopping = self._stopping.is_set()
        room = BATCH_RECORDS - len(self._pending)
        if room > 0:
            records = await self._backlog.oldest(
                room,
                BATCH_BYTES,
                skip_seqs=self._in_flight(),
                skip_topics=frozenset(self._suspect_topics()),  # they go alone first
            )
            if records:
                await self._deliver(records)
                if await self._remove_finished():  # as above: the next try reads again
                    self._tried_while_stopping = False
        # Cut short by a stop (see drain): Kafka back as it came, a backoff of up to
        # MAX_BACKOFF outlasted a short BRIDGE_SHUTDOWN_TIMEOUT, and memory mode lost
        # what it held. Once stopping, tried again at drain's pace. Not by appends
        # (_wake): a tight loop while Kafka is away.
        if self._stopping.is_set():
            await asyncio.sleep(STOPPING_RETRY_SECONDS)
            return
        # (asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation
        # that comes as the event is set, and the stop's cancel of this task with it)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._away_backoff):
                await self._stopping.wait()
        self._away_backoff = min(self._away_backoff * 2, MAX_BACKOFF)

    def _in_flight(self) -> frozenset[int]:
        """The seqs a read leaves out: handed over, set aside by a probe and not removed
        yet, or suspects (sent alone, see _deliver_suspects)."""
        if self._settled_by_probes or self._suspects or self._parked:
            return frozenset(self._pending).union(
                self._settled_by_probes, self._suspects, self._parked
            )
        return frozenset(self._pending)

    def _until_a_hold_ends(self) -> float:
        now = time.monotonic()
        ends = [until - now for until, _ in self._holds.values() if until > now]
        return min([IDLE_POLL, *ends])

    async def _remove_finished(self) -> list[int]:
        """Remove what the round is done with (see _finished); those seqs."""
        done, self._finished = self._finished, []
        await self._remove(done)
        return done

    async def _remove(self, seqs: list[int]) -> None:
        """Remove records Kafka has from the backlog. Should that fail, they are kept
        in ``_unremoved`` and removed first next round: read back, they would be sent
        again."""
        self._unremoved = seqs
        await self._backlog.remove(seqs)
        self._unremoved = []

    async def drain(self, deadline: float) -> None:
        """Wait until the backlog is empty, or holds only records of topics on hold with
        none of them in flight, or ``deadline`` (monotonic) passed. Not for a held topic
        that Kafka refuses until the deadline: the producer's flush, which shares it,
        would get no time for the other topics. A held topic whose records Kafka is
        still taking (slowly: acknowledged after BRIDGE_PUBLISH_TIMEOUT) is waited for:
        memory mode stopped with 9 of its 10 s left and lost what was still queued.
        While Kafka is away, until the deadline (it may come back meanwhile). Not at
        all when the stop came before the topics were created and the backlog outlives
        the process (see start). A backlog that outlives the process hands nothing over
        in the last ACK_RESERVE_SECONDS (a quarter of the time left at most), which are
        for the acknowledgements of what is in flight, for settle() to remove."""
        if self._kept_for_the_next_start():
            if self._backlog.depth:
                log.info(
                    "stopped before the topics were created (BRIDGE_CREATE_TOPICS): the "
                    "%d events waiting for Kafka are published at the next start, once "
                    "they are",
                    self._backlog.depth,
                )
            return
        self._stopping.set()
        # One more try for every topic first, and for every parked dead letter.
        self._holds.clear()
        for parked in self._parked.values():
            parked.retry_at = 0.0  # (tried by _drain_until's first pass)
        self._only_held_left = False
        self._handing_over = True  # (a drain that ended before may have stopped it)
        hand_over_until = deadline
        if self._backlog.outlives_the_process:  # (memory mode loses what is not handed)
            hand_over_until -= min(ACK_RESERVE_SECONDS, max(0.0, deadline - time.monotonic()) / 4)
        try:
            await self._drain_until(hand_over_until)
        finally:
            self._handing_over = False
        # What is in flight (a round may still be handing its batch over): its
        # acknowledgement lets settle() remove it.
        while (left := deadline - time.monotonic()) > 0 and (
            in_flight := [p.acked for p in self._pending.values() if not p.acked.done()]
        ):
            await asyncio.wait(in_flight, timeout=min(left, STOPPING_RETRY_SECONDS))

    async def _drain_until(self, deadline: float) -> None:
        while self._backlog.depth and time.monotonic() < deadline:
            self._retry_parked()  # the next ones owed their try (PARKED_TRIES_AT_ONCE)
            if self._parked_only_left():
                self._say_parked_at_stop()
                return
            if (
                self._only_held_left
                and self._publisher.connected
                and not self._pending
                and not self._probing  # a probe waiting for its topic's metadata
                # the last try of a parked dead letter, which the end would cancel (a
                # memory-mode event lost as the dead-letter topic took it: a review)
                and not any(self._owed(parked) for parked in self._parked.values())
            ):
                if not self._held_passing:
                    log.warning("stopping with the events of %s on hold", named(self.held_topics))
                    if self._parked:
                        self._say_parked_at_stop()
                    return
                # Held for the producer's broken numbering, which its replacement mends
                # in a moment, or for a topic Kafka was still creating: tried again,
                # within the deadline. Ending here lost memory mode's queue (84 events
                # after Kafka refused one too large a record; 40 of 150 events of new
                # topics, a review's test), and a durable spool kept them to the next
                # start. A topic Kafka never creates is tried until the deadline.
                for topic in self._held_passing:
                    self._holds.pop(topic, None)
                self._retried_at_stop = set(self._held_passing)
                self._held_passing.clear()
                self._only_held_left = False
            self.wake()
            await asyncio.sleep(STOPPING_RETRY_SECONDS)
        # (a topic Kafka never created, say, tried until the deadline: being tried again,
        # it may be in none of the holds at this moment)
        troubled = set(self._holds) | self._held_passing | set(self._probing)
        troubled |= self._retried_at_stop
        # less those whose records Kafka took in the meantime, not yet collected (the
        # round waits for another topic's acknowledgement)
        troubled -= self._acknowledged_topics()
        if troubled and self._backlog.depth:
            log.warning(
                "the stop's deadline passed with the events of %s on hold",
                named(sorted(troubled)),
            )
        if self._parked:
            self._say_parked_at_stop()

    def _say_parked_at_stop(self) -> None:
        topics = sorted({parked.record.destination.topic for parked in self._parked.values()})
        log.warning(
            "stopping with %d events Kafka refused for good (of %s) whose dead letters "
            "cannot be kept now",
            len(self._parked),
            named(topics),
        )

    def _acknowledged_topics(self) -> set[str]:
        """The topics whose records in flight Kafka has all acknowledged."""
        acknowledged: set[str] = set()
        waiting: set[str] = set()
        for pending in self._pending.values():
            (acknowledged if landed(pending.acked) else waiting).add(
                pending.record.destination.topic
            )
        return acknowledged - waiting

    def _count_published(self, pending: _Pending) -> None:
        acked_at = pending.acked_at or time.perf_counter()  # its callback may wait
        self._metrics.record_published(
            len(pending.record.destination.value), acked_at - pending.sent_at
        )

    async def settle(self) -> None:
        """Once stopped (its task cancelled): remove from the backlog what Kafka has
        and no round removed. An acknowledgement that came after a round last looked
        (in the drain's last pause, or in a round the stop cancelled) left its record
        there: a durable spool sent it again at the next start, and memory mode's
        shutdown log counted it as not acknowledged. Failures are left as they are:
        their records stay in the backlog, as before."""
        for parked in list(self._parked.values()):
            if parked.copy_landed:
                self._kept_after_all(parked)
        done = [*self._unremoved, *self._finished, *self._settled_by_probes]
        self._finished = []
        for seq, pending in list(self._pending.items()):
            if landed(pending.acked):
                del self._pending[seq]
                self._count_published(pending)
                done.append(seq)
        if not done:
            return
        self._settled_by_probes.clear()
        try:
            # Bounded: on a spool disk that hangs the removal never ends, and the stop
            # with it (the spool's close gives up after its own wait).
            async with asyncio.timeout(SETTLE_SECONDS):
                await self._remove(done)
        except TimeoutError:  # still queued: the spool's close says whether it ran
            log.warning(
                "the removal of %d events Kafka has did not end within %g s at shutdown "
                "(the spool's disk is slow or hangs)",
                len(done),
                SETTLE_SECONDS,
            )
        except Exception as exc:  # the stop goes on: they are sent again, at least once
            log.error(
                "%d events Kafka has could not be removed from the backlog at shutdown "
                "(%s); a durable spool sends them again at the next start",
                len(done),
                exc,
            )

    def _hold(self, topic: str, why: str, since: float | None = None, quota: bool = False) -> None:
        """Keep ``topic``'s records back for a while; the others go on. Not while Kafka
        is away: that is no topic's trouble. ``since`` (perf_counter): when the record
        that failed was handed over; Kafka must have answered something after it (an
        acknowledgement of another topic's record, a metadata refresh), or this may be
        the start of an outage: the publisher counts as connected until its metadata
        is 20 s old, and every topic was held for those seconds."""
        if not self._publisher.connected:
            return
        if since is not None and not self._publisher.answered_since(since):
            return
        if (
            quota
            and self._publisher.throttled
            and not (since is not None and self._publisher.metadata_lacks(topic, since))
        ):
            # A wait for room in the producer's buffer that ran out while Kafka holds
            # the whole producer back for a client quota is the quota's, not the
            # topic's: held, and said so, it sent the operator after the topic (a
            # review on a throttling broker). Not an acknowledgement's: a topic below
            # its quorum while throttled was never held, and each round waited for it
            # (a second review). Nor a topic that Kafka's metadata, answered since the
            # hand-over began, does not have: a missing topic was tried every round and
            # never said. (Its metadata not come yet is the quota's: Kafka delays every
            # answer on a throttled connection; ready_for held existing topics new to
            # the producer, a third review.)
            return
        now = time.monotonic()
        until, length = self._holds.get(topic, (0.0, HOLD_MIN / 2))
        if until > now:
            return  # held already
        length = min(length * 2, HOLD_MAX)
        self._holds[topic] = (now + length, length)
        level = logging.DEBUG
        if now - self._hold_said.get(topic, -HOLD_SAID_EVERY) >= HOLD_SAID_EVERY:
            level = logging.WARNING
            self._hold_said = {
                t: at for t, at in self._hold_said.items() if now - at < HOLD_SAID_EVERY
            }
            self._hold_said[topic] = now
        log.log(
            level,
            "records for %s are held back for %gs (those of other topics go on; said at "
            "most every %g s while it lasts): %s",
            topic,
            length,
            HOLD_SAID_EVERY,
            why,
        )

    async def _deliver(self, records: list[QueuedRecord]) -> None:
        """Hand ``records`` over, wait for their acknowledgement (bounded), and deal
        with every pending record whose outcome is known (the seqs done with join
        _finished)."""
        waiting = await self._hand_over(records)
        # Not waited for: the records of topics that were held (not acknowledged since).
        holds = self._holds
        awaited = [
            p for p in waiting if p.record.destination.topic not in holds and not p.acked.done()
        ]
        if awaited:
            await self._await_acks(awaited)
        await self._collect()

    async def _await_acks(self, awaited: list[_Pending]) -> None:
        """Until every one of ``awaited`` has its outcome, or ack_timeout has passed."""
        waiting = _Round(len(awaited), asyncio.get_running_loop().create_future())
        for pending in awaited:
            pending.round = waiting
        try:
            async with asyncio.timeout(self._ack_timeout):
                await waiting.done
        except TimeoutError:
            pass  # those still pending are counted late by _collect
        finally:
            for pending in awaited:
                pending.round = None

    async def _collect(self) -> None:
        """Deal with the pending records whose acknowledgement came (or failed): the
        seqs acknowledged join _finished, a record refused for good is set aside (see
        _start_set_aside). Those overdue count as a timeout, once each, and put their
        topic on hold."""
        done = self._finished
        overdue = time.perf_counter() - self._ack_timeout
        for seq, pending in list(self._pending.items()):
            topic = pending.record.destination.topic
            future = pending.acked
            if not future.done():  # still in aiokafka's hands: leave it pending
                if not pending.late and pending.sent_at <= overdue:
                    pending.late = True
                    self._metrics.record_publish_error("timeout")
                    self._hold(
                        topic,
                        f"Kafka did not acknowledge within {self._ack_timeout:g} s",
                        pending.sent_at,
                    )
                continue
            del self._pending[seq]
            if self._probing.get(topic) == seq:
                del self._probing[topic]  # the probe's outcome is known
            failure = (
                asyncio.CancelledError("the producer dropped the record")
                if future.cancelled()
                else future.exception()
            )
            if failure is None:
                done.append(seq)
                self._suspects.pop(seq, None)  # collected by another round than its own
                self._holds.pop(topic, None)
                self._held_passing.discard(topic)
                self._retried_at_stop.discard(topic)
                self._count_published(pending)
                continue
            error = self._publisher.failure(failure)
            if isinstance(error, PayloadTooLarge):
                # A topic's oldest suspect is handed over alone (see _deliver_suspects),
                # as a probe too when its topic was held: a refusal of it is its own,
                # whichever round collects it (one collected by another round made it a
                # suspect again, sent again and again).
                if seq != self._oldest_suspect_of(topic):
                    self._suspects[seq] = pending.record
                else:
                    self._start_set_aside(pending.record, error)
            else:
                # Kafka's refusal is its answer: this topic's trouble. A failure that is
                # no answer (a timeout) may be Kafka away: held if it answered since.
                since = None if refused_by_kafka(failure) else pending.sent_at
                self._hold(topic, f"Kafka did not take a record: {error.detail}", since)
                if isinstance(failure, OutOfOrderSequenceNumber):
                    self._held_passing.add(topic)
                else:
                    self._held_passing.discard(topic)

    async def _hand_over(self, records: list[QueuedRecord]) -> list[_Pending]:
        """Hand ``records`` to the producer in order, but none of a topic on hold or put
        on hold meanwhile; the pending records handed over (those the producer refuses
        as too large at once are set aside apart, see _start_set_aside)."""
        handed: list[_Pending] = []
        held: set[str] = set()
        position = 0
        connected = self._publisher.connected
        while position < len(records):
            record = records[position]
            try:
                # One deadline from here on, not one per record (a timer each): a
                # healthy hand-over takes microseconds, so only a topic that waits
                # (for metadata, or room in a stuck partition's queue) meets it; the
                # records after it get a deadline of their own.
                async with asyncio.timeout(self._hand_over_wait):
                    for record in records[position:]:
                        position += 1
                        topic = record.destination.topic
                        if topic in held or topic in self._probing:
                            continue  # not ahead of the earlier records of its topic
                        pending = self._pending.get(record.seq)
                        if pending is not None:  # a suspect handed over already
                            handed.append(pending)
                            continue
                        if topic in self._holds or (
                            connected and not self._publisher.ready_for(topic)
                        ):
                            # Held before, or new to the producer (its metadata may
                            # take up to HAND_OVER_WAIT, or never come): one record, a
                            # probe, which waits in a task of its own. Not while Kafka
                            # is away: a probe per topic and round would each fail,
                            # and be counted; the round tries one record, as before.
                            held.add(topic)
                            self._start_probe(record)
                            continue
                        try:
                            future = await self._publisher.hand_over(record.destination)
                        except PayloadTooLarge as exc:
                            held.add(topic)
                            self._start_set_aside(record, exc)
                            continue
                        except BridgeError as exc:
                            if not self._publisher.connected:
                                return handed  # Kafka is away: no use trying the others
                            held.add(topic)
                            self._hand_over_refused(topic, exc)
                            continue
                        pending = _Pending(record, future)
                        self._pending[record.seq] = pending
                        handed.append(pending)
            except TimeoutError:
                held.add(record.destination.topic)
                self._hand_over_timed_out(record.destination.topic)
        return handed

    def _hand_over_timed_out(self, topic: str) -> None:
        self._metrics.record_publish_error("timeout")
        self._hold(
            topic,
            f"no metadata or buffer space for it within {self._hand_over_wait:g} s",
            time.perf_counter() - self._hand_over_wait,
            quota=True,
        )
        self._held_passing.add(topic)  # Kafka may be creating it: see drain

    def _hand_over_refused(self, topic: str, exc: BridgeError) -> None:
        self._hold(topic, f"cannot hand records to Kafka: {exc.detail}")
        self._held_passing.discard(topic)

    def _start_probe(self, record: QueuedRecord) -> None:
        topic = record.destination.topic
        self._probing[topic] = record.seq
        task = spawn(self._probe(record), f"drainer-probe-{topic}")  # its death is logged
        self._probe_tasks.add(task)
        task.add_done_callback(self._probe_tasks.discard)

    async def _probe(self, record: QueuedRecord) -> None:
        """Hand over one record of a held topic, apart from the rounds: pending once
        the producer took it, its topic held again if it could not."""
        topic = record.destination.topic
        try:
            async with asyncio.timeout(self._hand_over_wait):
                future = await self._publisher.hand_over(record.destination)
        except TimeoutError:
            self._hand_over_timed_out(topic)
        except PayloadTooLarge as exc:
            await self._keep_refused(record, exc)
        except BridgeError as exc:
            self._hand_over_refused(topic, exc)
        else:
            self._pending[record.seq] = _Pending(record, future)
            # its outcome lets the topic's other records go, or holds it again
            future.add_done_callback(lambda _: self.wake())
        finally:
            if record.seq not in self._pending:  # not handed over: no outcome to wait for
                del self._probing[topic]
            self.wake()

    def _start_set_aside(self, record: QueuedRecord, error: BridgeError) -> None:
        """Set aside a record Kafka refused for good in a task apart from the rounds, its
        topic's other records waiting meanwhile (as for a probe). In the round, the dead
        letter's publish (up to BRIDGE_PUBLISH_TIMEOUT when the dead-letter topic cannot
        take it) held back every topic, at each retry; and memory mode lost the other
        topics' events at a stop, the drain's time spent waiting for it (a review)."""
        topic = record.destination.topic
        self._probing[topic] = record.seq
        task = spawn(self._set_aside_apart(record, error), f"drainer-set-aside-{topic}")
        self._probe_tasks.add(task)
        task.add_done_callback(self._probe_tasks.discard)

    async def _set_aside_apart(self, record: QueuedRecord, error: BridgeError) -> None:
        try:
            await self._keep_refused(record, error)
        finally:
            topic = record.destination.topic
            if self._probing.get(topic) == record.seq:
                del self._probing[topic]
            self.wake()

    async def _keep_refused(self, record: QueuedRecord, error: BridgeError) -> None:
        """Set aside a record Kafka refused for good: removed at the next round once
        kept (see _settled_by_probes), else parked (see _parked)."""
        topic = record.destination.topic
        kept, landing = await self._set_aside(record, error)
        if kept:
            was_parked = self._parked.pop(record.seq, None) is not None
            self._settled_by_probes.add(record.seq)
            self._suspects.pop(record.seq, None)
            # Kafka judged a record of the topic just now: it is in no other trouble (a
            # hold kept bridge_topics_held up with nothing of it waiting). Not so for a
            # parked one, refused long ago: its topic may be held since for another
            # trouble, which this would lift (a review's test).
            if not was_parked:
                self._holds.pop(topic, None)
        else:
            parked = self._parked.get(record.seq)
            wait = HOLD_MIN if parked is None else min(parked.wait * 2, HOLD_MAX)
            self._parked[record.seq] = _Parked(record, error, wait, landing)
            self._suspects.pop(record.seq, None)
            if landing is not None:
                landing.add_done_callback(lambda _: self.wake())

    def _retry_parked(self) -> None:
        """Try again the dead letters of the parked records whose wait is over, each in
        a task apart (a publish may take BRIDGE_PUBLISH_TIMEOUT), their topics going on."""
        now = time.monotonic()
        trying = sum(parked.trying for parked in self._parked.values())
        # the longest due first: in the dict's order, with tries that keep failing the
        # first PARKED_TRIES_AT_ONCE took turns and the rest waited (a review's doubt)
        for parked in sorted(self._parked.values(), key=lambda parked: parked.retry_at):
            if parked.landing is not None and not parked.trying:
                if parked.copy_in_flight:
                    continue  # it may land yet: not another copy (a review's test)
                if parked.copy_landed:
                    self._kept_after_all(parked)
                    continue
                parked.landing = None  # it failed: a new copy when its wait is over
            if not parked.trying and parked.retry_at <= now and trying < PARKED_TRIES_AT_ONCE:
                parked.trying = True
                trying += 1
                topic = parked.record.destination.topic
                task = spawn(self._keep_parked(parked), f"drainer-dead-letter-{topic}")
                self._probe_tasks.add(task)
                task.add_done_callback(self._probe_tasks.discard)

    def _kept_after_all(self, parked: _Parked) -> None:
        """The last copy of ``parked``'s dead letter landed: kept, removed next round."""
        del self._parked[parked.record.seq]
        self._settled_by_probes.add(parked.record.seq)
        self._say_set_aside(parked.record.destination, parked.error)

    async def _keep_parked(self, parked: _Parked) -> None:
        try:
            await self._keep_refused(parked.record, parked.error)
        finally:
            parked.trying = False  # (parked again, it is a new entry)
            self.wake()

    def _parked_only_left(self) -> bool:
        """Whether the backlog holds nothing but parked records, none being tried."""
        return (
            bool(self._parked)
            and self._backlog.depth <= len(self._parked)
            and not self._pending
            and not self._probing
            and not any(self._owed(parked) for parked in self._parked.values())
        )

    def _owed(self, parked: _Parked) -> bool:
        """Whether a stop still waits for ``parked``: its try being made or still owed
        (drain), or the last copy of its dead letter that may land yet (a stop that
        ended meanwhile kept the record, and its next start a second dead letter)."""
        return parked.trying or parked.retry_at == 0.0 or parked.copy_in_flight

    async def _set_aside(
        self, record: QueuedRecord, error: BridgeError
    ) -> tuple[bool, asyncio.Future[Any] | None]:
        """A record Kafka will never take (too large for the topic) must not block the
        ones behind it: it goes to the dead-letter topic, or, if even that refuses it,
        is dropped with an error. Says whether it may leave the backlog and, when not,
        the landing of a dead-letter copy that timed out but may still land."""
        original = record.destination
        if self._deadletter_topic and original.topic != self._deadletter_topic:
            try:
                await self._publisher.publish(
                    set_aside(original, error.detail, self._deadletter_topic)
                )
            except PayloadTooLarge:
                pass
            except BridgeError as exc:
                landing = exc.landing if isinstance(exc, PublishTimeout) else None
                # At WARNING when it is parked, at DEBUG at each retry after: one line
                # per parked record every 10 s flooded the log while the dead-letter
                # topic took nothing (a review); bridge_dead_letters_waiting counts them.
                log.log(
                    logging.DEBUG if record.seq in self._parked else logging.WARNING,
                    "cannot set aside a record Kafka refused yet (key %s for %s; it waits, "
                    "its topic going on, and is tried again): %s",
                    original.key.decode(errors="replace"),
                    original.topic,
                    exc.detail,
                )
                return False, landing
            else:
                self._say_set_aside(original, error)
                return True, None
        log.error(
            "Kafka refused the record with key %s for %s (%s) and it cannot be kept as a "
            "dead letter either: dropped",
            original.key.decode(errors="replace"),
            original.topic,
            error.detail,
        )
        self._metrics.dropped_records.inc()
        self.dropped += 1
        return True, None

    def _say_set_aside(self, original: Destination, error: BridgeError) -> None:
        """Log and count a record Kafka refused for good, kept as a dead letter."""
        log.error(
            "Kafka refused the record with key %s for %s (%s); it is on %s",
            original.key.decode(errors="replace"),
            original.topic,
            error.detail,
            self._deadletter_topic,
        )
        self._metrics.dead_letters.labels(KAFKA_REJECTED).inc()
