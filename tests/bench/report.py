"""results.md (tables, ratios to the baselines, the issue's targets) and results.png."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.bench.model import (
    ALL_RUNS,
    ROUND,
    SATURATION,
    SOAK,
    WARMUP,
    RunResult,
    SubjectResult,
    rate_label,
)

TARGET_RATE = 2000
TARGET_MODES = ("durable", "broker")  # the targets are for these; others are shown too
MB = 1_000_000
NOISY = 0.10  # other processes using more than 10 % of a CPU during a run
SOAK_TARGET_SECONDS = 600  # the "flat over a 10-minute run"
# "Flat": the last quarter of the soak peaks at most this much above the second quarter
# (2 %, or 1 MB if that is more). The first quarter is the warm-up: the de-duplication
# memory fills to its bound, the broker-mode bridge reached its plateau after 110 s of
# 600. Not zero: Python's RSS steps by about 1 MB now and then. Half the run lies between
# the two quarters, so a steady climb of more than about 4 % over the run fails (82 ->
# 85.5 MB over 10 minutes does), where comparing the halves' peaks with 5 % let a climb
# of 10 % pass.
SOAK_FLAT_TOLERANCE = 0.02
SOAK_FLAT_MIN_BYTES = MB
DISTURBED = " ⚠ disturbed"
# The baselines are measured once more at the end of the run (run.py, RECHECK). This
# machine's speed changes by up to 2x within an hour, which the "other load" check cannot
# see (nothing else runs; the CPUs are just slower): a baseline whose throughput moved by
# more than this between the start and the end marks the run's ratios as mixed.
SPEED_DRIFT = 0.15
# A latency verdict needs the rate offered: vegeta sent at least this share of
# rate x seconds (a load generator that fell behind measures a lighter load).
OFFERED_SHARE = 0.99
RECHECK = " again, end of run"


@dataclass
class Context:
    date: str
    quick: bool
    elapsed_seconds: float
    plan: dict[str, object]
    machine: dict[str, str]
    versions: dict[str, str]
    mix: list[tuple[str, float, str]]  # (event type, share %, shape), see mix.describe
    mix_source: str
    notes: list[str]
    skipped_modes: list[str]


def context_json(context: Context) -> dict[str, object]:
    return {
        "date": context.date,
        "quick": context.quick,
        "elapsed_seconds": round(context.elapsed_seconds, 1),
        "plan": context.plan,
        "machine": context.machine,
        "versions": context.versions,
        "mix": [
            {"event_type": t, "share_percent": round(s, 1), "shape": shape}
            for t, s, shape in context.mix
        ],
        "mix_source": context.mix_source,
        "skipped_modes": context.skipped_modes,
        "notes": context.notes,
    }


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.0f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _kafka_check(subject: SubjectResult) -> str:
    if subject.error:
        return "ERROR"
    if not subject.writes_kafka:
        return "n/a"
    failed = [r.label for r in subject.failed_runs]
    if subject.total_verified is False:
        failed.append(ALL_RUNS)
    if failed:
        return "**FAILED** (" + ", ".join(failed) + ")"
    return "OK" if any(r.verified for r in subject.runs) else "-"


def _other_load(subject: SubjectResult) -> str:
    loads = [
        r.other_load
        for r in subject.runs
        if not r.label.startswith(WARMUP) and "(" not in r.label and r.other_load is not None
    ]
    if not loads:
        return "-"
    worst = max(loads)
    return f"{100 * worst:.0f}" + (" ⚠" if worst > NOISY else "")


def _disturbed(run: RunResult | None) -> bool:
    return run is not None and run.other_load is not None and run.other_load > NOISY


def _throughput_disturbed(subject: SubjectResult) -> bool:
    return any(_disturbed(run) for run in subject.throughput_runs)


def _latency(run: RunResult | None) -> str:
    if run is None:
        return "-"
    text = f"{ms(run.p50_ms)} / {ms(run.p99_ms)} / {ms(run.p999_ms)}"
    if run.non_2xx:
        text += f" ({run.non_2xx} non-2xx)"
    return text


class Baselines:
    """The single-worker baselines of this run, by name."""

    def __init__(self, results: Sequence[SubjectResult]) -> None:
        self.by_name = {r.name: r for r in results if r.kind == "baseline" and r.workers == 1}

    def throughput(self, name: str) -> float | None:
        subject = self.by_name.get(name)
        if subject is None or subject.error or subject.kafka_failed:
            return None
        return subject.throughput


# --------------------------------------------------------------------------
# Targets


@dataclass
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: not measured


def targets(subject: SubjectResult, baselines: Baselines) -> list[Verdict]:
    """The issue's targets for one bridge subject."""
    lost = subject.kafka_failed or subject.error is not None
    tput = None if lost else subject.throughput
    verdicts: list[Verdict] = []
    for name, factor in (("starlette-noop", 1.0), ("raw-asgi", 0.5), ("naive-bridge", 1.5)):
        ratio = _ratio(tput, baselines.throughput(name))
        base = baselines.by_name.get(name)
        disturbed = _throughput_disturbed(subject) or (
            base is not None and _throughput_disturbed(base)
        )
        verdicts.append(
            Verdict(
                f"throughput ≥ {factor:g} x {name}",
                _x(ratio) + (DISTURBED if disturbed else ""),
                _unless_disturbed(None if ratio is None else ratio >= factor, disturbed),
            )
        )
    run = subject.run(rate_label(TARGET_RATE))
    short = _not_offered(run) if run is not None else None
    kept_up = run is not None and run.non_2xx == 0 and not lost and short is None
    for label, value, limit in (
        ("p50", run.p50_ms if run else None, 1.0),
        ("p99", run.p99_ms if run else None, 5.0),
    ):
        shown = f"{ms(value)} ms" if value is not None else "-"
        if run is not None and run.non_2xx:
            shown += f" ({run.non_2xx} non-2xx)"
        if short is not None:
            shown += f" ({short}: the rate was not offered)"
        if _disturbed(run):
            shown += DISTURBED
        passed = None if value is None else (kept_up and value <= limit)
        verdicts.append(
            Verdict(
                f"{label} at {TARGET_RATE}/s ≤ {limit:g} ms",
                shown,
                _unless_disturbed(passed, _disturbed(run)),
            )
        )
    rss = subject.peak_rss_bytes
    verdicts.append(
        Verdict("peak RSS ≤ 120 MB", f"{_mb(rss)} MB", None if rss is None else rss <= 120 * MB)
    )
    verdicts.append(
        Verdict(
            "Kafka holds one record per 2xx, every run",
            _kafka_check(subject),
            _kafka_passed(subject),
        )
    )
    verdicts.append(_refusals_verdict(subject))
    verdicts.append(_soak_verdict(subject))
    return verdicts


