"""The benchmark's verdicts (tests/bench/report.py): whether RSS stayed flat over a long
run, whether the bridge refused deliveries, whether the machine kept its speed, and
which throughput the ratios compare.

Pure functions on measured results; the runs themselves are ``make bench``'s.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench.model import (
    NOT_COUNTED,
    ROUND,
    SATURATION,
    SOAK,
    RunResult,
    SubjectResult,
    bucket_peaks,
    rate_label,
)
from tests.bench.report import (
    MB,
    RECHECK,
    TARGET_RATE,
    Baselines,
    Context,
    _cpu_us,
    _refusals_verdict,
    _soak_verdict,
    drifted,
    is_flat,
    markdown,
    soak_quarters,
    speed_drift,
    targets,
)


def test_bucket_peaks_keeps_the_largest_value_of_each_bucket() -> None:
    samples = [(10.0, 5), (10.5, 9), (14.9, 7), (15.0, 3), (21.0, 4)]
    assert bucket_peaks(samples, 5.0) == [(0.0, 9), (5.0, 3), (10.0, 4)]
    assert bucket_peaks([], 5.0) == []


def test_quarters_and_flatness() -> None:
    steady = [(float(t), 60 * MB + (t % 3) * MB) for t in range(0, 605, 5)]
    quarters = soak_quarters(steady)
    assert quarters == (62 * MB, 62 * MB)
    assert is_flat(quarters)

    leaking = [(float(t), 60 * MB + t * 20_000) for t in range(0, 605, 5)]
    quarters = soak_quarters(leaking)
    assert quarters is not None
    assert quarters[1] > quarters[0]
    assert not is_flat(quarters)

    assert soak_quarters([(0.0, MB)]) is None


def _climb(start_mb: float, end_mb: float, seconds: int = 600) -> list[tuple[float, int]]:
    """RSS rising in a straight line, one sample per 5 s bucket."""
    return [
        (float(t), int((start_mb + (end_mb - start_mb) * t / seconds) * MB))
        for t in range(0, seconds + 5, 5)
    ]


def test_a_steady_climb_of_a_few_percent_is_not_flat() -> None:
    """Comparing the peaks of the two halves with 5 % let 82 -> 90.5 MB (+10 %) pass."""
    assert not is_flat(_quarters(_climb(82, 90.5)))
    assert not is_flat(_quarters(_climb(82, 85.7)))  # +4.5 %
    assert is_flat(_quarters(_climb(82, 84.9)))  # +3.5 %: within the tolerance


def test_a_plateau_after_the_warm_up_is_flat_even_with_a_step() -> None:
    """The broker-mode soak: 82 MB climbing to 94.8 MB in its first 110 s, flat after;
    Python's RSS may step by 1 MB on the way."""
    plateau = [
        (float(t), int((82 + 12.8 * min(t, 110) / 110 + (1.0 if t >= 400 else 0.0)) * MB))
        for t in range(0, 605, 5)
    ]
    assert is_flat(_quarters(plateau))
    durable = [(float(t), 63 * MB + (t % 7) * 40_000) for t in range(0, 605, 5)]
    assert is_flat(_quarters(durable))


def test_flat_allows_2_percent_or_1_mb_whichever_is_more() -> None:
    assert is_flat((100 * MB, 102 * MB))
    assert not is_flat((100 * MB, 102 * MB + 1))
    assert is_flat((40 * MB, 41 * MB))  # 2 % would be 0.8 MB: 1 MB holds
    assert not is_flat((40 * MB, 41 * MB + 1))
    assert is_flat((95 * MB, 90 * MB))  # shrinking is flat


def _quarters(samples: list[tuple[float, int]]) -> tuple[int, int]:
    quarters = soak_quarters(samples)
    assert quarters is not None
    return quarters


def bridge_broker(**fields: Any) -> SubjectResult:
    """The bridge in broker mode as the report sees it, with ``fields`` set."""
    return SubjectResult(
        name="bridge broker",
        kind="bridge",
        base="bridge broker",
        workers=1,
        ack="broker",
        cpus="0",
        writes_kafka=True,
        **fields,
    )


def _soaked(
    samples: list[tuple[float, int]], seconds: float, verified: bool, refused: int = 0
) -> SubjectResult:
    subject = bridge_broker(soak_rss=samples)
    subject.runs.append(
        RunResult(
            label=SOAK,
            offered_rate=None,
            seconds=seconds,
            sent=1000 + refused,
            ok=1000,
            non_2xx=refused,
            socket_errors=0,
            rps=1000 / seconds,
            verified=verified,
        )
    )
    return subject


