"""The benchmark harness (tests/bench/run.py) around its Kafka checks: a subject's process
that dies mid-run (the run is still checked against Kafka, kept with the subject's runs
and fails the Kafka verdict, even when a second attempt is clean), the count of every
record once a subject stopped for good, and topic prefixes that keep subjects apart.

The subject, the load generator and Kafka are fakes: nothing is started or timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.bench import run as bench_run
from tests.bench.mix import REPO
from tests.bench.model import (
    ALL_RUNS,
    DIED,
    NOT_COUNTED,
    ROUND,
    SATURATION,
    WARMUP,
    RunResult,
    SubjectResult,
)
from tests.bench.report import Baselines, Context, _kafka_check, failures, markdown, targets
from tests.bench.run import Bench, Plan, Snapshot, Subject, make_subjects
from tests.test_bench_verdicts import bridge_broker

KAFKA = "Kafka holds one record per 2xx, every run"


class FakeProbe:
    """Kafka: ``total`` records on the subject's topics."""

    def __init__(self) -> None:
        self.total = 0  # on the event topics
        self.dead = 0  # on the dead-letter topic
        self.repeated = 0  # records on the event topics whose key an earlier one had

    def count(self, prefix: str, *, without: Collection[str] = ()) -> int:
        return self.dead if prefix.endswith(bench_run.DEADLETTER) else self.total

    def settle(self, prefix: str, expected: int, **_: Any) -> tuple[int, float]:
        return self.total, 0.0

    def repeated_keys(self, prefix: str, *, without: Collection[str] = ()) -> int:
        if self.repeated < 0:
            raise TimeoutError("no record for 30 s")
        return self.repeated

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


#: (2xx answers, records that reach Kafka, the subject alive at the end of the run),
#: and optionally the dead letters it makes
Step = tuple[int, int, bool] | tuple[int, int, bool, int]


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
        ok, landed, alive, *dead = next(script)
        before = Snapshot(0.0, 0.0, None, 0.0, 0.0, probe.total, probe.dead)
        probe.total += landed
        probe.dead += sum(dead)
        proc.alive_now = alive
        run = RunResult(label, None, seconds, ok, ok, 0, 0, ok / seconds)
        bench._finish(subject, proc, run, before, replace(before, wall=seconds))
        return run

    monkeypatch.setattr(bench, "_process", lambda *_: FakeProcess())
    monkeypatch.setattr(bench, "_wrk_run", wrk_run)
    monkeypatch.setattr(bench_run, "rss_bytes", lambda pid: 0)
    monkeypatch.setattr(bench_run, "say", lambda text: None)
    return bench


def _subject(env: dict[str, str] | None = None) -> Subject:
    return Subject(
        name="bridge memory",
        base="bridge memory",
        kind="bridge",
        argv=[],
        env=env or {},
        prefix="benchx-memory",
        ack="memory",
    )


