"""Operator tools against Kafka: create and list topics, tail what arrives.

Not on the request path; kept apart from :mod:`bridge.publisher` so the hot
path's module stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import heapq
import logging
import re
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, TextIO
from urllib.parse import quote

import aiokafka.client
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)
from aiokafka.protocol.metadata import MetadataRequest

from bridge import publisher as publisher_module
from bridge.auth import tokens_redactor
from bridge.config import Settings
from bridge.deadletter import SET_ASIDE_HEADERS, delivery_from_dead_letter
from bridge.errors import BridgeError, ConfigError, PublishTimeout
from bridge.geins import ENTITY_ACTIONS
from bridge.logs import printable
from bridge.metrics import Metrics
from bridge.pipeline import parse_and_route
from bridge.publisher import KafkaPublisher, kafka_client_options, landed
from bridge.redaction import MARKER, Redactor
from bridge.routing import TOPIC_NAME, Destination, Router

log = logging.getLogger(__name__)

DEFAULT_REPLICATION_CAP = 3
#: Kafka's default max.message.bytes (the brokers' message.max.bytes), which the
#: default BRIDGE_MAX_BODY_BYTES fits.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588
_TOPIC_EXISTS = TopicAlreadyExistsError.errno
_NOT_AUTHORIZED = TopicAuthorizationFailedError.errno
_TIMED_OUT = RequestTimedOutError.errno

#: Set while a reader's client asks Kafka for metadata: see reader().
_READING_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("reading_only", default=False)


class _MetadataRequestOfAReader(MetadataRequest):  # type: ignore[misc]  # aiokafka ships no types
    """aiokafka's metadata request, asking Kafka not to create the topics it names
    when a reader's client sends it (aiokafka always asks it to, and offers no
    setting)."""

    def __init__(
        self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None
    ) -> None:
        if _READING_ONLY.get():
            allow_auto_topic_creation = False
        super().__init__(topics, allow_auto_topic_creation)


# The name aiokafka's client builds its requests with; the same class as before for
# every other client (the bridge's producer relies on creation on first use).
aiokafka.client.MetadataRequest = _MetadataRequestOfAReader


def reader(options: dict[str, Any]) -> AIOKafkaConsumer:
    """A consumer for the operator commands, which only read (tail, dead-letter list
    and replay), outside any group.

    It creates no topic: a consumer asks Kafka for the metadata of the topics it is
    assigned, which a broker that creates topics on first use (Kafka's default) took
    as a request to create one deleted meanwhile, with the broker's partitions and
    replicas rather than the bridge's (a running tail brought back a topic an operator
    had just deleted). And where retention deleted the records ahead of its position,
    it goes on from the oldest left (aiokafka's default jumped to the end, silently
    skipping every record still there). A fetch waits for new records at most half
    the request timeout, so that its answer comes within it."""
    fetch_wait_ms = max(1, min(500, options.get("request_timeout_ms", 40_000) // 2))
    consumer = AIOKafkaConsumer(
        **options,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_wait_ms,
    )
    client = consumer._client
    update = client._metadata_update

    async def update_without_creating(cluster: Any, topics: Any) -> Any:
        reading = _READING_ONLY.set(True)
        try:
            return await update(cluster, topics)
        finally:
            _READING_ONLY.reset(reading)

    client._metadata_update = update_without_creating
    return consumer


def known_topics(router: Router) -> list[str]:
    """Every topic the known Geins entity/action pairs map to (default account/environment)."""
    return router.known_topics([(e, a) for e, acts in ENTITY_ACTIONS.items() for a in acts])


def default_topics(settings: Settings, router: Router) -> list[str]:
    """What ``bridge topics create`` and BRIDGE_CREATE_TOPICS make: the known topics and
    the dead-letter topic (when dead letters are kept). Without the latter, a broker
    that does not create topics on first use would answer every refused delivery 503."""
    topics = known_topics(router)
    if settings.deadletter_topic and settings.deadletter_topic not in topics:
        topics.append(settings.deadletter_topic)
    return topics


def topic_configs(settings: Settings) -> dict[str, str]:
    """The settings of the topics the bridge creates that differ from Kafka's defaults:
    a max.message.bytes that takes the largest record it sends, when BRIDGE_MAX_BODY_BYTES
    was raised past what the default takes. Without it, a durable or memory bridge
    answered 202 for a large event that Kafka then refused, and its dead letter, as
    large and more, was refused too: dropped (a new user's review)."""
    largest = settings.kafka_max_request_size()
    if largest <= KAFKA_DEFAULT_MAX_MESSAGE_BYTES:
        return {}  # the broker's own setting applies, as for any topic
    return {"max.message.bytes": str(largest)}


async def _max_message_bytes(admin: AIOKafkaAdminClient, topics: Sequence[str]) -> dict[str, int]:
    """The max.message.bytes of each of ``topics`` that Kafka tells (none it may not
    describe to this client, or does not know)."""
    if not topics:
        return {}
    wanted = {"max.message.bytes": None}
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, wanted) for t in topics]
        )
    except KafkaError as exc:  # only a check: the topics are there
        log.debug("cannot describe the topics' configs: %r", exc)
        return {}
    limits: dict[str, int] = {}
    for response in responses:
        for error, _, _, name, entries, *_ in response.resources:
            for entry in entries if error == 0 else ():
                if entry[0] == "max.message.bytes" and entry[1]:
                    limits[name] = int(entry[1])
    return limits