def test_verdict_needs_ten_minutes_and_a_clean_kafka_check() -> None:
    flat = [(float(t), 70 * MB) for t in range(0, 600, 5)]
    assert _soak_verdict(_soaked(flat, 600.0, verified=True)).passed is True
    assert _soak_verdict(_soaked(_climb(82, 90.5), 600.0, verified=True)).passed is False
    assert _soak_verdict(_soaked(flat, 120.0, verified=True)).passed is None  # too short
    assert _soak_verdict(_soaked(flat, 600.0, verified=False)).passed is False
    growing = [(float(t), 70 * MB + t * 50_000) for t in range(0, 600, 5)]
    assert _soak_verdict(_soaked(growing, 600.0, verified=True)).passed is False
    no_soak = _soaked([], 600.0, verified=True)
    no_soak.runs.clear()
    assert _soak_verdict(no_soak).passed is None


def test_refusals_fail_the_run_even_when_kafka_matches() -> None:
    """503s under load are not keeping up: the Kafka check passes (refused deliveries
    never reach Kafka), so a verdict of its own must fail."""
    flat = [(float(t), 70 * MB) for t in range(0, 600, 5)]
    clean = _soaked(flat, 600.0, verified=True)
    assert _refusals_verdict(clean).passed is True
    refusing = _soaked(flat, 600.0, verified=True, refused=1_590_000)
    verdict = _refusals_verdict(refusing)
    assert verdict.passed is False
    assert "1,590,000" in verdict.measured
    assert "1,590,000" in _soak_verdict(refusing).measured


def _idle_run(label: str, seconds: float, verified: bool | None = None) -> RunResult:
    return RunResult(
        label=label,
        offered_rate=None,
        seconds=seconds,
        sent=0,
        ok=0,
        non_2xx=0,
        socket_errors=0,
        rps=0.0,
        verified=verified,
    )


def test_a_bridge_that_was_sent_nothing_passes_no_kafka_refusal_or_soak_target() -> None:
    """Runs that measured nothing (no request sent, no 2xx, no Kafka check, RSS flat
    because idle) are not evidence: those targets are "not measured", never PASS."""
    flat = [(float(t), 70 * MB) for t in range(0, 600, 5)]
    subject = _soaked(flat, 600.0, verified=True)
    subject.runs = [
        _idle_run(label, 600.0 if label == SOAK else 15.0)
        for label in (SATURATION, rate_label(TARGET_RATE), SOAK)
    ]
    subject.peak_rss_bytes = 70 * MB
    verdicts = {v.target: v.passed for v in targets(subject, Baselines([subject]))}
    assert verdicts["Kafka holds one record per 2xx, every run"] is None
    assert verdicts["every delivery answered 2xx, every run"] is None
    assert verdicts["RSS flat over a 10-minute run"] is None
    # A soak that answered events but was never checked against Kafka is not a PASS
    # either; nor one the check passed with nothing answered.
    unchecked = _soaked(flat, 600.0, verified=True)
    unchecked.runs[0].verified = None
    assert _soak_verdict(unchecked).passed is None
    empty = _soaked(flat, 600.0, verified=True)
    empty.runs = [_idle_run(SOAK, 600.0, verified=True)]
    assert _soak_verdict(empty).passed is None
    kafka = [v for v in targets(empty, Baselines([empty])) if v.target.startswith("Kafka")]
    assert [v.passed for v in kafka] == [None]


def _wrk(label: str, rps: float, seconds: float = 15.0) -> RunResult:
    return RunResult(
        label=label,
        offered_rate=None,
        seconds=seconds,
        sent=int(rps * seconds),
        ok=int(rps * seconds),
        non_2xx=0,
        socket_errors=0,
        rps=rps,
    )


def _saturated(name: str, kind: str, rps: float, rounds: tuple[float, ...] = ()) -> SubjectResult:
    subject = SubjectResult(
        name=name, kind=kind, base=name, workers=1, ack=None, cpus="0", writes_kafka=False
    )
    subject.runs += [_wrk(f"{ROUND}{n}", value, 8.0) for n, value in enumerate(rounds, 1)]
    subject.runs.append(_wrk(SATURATION, rps))
    return subject


def _report(results: list[SubjectResult]) -> str:
    context = Context(
        date="2026-11-29 12:00 UTC",
        quick=False,
        elapsed_seconds=60.0,
        plan={},
        machine={},
        versions={},
        mix=[],
        mix_source="test",
        notes=[],
        skipped_modes=[],
    )
    return markdown(results, context, chart=None)