def _unless_disturbed(passed: bool | None, disturbed: bool) -> bool | None:
    """A target met only in a disturbed measurement is not shown as met ("-"): what else
    ran may have slowed a baseline as much as the bridge. One missed stays missed."""
    return None if disturbed and passed else passed


def _not_offered(run: RunResult) -> str | None:
    """Why a fixed-rate run did not offer its rate (fewer than OFFERED_SHARE of rate x
    seconds sent), or None if it did."""
    if run.offered_rate is None:
        return None
    expected = run.offered_rate * run.seconds
    if run.sent >= OFFERED_SHARE * expected:
        return None
    return f"sent {run.sent:,} of {expected:,.0f}"


def _kafka_passed(subject: SubjectResult) -> bool | None:
    """FAIL if a run lost data, or the count over all runs once the subject stopped did
    not match (or the subject broke); PASS only if some run that had 2xx answers was
    checked against Kafka; otherwise nothing was measured."""
    if not subject.runs:
        return None
    if subject.kafka_failed or subject.error is not None:
        return False
    return True if any(r.verified is True and r.ok > 0 for r in subject.runs) else None


def _refusals_verdict(subject: SubjectResult) -> Verdict:
    """A bridge that answers 503 under load (a full spool, say) is not keeping up,
    however fast those answers are; the Kafka check cannot see it, as refused
    deliveries rightly never reach Kafka."""
    target = "every delivery answered 2xx, every run"
    runs = [r for r in subject.runs if not r.label.startswith(WARMUP)]
    if not runs:
        return Verdict(target, "-", None)
    if not any(r.sent for r in runs):
        return Verdict(target, "nothing sent", None)
    refused = [f"{r.non_2xx:,} not in {r.label}" for r in runs if r.non_2xx]
    measured = "; ".join(refused) if refused else f"all, in {len(runs)} runs"
    return Verdict(target, measured, not refused)


def soak_quarters(samples: Sequence[tuple[float, int]]) -> tuple[int, int] | None:
    """The peak RSS of the second and of the last quarter of a soak run (the first is
    its warm-up)."""
    if len(samples) < 2:
        return None
    end = samples[-1][0]
    second = [rss for seconds, rss in samples if end / 4 < seconds <= end / 2]
    last = [rss for seconds, rss in samples if seconds > 3 * end / 4]
    if not second or not last:
        return None
    return max(second), max(last)


def is_flat(quarters: tuple[int, int]) -> bool:
    """The last quarter peaks at most SOAK_FLAT_TOLERANCE (or SOAK_FLAT_MIN_BYTES, if
    more) above the second."""
    second, last = quarters
    return last - second <= max(SOAK_FLAT_TOLERANCE * second, SOAK_FLAT_MIN_BYTES)


def _mb1(value: int) -> str:
    return f"{value / MB:.1f}"


def _soak_verdict(subject: SubjectResult) -> Verdict:
    target = "RSS flat over a 10-minute run"
    quarters = soak_quarters(subject.soak_rss)
    run = subject.run(SOAK)
    if quarters is None or run is None:
        growth = (
            f"{_mb(subject.rss_after_warmup_bytes)} MB after warm-up → "
            f"{_mb(subject.rss_end_bytes)} MB at the end of the short runs"
        )
        return Verdict(target, growth + " (no soak run: BENCH_SOAK_SECONDS=600)", None)
    second, last = quarters
    measured = (
        f"peak {_mb1(second)} MB in the second quarter, {_mb1(last)} MB in the last "
        f"({run.seconds / 60:.1f} min at saturation, {run.ok:,} events)"
    )
    if run.non_2xx:
        measured += f", {run.non_2xx:,} requests not answered 2xx"
    if run.verified is False:
        return Verdict(target, measured + ", Kafka check FAILED", False)
    if not run.ok:
        return Verdict(target, measured + " (nothing answered 2xx: not measured)", None)
    if run.verified is not True:
        return Verdict(target, measured + " (not checked against Kafka)", None)
    if run.seconds < 0.95 * SOAK_TARGET_SECONDS:
        return Verdict(target, measured + " (shorter than 10 minutes)", None)
    return Verdict(target, measured, is_flat(quarters))