def test_accepted_events_that_became_dead_letters_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event accepted and then refused by Kafka for good becomes a dead letter, on a
    topic inside the subject's prefix: counted with the events, a run where half of them
    never reached their topics passed (a review, with a topic of max.message.bytes=120).
    The events are counted apart, and any dead letter fails the run and the total."""
    bench = _bench(
        tmp_path,
        monkeypatch,
        [(1000, 1000, True), (5000, 2500, True, 2500)],
    )
    subject = _subject({"BRIDGE_DEADLETTER_TOPIC": "benchx-memory" + bench_run.DEADLETTER})
    assert subject.extra_topics == ["benchx-memory.deadletter"]
    result = bench.measure(subject)
    saturation = result.run(SATURATION)
    assert saturation is not None
    assert (saturation.records, saturation.dead_letters) == (2500, 2500)
    assert saturation.verify_detail == (
        "FAILED: 2500 lost (2500 records < 5000 2xx); 2500 dead letters"
    )
    assert result.failed_runs == [saturation]
    bench.check_total(subject, result)
    assert (result.records_total, result.dead_letters_total) == (3500, 2500)
    assert result.total_verified is False
    verdicts = {v.target: v for v in targets(result, Baselines([result]))}
    assert verdicts[KAFKA].passed is False


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


# --------------------------------------------------------------------------
# Every record, once the subject stopped for good


def _checked(label: str, ok: int) -> RunResult:
    run = RunResult(label, None, 8.0, ok, ok, 0, 0, ok / 8.0)
    run.records, run.verified, run.verify_detail = ok, True, f"OK ({ok} records = {ok} 2xx)"
    return run


def _bridge(records_total: int | None) -> SubjectResult:
    runs = [
        _checked(bench_run.ROUNDS_WARMUP, 1000),
        _checked(f"{ROUND}1", 4000),
        _checked(WARMUP, 1000),
        _checked(SATURATION, 5000),
    ]
    return bridge_broker(runs=runs, records_total=records_total)


def test_records_that_arrived_between_two_runs_checks_fail_the_kafka_verdict() -> None:
    """Every run matched its own count, but 3 records more than all the 2xx answers are
    on the subject's topics: late duplicates, which belong to no run."""
    late = _bridge(records_total=11_003)
    assert late.answered_total == 11_000
    assert late.failed_runs == []
    verdicts = {v.target: v.passed for v in targets(late, Baselines([late]))}
    assert verdicts[KAFKA] is False
    assert _kafka_check(late) == f"**FAILED** ({ALL_RUNS})"
    assert failures([late]) == [
        f"Kafka check FAILED for bridge broker, {ALL_RUNS}: "
        "FAILED: 3 extra (11003 records > 11000 2xx)"
    ]
    text = _markdown([late])
    assert (
        f"| bridge broker | {ALL_RUNS} | 11,000 | 11,000 | 11,003 | "
        "FAILED: 3 extra (11003 records > 11000 2xx) | - | - |"
    ) in text

    exact = _bridge(records_total=11_000)
    assert {v.target: v.passed for v in targets(exact, Baselines([exact]))}[KAFKA] is True
    assert failures([exact]) == []
    # not counted (results.json of an earlier harness): no verdict of its own, no row
    uncounted = _bridge(records_total=None)
    assert {v.target: v.passed for v in targets(uncounted, Baselines([uncounted]))}[KAFKA]
    assert ALL_RUNS not in _markdown([uncounted])


def test_check_total_counts_every_run_rounds_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench(tmp_path, monkeypatch, [])
    result = _bridge(records_total=None)
    probe = bench.probe
    assert isinstance(probe, FakeProbe)
    probe.total = 11_002
    bench.check_total(_subject(), result)
    assert result.records_total == 11_002
    assert result.total_verified is False
    probe.total = 11_000
    bench.check_total(_subject(), result)
    assert result.total_verified is True
    assert result.total_detail == "OK (11000 records = 11000 2xx, every key once)"