def test_a_baseline_that_slowed_down_by_the_end_marks_the_run_as_mixed() -> None:
    steady = [
        _saturated("raw-asgi", "baseline", 46_000),
        _saturated("starlette-noop", "baseline", 24_000),
        _saturated("raw-asgi" + RECHECK, "recheck", 44_000),  # -4 %: noise
        _saturated("starlette-noop" + RECHECK, "recheck", 25_500),  # +6 %
    ]
    assert speed_drift(steady) == [
        ("raw-asgi", 46_000, 44_000),
        ("starlette-noop", 24_000, 25_500),
    ]
    assert drifted(speed_drift(steady)) == []
    text = _report(steady)
    assert "Did the machine keep its speed?" in text
    assert "speed changed" not in text

    slowed = [*steady[:3], _saturated("starlette-noop" + RECHECK, "recheck", 15_000)]
    assert drifted(speed_drift(slowed)) == [("starlette-noop", 24_000, 15_000)]
    text = _report(slowed)
    assert "The machine's speed changed during this run" in text
    assert "-38 % ⚠" in text
    # the recheck is not a second baseline: the bridge's ratios use the first measurement
    assert "starlette-noop again" not in text.split("## Every subject")[0]


def test_no_recheck_no_speed_section() -> None:
    assert speed_drift([_saturated("raw-asgi", "baseline", 46_000)]) == []
    assert "keep its speed" not in _report([_saturated("raw-asgi", "baseline", 46_000)])


def test_the_ratios_compare_the_means_of_the_interleaved_rounds() -> None:
    # Own runs minutes apart: starlette 24,000 on a fast minute, the bridge 8,000 on a
    # slow one. The rounds, taken in turns, tell the same speed for both.
    starlette = _saturated("starlette-noop", "baseline", 24_000, rounds=(20_000, 22_000))
    bridge = _saturated("bridge broker", "bridge", 8_000, rounds=(10_000, 12_000))
    bridge.ack = "broker"
    assert starlette.throughput == 21_000
    assert bridge.throughput == 11_000
    verdicts = targets(bridge, Baselines([starlette, bridge]))
    assert verdicts[0].measured == "0.52x"  # 11,000 / 21,000, not 8,000 / 24,000
    text = _report([starlette, bridge])
    assert "mean of 2 interleaved rounds" in text
    assert "| bridge broker | 10,000 | 12,000 | 11,000 | 20 % |" in text
    # each subject's own run is still shown, as what it is
    assert "| bridge broker | 1 | 0 | 8,000 |" in text


def test_rounds_of_a_subject_that_broke_do_not_count() -> None:
    subject = _saturated("bridge broker", "bridge", 8_000, rounds=(10_000, 12_000))
    for run in subject.runs:
        if run.label.startswith(ROUND):
            run.label += NOT_COUNTED
    assert subject.rounds == []
    assert subject.throughput == 8_000  # its own run
    assert "## Interleaved rounds" not in _report([subject])


def test_a_disturbed_round_marks_the_ratio() -> None:
    starlette = _saturated("starlette-noop", "baseline", 24_000, rounds=(20_000, 22_000))
    bridge = _saturated("bridge broker", "bridge", 8_000, rounds=(10_000, 12_000))
    bridge.runs[1].other_load = 0.5
    verdict = targets(bridge, Baselines([starlette, bridge]))[0]
    assert "disturbed" in verdict.measured
    assert verdict.passed is False  # a miss stays a miss


def test_a_target_met_only_in_a_disturbed_measurement_is_not_a_pass() -> None:
    """Other load may slow a baseline as much as the bridge: a smoke run showed 1.80x the
    naive bridge from disturbed rounds, and 0.75x from the subjects' own runs."""
    starlette = _saturated("starlette-noop", "baseline", 8_000, rounds=(8_000, 8_000))
    bridge = _saturated("bridge broker", "bridge", 9_000, rounds=(9_000, 9_000))
    [ratio, *_] = targets(bridge, Baselines([starlette, bridge]))  # x starlette-noop
    assert ratio.passed is True
    starlette.runs[1].other_load = 0.5  # one of the baseline's rounds
    [ratio, *_] = targets(bridge, Baselines([starlette, bridge]))
    assert "disturbed" in ratio.measured
    assert ratio.passed is None


def test_with_rounds_a_change_of_speed_leaves_the_ratios_standing() -> None:
    """The ratios come from rounds taken side by side: a machine that sped up by the end
    mixes what was measured alone, not them."""
    results = [
        _saturated("raw-asgi", "baseline", 40_000, rounds=(40_000, 40_000)),
        _saturated("starlette-noop", "baseline", 20_000, rounds=(20_000, 20_000)),
        _saturated("starlette-noop" + RECHECK, "recheck", 24_000),  # +20 %
    ]
    text = _report(results)
    assert "The machine's speed changed during this run" in text
    assert "come from the interleaved rounds, taken side by side, and hold" in text