class TopicsNotCreated(KafkaError):  # type: ignore[misc]  # aiokafka ships no type information
    """Kafka refused to create some of the topics; ``results`` holds every topic's
    outcome ("created", "exists" or "failed: why"), the others were made."""

    def __init__(self, results: dict[str, str]) -> None:
        self.results = results
        super().__init__(
            "; ".join(
                f"creating topic {name} {result}"
                for name, result in sorted(results.items())
                if result.startswith("failed")
            )
        )


@contextlib.asynccontextmanager
async def _admin(
    options: dict[str, Any], start_within: float | None = None
) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed however its use ends: one whose start failed or
    timed out kept its connections and its tasks."""
    admin = AIOKafkaAdminClient(**options)
    try:
        async with asyncio.timeout(start_within):
            await admin.start()
        yield admin
    finally:
        await admin.close()


async def create_topics(settings: Settings, topics: Sequence[str]) -> dict[str, str]:
    """Create ``topics`` if missing. Returns topic -> "created" | "exists"; raises
    :class:`TopicsNotCreated` (with every outcome) when some could not be created.

    Without a configured replication factor, uses min(3, number of brokers up), so a
    one-broker development cluster and a production cluster both get a sensible value
    (see _say_if_brokers_are_down).
    """
    async with _admin(kafka_client_options(settings), settings.kafka_connect_timeout) as admin:
        replication = settings.topic_replication_factor
        up: set[int] = set()  # the brokers up, when they choose the replication factor
        if replication is None:
            up = {broker["node_id"] for broker in (await admin.describe_cluster())["brokers"]}
            replication = min(DEFAULT_REPLICATION_CAP, len(up))
        configs = topic_configs(settings)
        response = await admin.create_topics(
            [
                NewTopic(t, settings.topic_partitions, replication, topic_configs=configs)
                for t in dict.fromkeys(topics)  # Kafka refuses a request naming one twice
            ],
            # how long Kafka may wait for the creation to end before it answers: well
            # within the client's wait for that answer, so that a slow creation is told
            # topic by topic rather than as a request timed out
            timeout_ms=_creation_wait_ms(settings),
        )
        results = _outcomes(response.topic_errors)
        denied = [name for name, code, *_ in response.topic_errors if code == _NOT_AUTHORIZED]
        unfinished = [name for name, code, *_ in response.topic_errors if code == _TIMED_OUT]
        if denied:
            # Kafka answers "not authorized" before it looks whether the topic exists:
            # where CREATE is someone else's, the topics made by them are no failure.
            present = await _topics_there(admin)
            results.update({name: "exists" for name in denied if name in present})
        if unfinished:
            # Kafka goes on creating what it did not finish within the wait (a busy
            # controller): "failed" of topics that were then made failed a deploy step.
            made = await _appeared(admin, unfinished, settings.kafka_request_timeout)
            for name in unfinished:
                results[name] = (
                    "created"
                    if name in made
                    else "failed: Kafka had not finished creating it (it may yet: run "
                    "bridge topics create again to see)"
                )
        if configs:  # made before with a smaller limit, perhaps
            largest = settings.kafka_max_request_size()
            existing = [name for name, result in results.items() if result == "exists"]
            for name, limit in (await _max_message_bytes(admin, existing)).items():
                if limit < largest:
                    results[name] = (
                        f"exists: its max.message.bytes, {limit}, is under the {largest} "
                        "bytes of the largest record BRIDGE_MAX_BODY_BYTES lets in; raise it, "
                        "or Kafka refuses events that large"
                    )
        created = sum(result == "created" for result in results.values())
        if created and settings.topic_replication_factor is None:
            await _say_if_brokers_are_down(admin, up, created)
        if any(result.startswith("failed") for result in results.values()):
            raise TopicsNotCreated(results)
        return results


def _outcomes(topic_errors: Sequence[Any]) -> dict[str, str]:
    """Each topic's outcome as CreateTopics answered it: created, exists or failed."""
    results: dict[str, str] = {}
    for name, code, *rest in topic_errors:
        if code == 0:
            results[name] = "created"
        elif code == _TOPIC_EXISTS:
            results[name] = "exists"
        else:
            results[name] = f"failed: {rest[0] if rest and rest[0] else f'error code {code}'}"
    return results


def _creation_wait_ms(settings: Settings) -> int:
    """How long Kafka may take to create topics before it answers: half of
    BRIDGE_KAFKA_REQUEST_TIMEOUT, the other half for the answer to come."""
    return max(1, int(settings.kafka_request_timeout * 500))


async def _appeared(admin: AIOKafkaAdminClient, topics: list[str], within: float) -> set[str]:
    """Those of ``topics`` Kafka lists within ``within`` seconds (asked twice a second)."""
    until = time.monotonic() + within
    while True:
        present = await _topics_there(admin)
        if set(topics) <= present or time.monotonic() >= until:
            return present & set(topics)
        await asyncio.sleep(0.5)


async def _topics_there(admin: AIOKafkaAdminClient) -> set[str]:
    """The topics Kafka lists to this client (none when it does not answer)."""
    try:
        return set(await admin.list_topics())
    except (KafkaError, OSError, TimeoutError) as exc:  # only a check
        log.debug("cannot list the topics: %r", exc)
        return set()