def test_a_loss_made_up_for_by_a_duplicate_fails_the_kafka_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As many records as 2xx answers, but one key on two of them: since every request
    has a fresh key, an event is missing (a review: counting alone passed this)."""
    bench = _bench(tmp_path, monkeypatch, [])
    result = _bridge(records_total=None)
    probe = bench.probe
    assert isinstance(probe, FakeProbe)
    probe.total, probe.repeated = 11_000, 1
    bench.check_total(_subject(), result)
    assert result.total_verified is False
    assert failures([result]) == [
        f"Kafka check FAILED for bridge broker, {ALL_RUNS}: "
        "FAILED: 11000 records = 11000 2xx; 1 with a key already seen"
    ]
    verdicts = {v.target: v.passed for v in targets(result, Baselines([result]))}
    assert verdicts[KAFKA] is False
    # keys that could not be read (a broker gone mid-read): the counts still stand, and
    # the check says the keys were not read
    probe.repeated = -1
    result = _bridge(records_total=None)
    bench.check_total(_subject(), result)
    assert result.total_verified is True
    assert result.total_detail == "OK (11000 records = 11000 2xx, keys not read)"
    # BENCH_KEY_CHECK=0: counted only, as before
    bench.plan = replace(bench.plan, key_check=False)
    result = _bridge(records_total=None)
    bench.check_total(_subject(), result)
    assert (result.keys_repeated, result.total_verified) == (None, True)


def _markdown(results: list[SubjectResult]) -> str:
    context = Context("2026-11-29 12:00 UTC", False, 60.0, {}, {}, {}, [], "test", [], [])
    return markdown(results, context, chart=None)


def test_each_subject_s_topics_are_its_own() -> None:
    """Every topic a subject may write to (its events, its dead letters) starts with its
    own topic prefix and with no other subject's: ``-broker.`` is not ``-broker-w2.``
    nor ``-broker-nometrics.``, and dead letters do not go to one topic of all."""
    plan = replace(Plan.from_env(), two_workers=True, layers=True, only=frozenset())
    subjects = make_subjects(plan, "127.0.0.1:9", "abc123", ["broker", "durable", "memory"], None)
    writers = [s for s in subjects if s.topics is not None]
    assert {s.name for s in writers} >= {
        "naive-bridge",
        "bridge broker",
        "bridge broker 2 replicas",
        "bridge broker cut:nometrics",
    }
    checked = 0
    for subject in subjects:
        env = subject.env
        if "BRIDGE_TOPIC_TEMPLATE" in env:
            topics = [env["BRIDGE_TOPIC_TEMPLATE"].format(entity="order", action="created")]
            assert "BRIDGE_DEADLETTER_TOPIC" in env, subject.name
            topics.append(env["BRIDGE_DEADLETTER_TOPIC"])
        elif "BENCH_TOPIC_PREFIX" in env:
            topics = [env["BENCH_TOPIC_PREFIX"] + ".order.created"]
        else:
            assert subject.topics is None
            continue
        for topic in topics:
            owners = [s.name for s in writers if topic.startswith(s.topics or "")]
            # a cut-short bridge that publishes nothing owns nothing and shares nothing
            assert owners == ([subject.name] if subject.topics else []), topic
            checked += 1
    assert checked >= 20


# --------------------------------------------------------------------------
# The cut-short bridges (cutpoints.py)

_CUT_SCRIPT = """
import sys
from starlette.testclient import TestClient
from tests.bench import cutpoints
cutpoints.install(sys.argv[1])
from bridge.app import create_app
from bridge.config import load_settings
settings = load_settings(environ={
    "BRIDGE_TOKENS": "cut-token-1234", "BRIDGE_ACK": "broker",
    "BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
})
client = TestClient(create_app(settings))  # never started: no Kafka behind it
for token in ("cut-token-1234", "cut-token-1234", "wrong-token-123"):
    answer = client.post(
        "/webhooks/geins/Order/create", content=b'{"id":"1"}',
        headers={"Authorization": "Bearer " + token, "x-idempotency-key": "k1"},
    )
    print(answer.status_code, answer.json().get("topic"))
"""


@pytest.mark.parametrize(
    ("cut", "answers"),
    [
        # before authentication: anything is answered 202 alike
        ("guard", ["202 cut", "202 cut", "202 cut"]),
        # the whole bridge but the producer: authenticated, routed, de-duplicated
        ("kafka", ["202 geins.order.create", "200 geins.order.create", "401 None"]),
    ],
)
def test_a_cut_short_bridge_does_all_the_work_before_its_cut(cut: str, answers: list[str]) -> None:
    """The "kafka" cut charged the token checks, the record size check and the ack
    mode's de-duplication to Kafka (a review): it now stops at the producer alone."""
    result = subprocess.run(
        [sys.executable, "-c", _CUT_SCRIPT, cut],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    assert result.stdout.splitlines() == answers, result.stderr


def test_the_probe_finds_a_key_on_two_records(kafka_bootstrap: str, topic_prefix: str) -> None:
    """Against Kafka: the records of the prefix's topics (not of a topic left out, nor of
    another prefix), each key counted once per partition it is on."""
    import asyncio  # noqa: PLC0415

    from aiokafka import AIOKafkaProducer  # noqa: PLC0415

    from tests.bench.kafkacount import KafkaProbe  # noqa: PLC0415

    events, dead = f"{topic_prefix}.order.create", f"{topic_prefix}.deadletter"
    probe = KafkaProbe(kafka_bootstrap)
    try:
        probe.create_topics([events, dead, f"{topic_prefix}x.order.create"], 3)

        async def produce() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
            await producer.start()
            try:
                for topic, key in [
                    (events, b"a"),
                    (events, b"b"),
                    (events, b"a"),  # the one repeat
                    (dead, b"b"),  # left out
                    (f"{topic_prefix}x.order.create", b"a"),  # another prefix
                ]:
                    await producer.send_and_wait(topic, b"{}", key=key)
            finally:
                await producer.stop()

        asyncio.run(produce())
        assert probe.repeated_keys(f"{topic_prefix}.", without=[dead]) == 1
        assert probe.repeated_keys(f"{topic_prefix}.", without=[dead, events]) == 0
    finally:
        probe.close()