def test_layer_costs_come_from_the_rounds_when_there_are_some() -> None:
    """The CPU per request of a subject is its rounds' (taken side by side), not its own
    run's (minutes apart, maybe at another speed)."""
    subject = _saturated("bridge broker", "bridge", 8_000, rounds=(10_000, 10_000))
    for run in subject.runs:
        run.cpu_seconds = run.ok * (100e-6 if run.label.startswith(ROUND) else 150e-6)
    assert _cpu_us(subject) == pytest.approx(100.0)
    assert _cpu_us(_saturated("raw-asgi", "baseline", 40_000)) == 0.0


# --------------------------------------------------------------------------
# The targets (report.targets): each limit, on both sides of it


def _bridge_subject(
    *,
    rps: float = 20_000.0,
    p50_ms: float = 0.5,
    p99_ms: float = 2.0,
    rss_mb: float = 80.0,
    verified: bool = True,
) -> SubjectResult:
    """A bridge whose runs all pass unless told otherwise: saturation at ``rps``, the
    target rate with the given percentiles, ``rss_mb`` of peak RSS."""
    subject = bridge_broker(peak_rss_bytes=int(rss_mb * MB))
    sat = _wrk(SATURATION, rps)
    sat.verified = verified
    rate = RunResult(
        label=rate_label(TARGET_RATE),
        offered_rate=TARGET_RATE,
        seconds=15.0,
        sent=TARGET_RATE * 15,
        ok=TARGET_RATE * 15,
        non_2xx=0,
        socket_errors=0,
        rps=float(TARGET_RATE),
        p50_ms=p50_ms,
        p99_ms=p99_ms,
        verified=True,
    )
    subject.runs += [sat, rate]
    return subject


def _kafka_baseline(name: str, rps: float, *, verified: bool = True) -> SubjectResult:
    subject = _saturated(name, "baseline", rps)
    subject.writes_kafka = True
    subject.runs[-1].verified = verified
    return subject


def _verdicts(bridge: SubjectResult, *baselines: SubjectResult) -> dict[str, bool | None]:
    return {v.target: v.passed for v in targets(bridge, Baselines([*baselines, bridge]))}


STARLETTE = "throughput ≥ 1 x starlette-noop"
RAW = "throughput ≥ 0.5 x raw-asgi"
NAIVE = "throughput ≥ 1.5 x naive-bridge"
P50 = f"p50 at {TARGET_RATE}/s ≤ 1 ms"
P99 = f"p99 at {TARGET_RATE}/s ≤ 5 ms"
RSS = "peak RSS ≤ 120 MB"
KAFKA = "Kafka holds one record per 2xx, every run"


def _baselines() -> list[SubjectResult]:
    return [
        _saturated("starlette-noop", "baseline", 10_000),
        _saturated("raw-asgi", "baseline", 20_000),
        _kafka_baseline("naive-bridge", 1_000),
    ]


def test_each_throughput_target_passes_at_its_factor_and_fails_just_below() -> None:
    # 10,000 req/s: exactly 1 x starlette, 0.5 x raw-asgi and 10 x naive: all pass
    at = _verdicts(_bridge_subject(rps=10_000), *_baselines())
    assert (at[STARLETTE], at[RAW], at[NAIVE]) == (True, True, True)
    below = _verdicts(_bridge_subject(rps=9_900), *_baselines())
    assert (below[STARLETTE], below[RAW]) == (False, False)
    # naive-bridge at 6,667 req/s: 9,900 is 1.485 x, just below 1.5
    naive = _kafka_baseline("naive-bridge", 6_667)
    verdicts = _verdicts(_bridge_subject(rps=9_900), *_baselines()[:2], naive)
    assert verdicts[NAIVE] is False
    assert _verdicts(_bridge_subject(rps=10_001), *_baselines()[:2], naive)[NAIVE] is True
    # far below every factor (0.1 x each): fails, whatever the factors are relaxed to
    slow = _verdicts(_bridge_subject(rps=900), *_baselines()[:2], naive)
    assert (slow[STARLETTE], slow[RAW], slow[NAIVE]) == (False, False, False)