async def _say_if_brokers_are_down(admin: AIOKafkaAdminClient, up: set[int], created: int) -> None:
    """A WARNING when topics were just created with fewer than 3 replicas while brokers
    that hold replicas of other topics are down: min(3, brokers up) then gave them fewer
    replicas than the cluster has brokers, for good (a reviewer's 3-broker cluster with
    one stopped got factor 2, reported as created)."""
    replication = min(DEFAULT_REPLICATION_CAP, len(up))  # what they were created with
    if replication >= DEFAULT_REPLICATION_CAP:
        return
    try:
        topics = await admin.describe_topics()
    except (KafkaError, OSError, TimeoutError) as exc:  # only a check: they were created
        log.debug("cannot describe the topics: %r", exc)
        return
    holding = {
        replica
        for topic in topics
        for partition in topic["partitions"]
        for replica in partition["replicas"]
    }
    down = sorted(holding - up)
    if down:
        log.warning(
            "%d topics created with replication factor %d, the number of brokers up: "
            "brokers %s, which hold replicas, are down; set BRIDGE_TOPIC_REPLICATION_FACTOR "
            "to choose it (Kafka refuses a factor over the brokers up)",
            created,
            replication,
            ", ".join(map(str, down)),
        )


async def list_topics(settings: Settings) -> list[str]:
    async with _admin(kafka_client_options(settings), settings.kafka_connect_timeout) as admin:
        return sorted(t for t in await admin.list_topics() if not t.startswith("__"))


async def read_to_end(
    client_options: dict[str, Any], topics: Sequence[str] | None = None, *, prefix: str = ""
) -> list[Any]:
    """Every record now on ``topics`` (or on every topic starting with ``prefix``).

    Reads up to the end offsets seen at the start: it returns exactly what was
    acknowledged before the call and never waits for records that may not come.
    """
    async with _admin(client_options) as admin:
        described = await admin.describe_topics(list(topics) if topics is not None else None)
    partitions = sorted(
        TopicPartition(t["topic"], p["partition"])
        for t in described
        if t["error_code"] == 0 and t["topic"].startswith(prefix)
        for p in t["partitions"]
    )
    if not partitions:
        return []
    consumer = reader(client_options)
    await consumer.start()
    try:
        start = await consumer.beginning_offsets(partitions)
        end = await consumer.end_offsets(partitions)
        spans = {tp: (start[tp], end[tp]) for tp in partitions}
        records = await read_spans(consumer, spans)
        return sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
    finally:
        await stop_consumer(consumer)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, without the CancelledError aiokafka 0.14 raises out of it when
    a fetch was in flight: its fetcher's close awaits the fetch tasks it cancels (aiokafka
    issue 647). Kafka going away while ``deadletter list`` read made that a traceback in
    place of "cannot talk to Kafka". This task's own cancellation (Ctrl-C) goes on."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def read_spans(
    consumer: AIOKafkaConsumer, spans: dict[TopicPartition, tuple[int, int]]
) -> list[Any]:
    """The records at offsets [first, stop) of each partition, all partitions read at
    once and held (the dead letters are read a chunk at a time instead: see
    :func:`dead_letters`). ``stop`` must not be past the partition's end offset, or
    this waits for records that may never come.
    """
    todo = {tp: span for tp, span in spans.items() if span[0] < span[1]}
    if not todo:
        return []
    consumer.assign(sorted(todo))
    for tp, (first, _) in todo.items():
        consumer.seek(tp, first)
    kept: list[Any] = []
    while todo:
        for tp, batch in (await consumer.getmany(*todo, timeout_ms=500)).items():
            first, stop = todo[tp]
            kept.extend(r for r in batch if first <= r.offset < stop)
        for tp in [tp for tp in todo if await consumer.position(tp) >= todo[tp][1]]:
            # Done with it: a fetch of what lies beyond would only be thrown away.
            consumer.pause(tp)
            del todo[tp]
    return kept


def text(value: bytes | None) -> str:
    """A record's key, value or header value as text; Kafka allows null for each."""
    return "<none>" if value is None else value.decode(errors="replace")


def format_record(record: Any) -> str:
    """One consumed record as a block of text a person can read: a line per header
    and one for the value, whatever they hold (see :func:`shown`)."""
    lines = [f"--- {record.topic} [{record.partition}] @{record.offset}  key={text(record.key)}"]
    lines += [f"  {name}: {text(value)}" for name, value in record.headers]
    lines.append(f"  {text(record.value)}")
    return shown(lines)


def shown(lines: Sequence[str]) -> str:
    """``lines`` for a terminal: what senders wrote (a body, a key, a path) has its
    non-printable characters written as Python escapes, so that a pretty-printed body
    keeps to its line and no escape sequence reaches the operator's terminal."""
    return "\n".join(printable(line) for line in lines)


#: How often ``bridge tail`` looks for new topics (and partitions) to follow.
TAIL_DISCOVERY_SECONDS = 2.0


