"""One delivery's way through the bridge, free of HTTP: parse, route, deliver.

The ingress hands in a :class:`~bridge.geins.Delivery` and gets back an
:class:`Accepted` or a :class:`~bridge.errors.BridgeError`. How an event is
made safe before the answer is the ack mode's business (see
:mod:`bridge.ackmodes`). Deliveries refused for their content are kept as dead
letters on the way out.

No webhook token goes further than the pipeline: a delivery with one in its path, or
whose entity, action or topic name would hold one, is refused (and kept as a dead
letter, the token left out), one whose idempotency key holds one is refused, and an
x-Timestamp or subject that holds one is not published as a header
(:func:`parse_and_route`, which ``bridge deadletter replay`` runs too). Each check costs
an accepted delivery a comparison of lengths (no text shorter than a token holds one),
then a cache look-up of text that repeats and is short, or a search.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from bridge.ackmodes import AckMode
from bridge.config import DEAD_LETTER_ROOM
from bridge.deadletter import dead_letter, delivery_key, set_aside
from bridge.errors import (
    KAFKA_REJECTED,
    BadIdempotencyKey,
    BridgeError,
    MalformedEventType,
    PayloadTooLarge,
    PublishTimeout,
    TokenInPath,
)
from bridge.geins import Delivery, Event, parse_delivery
from bridge.metrics import Metrics
from bridge.publisher import check_record_size, landed
from bridge.redaction import Redactor
from bridge.routing import Destination, Router, plain_letters

log = logging.getLogger(__name__)

#: How many lost dead letters' keys are remembered, so that each counts once.
DROPPED_LETTERS_KEPT = 10_000

#: Dead letters are de-duplicated by their delivery's idempotency key, kept apart from
#: the keys of events (an idempotency key never holds a NUL).
DEAD_LETTER_KEYS = "\x00dead-letter:"
#: Where a token goes, for the details of the refusals of a token anywhere else.
WHERE_TOKENS_GO = (
    "a token goes in the Authorization header ('Authorization: Bearer <token>') "
    "or in the token query parameter ('?token=<token>')"
)


@dataclass(slots=True)  # read-only; not frozen for speed (see bridge.geins.Delivery)
class Accepted:
    """The event is safe by the guarantee ``ack`` names (or was already, if ``duplicate``)."""

    event: Event
    topic: str
    ack: str
    duplicate: bool


class Pipeline:
    """Parse, route and deliver one delivery."""

    def __init__(
        self,
        router: Router,
        ack_mode: AckMode,
        metrics: Metrics,
        *,
        strict_types: bool,
        deadletter_topic: str,
        secrets: Redactor,
        record_limit: int,
        dedup: bool = True,
    ) -> None:
        self.router = router
        self.ack_mode = ack_mode
        self._metrics = metrics
        self._strict_types = strict_types
        self._deadletter_topic = deadletter_topic
        self._secrets = secrets  # the authenticator's: it learns each token as it is used
        # Settings.max_event_record_bytes(): the largest record an accepted event makes
        # (what the topics must take), less the room the headers of a dead letter need
        # should Kafka refuse it for good; a dead letter may take that room.
        self._record_limit = record_limit
        self._letter_limit = record_limit + DEAD_LETTER_ROOM
        # The keys of the dead letters lost, most recent last (counted once each)
        self._dropped_letters: OrderedDict[str, None] = OrderedDict()
        # The landing (a batch's future) of dead letters answered 503 -> the keys of
        # those whose landing is watched (to count it)
        self._watched_landings: weakref.WeakKeyDictionary[asyncio.Future[Any], set[str]] = (
            weakref.WeakKeyDictionary()
        )
        # False (BRIDGE_DEDUP_WINDOW=0): no mode sees a key to de-duplicate by, not even
        # two copies arriving at once.
        self._dedup = dedup

    async def handle(self, delivery: Delivery) -> Accepted:
        started = time.perf_counter()
        try:
            event, destination = parse_and_route(
                delivery, self.router, self._secrets, self._strict_types
            )
        except BridgeError as exc:
            if exc.content_rejection:
                await self._keep_dead_letter(delivery, exc)
            raise
        self._metrics.observe_stage("parse", time.perf_counter() - started)
        try:
            # before any mode takes it: one accepted could never be delivered
            check_record_size(destination, self._record_limit)
            dedup_key = event.key if self._dedup and not event.key_generated else None
            try:
                fresh = await self.ack_mode.deliver(destination, dedup_key)
            except PayloadTooLarge as refused:  # by Kafka, for good (only broker mode waits)
                await self._keep_refused_event(destination, dedup_key, refused)
                raise
        except BridgeError as exc:
            exc.event = event
            raise
        return Accepted(
            event=event, topic=destination.topic, ack=self.ack_mode.name, duplicate=not fresh
        )

    def event_of(self, delivery: Delivery) -> Event | None:
        """The event ``delivery`` makes (None if parsing refuses it), for the labels and
        log line of a delivery cut off by a stop: parsed again then, never on the way
        of one that is not."""
        try:
            event, _ = parse_and_route(delivery, self.router, self._secrets, self._strict_types)
        except BridgeError:
            return None
        return event

    async def _keep_refused_event(
        self, event: Destination, dedup_key: str | None, refusal: PayloadTooLarge
    ) -> None:
        """Keep an event Kafka refused as too large for its topic as a ``kafka_rejected``
        dead letter before its 413, as durable and memory modes do after their 202.

        When it cannot be kept now, the answer is 503 instead (the sender retries); a
        retry whose dead letter was kept already gets the 413 without a second one.
        """
        if not self._deadletter_topic or event.topic == self._deadletter_topic:
            return
        kept = await self._keep(
            set_aside(event, refusal.detail, self._deadletter_topic),
            dedup_key,
            KAFKA_REJECTED,
            f"the event is refused by Kafka ({refusal.detail})",
        )
        if kept is not None:
            where = self._deadletter_topic
            refusal.detail += f"; it is kept on {where}" if kept else f"; it is on {where} already"

    async def _keep_dead_letter(self, delivery: Delivery, error: BridgeError) -> None:
        """Keep the refused delivery with the guarantee of an event before its 4xx.

        When it cannot be kept now (a full spool, Kafka away in broker mode) the answer
        is that 503 instead, so that the sender retries and the dead letter is not lost.
        One that can never be kept (too large even for Kafka) is logged, and the 4xx
        goes out. A Geins retry of a refused delivery (the same idempotency key within
        the de-duplication window) is refused again but not kept twice.
        """
        if not self._deadletter_topic:
            return
        await self._keep(
            dead_letter(delivery, error, self._deadletter_topic, self._secrets),
            delivery_key(delivery, self._secrets) if self._dedup else None,
            error.reason,
            f"the delivery is refused ({error.reason}: {error.detail})",
        )

    async def _keep(
        self, letter: Destination, key: str | None, reason: str, refused: str
    ) -> bool | None:
        """Keep the dead letter ``letter`` (of ``reason``) with the guarantee of an
        event, once per ``key``: True when kept now, False when kept already, None when
        it can never be kept (logged). Raises the retriable BridgeError of a dead letter
        that cannot be kept now, its detail saying what was ``refused`` too."""
        try:
            check_record_size(letter, self._letter_limit)
            if key is None:
                await self.ack_mode.keep(letter)
            elif not await self.ack_mode.deliver(letter, DEAD_LETTER_KEYS + key):
                return False  # kept already, at the first attempt
        except BridgeError as exc:
            if not exc.retriable:
                log.error("could not keep a dead letter (%s): %s", reason, exc.detail)
                self._count_dropped(key)
                return None
            if isinstance(exc, PublishTimeout) and exc.landing is not None:
                self._count_if_it_lands(exc.landing, key, reason)
            exc.detail = (
                f"{refused} and cannot be kept as a dead letter now ({exc.detail}); retry later"
            )
            raise
        except Exception:
            log.exception("could not keep a dead letter (%s)", reason)
            self._count_dropped(key)
            return None
        self._metrics.dead_letters.labels(reason).inc()
        return True

    def _count_dropped(self, key: str | None) -> None:
        """Count a lost dead letter (as the drainer counts one), the first time the
        dead letter of ``key`` (None: no key to know it by) is lost only: a sender
        retrying its refused delivery loses no other record."""
        if key is not None:
            if key in self._dropped_letters:
                self._dropped_letters.move_to_end(key)
                return
            self._dropped_letters[key] = None
            if len(self._dropped_letters) > DROPPED_LETTERS_KEPT:
                self._dropped_letters.popitem(last=False)
        self._metrics.dropped_records.inc()

    def _count_if_it_lands(
        self, landing: asyncio.Future[Any], key: str | None, reason: str
    ) -> None:
        """Count a dead letter answered 503 (its publish timed out, broker mode) once
        Kafka takes it after all: the sender's retry then finds it kept already and
        counts nothing, so it was in Kafka and never counted. ``landing`` is its
        batch's: a retry that waited for the same record raises with it (counted once
        by its key), and so do other dead letters of the batch (each counted)."""
        if key is not None:
            watched = self._watched_landings.setdefault(landing, set())
            if key in watched:
                return
            watched.add(key)

        def count(done: asyncio.Future[Any]) -> None:
            if landed(done):
                self._metrics.dead_letters.labels(reason).inc()

        landing.add_done_callback(count)


def parse_and_route(
    delivery: Delivery,
    router: Router,
    secrets: Redactor,
    strict_types: bool,
    *,
    key: str | None = None,
) -> tuple[Event, Destination]:
    """The event of ``delivery`` and where it goes, or the BridgeError that refuses it:
    the bridge's parsing and routing with its token checks, for the deliveries it
    serves and the dead letters ``bridge deadletter replay`` runs again alike.

    No webhook token ``secrets`` knows goes further: a delivery with one in its path,
    or whose entity, action, topic name or idempotency key would hold one, is refused;
    an x-Timestamp or subject that holds one is left out of the event (it is no
    header then). ``key`` is the key of an event whose delivery has none (a replayed
    dead letter's own), instead of a new one.
    """
    checked = bool(secrets)  # without tokens (BRIDGE_ALLOW_UNAUTHENTICATED) none to find
    if checked:
        _check_path(delivery, secrets)
    event = parse_delivery(delivery, strict_types=strict_types, redact=secrets.redact)
    if key is not None and event.key_generated:
        event.key = key
    if checked:
        _check_event(event, secrets, router.template.fields)
    destination = router.route(event)
    if checked and secrets.in_topic(destination.topic):
        raise MalformedEventType(
            "the event's topic would be named after a webhook token (its account or "
            f"environment holds one): {WHERE_TOKENS_GO}"
        )
    return event, destination


def _check_path(delivery: Delivery, secrets: Redactor) -> None:
    """Refuse a delivery whose path holds a token, before it can name a topic. Its
    segments repeat from one delivery to the next: a cache look-up, when not shorter
    than a token. Checked together, as sent: a token holding a '/' (a base64 one)
    spans entity and action (each alone held none, and the event was published to
    geins.<first half>.<second half>), or ends in the trailing '/' the routes let go
    of (the rest of it named the topic, or the 422's detail quoted it)."""
    segments = delivery.path_segments
    if (
        segments is not None
        and len(segments) >= secrets.shortest
        and secrets.contains_cached(segments)
    ):
        raise TokenInPath(
            f"the URL path holds a webhook token: {WHERE_TOKENS_GO}, never in the path"
        )


def _names_a_token(text: str, secrets: Redactor) -> bool:
    """Whether an account or environment holds a token, as sent or as its topic name is
    made from it (bridge.routing.plain_letters)."""
    return secrets.contains_cached(text) or (
        not text.isascii() and secrets.contains_cached(plain_letters(text))
    )


def _check_event(event: Event, secrets: Redactor, in_topic: tuple[str, ...]) -> None:
    """Refuse an event whose entity or action holds a token (they name its topic, with
    most templates, and its ce_type), or its account or environment where ``in_topic``
    (the template's fields) names them, or whose idempotency key does (the record's key
    and ce_id); leave out an x-Timestamp or a subject (ce_subject) that holds one: they
    never refuse a delivery. Text shorter than any token is not looked at; the rest is
    cached but for the key and the subject (whose answers would not repeat)."""
    if secrets.in_topic(event.entity) or secrets.in_topic(event.action):
        raise MalformedEventType(
            f"the entity or action holds a webhook token: {WHERE_TOKENS_GO}, never in a "
            "name of the event"
        )
    shortest = secrets.shortest
    # As sent: made topic-safe and cut to 48 characters, a token with something before
    # it would leave only a part of it in the topic, which no check finds. And with its
    # letters made plain, as the topic name is: a token written with accents or in
    # full-width letters became most of one there (a review).
    account, environment = event.account, event.environment
    if (
        account is not None
        and len(account) >= shortest
        and "account" in in_topic
        and _names_a_token(account, secrets)
    ) or (
        environment is not None
        and len(environment) >= shortest
        and "environment" in in_topic
        and _names_a_token(environment, secrets)
    ):
        raise MalformedEventType(
            f"the account or environment holds a webhook token: {WHERE_TOKENS_GO}, never "
            "in a name of the event"
        )
    # x-Idempotency-Key and x-Timestamp are read a character a byte (latin-1), and
    # published as the bytes sent: a token is looked for in their UTF-8 reading too (the
    # tokens are UTF-8, and authentication compares the bytes).
    raw_key, timestamp, subject = event.raw_key, event.raw_timestamp, event.subject
    if (
        raw_key is not None
        and len(raw_key) >= shortest
        and (
            (not event.key_generated and secrets.contains(event.key))
            or (not raw_key.isascii() and secrets.contains_bytes(raw_key.encode("latin-1")))
        )
    ):
        raise BadIdempotencyKey(
            f"x-Idempotency-Key contains a webhook token: {WHERE_TOKENS_GO}, never in the key"
        )
    if (
        timestamp is not None
        and len(timestamp) >= shortest
        and (
            secrets.contains_cached(timestamp)
            or (not timestamp.isascii() and secrets.contains_bytes(timestamp.encode("latin-1")))
        )
    ):
        event.raw_timestamp = None  # its time, if it has one, is kept as ce_time
    if subject is not None and len(subject) >= shortest and secrets.contains(subject):
        event.subject = None  # the body, the event's data, still has it as sent
