"""What a benchmark run measured: plain data, written to results.json as is."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

SATURATION = "saturation"
WARMUP = "warm-up"
SOAK = "soak"
SOAK_BUCKET_SECONDS = 5.0
# The interleaved saturation rounds (run.py, Bench.interleaved) are labelled "round 1",
# "round 2", ...; a subject that broke during them has its rounds relabelled with
# NOT_COUNTED: still Kafka-checked, left out of its throughput.
ROUND = "round "
NOT_COUNTED = ", not counted"
# Added to the label of a run at whose end the subject's process was found dead.
DIED = " (subject died)"
# The check of every record on a subject's topics once it stopped for good.
ALL_RUNS = "all runs, once it stopped"


def bucket_peaks(samples: Sequence[tuple[float, int]], bucket: float) -> list[tuple[float, int]]:
    """The largest value of each ``bucket`` seconds of ``(seconds, value)`` samples, the
    times made relative to the first sample: a 10-minute run sampled 4 times a second
    becomes 120 points that still show every peak."""
    if not samples:
        return []
    start = samples[0][0]
    peaks: dict[int, int] = {}
    for seconds, value in samples:
        index = int((seconds - start) // bucket)
        peaks[index] = max(peaks.get(index, value), value)
    return [(index * bucket, peak) for index, peak in sorted(peaks.items())]


#: SubjectResult.keys_repeated when reading the keys failed (a broker gone mid-read).
KEYS_UNREAD = -1


def kafka_detail(
    records: int,
    answered: int,
    *,
    died: bool = False,
    dead_letters: int = 0,
    repeated_keys: int | None = None,
) -> str:
    """What a Kafka check found: ``records`` on the subject's event topics against the
    2xx ``answered``; a subject that died fails it whatever the counts, and so do
    ``dead_letters`` (the mix holds valid deliveries only: a dead letter is an accepted
    event Kafka refused, which never reached its topic) and ``repeated_keys``, records
    whose key another record had (every request has a fresh key: equal counts with a
    key twice hide a loss); None: the keys were not to be read; KEYS_UNREAD: reading
    them failed (said, the counts deciding)."""
    if records == answered:
        found = f"{records} records = {answered} 2xx"
    elif records < answered:
        found = f"{answered - records} lost ({records} records < {answered} 2xx)"
    else:
        found = f"{records - answered} extra ({records} records > {answered} 2xx)"
    if repeated_keys == 0:
        found += ", every key once"
    elif repeated_keys == KEYS_UNREAD:
        found += ", keys not read"
    elif repeated_keys:
        found += f"; {repeated_keys} with a key already seen"
    if dead_letters:
        found += f"; {dead_letters} dead letters"
    if died:
        return f"FAILED: the subject died; {found}"
    if records == answered and not dead_letters and (repeated_keys or 0) <= 0:
        return f"OK ({found})"
    return f"FAILED: {found}"


def rate_label(rate: int) -> str:
    return f"{rate}/s"


@dataclass
class RunResult:
    """One load run against one subject."""

    label: str  # "warm-up", "saturation", "500/s", ...
    offered_rate: int | None  # None: closed loop (wrk)
    seconds: float
    sent: int
    ok: int  # 2xx answers
    non_2xx: int  # requests without a 2xx answer (error status or none)
    socket_errors: int
    rps: float  # 2xx answers per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    cpu_seconds: float = 0.0  # the subject's, during the run
    broker_cpu_seconds: float | None = None  # the Kafka broker's, during the run
    records: int | None = None  # records that reached its event topics because of this run
    dead_letters: int = 0  # records its dead-letter topic got during this run
    verified: bool | None = None  # None: the subject writes nothing to Kafka
    verify_detail: str = ""
    settle_seconds: float | None = None
    status_counts: dict[str, int] = field(default_factory=dict)
    other_load: float | None = None  # CPUs used by processes outside the benchmark (0.25 = 25 %)
    # The subject's process was found dead at the end of the run: what it answered was
    # still checked against Kafka, but a crash is when answered events go missing.
    died: bool = False

    @property
    def cpu_per_1k(self) -> float | None:
        """CPU seconds the subject spent per 1,000 accepted events."""
        return 1000 * self.cpu_seconds / self.ok if self.ok else None

    @property
    def broker_cpu_per_1k(self) -> float | None:
        if self.broker_cpu_seconds is None or not self.ok:
            return None
        return 1000 * self.broker_cpu_seconds / self.ok


@dataclass
class SubjectResult:
    """Everything measured on one subject process."""

    name: str  # "raw-asgi", "bridge broker", "starlette-noop 2 workers", ...
    kind: str  # "baseline" or "bridge"
    base: str  # the subject without the worker count: "raw-asgi", "bridge broker"
    workers: int
    ack: str | None
    cpus: str  # where it was pinned ("0", or "all")
    writes_kafka: bool
    cut: str | None = None  # the layer a "layer" subject cuts requests short at
    runs: list[RunResult] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    rss_after_warmup_bytes: int | None = None
    rss_end_bytes: int | None = None
    # The soak run (BENCH_SOAK_SECONDS): (seconds into it, peak RSS in bytes over the
    # SOAK_BUCKET_SECONDS that start there), one point per bucket.
    soak_rss: list[tuple[float, int]] = field(default_factory=list)
    metrics_scrape_ms: float | None = None
    metrics_bytes: int | None = None
    metrics_samples: int | None = None
    profile_top: list[tuple[str, float]] = field(default_factory=list)  # (function, self %)
    profile_files: list[tuple[str, float]] = field(default_factory=list)  # (file, self %)
    profile_samples: int | None = None
    profile_path: str | None = None  # py-spy's collapsed stacks (raw format)
    # Records on the subject's topics once it stopped for good (its process in the
    # rounds and its own), against answered_total: catches records that reached Kafka
    # between two runs' checks (late duplicates, say). None: not counted.
    records_total: int | None = None
    dead_letters_total: int = 0  # on its dead-letter topic then
    # Records then on its event topics whose key an earlier one had; None: not to be
    # read (BENCH_KEY_CHECK=0, an older results.json); KEYS_UNREAD: reading failed.
    keys_repeated: int | None = None
    error: str | None = None
    earlier_error: str | None = None  # a first attempt broke; this is the second
    exit_code: int | None = None

    def run(self, label: str) -> RunResult | None:
        return next((r for r in self.runs if r.label == label), None)

    @property
    def failed_runs(self) -> list[RunResult]:
        """Runs that failed the Kafka check, and, for a subject that writes to Kafka, runs
        it died in (whatever the check found: it may have lost what it had not sent yet)."""
        return [r for r in self.runs if r.verified is False or (r.died and self.writes_kafka)]

    @property
    def answered_total(self) -> int:
        """The 2xx answers of every run of the subject (warm-ups, rounds, attempts)."""
        return sum(r.ok for r in self.runs)

    @property
    def total_verified(self) -> bool | None:
        """Whether every record on its event topics is one of its 2xx answers, and no
        event became a dead letter; None: not counted."""
        if self.records_total is None:
            return None
        return (
            self.records_total == self.answered_total
            and not self.dead_letters_total
            and (self.keys_repeated or 0) <= 0  # KEYS_UNREAD: the counts decide
        )

    @property
    def total_detail(self) -> str:
        """What the count over all its runs found (see :func:`kafka_detail`)."""
        return kafka_detail(
            self.records_total or 0,
            self.answered_total,
            dead_letters=self.dead_letters_total,
            repeated_keys=self.keys_repeated,
        )

    @property
    def kafka_failed(self) -> bool:
        """A run failed the Kafka check, or the count over all its runs did."""
        return bool(self.failed_runs) or self.total_verified is False

    @property
    def died_runs(self) -> list[RunResult]:
        return [r for r in self.runs if r.died]

    @property
    def rounds(self) -> list[RunResult]:
        """The interleaved saturation rounds that count (none if the subject had none)."""
        return [
            r for r in self.runs if r.label.startswith(ROUND) and not r.label.endswith(NOT_COUNTED)
        ]

    @property
    def throughput_runs(self) -> list[RunResult]:
        """The runs its throughput comes from: the rounds, else its own saturation run."""
        run = self.run(SATURATION)
        return self.rounds or ([run] if run is not None else [])

    @property
    def throughput(self) -> float | None:
        """Requests per second at saturation: the mean of the interleaved rounds (what
        the ratios compare, see run.py), or the subject's own saturation run."""
        runs = self.throughput_runs
        return statistics.fmean(r.rps for r in runs) if runs else None