def test_each_latency_target_passes_at_its_limit_and_fails_just_above() -> None:
    at = _verdicts(_bridge_subject(p50_ms=1.0, p99_ms=5.0), *_baselines())
    assert (at[P50], at[P99]) == (True, True)
    above = _verdicts(_bridge_subject(p50_ms=1.01, p99_ms=5.01), *_baselines())
    assert (above[P50], above[P99]) == (False, False)
    slow = _verdicts(_bridge_subject(p50_ms=30.0, p99_ms=200.0), *_baselines())
    assert (slow[P50], slow[P99]) == (False, False)


def test_the_rss_target_passes_at_120_mb_and_fails_above() -> None:
    assert _verdicts(_bridge_subject(rss_mb=120.0), *_baselines())[RSS] is True
    assert _verdicts(_bridge_subject(rss_mb=120.001), *_baselines())[RSS] is False
    assert _verdicts(_bridge_subject(rss_mb=300.0), *_baselines())[RSS] is False


def test_a_run_that_failed_the_kafka_check_fails_the_kafka_target() -> None:
    """Even when another run of the same subject passed it."""
    subject = _bridge_subject(verified=False)
    assert subject.runs[1].verified is True  # the rate run passed
    assert _verdicts(subject, *_baselines())[KAFKA] is False
    assert _verdicts(_bridge_subject(), *_baselines())[KAFKA] is True


def test_a_bridge_that_lost_data_gets_no_speed_or_latency_verdict() -> None:
    """Dropping events is fast: its throughput is not compared, its latency fails."""
    verdicts = _verdicts(_bridge_subject(rps=50_000, verified=False), *_baselines())
    assert (verdicts[STARLETTE], verdicts[RAW], verdicts[NAIVE]) == (None, None, None)
    assert (verdicts[P50], verdicts[P99]) == (False, False)
    broken = _bridge_subject(rps=50_000)
    broken.error = "RuntimeError: the subject died"
    verdicts = _verdicts(broken, *_baselines())
    assert (verdicts[STARLETTE], verdicts[P50], verdicts[KAFKA]) == (None, False, False)


def test_a_baseline_that_failed_the_kafka_check_is_not_compared() -> None:
    """A naive bridge that loses records is faster than it should be: no ratio to it."""
    lossy = _kafka_baseline("naive-bridge", 1_000, verified=False)
    assert Baselines([lossy]).throughput("naive-bridge") is None
    verdicts = _verdicts(_bridge_subject(rps=10_000), *_baselines()[:2], lossy)
    assert verdicts[NAIVE] is None
    assert verdicts[STARLETTE] is True  # the other baselines still count


def test_a_latency_verdict_needs_the_rate_offered() -> None:
    """A load generator that sent a third of its requests measured a lighter load: the
    percentiles say nothing about 2,000/s, however low they are."""
    subject = _bridge_subject()
    rate_run = subject.runs[1]
    rate_run.sent = rate_run.ok = 10_000  # of 30,000
    verdicts = {v.target: v for v in targets(subject, Baselines([subject]))}
    assert (verdicts[P50].passed, verdicts[P99].passed) == (False, False)
    assert "sent 10,000 of 30,000" in verdicts[P50].measured
    # at the limit (99 % of rate x seconds) and just below it
    rate_run.sent = rate_run.ok = 29_700
    assert _verdicts(subject)[P50] is True
    rate_run.sent = rate_run.ok = 29_699
    assert _verdicts(subject)[P50] is False


def test_the_speed_check_compares_a_run_alone_with_a_run_alone() -> None:
    """A turn in the rounds reads lower than a run alone: the rounds' mean at the start
    against a run alone at the end warns of a speed-up that never was, and hides a
    slowdown."""
    steady = [
        _saturated("starlette-noop", "baseline", 24_000, rounds=(20_000, 20_000)),
        _saturated("starlette-noop" + RECHECK, "recheck", 24_000),
    ]
    assert speed_drift(steady) == [("starlette-noop", 24_000, 24_000)]
    assert "speed changed" not in _report(steady)
    slowed = [
        _saturated("starlette-noop", "baseline", 30_000, rounds=(24_000, 24_000)),
        _saturated("starlette-noop" + RECHECK, "recheck", 24_500),
    ]
    assert drifted(speed_drift(slowed)) == [("starlette-noop", 30_000, 24_500)]
    assert "The machine's speed changed during this run" in _report(slowed)


def test_the_second_worker_table_compares_runs_alone() -> None:
    one = _saturated("starlette-noop", "baseline", 12_000, rounds=(10_000, 10_000))
    two = _saturated("starlette-noop", "baseline", 6_000)
    two.name, two.workers, two.cpus = "starlette-noop 2 workers", 2, "any"
    text = _report([one, two])
    assert "| starlette-noop 2 workers | 12,000 | 6,000 | 0.50x |" in text