def failures(results: Sequence[SubjectResult]) -> list[str]:
    """Why ``make bench`` exits 1 (none: it exits 0): a run that failed the Kafka check,
    or that a subject writing to Kafka died in (though measured again), and a subject
    that could not be measured."""
    found = [
        f"Kafka check FAILED for {r.name} {run.label}" for r in results for run in r.failed_runs
    ]
    found += [
        f"Kafka check FAILED for {r.name}, {ALL_RUNS}: " + r.total_detail
        for r in results
        if r.total_verified is False
    ]
    found += [f"could not be measured: {r.name}" for r in results if r.error]
    return found


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "**FAIL**", None: "-"}[passed]


# --------------------------------------------------------------------------
# results.md


def _rates(results: Sequence[SubjectResult]) -> list[int]:
    return sorted(
        {run.offered_rate for r in results for run in r.runs if run.offered_rate is not None}
    )


def speed_drift(results: Sequence[SubjectResult]) -> list[tuple[str, float, float]]:
    """``(baseline, req/s at the start, req/s at the end)`` for each baseline measured
    again at the end of the run: both its own saturation runs, measured alone the same
    way. (The interleaved rounds' mean is no start to compare with: the subjects' turns
    there read lower than a run alone.)"""
    first = {r.name: _solo_rps(r) for r in results if r.kind == "baseline" and r.workers == 1}
    pairs = []
    for r in results:
        end = _solo_rps(r) if r.kind == "recheck" else None
        if end is None:
            continue
        name = r.name.removesuffix(RECHECK)
        start = first.get(name)
        if start:
            pairs.append((name, start, end))
    return pairs


def _solo_rps(subject: SubjectResult | None) -> float | None:
    """req/s of the subject's own saturation run (alone, not in the rounds)."""
    run = subject.run(SATURATION) if subject is not None else None
    return run.rps if run is not None else None