async def tail(
    settings: Settings,
    topics: Sequence[str],
    *,
    pattern: str | None,
    from_beginning: bool,
    limit: int | None,
    out: TextIO | None = None,
    as_json: bool = False,
) -> int:
    """Print records as they arrive until interrupted or ``limit`` records were shown
    (as text for people, or ``as_json``, a line of JSON each).

    With ``pattern``, the records of every topic it matches (from the start of the
    name, as Kafka consumers match) and of the ``topics`` named as well.

    The partitions are assigned here rather than by a pattern subscription: without a
    consumer group aiokafka resets the position of every partition whenever a topic
    appears, so a topic created while tailing lost its first records (or, from the
    beginning, every topic was printed again). Partitions there at the start begin
    at their end (or beginning); those that appear later, at their beginning, since
    everything on them arrived after the start.
    """
    subscription = re.compile(checked_pattern(pattern)) if pattern is not None else None
    named = set(topics)

    def wanted(topic: str) -> bool:
        return topic in named or bool(subscription and subscription.match(topic))

    describe = record_json if as_json else format_record
    options = kafka_client_options(settings)
    admin = AIOKafkaAdminClient(**options)
    consumer = reader(options)
    shown = 0
    try:
        async with asyncio.timeout(settings.kafka_connect_timeout):
            await admin.start()
            await consumer.start()
        follow = _Follower(admin, consumer, wanted, settings.kafka_connect_timeout)
        await follow.look(new_at_end=not from_beginning)
        follow.say_what_is_missing(topics, pattern)
        looked = time.monotonic()
        while limit is None or shown < limit:
            if time.monotonic() - looked >= TAIL_DISCOVERY_SECONDS:
                await follow.look_again()
                looked = time.monotonic()
            if not follow.assigned:
                await asyncio.sleep(TAIL_DISCOVERY_SECONDS)
                continue
            batches = await consumer.getmany(timeout_ms=500)
            for record in (r for tp in sorted(batches) for r in batches[tp]):
                print(describe(record), file=out or sys.stdout, flush=True)
                shown += 1
                if limit is not None and shown >= limit:
                    break
    finally:
        await stop_consumer(consumer)
        await admin.close()
    return shown


class _Follower:
    """The partitions ``bridge tail`` follows: those of the topics it wants, now."""

    def __init__(
        self,
        admin: AIOKafkaAdminClient,
        consumer: AIOKafkaConsumer,
        wanted: Callable[[str], bool],
        timeout: float,
    ) -> None:
        self._admin = admin
        self._consumer = consumer
        self._wanted = wanted
        self._timeout = timeout
        self.assigned: set[TopicPartition] = set()
        self._failing = False  # the last look failed: said once, until one works again
        self._looked = False  # a look was made: the topics of later ones are new

    async def look_again(self) -> None:
        """Look for new topics while tailing. A look Kafka does not answer in time (a
        broker stalled a few seconds) is tried again at the next one: it ended the
        tail, exit 1, which runs until interrupted."""
        try:
            await self.look(new_at_end=False)
        except (KafkaError, OSError, TimeoutError) as exc:
            if not self._failing:
                log.warning(
                    "cannot look for new topics now (%s); the tail goes on and looks again",
                    str(exc) or f"no answer within {self._timeout:g} s",
                )
            self._failing = True
        else:
            if self._failing:
                log.info("looking for new topics again")
            self._failing = False

    def say_what_is_missing(self, topics: Sequence[str], pattern: str | None) -> None:
        """After the first look: name each topic named that is not there, and a pattern
        no topic matches. A misspelt topic waited in silence, as for a quiet one."""
        followed = {tp.topic for tp in self.assigned}
        for topic in topics:
            if topic not in followed:
                log.warning(
                    "topic %s does not exist (yet): waiting for it (bridge topics list "
                    "shows those there are)",
                    topic,
                )
        if pattern is not None and not any(re.match(pattern, topic) for topic in followed):
            log.warning("no topic matches %s (yet): waiting for one", pattern)

    async def look(self, *, new_at_end: bool) -> None:
        """Assign the partitions of the topics wanted now. Those already assigned keep
        their position; new ones start at their beginning, or (``new_at_end``, for the
        first look of a tail that is not from the beginning) at their end."""
        looked, self._looked = self._looked, True
        async with asyncio.timeout(self._timeout):
            described = await self._admin.describe_topics()  # all topics: creates none
            now = {
                TopicPartition(t["topic"], p["partition"])
                for t in described
                if t["error_code"] == 0 and not t["is_internal"] and self._wanted(t["topic"])
                for p in t["partitions"]
            }
            if now == self.assigned:
                return
            new = now - self.assigned
            consumer = self._consumer
            kept = {tp: await consumer.position(tp) for tp in self.assigned & now}
            consumer.assign(sorted(now))
            for tp, offset in kept.items():
                consumer.seek(tp, offset)
            if looked:  # said, so that one a warning said was missing shows it came
                for topic in sorted({tp.topic for tp in new} - {tp.topic for tp in self.assigned}):
                    log.info("following new topic %s", topic)
            if new and new_at_end:
                for tp, offset in (await consumer.end_offsets(sorted(new))).items():
                    consumer.seek(tp, offset)
            elif new:
                await consumer.seek_to_beginning(*new)
            self.assigned = now


def checked_pattern(pattern: str) -> str:
    """``pattern``, or ConfigError (exit 2) if it is no regular expression. Alone: the
    topics named beside it are matched by name (joined into one pattern, a global
    flag such as ``(?i)`` came in the middle, which Python refuses: a traceback)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--pattern {pattern!r} is not a regular expression: {exc}") from None
    return pattern


def _header(record: Any, name: str) -> str:
    """The header's value as text: "" when there is none, ``<none>`` when it is null."""
    for key, value in record.headers:
        if key == name:
            return text(value)
    return ""


def position(record: Any) -> str:
    """Where a record is on its topic, ``[partition]@offset`` as ``bridge tail`` shows it
    (an offset alone names one record per partition)."""
    return f"[{record.partition}]@{record.offset}"


