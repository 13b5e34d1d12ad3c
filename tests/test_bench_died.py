"""The benchmark harness (tests/bench/run.py) when a subject's process dies mid-run: the
run is still checked against Kafka, kept with the subject's runs and fails the Kafka
verdict, even when a second attempt is clean.

The subject, the load generator and Kafka are fakes: nothing is started or timed.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.bench import run as bench_run
from tests.bench.model import (
    DIED,
    NOT_COUNTED,
    ROUND,
    SATURATION,
    WARMUP,
    RunResult,
    SubjectResult,
)
from tests.bench.report import Baselines, _kafka_check, failures, targets
from tests.bench.run import Bench, Plan, Snapshot, Subject

KAFKA = "Kafka holds one record per 2xx, every run"


class FakeProbe:
    """Kafka: ``total`` records on the subject's topics."""

    def __init__(self) -> None:
        self.total = 0

    def count(self, prefix: str) -> int:
        return self.total

    def settle(self, prefix: str, expected: int, **_: Any) -> tuple[int, float]:
        return self.total, 0.0

    def create_topics(self, names: list[str], partitions: int) -> None:
        pass


class FakeProcess:
    """A subject process that is alive until the script says otherwise."""

    def __init__(self) -> None:
        self.alive_now = True
        self.proc = object()
        self.pid = os.getpid()  # /proc readings of this test's own process
        self.port = 1
        self.ports = [1]
        self.url = "http://127.0.0.1:1"
        self.rss_samples: list[tuple[float, int]] = []

    def start(self) -> None:
        pass

    def alive(self) -> bool:
        return self.alive_now

    def cpu_seconds(self) -> float:
        return 0.0

    def peak_rss_bytes(self) -> int:
        return 0

    def log_tail(self) -> str:
        return "Terminated"

    def stop(self) -> int:
        return 0 if self.alive_now else -15


class NoKafka:
    pid = None


#: (2xx answers, records that reach Kafka, the subject alive at the end of the run)
Step = tuple[int, int, bool]


def _bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: list[Step]) -> Bench:
    """A Bench whose wrk runs follow ``steps`` (run.py's own _finish and _verify)."""
    probe = FakeProbe()
    plan = replace(
        Plan.from_env(),
        quiet_wait=0.0,
        retry_budget=0.0,
        soak_seconds=0.0,
        profile=False,
        rates=(),
        out=tmp_path,
    )
    bench = Bench(plan, NoKafka(), probe, [], "wrk", None, tmp_path)  # type: ignore[arg-type]
    script = iter(steps)

    def wrk_run(
        subject: Subject, proc: Any, home: Path, label: str, seconds: float, *, drain: float
    ) -> RunResult:
        ok, landed, alive = next(script)
        before = Snapshot(0.0, 0.0, None, 0.0, 0.0, probe.total)
        probe.total += landed
        proc.alive_now = alive
        run = RunResult(label, None, seconds, ok, ok, 0, 0, ok / seconds)
        bench._finish(subject, proc, run, before, replace(before, wall=seconds))
        return run

    monkeypatch.setattr(bench, "_process", lambda *_: FakeProcess())
    monkeypatch.setattr(bench, "_wrk_run", wrk_run)
    monkeypatch.setattr(bench_run, "rss_bytes", lambda pid: 0)
    monkeypatch.setattr(bench_run, "say", lambda text: None)
    return bench


def _subject() -> Subject:
    return Subject(
        name="bridge memory",
        base="bridge memory",
        kind="bridge",
        argv=[],
        env={},
        prefix="benchx-memory",
        ack="memory",
    )


def test_a_subject_that_died_fails_the_kafka_check_though_measured_again_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory mode, killed at the end of its saturation run: 10 of the 5,000 events it
    answered never reached Kafka. The second attempt is clean; the run still fails."""
    bench = _bench(
        tmp_path,
        monkeypatch,
        [(1000, 1000, True), (5000, 4990, False), (1000, 1000, True), (5000, 5000, True)],
    )
    result = bench.measure(_subject())
    assert result.error is None
    assert result.earlier_error is not None
    assert "died during saturation" in result.earlier_error
    died = result.runs[1]
    assert died.label == SATURATION + DIED + " (attempt 1)"
    assert died.died
    assert died.records == 4990  # checked against Kafka, though the subject had died
    assert died.verify_detail == "FAILED: the subject died; 10 lost (4990 records < 5000 2xx)"
    assert result.failed_runs == [died]
    assert result.run(SATURATION) is result.runs[3]  # the clean attempt's run counts
    verdicts = {v.target: v for v in targets(result, Baselines([result]))}
    assert verdicts[KAFKA].passed is False
    assert failures([result]) == [f"Kafka check FAILED for bridge memory {died.label}"]


def test_a_death_fails_even_when_every_answered_event_arrived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench(
        tmp_path, monkeypatch, [(1000, 1000, False), (1000, 1000, True), (5000, 5000, True)]
    )
    result = bench.measure(_subject())
    died = result.runs[0]
    assert died.label == WARMUP + DIED + " (attempt 1)"
    assert (died.records, died.verified) == (1000, True)
    assert died.verify_detail == "FAILED: the subject died; 1000 records = 1000 2xx"
    assert "**FAILED**" in _kafka_check(result)
    assert failures([result])


def test_a_round_the_subject_died_in_is_checked_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken turn in the interleaved rounds: kept (not counted in the throughput),
    checked against Kafka, and a failed run of the subject."""
    bench = _bench(
        tmp_path, monkeypatch, [(1000, 1000, True), (4000, 4000, True), (4000, 3000, False)]
    )
    subject = _subject()
    rounds = bench.interleaved([subject])
    assert bench.plan.rounds >= 2
    runs = rounds[subject.name]
    assert [r.label for r in runs] == [
        bench_run.ROUNDS_WARMUP,
        f"{ROUND}1{NOT_COUNTED}",
        f"{ROUND}2{DIED}{NOT_COUNTED}",
    ]
    assert (runs[2].records, runs[2].died) == (3000, True)
    result = SubjectResult(
        name=subject.name,
        kind="bridge",
        base=subject.base,
        workers=1,
        ack="memory",
        cpus="0",
        writes_kafka=True,
        runs=runs,  # as main() puts the rounds with the subject's own runs
    )
    assert result.failed_runs == [runs[2]]
    assert result.rounds == []  # its rounds no longer mirror the others': not counted