def drifted(pairs: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    return [(n, a, b) for n, a, b in pairs if abs(b / a - 1) > SPEED_DRIFT]


def _speed_warning(results: Sequence[SubjectResult]) -> list[str]:
    moved = drifted(speed_drift(results))
    if not moved:
        return []
    what = "; ".join(f"{n} {a:,.0f} req/s at the start, {b:,.0f} at the end" for n, a, b in moved)
    if any(r.rounds for r in results):
        effect = (
            "the ratios and the throughput targets come from the interleaved rounds, taken "
            "side by side, and hold; what the subjects measured alone, minutes apart "
            "(latency, CPU per layer, two processes against one), mixes two speeds"
        )
    else:
        effect = "the ratios compare subjects measured at different speeds"
    return [
        f"**⚠ The machine's speed changed during this run** ({what}): {effect}. "
        "Run again on a quieter hour.",
        "",
    ]


def _speed(results: Sequence[SubjectResult]) -> list[str]:
    pairs = speed_drift(results)
    if not pairs:
        return []
    out = ["## Did the machine keep its speed?", ""]
    out += [
        "The baselines measured once more after every other subject, the same way: both "
        "columns are a baseline's own saturation run, alone (the start is its run after the "
        "interleaved rounds, not their mean). This machine's speed changes by up to 2x "
        "within an hour without any other process running, which the other-load check "
        f"cannot see; a change of more than {100 * SPEED_DRIFT:.0f} % marks as mixed what "
        "was measured minutes apart (with interleaved rounds the ratios, taken side by "
        "side, hold).",
        "",
    ]
    rows = [
        [
            n,
            _num(a),
            _num(b),
            f"{100 * (b / a - 1):+.0f} %" + (" ⚠" if abs(b / a - 1) > SPEED_DRIFT else ""),
        ]
        for n, a, b in pairs
    ]
    return out + _table(["baseline", "req/s at the start", "req/s at the end", "change"], rows)


def _headline(results: Sequence[SubjectResult], baselines: Baselines) -> list[str]:
    bridges = [r for r in results if r.kind == "bridge" and r.workers == 1]
    out = ["## The bridge against the baselines", ""]
    if not bridges:
        return [*out, "No bridge subject was measured.", ""]
    rounds = max((len(r.rounds) for r in results), default=0)
    if rounds:
        out += [
            f"req/s at saturation: the mean of {rounds} interleaved rounds (below), which the "
            "ratios compare.",
            "",
        ]
    rows = [
        [
            f"**{r.name}**",
            _num(r.throughput),
            _x(_ratio(r.throughput, baselines.throughput("starlette-noop"))),
            _x(_ratio(r.throughput, baselines.throughput("raw-asgi"))),
            _x(_ratio(r.throughput, baselines.throughput("naive-bridge"))),
            _latency(r.run(rate_label(TARGET_RATE))),
            _mb(r.peak_rss_bytes),
            _kafka_check(r) + (f" {r.error}" if r.error else ""),
        ]
        for r in bridges
    ]
    header = [
        "subject",
        "req/s at saturation",
        "/ starlette-noop",
        "/ raw-asgi",
        "/ naive-bridge",
        f"p50 / p99 / p99.9 ms at {TARGET_RATE}/s",
        "peak RSS MB",
        "Kafka check",
    ]
    return out + _table(header, rows)


def _targets(
    results: Sequence[SubjectResult], baselines: Baselines, skipped_modes: Sequence[str]
) -> list[str]:
    out = ["## Targets (issue 4)", ""]
    out += [
        "For one bridge process with the broker on the same machine; the issue sets them for "
        f"the `{'` and `'.join(TARGET_MODES)}` modes (other modes are shown for information).",
        "",
    ]
    for r in results:
        if r.kind != "bridge" or r.workers != 1:
            continue
        mode_note = "" if r.ack in TARGET_MODES else " (informational)"
        out += [f"**{r.name}**{mode_note}", ""]
        out += _table(
            ["target", "measured", "result"],
            [[v.target, v.measured, _verdict(v.passed)] for v in targets(r, baselines)],
        )
    for mode in skipped_modes:
        out += [f"**bridge {mode}**: not measured (see notes).", ""]
    return out


def _every_subject(results: Sequence[SubjectResult]) -> list[str]:
    rates = _rates(results)
    header = ["subject", "workers", "cpus", "req/s at saturation, own run", "non-2xx"]
    header += [f"p50 / p99 / p99.9 ms at {rate}/s" for rate in rates]
    header += [
        "peak RSS MB",
        "CPU s / 1k events (saturation)",
        f"CPU s / 1k events ({rates[-1]}/s)" if rates else "CPU s / 1k events",
        "broker CPU s / 1k events (saturation)",
        "other load % (max)",
        "Kafka check",
    ]
    rows = []
    for r in results:
        sat = r.run(SATURATION)
        top_rate = r.run(rate_label(rates[-1])) if rates else None
        row = [r.name, str(r.workers), r.cpus, _num(sat.rps if sat else None)]
        row += [_num(sat.non_2xx if sat else None)]
        row += [_latency(r.run(rate_label(rate))) for rate in rates]
        row += [
            _mb(r.peak_rss_bytes),
            _num(sat.cpu_per_1k if sat else None, 3),
            _num(top_rate.cpu_per_1k if top_rate else None, 3),
            _num(sat.broker_cpu_per_1k if sat and r.writes_kafka else None, 3),
            _other_load(r),
            _kafka_check(r) + (f": {r.error.splitlines()[0]}" if r.error else ""),
        ]
        rows.append(row)
    return ["## Every subject", "", *_table(header, rows)]


def _rounds(results: Sequence[SubjectResult]) -> list[str]:
    """Each subject's req/s in each interleaved round, and their mean."""
    measured = [r for r in results if r.rounds]
    if not measured:
        return []
    count = max(len(r.rounds) for r in measured)
    out = ["## Interleaved rounds", ""]
    out += [
        "The single-worker subjects, started side by side and idle but for the one under "
        "load, take turns at saturation (wrk, as in their own runs), the order reversed "
        "every other round (A B C … C B A …). This machine's speed drifts by 10 % from "
        "minute to minute and more within an hour; with the turns mirrored, a steady drift "
        "moves every subject's mean alike, so the ratios compare subjects at the same "
        "speed. Each subject's own run, measured minutes apart from the others, gives its "
        "memory, its latency and the CPU columns of the table above; the CPU per request "
        "here is the rounds' (and the layer table's).",
        "",
    ]
    rows = []
    for r in measured:
        values = [run.rps for run in r.rounds]
        spread = max(values) / min(values) - 1 if min(values) > 0 else None
        row = [r.name, *(_num(v) for v in values), *["-"] * (count - len(values))]
        row += [_num(r.throughput), "-" if spread is None else f"{100 * spread:.0f} %"]
        cpu = _cpu_us(r)
        row += ["-" if cpu is None else f"{cpu:.1f}"]
        rows.append(row)
    header = [
        "subject", *(f"{ROUND}{n}" for n in range(1, count + 1)), "mean", "max / min - 1",
        "µs CPU per request",
    ]  # fmt: skip
    return out + _table(header, rows)


def _workers(results: Sequence[SubjectResult]) -> list[str]:
    multi = [r for r in results if r.workers > 1]
    if not multi:
        return []
    out = ["## A second worker process", ""]
    out += [
        "`uvicorn --workers 2`: the subject is not pinned (both cores, shared with wrk and "
        "the broker); one worker is pinned to one core. Saturation throughput only. On a "
        "2-core machine the second worker takes the core the load generator and the broker "
        "need, so this shows contention more than scaling. Both req/s columns are the "
        "subjects' own saturation runs, each measured alone (not the interleaved rounds' "
        "mean, which reads lower), minutes apart.",
        "",
    ]
    if any("replicas" in r.name for r in multi):
        out += [
            "The bridge has no `--workers` option (one process per replica, each with its own "
            "spool, de-duplication memory and metrics): its rows are two bridge processes on "
            "two ports, wrk's connections split evenly between them (one wrk thread each), "
            "which is what two replicas behind a load balancer get.",
            "",
        ]
    one = {r.base: r for r in results if r.workers == 1}
    rows = []
    for r in multi:
        alone, two = _solo_rps(one.get(r.base)), _solo_rps(r)
        rows.append(
            [
                r.name,
                _num(alone),
                _num(two),
                _x(_ratio(two, alone)),
                _mb(r.peak_rss_bytes),
                _kafka_check(r),
            ]
        )
    header = [
        "subject", "1 process req/s, own run", "2 processes req/s, own run", "scale",
        "peak RSS MB (all)", "Kafka",
    ]  # fmt: skip
    return out + _table(header, rows)


def _soaks(results: Sequence[SubjectResult]) -> list[str]:
    soaked = [(r, r.run(SOAK), soak_quarters(r.soak_rss)) for r in results if r.soak_rss]
    if not soaked:
        return []
    out = ["## Memory over a long run", ""]
    out += [
        "wrk at saturation for the whole soak (BENCH_SOAK_SECONDS), after the short runs; the "
        "bridge's RSS sampled 4 times a second. Flat: the last quarter of the run peaks at "
        f"most {100 * SOAK_FLAT_TOLERANCE:.0f} % (or {SOAK_FLAT_MIN_BYTES / MB:.0f} MB, "
        "whichever is more) above the second quarter, so a steady climb of more than about "
        f"{200 * SOAK_FLAT_TOLERANCE:.0f} % over the run fails. The first quarter is the "
        "warm-up: the de-duplication memory (broker and memory modes) fills to its bound "
        "(BRIDGE_DEDUP_MAX_KEYS) within the first minute at these rates, so growth after "
        "that would be a leak.",
        "",
    ]
    rows = []
    for r, run, quarters in soaked:
        rows.append(
            [
                r.name,
                f"{run.seconds / 60:.1f}" if run else "-",
                _num(run.rps if run else None),
                *(_mb(_rss_at(r.soak_rss, fraction)) for fraction in (0.0, 0.1, 0.5, 1.0)),
                _mb1(quarters[0]) if quarters else "-",
                _mb1(quarters[1]) if quarters else "-",
                ("flat" if is_flat(quarters) else "**grows**") if quarters else "-",
                run.verify_detail if run else "-",
            ]
        )
    header = [
        "subject",
        "minutes",
        "req/s",
        "RSS MB at start",
        "at 10 %",
        "at 50 %",
        "at the end",
        "peak, second quarter",
        "peak, last quarter",
        "verdict",
        "Kafka check",
    ]
    return out + _table(header, rows)


def _rss_at(samples: Sequence[tuple[float, int]], fraction: float) -> int:
    """The first sample at or after ``fraction`` of the soak."""
    end = samples[-1][0]
    return next(rss for seconds, rss in samples if seconds >= fraction * end)


def _broker_cpu_us(results: Sequence[SubjectResult]) -> float | None:
    """The whole broker-mode bridge's CPU per request: what the layers and the
    metrics are measured against."""
    return _cpu_us(next((r for r in results if r.name == "bridge broker"), None))


def _cpu_us(subject: SubjectResult | None) -> float | None:
    """The subject's CPU per answered request at saturation, in µs: over its
    interleaved rounds (taken side by side with the others), else its own run."""
    if subject is None or subject.error:
        return None
    runs = subject.throughput_runs
    answered = sum(run.ok for run in runs)
    return 1e6 * sum(run.cpu_seconds for run in runs) / answered if answered else None


#: (cut, what the layer between the previous cut and this one does)
LAYERS = (
    ("server", "HTTP: uvicorn, httptools, the bridge's HTTP protocol (deadlines, head limits)"),
    ("guard", "the guard (URL and header limits, concurrency) and the webhook dispatch"),
    (
        "kafka",
        "the endpoint: query, token, body, parse, route, size check, ack mode "
        "(de-duplication), answer, metrics",
    ),
)


def _layers(results: Sequence[SubjectResult]) -> list[str]:
    """Where a broker-mode request's CPU goes, from the bridge cut short at each layer."""
    cuts = {r.cut: _cpu_us(r) for r in results if r.cut}
    whole = _broker_cpu_us(results)
    if whole is None or any(cuts.get(cut) is None for cut, _ in LAYERS):
        return []
    out = [
        "## Where a request's CPU goes (broker mode)",
        "",
        "The bridge measured again at saturation with webhook requests cut short at one "
        "layer (tests/bench/cutpoints.py); each row is the CPU per request that layer adds "
        "to the one above it. The Starlette no-op and raw ASGI baselines show where a "
        "request on this machine cannot go below. CPU per request over the interleaved "
        "rounds where there are some: the cut-short bridges take their turns with the "
        "others, so a change of the machine's speed does not pass for a layer's cost.",
        "",
    ]
    rows = []
    before = 0.0
    for cut, what in LAYERS:
        spent = cuts[cut] or 0.0
        rows.append([what, f"{spent - before:.1f}", f"{100 * (spent - before) / whole:.0f} %"])
        before = spent
    rows.append(
        [
            "Kafka: the publisher's hand-over to aiokafka, its batching and network, the ack, "
            "the deadline",
            f"{whole - before:.1f}",
            f"{100 * (whole - before) / whole:.0f} %",
        ]
    )
    rows.append(["**the whole request**", f"**{whole:.1f}**", "100 %"])
    out += _table(["layer", "µs CPU per request", "share"], rows)
    baselines = Baselines(results)
    for name in ("raw-asgi", "starlette-noop"):
        cpu = _cpu_us(baselines.by_name.get(name))
        if cpu is not None:
            out.append(f"- {name}: {cpu:.1f} µs per request")
    return [*out, ""]


def _metrics(results: Sequence[SubjectResult]) -> list[str]:
    scraped = [r for r in results if r.metrics_scrape_ms is not None]
    if not scraped:
        return []
    out = ["## Prometheus metrics", ""]
    whole = _broker_cpu_us(results)
    bare = _cpu_us(next((r for r in results if r.cut == "nometrics"), None))
    if whole is not None and bare is not None:
        out += [
            "On the request path (the bridge has no switch to turn them off; the harness "
            "replaces the recording calls with no-ops, see cutpoints.py): broker mode spends "
            f"{whole:.1f} µs of CPU per request with them and {bare:.1f} µs without, "
            f"so they cost {whole - bare:+.1f} µs per request "
            f"({100 * (whole - bare) / whole:+.0f} %; differences of a few µs are within "
            "the noise of this machine).",
            "",
        ]
    out += [
        "Serving `/metrics` costs nothing until it is scraped. A scrape after the runs "
        "(median of 20):",
        "",
    ]
    rows = [
        [
            r.name,
            ms(r.metrics_scrape_ms),
            f"{(r.metrics_bytes or 0) / 1000:.1f}",
            str(r.metrics_samples),
        ]
        for r in scraped
    ]
    return out + _table(["subject", "scrape ms", "size KB", "samples"], rows)


def _profiles(results: Sequence[SubjectResult]) -> list[str]:
    out: list[str] = []
    for r in results:
        if not r.profile_top:
            continue
        out += [f"## Profile: {r.name} at saturation (py-spy, self time)", ""]
        out += [
            f"{r.profile_samples} samples (200 per second, idle ones left out) of the bridge "
            "process during an extra saturation run (not the measured one); collapsed stacks "
            f"in `{r.profile_path}` (kept until the next run).",
            "",
        ]
        out += _table(
            ["function (file)", "self %"],
            [[f"`{name}`", f"{pct:.1f}"] for name, pct in r.profile_top],
        )
        out += ["The same samples by source file (self time):", ""]
        out += _table(
            ["file", "self %"],
            [[f"`{name}`", f"{pct:.1f}"] for name, pct in r.profile_files],
        )
        out += [
            "py-spy sees Python frames only: time in C code (uvloop's event loop and sockets, "
            "httptools' parser, aiokafka's record builder) counts for the Python frame that "
            "called it, e.g. `Runner.run` for the event loop itself.",
            "",
        ]
    return out


def _checks(results: Sequence[SubjectResult]) -> list[str]:
    out = ["## Kafka check of every run", ""]
    out += [
        "Records that reached the subject's event topics during the run (after waiting for "
        "delivery to settle) against the 2xx answers the load generator counted. Any "
        "difference fails the run, whatever its speed, and so does any record on its "
        "dead-letter topic (counted apart: the load holds valid deliveries only, so a dead "
        "letter is an accepted event Kafka refused, which never reached its topic).",
        "",
    ]
    if any(r.records_total is not None for r in results):
        out += [
            f"The row *{ALL_RUNS}* counts every record on the subject's event topics (and "
            "its dead letters apart) once its processes stopped for good, against the 2xx "
            "answers of "
            "all its runs, rounds included: a record that arrived between two runs' checks "
            "(a late duplicate, say) belongs to no run and shows only there. It also reads "
            "every record's key (each request has a fresh one): a key on two records fails "
            "it, since with equal counts it would hide a lost event.",
            "",
        ]
    rows = []
    for r in results:
        if not r.writes_kafka:
            continue
        rows += [
            [
                r.name,
                run.label,
                _num(run.sent),
                _num(run.ok),
                _num(run.records),
                run.verify_detail or "-",
                ms(1000 * run.settle_seconds) if run.settle_seconds is not None else "-",
                "-" if run.other_load is None else f"{100 * run.other_load:.0f}",
            ]
            for run in r.runs
        ]
        if r.records_total is not None:
            total = [r.name, ALL_RUNS, _num(sum(run.sent for run in r.runs))]
            total += [_num(r.answered_total), _num(r.records_total)]
            total += [r.total_detail, "-", "-"]
            rows.append(total)
    header = ["subject", "run", "sent", "2xx", "records", "result", "settle ms", "other load %"]
    return out + _table(header, rows)


def _method(results: Sequence[SubjectResult], context: Context) -> list[str]:
    plan = context.plan
    out = ["## How it was measured", ""]
    out += [
        f"- Machine: {context.machine.get('cpus')} CPUs ({context.machine.get('cpu model')}), "
        f"{context.machine.get('memory')}, Linux {context.machine.get('kernel')}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in context.versions.items()) + ".",
        f"- Pinning: each single-worker subject on CPU {plan.get('subject cpus')}; the load "
        "generator, the Kafka broker and the harness on CPU "
        f"{plan.get('load generator, broker and harness cpus')}.",
        f"- Saturation: wrk -t1 -c{plan.get('wrk connections')}, {plan.get('warm-up seconds')} s "
        f"warm-up, then {plan.get('saturation seconds')} s measured; req/s = 2xx answers / "
        "measured seconds. After the measured window wrk's requests go to a path every subject "
        "answers 404, so that no webhook is left in flight when wrk stops "
        "(the 2xx count is exact).",
        *(
            [
                f"- Interleaved rounds: {plan.get('rounds')} rounds of "
                f"{plan.get('round seconds')} s at saturation per single-worker subject, after "
                "one warm-up each, the order reversed every other round; their mean is the "
                "subject's req/s in the ratios."
            ]
            if plan.get("rounds")
            else []
        ),
        "- Latency: vegeta, open loop (no coordinated omission), "
        f"{plan.get('fixed-rate seconds')} s at each rate; nearest-rank percentiles of every "
        "answered request.",
        "- Other load: CPU time the machine spent outside the benchmark's processes (subject, "
        "broker, load generator, harness) during a run, in % of one CPU (/proc/stat); ⚠ marks "
        f"runs above {100 * NOISY:.0f} %, whose numbers were disturbed by something else.",
        "- Peak RSS: the kernel's VmHWM of the subject (with two workers: the largest sampled sum "
        "of VmRSS). CPU: utime + stime from /proc during the run, per 1,000 2xx answers. "
        "`durable` and `memory` answer before they publish: what is still in their backlog "
        "when a saturation window ends is published during the Kafka check's settle (its "
        "ms in the Kafka table, most of which is the check's own polling), uncharged.",
        "- Each Kafka-writing subject has its own topic prefix, topics created beforehand with "
        "3 partitions; the naive bridge uses one `AIOKafkaProducer(acks='all')` and "
        "`send_and_wait` per request.",
        f"- Deliveries ({context.mix_source}), each with a fresh x-Idempotency-Key:",
        "",
    ]
    out += _table(
        ["event type", "share %", "shape"],
        [[t, f"{s:.1f}", f"`{shape}`"] for t, s, shape in context.mix],
    )
    notes = list(context.notes)
    notes += [
        f"{r.name} broke in a first attempt and was measured again: "
        + r.earlier_error.splitlines()[0]
        for r in results
        if r.earlier_error
    ]
    notes += [
        f"{r.name}: its process died during "
        + ", ".join(run.label for run in r.died_runs)
        + (
            " (Kafka-checked as far as it got; a run a subject writing to Kafka died in "
            "fails the Kafka check)"
            if r.writes_kafka
            else ""
        )
        for r in results
        if r.died_runs
    ]
    if notes:
        out += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return out


def markdown(results: Sequence[SubjectResult], context: Context, chart: Path | None) -> str:
    baselines = Baselines(results)
    kind = "quick smoke run (BENCH_QUICK=1): numbers are rough" if context.quick else "full run"
    out = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (tests/bench/run.py) on {context.date}, {kind}, "
        f"in {context.elapsed_seconds / 60:.1f} minutes. This machine is small and shared: "
        "compare the ratios to the baselines measured in the same run rather than the "
        "absolute numbers.",
        "",
    ]
    if chart is not None:
        out += [f"![throughput and latency]({chart.name})", ""]
    out += _speed_warning(results)
    out += _headline(results, baselines)
    out += _targets(results, baselines, context.skipped_modes)
    out += _every_subject(results)
    out += _rounds(results)
    out += _speed(results)
    out += _layers(results)
    out += _soaks(results)
    out += _workers(results)
    out += _metrics(results)
    out += _profiles(results)
    out += _checks(results)
    out += _method(results, context)
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------
# results.png