def describe_dead_letter(record: Any) -> str:
    """Two lines per dead letter: where it is, when, its key, why it was refused; then
    the request it came from (or, for an event Kafka refused, the topic it was for) and
    what it held."""
    body = record.value.decode(errors="replace") if record.value else ""
    excerpt = body if len(body) <= 80 else body[:77] + "..."
    # A kafka_rejected dead letter is the event's record: no request headers. Its
    # time is then Kafka's, and its origin the topic it was refused on.
    when = _header(record, "x-bridge-received-at") or kafka_time(record.timestamp) or "-"
    method, query = _header(record, "x-bridge-method"), _header(record, "x-bridge-query")
    # The path as a URL gives it (it is kept decoded): a '?' or a space in a segment
    # would read as something else pasted back.
    path = quote(_header(record, "x-bridge-path"), safe="/" + MARKER)
    origin = (
        f"{method} {path}{'?' + query if query else ''}"
        if method
        else f"event for {_header(record, 'x-bridge-original-topic') or '?'}"
    )
    return shown(
        [
            f"{position(record):<9} {when:32} key={text(record.key)}  "
            f"{_header(record, 'x-bridge-reason')}: {_header(record, 'x-bridge-detail')}",
            f"          {origin}  {excerpt}",
        ]
    )


def kafka_time(timestamp_ms: object) -> str | None:
    """A record's timestamp as an ISO 8601 UTC time; None when it has none (-1) or one
    no date holds (a producer may set any, year 10000 and beyond)."""
    if not isinstance(timestamp_ms, int) or timestamp_ms < 0:
        return None
    try:
        when = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return when.isoformat()


def record_json(record: Any) -> str:
    """A record as one line of JSON, for a script (``tail --json``, ``deadletter list
    --json``): as Kafka holds it, its key, header values and value as text (bytes that
    are not UTF-8 as U+FFFD, as the text lines show them), null where Kafka has none."""

    def as_text(value: bytes | None) -> str | None:
        return None if value is None else value.decode(errors="replace")

    timestamp = record.timestamp
    return orjson.dumps(
        {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": kafka_time(timestamp),
            "timestamp_ms": timestamp if isinstance(timestamp, int) else None,
            "key": as_text(record.key),
            "headers": [[name, as_text(value)] for name, value in record.headers],
            "value": as_text(record.value),
        }
    ).decode()


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterQuery:
    """Which dead letters a command wants; an empty field does not narrow the choice.

    ``offsets`` are (partition or None, offset) as ``--offset`` gives them: None only
    on a topic of one partition, where an offset alone names one record.
    """

    offsets: Sequence[tuple[int | None, int]] = ()
    keys: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()

    def wants(self, record: Any) -> bool:
        """Whether ``record`` has one of the keys and one of the reasons (offsets are
        sought, not matched). A key is matched as it is and as list shows it (escaped:
        `order\\xa042` for a no-break space), so that one copied from list matches."""
        if self.keys and self.keys.isdisjoint(key_forms(record.key)):
            return False
        if not self.reasons:
            return True
        reason = dict(record.headers).get("x-bridge-reason")
        return reason is not None and reason.decode("utf-8", "replace") in self.reasons


def key_forms(key: bytes | None) -> set[str]:
    """A record's key as ``--key`` may give it: its text, and that text as the
    commands show it (:func:`shown`)."""
    as_text = text(key)
    return {as_text, printable(as_text)}


#: How many records reading the dead letters takes from aiokafka at a time, for one
#: partition: what it holds of each partition, on top of aiokafka's fetch buffer.
DEAD_LETTER_CHUNK = 100


async def dead_letters(settings: Settings, query: DeadLetterQuery) -> AsyncGenerator[Any, None]:
    """The dead letters ``query`` wants, oldest first (see :func:`_oldest_first`), each
    as soon as it is read: memory for a chunk of each partition, whatever the size of
    the topic. Close it (``contextlib.aclosing``) to stop early: that stops the consumer.

    Kafka gets three BRIDGE_KAFKA_CONNECT_TIMEOUTs to describe the topic, and as long for
    each chunk, not for the whole topic: whoever takes the records (a pager, a replay
    publishing each) takes its own time between chunks, which is not Kafka's.
    """
    options = kafka_client_options(settings)
    deadline = settings.kafka_connect_timeout * 3
    # Retention may delete the oldest records while a long replay still reads before
    # them: it goes on from the oldest left (see reader()).
    consumer = reader(options)
    try:
        async with _answered_within(deadline):
            partitions = await _dead_letter_partitions(settings, options)
            positions = _positions(settings.deadletter_topic, partitions, query.offsets)
            await consumer.start()
            spans = await _dead_letter_spans(consumer, partitions, positions)
        _assign(consumer, spans)
        streams = [
            _partition_records(consumer, tp, tp_spans, query.wants, deadline)
            for tp, tp_spans in spans.items()
        ]
        async for record in _oldest_first(streams):
            yield record
    finally:
        await stop_consumer(consumer)


