"""Every Prometheus metric the bridge exposes, in its own registry.

Label values come only from fixed sets (the Geins entity/action table, error
reasons, outcomes), never from raw input, so a hostile sender cannot grow the
number of series. Other modules call the methods here instead of touching
prometheus-client themselves.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    exposition,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge import package_version
from bridge.errors import ALL_ERRORS, DEAD_LETTER_REASONS
from bridge.geins import ENTITY_ACTIONS, KNOWN_ACTIONS, Event

# Webhook handling takes well under a millisecond when nothing waits on Kafka:
# the default buckets (from 5 ms) would put everything in the first one.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# Auth and parse take a few microseconds each: below LATENCY_BUCKETS' first bound, a
# p99 of them was an interpolation inside one bucket, not a measurement.
STAGE_BUCKETS = (0.00001, 0.000025, 0.00005, *LATENCY_BUCKETS)

OUTCOMES = ("accepted", "duplicate", "rejected", "rate_limited", "unavailable", "error")
STAGES = ("auth", "parse", "spool_commit", "kafka_ack")
NONE_LABEL = "none"  # the request was refused before entity/action were known
OTHER_LABEL = "other"  # a well-formed name outside the known table
PUBLISH_ERRORS = ("timeout", "kafka_error", "too_large", "not_connected")

_ENTITY_LABELS = {name: name.lower() for name in ENTITY_ACTIONS}
CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST


class FastHistogram:
    """A histogram child without locks: the event loop is its only writer.

    prometheus-client guards every observation with a lock, which the profile
    showed on the per-request path. Here an observation is a bisect and two
    additions; :class:`FastCollector` turns the counts into the usual series.
    """

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value


class CounterReadAtScrape:
    """A counter kept elsewhere (a count in the spool's writer thread, say), read at
    each scrape as a Gauge's set_function is."""

    def __init__(self) -> None:
        self.read: Callable[[], float] = lambda: 0.0

    def set_function(self, read: Callable[[], float]) -> None:
        self.read = read


class FastCollector(Collector):
    """Exposes lock-free counters and histograms of the request path."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[str, tuple[str, ...], dict[tuple[str, ...], float]]] = {}
        self.histograms: dict[str, tuple[str, str | None, dict[str, FastHistogram]]] = {}
        self.counters_read: dict[str, tuple[str, CounterReadAtScrape]] = {}

    def counter(
        self, name: str, documentation: str, labels: tuple[str, ...] = ()
    ) -> dict[tuple[str, ...], float]:
        values: dict[tuple[str, ...], float] = {}
        self.counters[name] = (documentation, labels, values)
        return values

    def counter_read_at_scrape(self, name: str, documentation: str) -> CounterReadAtScrape:
        counter = CounterReadAtScrape()
        self.counters_read[name] = (documentation, counter)
        return counter

    def histogram(
        self,
        name: str,
        documentation: str,
        label: str | None,
        children: tuple[str, ...],
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> dict[str, FastHistogram]:
        by_label = {child: FastHistogram(buckets) for child in children}
        self.histograms[name] = (documentation, label, by_label)
        return by_label

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, labels, values) in self.counters.items():
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for label_values, value in list(values.items()):
                family.add_metric(list(label_values), value)
            yield family
        for name, (documentation, counter) in self.counters_read.items():
            yield CounterMetricFamily(name, documentation, value=counter.read())
        for name, (documentation, label, by_label) in self.histograms.items():
            histogram = HistogramMetricFamily(
                name, documentation, labels=[label] if label else None
            )
            for child, h in by_label.items():
                cumulative, buckets = 0, []
                for bound, count in zip((*h.buckets, math.inf), h.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
                histogram.add_metric([child] if label else [], buckets, h.sum)
            yield histogram


class Metrics:
    """The bridge's metrics; one instance per process (tests make their own)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # process_open_fds against process_max_fds, memory and CPU: file descriptors
        # running out was invisible (libuv closes what it cannot accept, silently; a
        # review), and the other process_* series are what dashboards expect.
        ProcessCollector(registry=registry)
        # What every request touches lives in a lock-free collector (see FastHistogram);
        # everything else uses prometheus-client as it comes.
        fast = FastCollector()
        registry.register(fast)
        self._requests = fast.counter(
            "bridge_requests",
            "Webhook deliveries handled, by entity, action and outcome.",
            ("entity", "action", "outcome"),
        )
        # The refusals before entity and action are known, there from the start: rate()
        # and increase() miss the first increment of a series that appears with it.
        for outcome in OUTCOMES[2:]:
            self._requests[(NONE_LABEL, NONE_LABEL, outcome)] = 0.0
        # So are the 5xx of each known event type (BridgeServerErrors' numerator): at
        # Geins' low, mixed traffic an outage whose failures were each of a type that
        # had not failed before showed no rate at all (31 types, 62 series). And their
        # acceptances (the ratios' denominators): the first deliveries after a start
        # counted no rate, and a few refusals among them read as all refused
        # (BridgeDeliveriesRefused pending in a test's healthy traffic).
        for entity, actions in ENTITY_ACTIONS.items():
            for action in actions:
                for outcome in ("accepted", "unavailable", "error"):
                    self._requests[(_ENTITY_LABELS[entity], action, outcome)] = 0.0
        self._durations = fast.histogram(
            "bridge_request_duration_seconds",
            # From the head, not the first byte: that is when the app gets the request
            # (the HTTP server's own refusals are timed from when it awaited the head).
            "Time from when the request head was read to the answer, by outcome "
            "(the HTTP server's own refusals, a 400, 405, 408, 414, 429, 431, 501 or 503: "
            "from when it began waiting for the head).",
            "outcome",
            OUTCOMES,
        )
        self._stages = fast.histogram(
            "bridge_stage_duration_seconds",
            "Time spent in each stage: auth, parse, spool_commit (one group commit), "
            "kafka_ack (hand-off to acknowledgement).",
            "stage",
            STAGES,
            STAGE_BUCKETS,
        )
        self._publish_duration = fast.histogram(
            "bridge_publish_duration_seconds",
            "Time from handing a record to the Kafka client to the broker's acknowledgement.",
            None,
            ("",),
        )[""]
        self._published = fast.counter("bridge_published_records", "Records acknowledged by Kafka.")
        self._published_bytes = fast.counter(
            "bridge_published_bytes", "Value bytes of the records acknowledged by Kafka."
        )
        self._published[()] = self._published_bytes[()] = 0.0
        self.rejections = Counter(
            "bridge_rejections",
            "Deliveries not accepted, by reason (4xx and 5xx).",
            ["reason"],
            registry=registry,
        )
        self.publish_errors = Counter(
            "bridge_publish_errors",
            "Failed attempts to get a record into Kafka (not lost records), by reason.",
            ["reason"],
            registry=registry,
        )
        self.duplicates = Counter(
            "bridge_duplicates",
            "Deliveries whose idempotency key was already accepted (answered 200, not published).",
            registry=registry,
        )
        self.dead_letters = Counter(
            "bridge_dead_letters",
            "Refused deliveries kept on the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.dropped_records = Counter(
            "bridge_dropped_records",
            "Records lost: accepted records Kafka refused for good (too large) that could "
            "not be kept as dead letters either, dead letters that could not be kept, and "
            "spooled events the spool could not read back (set aside in its file's table "
            "spool_unreadable). Should stay 0.",
            registry=registry,
        )
        self.spool_depth = Gauge(
            "bridge_spool_depth",
            "Accepted events waiting for Kafka (spool or memory queue).",
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "bridge_spool_bytes",
            "Bytes of the accepted events waiting for Kafka.",
            registry=registry,
        )
        self.spool_max_bytes = Gauge(
            "bridge_spool_max_bytes",
            "The most bytes of events that may wait for Kafka: BRIDGE_SPOOL_MAX_BYTES "
            "(durable) or BRIDGE_MEMORY_MAX_BYTES (memory); 0 in broker mode.",
            registry=registry,
        )
        self.spool_disk_free = Gauge(
            "bridge_spool_disk_free_bytes",
            "Free bytes on the spool's volume, for the bridge's user, plus the pages of "
            "the spool file that delivered events freed (durable mode; NaN in the other "
            "modes).",
            registry=registry,
        )
        self.spool_disk_free.set(math.nan)
        self.spool_oldest_age = Gauge(
            "bridge_spool_oldest_age_seconds",
            "Age of the oldest event waiting for Kafka (0 when none waits).",
            registry=registry,
        )
        self.topics_held = Gauge(
            "bridge_topics_held",
            "Topics whose waiting events are held back because Kafka cannot take them "
            "now (durable and memory modes, and a leftover spool drained in broker mode); "
            "the events of other topics go on.",
            registry=registry,
        )
        self.dead_letters_waiting = Gauge(
            "bridge_dead_letters_waiting",
            "Events Kafka refused for good (too large for their topic) whose dead letters "
            "cannot be kept yet (the dead-letter topic missing, denied or below its "
            "quorum): they wait in the backlog, tried again, while their topics go on.",
            registry=registry,
        )
        self.dedup_keys = Gauge(
            "bridge_dedup_keys",
            "Idempotency keys remembered for de-duplication (in memory, or in the spool "
            "in durable mode).",
            registry=registry,
        )
        self.dedup_keys_forgotten_early = fast.counter_read_at_scrape(
            "bridge_dedup_keys_forgotten_early",
            "Idempotency keys forgotten before BRIDGE_DEDUP_WINDOW ended because "
            "BRIDGE_DEDUP_MAX_KEYS (BRIDGE_SPOOL_MAX_KEYS in durable mode) newer ones "
            "came: a retry of one is published again. Should stay 0.",
        )
        self.unknown_types = Counter(
            "bridge_unknown_event_types",
            "Accepted deliveries whose entity/action is not in the known Geins table.",
            registry=registry,
        )
        self.generated_keys = Counter(
            "bridge_generated_keys",
            "Deliveries without x-Idempotency-Key, given a generated key.",
            registry=registry,
        )
        self.timestamp_fallbacks = Counter(
            "bridge_timestamp_fallbacks",
            "Deliveries whose x-Timestamp was missing or not RFC 3339 (received time used).",
            registry=registry,
        )
        self.inflight = Gauge(
            "bridge_inflight_requests",
            "Webhook requests being handled now.",
            registry=registry,
        )
        self.bodies_bytes = Gauge(
            "bridge_bodies_bytes",
            "Bytes of request bodies held by webhook requests in progress "
            "(BRIDGE_MAX_BODIES_BYTES caps them).",
            registry=registry,
        )
        self.open_connections = Gauge(
            "bridge_open_connections",
            "HTTP connections open now, idle ones and those being refused included "
            "(BRIDGE_MAX_CONNECTIONS caps them).",
            registry=registry,
        )
        self.idle_connections_closed = Counter(
            "bridge_idle_connections_closed",
            "Idle HTTP connections closed to make room for a new one at "
            "BRIDGE_MAX_CONNECTIONS (the one idle longest each time).",
            registry=registry,
        )
        self.kafka_connected = Gauge(
            "bridge_kafka_connected",
            "1 when the producer is connected and its metadata is fresh, else 0.",
            registry=registry,
        )
        self.kafka_stalled = Gauge(
            "bridge_kafka_stalled",
            "Broker ack: 1 while Kafka took no record a delivery's publish waited for "
            "(the bridge is unready meanwhile), else 0; always 0 with the other acks.",
            registry=registry,
        )
        self.secret_rotations = Counter(
            "bridge_kafka_secret_rotations",
            "Times the Kafka secret files changed and the bridge reconnected with them "
            "(applied), or could not: Kafka refused them or the files cannot be used "
            "(refused), or Kafka did not answer in time (failed). The old connection "
            "stays in use until one is applied.",
            ["result"],
            registry=registry,
        )
        self.producer_resets = Counter(
            "bridge_kafka_producer_resets",
            "Times the Kafka producer was replaced by a fresh one (a new producer id) "
            "because it could send nothing more to a partition: Kafka refused a record "
            "for good, or the producer gave up on a batch during an outage.",
            registry=registry,
        )
        self.kafka_throttle = Counter(
            "bridge_kafka_throttle_seconds",
            "Seconds Kafka asked the producer to hold back its requests (throttle_time_ms "
            "of its produce answers): a client quota (producer_byte_rate, "
            "request_percentage) on the bridge's client id or user is below its traffic.",
            registry=registry,
        )
        self.ready = Gauge(
            "bridge_ready",
            "1 when the bridge accepts deliveries (what /readyz answers), else 0.",
            registry=registry,
        )
        self.build_info = Gauge(
            "bridge_build_info",
            "Always 1; the labels say which version runs.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(package_version()).set(1)
        # Create the fixed children up front: series exist (at 0) before the
        # first event, and no label lookup happens for them on the hot path.
        for error in ALL_ERRORS:
            self.rejections.labels(error.reason)
        for reason in PUBLISH_ERRORS:
            self.publish_errors.labels(reason)
        for result in ("applied", "refused", "failed"):
            self.secret_rotations.labels(result)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)

    def record_request(
        self,
        outcome: str,
        event: Event | None,
        reason: str | None,
        seconds: float,
        names: tuple[str, str] | None = None,
    ) -> None:
        """Count one finished webhook request (called once per request, by the ingress);
        ``names``: the entity and action of a refusal that knows them without an event."""
        if event is None:
            if names is None:
                entity = action = NONE_LABEL
            else:
                entity = _ENTITY_LABELS.get(names[0], OTHER_LABEL)
                action = names[1] if names[1] in KNOWN_ACTIONS else OTHER_LABEL
        else:
            entity = _ENTITY_LABELS.get(event.entity, OTHER_LABEL)
            action = event.action if event.action in KNOWN_ACTIONS else OTHER_LABEL
            if outcome == "duplicate":
                self.duplicates.inc()
            if outcome == "accepted":
                if not event.known_type:
                    self.unknown_types.inc()
                if event.key_generated:
                    self.generated_keys.inc()
                if not event.time_from_header:
                    self.timestamp_fallbacks.inc()
        label = (entity, action, outcome)
        self._requests[label] = self._requests.get(label, 0.0) + 1
        if reason is not None:
            self.rejections.labels(reason).inc()
        self._durations[outcome].observe(seconds)

    def record_published(self, value_bytes: int, seconds: float) -> None:
        self._published[()] += 1
        self._published_bytes[()] += value_bytes
        self._publish_duration.observe(seconds)
        self._stages["kafka_ack"].observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(seconds)

    def record_publish_error(self, reason: str) -> None:
        self.publish_errors.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