def chart(results: Sequence[SubjectResult], path: Path) -> bool:
    """Throughput bars and latency percentiles; False if matplotlib is missing."""
    try:
        import matplotlib as mpl  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        return False
    mpl.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    measured = [
        r for r in results if r.throughput is not None and r.kind not in {"layer", "recheck"}
    ]
    singles = [r for r in measured if r.workers == 1]
    rates = sorted(
        {run.offered_rate for r in singles for run in r.runs if run.offered_rate is not None}
    )
    soaked = [r for r in singles if r.soak_rss]
    fig = plt.figure(figsize=(13, 13.5 if soaked else 9.5), layout="constrained")
    grid = fig.add_gridspec(3 if soaked else 2, max(1, len(rates)))
    ax = fig.add_subplot(grid[0, :])

    def color(r: SubjectResult) -> str:
        if r.kafka_failed:
            return "#d62728"
        if r.kind == "bridge":
            return "#1f77b4" if r.workers == 1 else "#9ecae1"
        return "#7f7f7f" if r.workers == 1 else "#c7c7c7"

    names = [
        r.name
        + (" (FAILED)" if r.kafka_failed else "")
        + (" (disturbed)" if _throughput_disturbed(r) else "")
        for r in measured
    ]
    values = [r.throughput or 0.0 for r in measured]
    bars = ax.barh(names, values, color=[color(r) for r in measured])
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3, fontsize=9)
    ax.set_xlabel("2xx answers per second at saturation (wrk -t1, higher is better)")
    ax.set_title("Throughput (grey: baselines, blue: the bridge; light: two workers)")
    ax.set_xlim(0, max(values, default=1) * 1.15)
    ax.grid(axis="x", alpha=0.3)

    percentiles: list[tuple[str, Callable[[RunResult], float | None]]] = [
        ("p50", lambda run: run.p50_ms),
        ("p99", lambda run: run.p99_ms),
        ("p99.9", lambda run: run.p999_ms),
    ]
    shades = ["#9ecae1", "#3182bd", "#08519c"]
    for col, rate in enumerate(rates):
        lax = fig.add_subplot(grid[1, col])
        subjects = [r for r in singles if r.run(rate_label(rate)) is not None]
        width = 0.8 / len(percentiles)
        for k, (label, pick) in enumerate(percentiles):
            xs = [i + (k - 1) * width for i in range(len(subjects))]
            ys = []
            for r in subjects:
                run = r.run(rate_label(rate))
                ys.append((pick(run) if run else None) or 0.0)
            lax.bar(xs, ys, width=width, label=label, color=shades[k])
        lax.set_yscale("log")
        lax.set_xticks(range(len(subjects)))
        lax.set_xticklabels(
            [
                r.name + (" (disturbed)" if _disturbed(r.run(rate_label(rate))) else "")
                for r in subjects
            ],
            rotation=25,
            ha="right",
            fontsize=9,
        )
        lax.set_ylabel("latency, ms (log scale)")
        lax.set_title(f"Latency at {rate} requests/s offered (vegeta, open loop)")
        lax.grid(axis="y", alpha=0.3, which="both")
        if rate == TARGET_RATE:
            lax.axhline(1.0, color="#2ca02c", linestyle="--", linewidth=1, label="target p50 1 ms")
            lax.axhline(5.0, color="#ff7f0e", linestyle="--", linewidth=1, label="target p99 5 ms")
        lax.legend(fontsize=8, loc="upper left")
    if soaked:
        sax = fig.add_subplot(grid[2, :])
        for r in soaked:
            sax.plot(
                [seconds / 60 for seconds, _ in r.soak_rss],
                [rss / MB for _, rss in r.soak_rss],
                label=r.name,
            )
        sax.axhline(120, color="#d62728", linestyle="--", linewidth=1, label="target 120 MB")
        sax.set_ylim(bottom=0)
        sax.set_xlabel("minutes into the soak run (wrk at saturation)")
        sax.set_ylabel("RSS, MB (peak per 5 s)")
        sax.set_title("Memory over a long run")
        sax.grid(alpha=0.3)
        sax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(out: Path, results: Sequence[SubjectResult], context: Context) -> list[Path]:
    png = out / "results.png"
    drew = chart(results, png)
    if not drew:
        context.notes.append("matplotlib is not installed: no chart (pip install matplotlib)")
    md = out / "results.md"
    md.write_text(markdown(results, context, png if drew else None), encoding="utf-8")
    return [md, png] if drew else [md]