@contextlib.asynccontextmanager
async def _answered_within(seconds: float) -> AsyncIterator[None]:
    """``asyncio.timeout(seconds)`` whose TimeoutError says how long Kafka had (a bare one
    says nothing)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise TimeoutError(f"no answer within {seconds:g} s") from None


async def _dead_letter_partitions(
    settings: Settings, options: dict[str, Any]
) -> list[TopicPartition]:
    """The partitions of the dead-letter topic; ConfigError when there is no such topic."""
    topic = settings.deadletter_topic
    async with _admin(options) as admin:
        # Describing a topic that does not exist creates it where the broker allows
        # that: a misspelt BRIDGE_DEADLETTER_TOPIC would silently become a topic.
        if topic not in await admin.list_topics():
            raise ConfigError(
                f"the dead-letter topic {topic} does not exist on Kafka at "
                f"{settings.kafka_bootstrap}, or Kafka's ACLs deny the bridge DESCRIBE on "
                "it (topics so denied are not listed): check BRIDGE_DEADLETTER_TOPIC (the "
                "topic is made by bridge topics create, or by the first dead letter kept)"
            )
        described = await admin.describe_topics([topic])
    return sorted(
        TopicPartition(topic, p["partition"])
        for t in described
        if t["error_code"] == 0
        for p in t["partitions"]
    )


def _positions(
    topic: str, partitions: Sequence[TopicPartition], offsets: Sequence[tuple[int | None, int]]
) -> list[tuple[TopicPartition, int]]:
    """The records ``--offset`` names, each once; an offset alone is partition 0, and
    refused on a topic of more partitions (it would name one record on each)."""
    positions: dict[tuple[TopicPartition, int], None] = {}  # a set that keeps the order
    for partition, offset in offsets:
        if partition is None and len(partitions) > 1:
            raise ConfigError(
                f"--offset {offset} names one record on each partition of "
                f"{topic} ({len(partitions)} partitions): "
                f"give PARTITION:OFFSET, such as 0:{offset}"
            )
        positions[TopicPartition(topic, partition or 0), offset] = None
    return list(positions)


async def _dead_letter_spans(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    positions: Sequence[tuple[TopicPartition, int]],
) -> dict[TopicPartition, list[tuple[int, int]]]:
    """What to read of each partition, as spans of offsets [first, stop) in offset
    order: the records at ``positions`` or, when there are none, all of the topic up to
    its end now (what arrives meanwhile is not waited for). A position no longer there
    (past retention), not there yet, or on a partition the topic lacks holds none."""
    start = await consumer.beginning_offsets(partitions)
    end = await consumer.end_offsets(partitions)
    if not positions:
        return {tp: [(start[tp], end[tp])] for tp in partitions if start[tp] < end[tp]}
    # A span per record named: seeking to each (a handful, typed by hand) fetches only
    # around it, where one pass from the lowest would read all in between.
    spans: dict[TopicPartition, list[tuple[int, int]]] = {}
    for tp, offset in sorted(positions):
        if tp in end and start[tp] <= offset < end[tp]:
            spans.setdefault(tp, []).append((offset, offset + 1))
    return spans


def _assign(consumer: AIOKafkaConsumer, spans: dict[TopicPartition, list[tuple[int, int]]]) -> None:
    """Give ``consumer`` the partitions to read, each at its first span. Seeking right
    away, before aiokafka's background fetcher runs, has it fetch from there at once
    rather than first look up a position of its own."""
    if not spans:
        return  # nothing to read: no partition to fetch from
    consumer.assign(sorted(spans))
    for tp, [(first, _), *_] in spans.items():
        consumer.seek(tp, first)


async def _partition_records(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    spans: Sequence[tuple[int, int]],
    keep: Callable[[Any], bool],
    deadline: float,
) -> AsyncIterator[Any]:
    """The records of ``tp`` in ``spans`` that ``keep`` accepts, in offset order, taken
    from aiokafka a chunk at a time: memory for one chunk however long the partition."""
    for first, stop in spans:
        if await _position(consumer, tp, deadline) != first:
            consumer.seek(tp, first)  # only when elsewhere: a seek drops what was fetched
        expected = first  # the offset of the next record, unless there is none at it
        while True:
            at = await _position(consumer, tp, deadline)
            if at > expected:  # said first: an offset reset may have jumped to the end
                await _say_if_deleted(consumer, tp, expected, min(at, stop), deadline)
            if at >= stop:
                break
            expected = at
            for record in await _next_chunk(consumer, tp, deadline):
                if expected < record.offset < stop:
                    await _say_if_deleted(consumer, tp, expected, record.offset, deadline)
                expected = record.offset + 1
                # A fetch returns whole batches: records past ``stop`` may come with it.
                if first <= record.offset < stop and keep(record):
                    yield record
    # Done with it: a fetch of what lies beyond would only be thrown away.
    consumer.pause(tp)


async def _say_if_deleted(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int, deadline: float
) -> None:
    """Reading skipped the offsets [start, end) of ``tp``: say so when Kafka deleted
    them meanwhile (retention; reading goes on from the oldest left), which went
    unsaid. Records compacted away and transaction markers leave such gaps too, and
    are not said: they were never there to show. An empty range (a fetch ran past the
    span's end, and reading was already beyond it) skipped nothing of the span."""
    if start >= end:
        return
    async with _answered_within(deadline):
        beginning: int = (await consumer.beginning_offsets([tp]))[tp]
    if beginning > start:
        log.warning(
            "[%d]@%d to [%d]@%d of %s were deleted while being read (retention, or "
            "records deleted by hand): they are not shown",
            tp.partition,
            start,
            tp.partition,
            min(beginning, end) - 1,
            tp.topic,
        )


async def _position(consumer: AIOKafkaConsumer, tp: TopicPartition, deadline: float) -> int:
    """``consumer.position(tp)`` within ``deadline`` seconds: after an offset reset
    (records deleted by retention while reading) aiokafka asks Kafka for it, and waits
    as long as Kafka takes to answer."""
    async with _unless_deleted(consumer, tp), _answered_within(deadline):
        position: int = await consumer.position(tp)
        return position


async def _next_chunk(consumer: AIOKafkaConsumer, tp: TopicPartition, deadline: float) -> list[Any]:
    """The next records of ``tp``, at most DEAD_LETTER_CHUNK of them; none when aiokafka
    moved past offsets that hold no record (transaction markers, records compacted
    away), which only the position shows: getmany waits for records. TimeoutError when
    Kafka sends neither within ``deadline`` seconds."""
    async with _unless_deleted(consumer, tp), _answered_within(deadline):
        at = await consumer.position(tp)
        while True:
            batches = await consumer.getmany(tp, timeout_ms=500, max_records=DEAD_LETTER_CHUNK)
            if batches or await consumer.position(tp) != at:
                return list(batches.get(tp, []))


@contextlib.asynccontextmanager
async def _unless_deleted(consumer: AIOKafkaConsumer, tp: TopicPartition) -> AsyncIterator[None]:
    """A TimeoutError reading ``tp`` as the ConfigError it is when its topic was deleted
    meanwhile: the fetches failed (no such topic), and the wait was said as Kafka not
    answering, though it answered every request (a review's find)."""
    try:
        yield
    except TimeoutError:
        if consumer.partitions_for_topic(tp.topic) is None:  # per the metadata refreshed
            raise ConfigError(
                f"the dead-letter topic {tp.topic} was deleted while being read"
            ) from None
        raise


async def _oldest_first(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The records of ``streams`` (one per partition, each in offset order) merged by
    (timestamp, partition, offset): each step yields the lowest of the streams' next
    records, as heapq.merge does, so that only one record per stream waits here.

    That is the order of the whole topic sorted, the order list promises, as long as
    timestamps do not go back within a partition. Where one does (dead letters kept by
    bridges whose clocks differ, or written by a producer that sets its own), that
    record is not moved up: it comes after those written before it on its partition,
    and each partition is always shown in the order it was written. Sorting it in among
    the others would take holding the whole topic, which is what this avoids.
    """
    waiting: list[tuple[tuple[int, int, int], Any, AsyncIterator[Any]]] = []
    for stream in streams:
        await _wait_next(waiting, stream)
    while waiting:
        _, record, stream = heapq.heappop(waiting)
        yield record
        await _wait_next(waiting, stream)


async def _wait_next(
    waiting: list[tuple[tuple[int, int, int], Any, AsyncIterator[Any]]],
    stream: AsyncIterator[Any],
) -> None:
    """Put the next record of ``stream`` on the heap ``waiting``, when it has one. The
    key is unique on a topic, so the heap never compares records or streams."""
    record = await anext(stream, None)
    if record is not None:
        key = (record.timestamp, record.partition, record.offset)
        heapq.heappush(waiting, (key, record, stream))


class Replayed(NamedTuple):
    """What became of one dead letter in a replay."""

    record: Any
    #: replayed: published (or would be, in a dry run); refused: parsing or routing
    #: still refuses it, or it is no dead letter the bridge wrote; unpublished:
    #: accepted, but Kafka did not take it
    result: Literal["replayed", "refused", "unpublished"]
    #: what its line says: "accepted", "resent", "still refused: why" or
    #: "not published: why"
    outcome: str
    topic: str | None = None  # where it went (or would go), when replayed


async def replay_dead_letters(
    settings: Settings,
    router: Router,
    records: AsyncIterable[Any],
    *,
    dry_run: bool,
    publishing: Callable[[Any], None] = lambda _: None,
) -> AsyncGenerator[Replayed, None]:
    """Run each dead letter through today's parsing and routing again, as ``records``
    gives them, yielding what became of each (:class:`Replayed`) in turn.
    The token checks of a delivery come with them (:func:`~bridge.pipeline.parse_and_route`),
    against the tokens the settings hold now: a dead letter that would still put one
    in a topic name, ``ce_type`` or key is still refused.

    Accepted ones are published with their original idempotency key (or, when the
    delivery had none, the dead letter's own key), so consumers see a replay of an
    event they already have, or a second replay, as a duplicate. The producer starts
    with the first record to publish: none when nothing is (a dry run, no match).
    ``publishing`` is told of each record as its publishing starts: one interrupted
    then may be on Kafka without its line.

    A topic Kafka has no metadata for within the publish timeout (missing, on a broker
    that does not create topics) is tried once: its other records are not published,
    at once, where each waited the whole timeout. Kafka not reachable (no metadata for
    STALE_AFTER_SECONDS) stops the replay with a ConnectionError after the record that
    found it so, where each record read ahead was tried in turn.
    """
    secrets = tokens_redactor(settings.tokens, settings.tokens_file)
    publisher: KafkaPublisher | None = None
    missing: set[str] = set()  # topics without metadata: see above
    stopped_early = True
    try:
        async for record in records:
            destination, outcome = _replayed(record, settings, router, secrets)
            if destination is None:
                yield Replayed(record, "refused", outcome)
                continue
            topic = destination.topic
            if dry_run:
                yield Replayed(record, "replayed", outcome, topic)
                continue
            if topic in missing:
                yield Replayed(record, "unpublished", _not_published(topic))
                continue
            publisher = publisher or await _started_publisher(settings)
            publishing(record)
            started = time.perf_counter()
            try:
                await publisher.publish(destination)
            except BridgeError as exc:
                unsaid = await _still_landing(exc, settings.publish_timeout)
                if unsaid is None:
                    yield Replayed(record, "replayed", outcome, topic)
                    continue
                if not publisher.connected:
                    yield Replayed(record, "unpublished", f"not published: {exc.detail}{unsaid}")
                    raise ConnectionError(
                        f"Kafka answered nothing for {publisher_module.STALE_AFTER_SECONDS:g} s "
                        "or more; the replay stopped"
                    ) from None
                # No metadata for the topic is a missing topic only if Kafka answered
                # meanwhile: the producer refreshes the metadata of the topics it
                # published to, so Kafka gone as a topic's first record went counted
                # as connected, and that topic, which exists, as missing.
                if (
                    publisher.ready_for(topic)
                    or not isinstance(exc, PublishTimeout)  # a refusal (an ACL): not missing
                    or not publisher.answered_since(started)
                ):
                    yield Replayed(record, "unpublished", f"not published: {exc.detail}{unsaid}")
                else:
                    missing.add(topic)
                    yield Replayed(record, "unpublished", _not_published(topic))
                continue
            yield Replayed(record, "replayed", outcome, topic)
        stopped_early = False
    finally:
        if publisher is not None:
            # Stopped early (Ctrl-C, SIGTERM, Kafka away): a flush to a Kafka that does
            # not answer held the summary for BRIDGE_SHUTDOWN_TIMEOUT (15 s), past the
            # 10 s a container gets to stop before SIGKILL. A record in flight is said
            # to be maybe on Kafka all the same.
            await publisher.stop(
                time.monotonic() + STOPPED_REPLAY_FLUSH_SECONDS if stopped_early else None
            )


async def _still_landing(exc: BridgeError, wait: float) -> str | None:
    """None if the record that failed with ``exc`` landed after all, within ``wait`` more
    seconds; else what its "not published" line adds. A record that timed out is still
    in the producer: "not published" of one that then landed (the flush at the end took
    it) made a second replay publish it twice."""
    landing = exc.landing if isinstance(exc, PublishTimeout) else None
    if landing is None:
        return ""
    await asyncio.wait([landing], timeout=wait)
    if landed(landing):
        return None
    return "" if landing.done() else f" (it may still reach Kafka: {MAYBE_ON_KAFKA})"


#: What a replay says of a record that may be on Kafka without its line.
MAYBE_ON_KAFKA = "a replay of it again is a duplicate with its key"
#: How long a replay that stopped early lets Kafka take what is in flight.
STOPPED_REPLAY_FLUSH_SECONDS = 2.0


def _not_published(topic: str) -> str:
    return (
        f"not published: Kafka has no topic {topic} (no metadata for it within "
        "BRIDGE_PUBLISH_TIMEOUT); create it (bridge topics create) and replay again"
    )


async def _started_publisher(settings: Settings) -> KafkaPublisher:
    """A publisher connected to Kafka; KafkaError when Kafka is not reachable."""
    publisher = KafkaPublisher(settings, Metrics())
    await publisher.start()
    if not publisher.connected:
        await publisher.stop()
        if publisher.denied is not None:  # Kafka answered: no broker missing
            raise ConfigError(publisher.denied)
        # As aiokafka's own clients fail in the other commands, so that the CLI says it
        # the same way (and asks whether the security settings are refused): "Kafka at
        # X: KafkaError: Kafka at X is not reachable" said it twice and named no check.
        raise KafkaConnectionError(f"Unable to bootstrap from {settings.kafka_bootstrap}")
    return publisher


def _replayed(
    record: Any, settings: Settings, router: Router, secrets: Redactor
) -> tuple[Destination | None, str]:
    if not _header(record, "x-bridge-reason"):  # the bridge writes it on every dead letter
        # Some other producer's record (a test message, say): replayed, one holding an
        # entity and action was published as an event.
        return None, "still refused: not a dead letter (no x-bridge-reason header)"
    original_topic = next(
        (text(v) for n, v in record.headers if n == "x-bridge-original-topic" and v), None
    )
    if original_topic:  # accepted, then refused by Kafka: resend as it was
        if not TOPIC_NAME.fullmatch(original_topic) or original_topic == settings.deadletter_topic:
            return None, (
                "still refused: not a dead letter the bridge can read "
                f"(x-bridge-original-topic {original_topic!r} is no event topic)"
            )
        headers = [(n, v) for n, v in record.headers if n not in SET_ASIDE_HEADERS]
        return Destination(original_topic, record.key, record.value or b"", headers), "resent"
    try:
        delivery = delivery_from_dead_letter(record.headers, record.value or b"")
    except (ValueError, TypeError, AttributeError) as exc:  # not UTF-8, a bad time or list
        # Not one the bridge wrote (it writes these headers as UTF-8): the run goes on.
        return None, f"still refused: not a dead letter the bridge can read ({exc})"
    # When the delivery had no usable key, the dead letter got a generated one: every
    # replay of it publishes with that key, for consumers to de-duplicate by.
    own_key = record.key.decode(errors="replace") if record.key else None
    try:
        _, destination = parse_and_route(
            delivery, router, secrets, strict_types=settings.strict_types, key=own_key
        )
    except BridgeError as exc:
        return None, f"still refused: {exc.reason} ({exc.detail})"
    return destination, "accepted"