# --------------------------------------------------------------------------
# Rendering again from results.json (after changing this file, say)


def load(path: Path) -> tuple[list[SubjectResult], Context]:
    """The results and context that run.py wrote to results.json."""
    data = json.loads(path.read_text(encoding="utf-8"))
    subjects = []
    for raw in data["subjects"]:
        runs = [RunResult(**run) for run in raw.pop("runs")]
        subject = SubjectResult(**raw, runs=runs)
        subject.profile_top = [(str(k), float(v)) for k, v in subject.profile_top]
        subject.profile_files = [(str(k), float(v)) for k, v in subject.profile_files]
        subject.soak_rss = [(float(t), int(rss)) for t, rss in subject.soak_rss]
        subjects.append(subject)
    ctx = data["context"]
    context = Context(
        date=ctx["date"],
        quick=ctx["quick"],
        elapsed_seconds=ctx["elapsed_seconds"],
        plan=ctx["plan"],
        machine=ctx["machine"],
        versions=ctx["versions"],
        mix=[(m["event_type"], m["share_percent"], m["shape"]) for m in ctx["mix"]],
        mix_source=ctx.get("mix_source", ""),
        notes=ctx["notes"],
        skipped_modes=ctx.get("skipped_modes", []),
    )
    return subjects, context


def save(out: Path, results: Sequence[SubjectResult], context: Context) -> list[Path]:
    """results.md, results.png and results.json in ``out``."""
    written = write(out, results, context)
    payload = {"context": context_json(context), "subjects": [asdict(r) for r in results]}
    path = out / "results.json"
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return [*written, path]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.bench.report [results.json]``: write results.md and .png again."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0]) if args else Path(__file__).with_name("results.json")
    results, context = load(path)
    for written in write(path.parent, results, context):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
