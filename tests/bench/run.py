"""``make bench``: the bridge against its baselines, on one machine, in one run.

Starts its own Kafka broker (free ports, fresh data), then for each subject --
the baselines ``raw-asgi``, ``starlette-noop`` and ``naive-bridge``, then the
bridge in each ack mode its settings accept -- starts the subject as its own
process on a free port, warms it up, measures throughput at saturation (wrk),
latency at fixed offered rates (vegeta, open loop), its CPU time and peak
memory, checks that Kafka holds exactly one record per 2xx answer, and stops
it. Then the baselines (and the bridge, if ``bridge serve`` can) with two
worker processes. Before all that, the single-worker subjects take turns at
saturation in interleaved rounds (``Bench.interleaved``), whose means the ratios
compare. Last, the raw ASGI and Starlette no-ops once more: if either
moved by more than 15 % since the start, the machine changed speed during the
run and results.md says its ratios are mixed. Writes tests/bench/results.md,
results.json and results.png.

Settings (environment): ``BENCH_QUICK=1`` a smoke run of a few seconds per
measurement; ``BENCH_SECONDS`` (saturation) and ``BENCH_RATE_SECONDS`` (each
fixed rate) override the durations; ``BENCH_RATES`` (default ``500,2000``);
``BENCH_CONNECTIONS`` (default 32); ``BENCH_PIN=0`` no CPU pinning;
``BENCH_WORKERS2=0`` skips the two-worker runs; ``BENCH_ONLY=raw-asgi,broker``
limits the subjects (names or ack modes); ``BENCH_PROFILE=1`` adds a py-spy
profile of the bridge in broker mode at saturation; ``BENCH_OUT`` another
folder for the results; ``BENCH_WARMUP_SECONDS``; ``BENCH_QUIET_WAIT`` /
``BENCH_QUIET_BUDGET`` (seconds to wait for other processes to calm down, per
subject / in all) and ``BENCH_RETRY_BUDGET`` (seconds to spend measuring
disturbed runs again); ``BENCH_SOAK_SECONDS`` (default 0: none; 600 for the issue's
10-minute run) adds a run that long at saturation to each bridge mode in
``BENCH_SOAK_MODES`` (default ``broker,durable``), sampling the bridge's RSS to
show whether memory stays flat; ``BENCH_ROUNDS`` (default 4; 0: none) and
``BENCH_ROUND_SECONDS`` (default 8) the interleaved rounds; ``BENCH_KEY_CHECK=0`` counts
the records of a subject's runs taken together without reading their keys. See
tests/bench/README.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from aiokafka.errors import KafkaError

from bridge.devkafka import KAFKA_VERSION, LocalKafka, ensure_jars, free_port, free_ports
from tests.bench import report
from tests.bench.cutpoints import CUTS
from tests.bench.kafkacount import KafkaProbe
from tests.bench.mix import (
    REPO,
    Delivery,
    describe,
    event_types,
    load_mix,
    vegeta_targets,
    wrk_script,
)
from tests.bench.model import (
    ALL_RUNS,
    DIED,
    KEYS_UNREAD,
    NOT_COUNTED,
    ROUND,
    SATURATION,
    SOAK,
    SOAK_BUCKET_SECONDS,
    WARMUP,
    RunResult,
    SubjectResult,
    bucket_peaks,
    kafka_detail,
    rate_label,
)
from tests.bench.procs import (
    SubjectProcess,
    cpu_seconds,
    harness_cpu_seconds,
    http_get,
    machine_busy_seconds,
    pin_all_threads,
    rss_bytes,
)
from tests.bench.tools import (
    ensure_vegeta,
    ensure_wrk,
    pinned,
    run_vegeta,
    run_wrk,
    say,
    tool_version,
)

PYTHON = sys.executable
TOKEN = "bench-" + secrets.token_hex(8)
ACK_MODES = ("broker", "durable", "memory")
TOPIC_PARTITIONS = 3  # the bridge's default BRIDGE_TOPIC_PARTITIONS, for every subject
WORKDIR = REPO / ".cache" / "bench"
ROUNDS_WARMUP = WARMUP + ", before the rounds"
# A bridge subject's dead letters go to <its prefix>.deadletter: inside its own topics
# (the template <prefix>.{entity}.{action} cannot make it), counted apart from its
# events: the mix holds valid deliveries only, so any dead letter is an accepted event
# Kafka refused, missing from its topic.
DEADLETTER = ".deadletter"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class Plan:
    """How long and how hard to push each subject."""

    quick: bool
    warmup_seconds: float
    main_seconds: float
    drain_seconds: float
    rate_seconds: float
    rates: tuple[int, ...]
    connections: int
    subject_cpus: set[int] | None
    load_cpus: set[int] | None
    two_workers: bool
    layers: bool  # measure the bridge cut short at each layer
    profile: bool
    only: frozenset[str]
    out: Path
    quiet_wait: float  # at most this long before each subject for the machine to calm down
    quiet_budget: float  # ... and at most this long in all
    retry_budget: float  # seconds to spend measuring disturbed runs again
    soak_seconds: float  # a run this long at saturation for memory growth; 0: none
    soak_modes: frozenset[str]  # ... of the bridge in these ack modes
    rounds: int  # interleaved saturation rounds of the single-worker subjects; 0: none
    round_seconds: float
    key_check: bool = True  # read every record's key once a subject stopped for good

    @classmethod
    def from_env(cls) -> Plan:
        quick = os.environ.get("BENCH_QUICK", "") not in {"", "0"}
        cpus = sorted(os.sched_getaffinity(0))
        pin = os.environ.get("BENCH_PIN", "1") != "0" and len(cpus) >= 2
        rates = os.environ.get("BENCH_RATES", "500,2000")
        only = os.environ.get("BENCH_ONLY", "")
        soak_modes = os.environ.get("BENCH_SOAK_MODES", "broker,durable")
        return cls(
            quick=quick,
            warmup_seconds=_env_float("BENCH_WARMUP_SECONDS", 1.0 if quick else 5.0),
            main_seconds=_env_float("BENCH_SECONDS", 3.0 if quick else 15.0),
            drain_seconds=1.0 if quick else 3.0,
            rate_seconds=_env_float("BENCH_RATE_SECONDS", 3.0 if quick else 15.0),
            rates=tuple(int(r) for r in rates.split(",") if r.strip()),
            connections=int(_env_float("BENCH_CONNECTIONS", 32)),
            subject_cpus={cpus[0]} if pin else None,
            load_cpus=set(cpus[1:]) if pin else None,
            two_workers=os.environ.get("BENCH_WORKERS2", "1") != "0",
            layers=os.environ.get("BENCH_LAYERS", "1") != "0",
            profile=os.environ.get("BENCH_PROFILE", "") not in {"", "0"},
            only=frozenset(s.strip() for s in only.split(",") if s.strip()),
            out=Path(os.environ.get("BENCH_OUT", str(REPO / "tests" / "bench"))),
            quiet_wait=_env_float("BENCH_QUIET_WAIT", 0.0 if quick else 60.0),
            quiet_budget=_env_float("BENCH_QUIET_BUDGET", 120.0),
            retry_budget=_env_float("BENCH_RETRY_BUDGET", 0.0 if quick else 120.0),
            soak_seconds=_env_float("BENCH_SOAK_SECONDS", 0.0),
            soak_modes=frozenset(m.strip() for m in soak_modes.split(",") if m.strip()),
            rounds=int(_env_float("BENCH_ROUNDS", 2 if quick else 4)),
            round_seconds=_env_float("BENCH_ROUND_SECONDS", 2.0 if quick else 8.0),
            key_check=os.environ.get("BENCH_KEY_CHECK", "1") != "0",
        )

    def describe(self) -> dict[str, object]:
        return {
            "quick": self.quick,
            "warm-up seconds": self.warmup_seconds,
            "saturation seconds": self.main_seconds,
            "fixed-rate seconds": self.rate_seconds,
            "rates": list(self.rates),
            "wrk connections": self.connections,
            "soak seconds": self.soak_seconds,
            "soak modes": sorted(self.soak_modes) if self.soak_seconds > 0 else [],
            "rounds": self.rounds,
            "round seconds": self.round_seconds,
            "subject cpus": sorted(self.subject_cpus) if self.subject_cpus else "any",
            "load generator, broker and harness cpus": (
                sorted(self.load_cpus) if self.load_cpus else "any"
            ),
        }


@dataclass(frozen=True)
class Snapshot:
    """Counters read just before and just after a run."""

    wall: float
    subject_cpu: float
    broker_cpu: float | None
    busy: float  # the whole machine's busy CPU seconds
    harness: float  # this process and its finished children (wrk, vegeta)
    records: int  # on the subject's event topics
    dead_letters: int  # on its dead-letter topic


@dataclass
class Subject:
    """A server to measure: how to start it and what it is."""

    name: str
    base: str
    kind: str
    argv: list[str]
    env: dict[str, str]
    prefix: str | None  # topic prefix, if it writes to Kafka
    workers: int = 1
    replicas: bool = False  # the workers are separate bridge processes on their own ports
    ack: str | None = None
    metrics: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    cut: str | None = None  # cut short at this layer (cutpoints.py): saturation only

    @property
    def topics(self) -> str | None:
        """What the name of each of its topics starts with (events and dead letters): its
        prefix and a '.', which sets it apart from the subjects whose prefix extends its
        own (``bench…-broker.`` and ``bench…-broker-w2.``); None if it writes nothing."""
        return None if self.prefix is None else self.prefix + "."

    @property
    def extra_topics(self) -> list[str]:
        """The topics of its own the bridge may write to besides the events': the
        dead-letter topic, inside its prefix (the default ``geins.deadletter`` would be
        every subject's and no subject's)."""
        deadletter = self.env.get("BRIDGE_DEADLETTER_TOPIC")
        return [deadletter] if deadletter and self.prefix is not None else []


# --------------------------------------------------------------------------
# What to measure


def clean_env() -> dict[str, str]:
    """The harness's environment without anything that configures a subject."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BRIDGE_", "BENCH_", "PROMETHEUS_MULTIPROC"))
    }


def supported_ack_modes() -> tuple[list[str], dict[str, str]]:
    """The ack modes ``bridge check-config`` accepts (exit 2 means: not this version)."""
    supported: list[str] = []
    notes: dict[str, str] = {}
    for mode in ACK_MODES:
        env = {**clean_env(), "BRIDGE_ACK": mode, "BRIDGE_TOKENS": TOKEN}
        result = subprocess.run(
            [PYTHON, "-m", "bridge", "check-config"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode == 0:
            supported.append(mode)
        elif result.returncode == 2:
            notes[mode] = "not supported by this version (check-config exit 2)"
        else:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:]
            notes[mode] = f"check-config failed with exit {result.returncode}: {last}"
    return supported, notes


def bridge_serve_workers_flag() -> str | None:
    """``--workers`` if ``bridge serve`` has it (it did not when this was written)."""
    result = subprocess.run(
        [PYTHON, "-m", "bridge", "serve", "--help"],
        env={**clean_env(), "BRIDGE_TOKENS": TOKEN},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--workers" if "--workers" in result.stdout else None


def make_subjects(
    plan: Plan, bootstrap: str, run_id: str, modes: list[str], workers_flag: str | None
) -> list[Subject]:
    def launch(name: str, workers: int) -> list[str]:
        # tests/bench/subject.py runs what `uvicorn APP --loop uvloop --http httptools
        # --no-access-log` or `python -m bridge serve` would, under a command line that
        # names neither (see its docstring: subjects were killed from outside).
        argv = [PYTHON, "-m", "tests.bench.subject", name]
        return argv + (["--workers", str(workers)] if workers > 1 else [])

    def naive(workers: int) -> Subject:
        prefix = f"bench{run_id}-naive{'-w' + str(workers) if workers > 1 else ''}"
        return Subject(
            name="naive-bridge" + (f" {workers} workers" if workers > 1 else ""),
            base="naive-bridge",
            kind="baseline",
            argv=launch("naive", workers),
            env={
                "BENCH_KAFKA_BOOTSTRAP": bootstrap,
                "BENCH_TOPIC_PREFIX": prefix,
                "BENCH_TOKEN": TOKEN,
            },
            prefix=prefix,
            workers=workers,
        )

    def bridge(mode: str, workers: int) -> Subject:
        # Without a --workers option, more workers means replicas: that many bridge
        # processes, each on its own port with its own spool, the load split evenly.
        replicas = workers > 1 and workers_flag is None
        prefix = f"bench{run_id}-{mode}{'-w' + str(workers) if workers > 1 else ''}"
        plural = "replicas" if replicas else "workers"
        return Subject(
            name=f"bridge {mode}" + (f" {workers} {plural}" if workers > 1 else ""),
            base=f"bridge {mode}",
            kind="bridge",
            argv=launch("cli", 1 if replicas else workers),
            env={
                "BRIDGE_KAFKA_BOOTSTRAP": bootstrap,
                "BRIDGE_TOKENS": TOKEN,
                "BRIDGE_HOST": "127.0.0.1",
                "BRIDGE_TOPIC_TEMPLATE": prefix + ".{entity}.{action}",
                "BRIDGE_DEADLETTER_TOPIC": prefix + DEADLETTER,
                "BRIDGE_ACK": mode,
            },
            prefix=prefix,
            workers=workers,
            replicas=replicas,
            ack=mode,
            metrics=not replicas,  # a scrape would see one replica of several
        )

    def simple(name: str, workers: int) -> Subject:
        return Subject(
            name=name + (f" {workers} workers" if workers > 1 else ""),
            base=name,
            kind="baseline",
            argv=launch(name.split("-", maxsplit=1)[0], workers),
            env={},
            prefix=None,
            workers=workers,
        )

    def cut(layer: str) -> Subject:
        # The broker mode, cut short: what each layer of a request costs (report.py).
        whole = bridge("broker", 1)
        prefix = f"{whole.prefix}-{layer}"
        publishes = layer == "nometrics"
        return Subject(
            name=f"bridge broker cut:{layer}",
            base=f"bridge broker cut:{layer}",
            kind="layer",
            argv=[*whole.argv, "--cut", layer],
            env={
                **whole.env,
                "BRIDGE_TOPIC_TEMPLATE": prefix + ".{entity}.{action}",
                "BRIDGE_DEADLETTER_TOPIC": prefix + DEADLETTER,
            },
            prefix=prefix if publishes else None,
            ack="broker",
            cut=layer,
        )

    subjects = [
        simple("raw-asgi", 1),
        simple("starlette-noop", 1),
        naive(1),
        *(bridge(mode, 1) for mode in modes),
    ]
    if plan.layers and "broker" in modes:
        subjects += [cut(layer) for layer in CUTS]
    if plan.two_workers:
        subjects += [
            simple("raw-asgi", 2),
            simple("starlette-noop", 2),
            naive(2),
        ]
        subjects += [bridge(mode, 2) for mode in modes if mode in {"broker", "durable"}]
    if plan.only:
        subjects = [
            s
            for s in subjects
            if s.name in plan.only or s.base in plan.only or (s.ack or "") in plan.only
        ]
    # The single-worker baselines once more, last: whether the machine kept its speed
    # from the first subject to the last (report.speed_drift).
    subjects += [
        replace(s, name=s.name + report.RECHECK, base=s.base + report.RECHECK, kind="recheck")
        for s in list(subjects)
        if s.base in {"raw-asgi", "starlette-noop"} and s.workers == 1
    ]
    return subjects


# --------------------------------------------------------------------------
# Measuring one subject


class SubjectDied(RuntimeError):
    """The subject's process was found dead at the end of ``run``, which has been checked
    against Kafka (what it answered so far against the records that arrived) and must
    still be kept with the subject's runs."""

    def __init__(self, run: RunResult, label: str, log_tail: str) -> None:
        super().__init__(f"the subject died during {label}:\n{log_tail}")
        self.run = run


def _settle_wait(subject: Subject) -> float:
    """How long to wait for its records to reach Kafka (the spooling modes are slower)."""
    return 60.0 if subject.ack in {"memory", "durable"} else 30.0


def _noise(run: RunResult) -> str:
    if run.other_load is None or run.other_load <= report.NOISY:
        return ""
    return f" (other processes used {100 * run.other_load:.0f} % of a CPU meanwhile)"


class Bench:
    def __init__(
        self,
        plan: Plan,
        kafka: LocalKafka,
        probe: KafkaProbe,
        mix: list[Delivery],
        wrk: str | None,
        vegeta: str | None,
        workdir: Path,
    ) -> None:
        self.plan = plan
        self.kafka = kafka
        self.probe = probe
        self.mix = mix
        self.wrk = wrk
        self.vegeta = vegeta
        self.workdir = workdir
        self.timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.quiet_waited = 0.0
        self.retry_spent = 0.0

    def foreign_load(self, seconds: float = 1.0) -> float:
        """CPUs used by processes other than ours (broker, harness) over ``seconds``."""
        busy, harness, broker = machine_busy_seconds(), harness_cpu_seconds(), self.broker_cpu()
        time.sleep(seconds)
        ours = harness_cpu_seconds() - harness
        broker_after = self.broker_cpu()
        if broker is not None and broker_after is not None:
            ours += broker_after - broker
        return max(0.0, machine_busy_seconds() - busy - ours) / seconds

    def wait_for_quiet(self, name: str) -> None:
        """Give something else running on the machine (a test suite, say) a chance to end."""
        allowed = min(self.plan.quiet_wait, self.plan.quiet_budget - self.quiet_waited)
        if allowed <= 0:
            return
        started = time.monotonic()
        load = self.foreign_load()
        if load <= report.NOISY:
            return
        say(
            f"{name}: other processes use {100 * load:.0f} % of a CPU; "
            f"waiting up to {allowed:.0f} s"
        )
        while load > report.NOISY and time.monotonic() - started < allowed:
            load = self.foreign_load(2.0)
        self.quiet_waited += time.monotonic() - started

    def broker_cpu(self) -> float | None:
        pid = self.kafka.pid
        return cpu_seconds(pid) if pid is not None else None

    def measure(self, subject: Subject) -> SubjectResult:
        """Measure a subject; once more if it broke (a stray signal on a shared machine)."""
        first = self._measure_once(subject)
        if first.error is None:
            return first
        say(f"{subject.name}: starting it once more")
        second = self._measure_once(subject)
        for run in first.runs:
            run.label += " (attempt 1)"
        second.runs = first.runs + second.runs
        second.earlier_error = first.error
        return second

    def _measure_once(self, subject: Subject) -> SubjectResult:
        multi = subject.workers > 1
        cpus = None if multi else self.plan.subject_cpus
        result = SubjectResult(
            name=subject.name,
            kind=subject.kind,
            base=subject.base,
            workers=subject.workers,
            ack=subject.ack,
            cpus=",".join(map(str, sorted(cpus))) if cpus else "any",
            writes_kafka=subject.prefix is not None,
            cut=subject.cut,
        )
        home = self.workdir / subject.name.replace(" ", "-")
        proc = self._process(subject, home, cpus)
        self.wait_for_quiet(subject.name)
        say(f"{subject.name}: starting on port {proc.port} (cpus {result.cpus})")
        try:
            proc.start()
            self._runs(subject, proc, result, home)
            if subject.metrics:
                self._scrape_metrics(proc, result)
            if self.plan.profile and subject.ack == "broker" and not (multi or subject.cut):
                self._profile(subject, proc, result, home)
        except Exception as exc:  # one broken subject must not end the run
            if isinstance(exc, SubjectDied):
                result.runs.append(exc.run)
            result.error = f"{type(exc).__name__}: {exc}"
            say(f"{subject.name}: {result.error}")
        finally:
            if proc.proc is not None:
                result.rss_end_bytes = rss_bytes(proc.pid) if proc.alive() else None
                result.peak_rss_bytes = proc.peak_rss_bytes() or None
                result.exit_code = proc.stop()
        return result

    def _process(self, subject: Subject, home: Path, cpus: set[int] | None) -> SubjectProcess:
        """The subject's process, not started yet, in ``home``; its topics created."""
        home.mkdir(parents=True, exist_ok=True)
        # replicas: one port each; the first is the subject's ``port``
        replica_ports = free_ports(subject.workers) if subject.replicas else []
        port = replica_ports[0] if replica_ports else free_port()
        if subject.prefix is not None:
            self.probe.create_topics(
                [f"{subject.prefix}.{t}" for t in event_types(self.mix)] + subject.extra_topics,
                TOPIC_PARTITIONS,
            )
        env = {**clean_env(), "PYTHONPATH": str(REPO), **subject.env}
        if replica_ports:
            argv = [*subject.argv, "--replica-ports", ",".join(map(str, replica_ports))]
        elif subject.kind in {"bridge", "layer"}:  # configured by BRIDGE_* variables
            env["BRIDGE_PORT"] = str(port)
            argv = subject.argv
        else:
            argv = [*subject.argv, "--port", str(port)]
        return SubjectProcess(
            argv,
            env=env,
            cwd=home / "cwd",
            port=port,
            log=home / "subject.log",
            cpus=cpus,
            more_ports=replica_ports[1:],
        )

    def interleaved(self, subjects: Sequence[Subject]) -> dict[str, list[RunResult]]:
        """Saturation rounds of single-worker ``subjects`` taking turns, by name.

        Measured one after the other, minutes apart, two subjects can differ by the
        machine's drift alone (10 % from minute to minute here, up to 2x within an hour).
        So all of them run side by side (each on the subject CPU, idle but for the one
        under load) and take short turns, the order reversed every other round: a steady
        drift then moves every subject's mean alike. Each run is Kafka-checked like any
        other, which also waits for a subject's backlog to reach Kafka before the next
        one's turn. A subject that does not start or breaks is left out (its rounds are
        relabelled NOT_COUNTED); the others go on.
        """
        started: dict[str, tuple[Subject, SubjectProcess, Path]] = {}
        runs: dict[str, list[RunResult]] = {s.name: [] for s in subjects}
        self.wait_for_quiet("interleaved rounds")
        try:
            for subject in subjects:
                home = self.workdir / ("rounds-" + subject.name.replace(" ", "-"))
                proc = self._process(subject, home, self.plan.subject_cpus)
                try:
                    proc.start()
                    warm = self._wrk_run(
                        subject, proc, home, ROUNDS_WARMUP, self.plan.warmup_seconds, drain=1.0
                    )
                except Exception as exc:  # measured alone later, without rounds
                    if isinstance(exc, SubjectDied):
                        runs[subject.name].append(exc.run)
                    say(f"{subject.name}: left out of the rounds: {type(exc).__name__}: {exc}")
                    proc.stop()
                    continue
                runs[subject.name].append(warm)
                started[subject.name] = (subject, proc, home)
            order = list(started)
            for number in range(1, self.plan.rounds + 1):
                turns = order if number % 2 else order[::-1]
                for name in turns:
                    if name in started:
                        self._turn(started, runs, name, f"{ROUND}{number}")
                say(f"round {number} of {self.plan.rounds} done")
        finally:
            for _, proc, _ in started.values():
                proc.stop()
        return runs

    def _turn(
        self,
        started: dict[str, tuple[Subject, SubjectProcess, Path]],
        runs: dict[str, list[RunResult]],
        name: str,
        label: str,
    ) -> None:
        subject, proc, home = started[name]
        try:
            # A disturbed turn is measured again at once (the less disturbed one counts):
            # a round has no other way to leave out what another process took.
            run = self._undisturbed(
                subject,
                runs[name],
                lambda: self._wrk_run(
                    subject, proc, home, label, self.plan.round_seconds, drain=1.0
                ),
                set_aside=NOT_COUNTED,
            )
        except Exception as exc:  # the subject broke: its rounds no longer mirror the others'
            if isinstance(exc, SubjectDied):  # Kafka-checked; a failed run of the subject
                runs[name].append(exc.run)
            say(f"{name}: {label}: {type(exc).__name__}: {exc}; its rounds are not counted")
            del started[name]
            proc.stop()
            for earlier in runs[name]:
                if earlier.label.startswith(ROUND) and not earlier.label.endswith(NOT_COUNTED):
                    earlier.label += NOT_COUNTED
            return
        say(
            f"{name}: {label}: {run.rps:,.0f} req/s"
            + (f", Kafka {run.verify_detail}" if run.verified is not None else "")
            + _noise(run)
        )

    def _runs(
        self, subject: Subject, proc: SubjectProcess, result: SubjectResult, home: Path
    ) -> None:
        if self.wrk is None:
            msg = "wrk is not available"
            raise RuntimeError(msg)
        warm = self._wrk_run(subject, proc, home, WARMUP, self.plan.warmup_seconds, drain=1.0)
        result.runs.append(warm)
        result.rss_after_warmup_bytes = rss_bytes(proc.pid)
        sat = self._undisturbed(
            subject,
            result.runs,
            lambda: self._wrk_run(
                subject,
                proc,
                home,
                SATURATION,
                self.plan.main_seconds,
                drain=self.plan.drain_seconds,
            ),
        )
        say(
            f"{subject.name}: {sat.rps:,.0f} req/s at saturation, {sat.non_2xx} non-2xx"
            + (f", Kafka {sat.verify_detail}" if sat.verified is not None else "")
            + _noise(sat)
        )
        if subject.workers > 1 or subject.cut or subject.kind == "recheck":
            return
        if self.vegeta is not None:
            self._rate_runs(subject, proc, result, home)
        if self.plan.soak_seconds > 0 and subject.ack in self.plan.soak_modes:
            self._soak(subject, proc, result, home)

    def _rate_runs(
        self, subject: Subject, proc: SubjectProcess, result: SubjectResult, home: Path
    ) -> None:
        """Latency at each fixed offered rate (vegeta, open loop)."""
        for rate in self.plan.rates:
            run = self._undisturbed(
                subject, result.runs, functools.partial(self._vegeta_run, subject, proc, home, rate)
            )
            say(
                f"{subject.name}: at {rate}/s p50 {report.ms(run.p50_ms)} p99 "
                f"{report.ms(run.p99_ms)} p99.9 {report.ms(run.p999_ms)} ms, "
                f"{run.non_2xx} non-2xx"
                + (f", Kafka {run.verify_detail}" if run.verified is not None else "")
                + _noise(run)
            )

    def _soak(
        self, subject: Subject, proc: SubjectProcess, result: SubjectResult, home: Path
    ) -> None:
        """A long run at saturation, keeping the RSS samples taken during it: memory that
        grows with the number of requests served (a leak, an unbounded cache) shows here
        and not in the 15-second runs."""
        seconds = self.plan.soak_seconds
        say(f"{subject.name}: soak, {seconds:.0f} s at saturation")
        first = len(proc.rss_samples)
        run = self._wrk_run(subject, proc, home, SOAK, seconds, drain=self.plan.drain_seconds)
        result.runs.append(run)
        result.soak_rss = bucket_peaks(proc.rss_samples[first:], SOAK_BUCKET_SECONDS)
        quarters = report.soak_quarters(result.soak_rss)
        say(
            f"{subject.name}: soak {run.rps:,.0f} req/s, Kafka {run.verify_detail}"
            + (
                f", RSS peak {quarters[0] / report.MB:.1f} MB in the second quarter, "
                f"{quarters[1] / report.MB:.1f} MB in the last"
                + ("" if report.is_flat(quarters) else " (grows)")
                if quarters
                else ""
            )
            + _noise(run)
        )

    def _undisturbed(
        self,
        subject: Subject,
        runs: list[RunResult],
        measure: Callable[[], RunResult],
        *,
        set_aside: str = "",
    ) -> RunResult:
        """Measure; if other processes disturbed the run and time allows, measure once more
        and keep the less disturbed run. Every run is kept in ``runs`` (and checked); the
        label of the one not kept ends with ``set_aside`` too."""
        run = measure()
        if (
            run.other_load is None
            or run.other_load <= report.NOISY
            or self.retry_spent >= self.plan.retry_budget
        ):
            runs.append(run)
            return run
        started = time.monotonic()
        say(f"{subject.name}: {run.label}{_noise(run)}: measuring it again")
        self.wait_for_quiet(subject.name)
        try:
            again = measure()
        except SubjectDied:
            run.label += " (disturbed)" + set_aside
            runs.append(run)
            raise
        self.retry_spent += time.monotonic() - started
        if (again.other_load or 0.0) <= run.other_load:
            run, again = again, run
        again.label += " (disturbed, repeated)" + set_aside
        runs += [again, run]
        return run

    def _snapshot(
        self,
        subject: Subject,
        proc: SubjectProcess,
        *,
        records: bool,
        load_pid: int | None = None,
    ) -> Snapshot:
        """Read the counters; ``load_pid`` is a running load generator (ours)."""
        return Snapshot(
            wall=time.monotonic(),
            subject_cpu=proc.cpu_seconds(),
            broker_cpu=self.broker_cpu(),
            busy=machine_busy_seconds(),
            harness=harness_cpu_seconds() + (cpu_seconds(load_pid) if load_pid else 0.0),
            records=self._events(subject) if records else 0,
            dead_letters=self._dead_letters(subject) if records else 0,
        )

    def _events(self, subject: Subject) -> int:
        if subject.topics is None:
            return 0
        return self.probe.count(subject.topics, without=subject.extra_topics)

    def _dead_letters(self, subject: Subject) -> int:
        return sum(self.probe.count(topic) for topic in subject.extra_topics)

    def _finish(
        self,
        subject: Subject,
        proc: SubjectProcess,
        run: RunResult,
        before: Snapshot,
        after: Snapshot | None = None,
    ) -> None:
        """CPU accounting (up to ``after``: the end of the measured window, else now),
        the Kafka check, and a check that the subject survived: if it died, the run is
        still checked against Kafka, marked ``died`` and raised with SubjectDied, for
        the caller to keep it (a failed run of a subject that writes to Kafka)."""
        if after is None:
            after = self._snapshot(subject, proc, records=False)
        run.cpu_seconds = after.subject_cpu - before.subject_cpu
        broker = None
        if after.broker_cpu is not None and before.broker_cpu is not None:
            broker = after.broker_cpu - before.broker_cpu
        run.broker_cpu_seconds = broker
        ours = run.cpu_seconds + (broker or 0.0) + after.harness - before.harness
        wall = after.wall - before.wall
        if wall > 0:
            run.other_load = max(0.0, after.busy - before.busy - ours) / wall
        run.died = not proc.alive()
        self._verify(subject, run, before)
        if run.died:
            label = run.label
            run.label += DIED
            raise SubjectDied(run, label, proc.log_tail())

    def _verify(self, subject: Subject, run: RunResult, before: Snapshot) -> None:
        if subject.topics is None:
            return
        after, waited = self.probe.settle(
            subject.topics,
            before.records + run.ok,
            without=subject.extra_topics,
            max_wait=_settle_wait(subject),
        )
        run.records = after - before.records
        run.dead_letters = self._dead_letters(subject) - before.dead_letters
        run.settle_seconds = waited
        run.verified = run.records == run.ok and not run.dead_letters
        run.verify_detail = kafka_detail(
            run.records, run.ok, died=run.died, dead_letters=run.dead_letters
        )

    def check_total(self, subject: Subject, result: SubjectResult) -> None:
        """Once the subject stopped for good (its process in the rounds and its own): every
        record on its topics against the 2xx answers of all its runs. A record that
        reached Kafka after one run's check and before the next one's starting count
        belongs to no run; only this count sees it."""
        if subject.topics is None:
            return
        result.records_total, _ = self.probe.settle(
            subject.topics,
            result.answered_total,
            without=subject.extra_topics,
            max_wait=_settle_wait(subject),
        )
        result.dead_letters_total = self._dead_letters(subject)
        if self.plan.key_check:
            started = time.monotonic()
            try:
                result.keys_repeated = self.probe.repeated_keys(
                    subject.topics, without=subject.extra_topics
                )
            except (TimeoutError, KafkaError) as exc:  # the counts still stand
                result.keys_repeated = KEYS_UNREAD
                say(f"{subject.name}: could not read every record's key: {exc!r}")
            else:
                seconds = time.monotonic() - started
                say(f"{subject.name}: read every record's key in {seconds:.1f} s")
        say(f"{subject.name}: Kafka, {ALL_RUNS}: {result.total_detail}")

    def _wrk_run(
        self,
        subject: Subject,
        proc: SubjectProcess,
        home: Path,
        label: str,
        seconds: float,
        *,
        drain: float,
    ) -> RunResult:
        assert self.wrk is not None
        script = home / f"wrk-{label}.lua"
        result_path = home / f"wrk-{label}.json"
        ports = proc.ports
        script.write_text(
            wrk_script(
                self.mix,
                host="127.0.0.1",
                port=proc.port,
                main_seconds=seconds,
                run_id=secrets.token_hex(4),
                timestamp=self.timestamp,
                result_path=result_path,
                ports=ports,
            ),
            encoding="utf-8",
        )
        before = self._snapshot(subject, proc, records=True)
        at_switch: list[Snapshot] = []

        def switch(wrk_pid: int) -> None:
            at_switch.append(self._snapshot(subject, proc, records=False, load_pid=wrk_pid))

        wrk = run_wrk(
            self.wrk,
            url=proc.url + "/webhooks/geins",
            script=script,
            result_path=result_path,
            connections=self.plan.connections,
            main_seconds=seconds,
            drain_seconds=drain,
            cpus=self.plan.load_cpus,
            log=home / "load.log",
            on_switch=switch,
            threads=len(ports),
        )
        run = RunResult(
            label=label,
            offered_rate=None,
            seconds=wrk.seconds,
            sent=wrk.sent,
            ok=wrk.ok,
            non_2xx=wrk.non_2xx,
            socket_errors=wrk.socket_errors,
            rps=wrk.rps,
        )
        self._finish(subject, proc, run, before, at_switch[0] if at_switch else None)
        return run

    def _vegeta_run(
        self, subject: Subject, proc: SubjectProcess, home: Path, rate: int
    ) -> RunResult:
        assert self.vegeta is not None
        targets = home / f"targets-{rate}.jsonl"
        count = int(rate * self.plan.rate_seconds * 1.1) + 100
        run_id = secrets.token_hex(4)
        with targets.open("w", encoding="utf-8") as out:
            for line in vegeta_targets(
                self.mix,
                base_url=proc.url,
                count=count,
                run_id=run_id,
                timestamp=self.timestamp,
            ):
                out.write(line + "\n")
        before = self._snapshot(subject, proc, records=True)
        veg = run_vegeta(
            self.vegeta,
            targets=targets,
            rate=rate,
            seconds=self.plan.rate_seconds,
            workdir=home,
            cpus=self.plan.load_cpus,
            log=home / "load.log",
        )
        run = RunResult(
            label=rate_label(rate),
            offered_rate=rate,
            seconds=veg.seconds,
            sent=veg.sent,
            ok=veg.ok,
            non_2xx=veg.non_2xx + veg.errors,
            socket_errors=veg.errors,
            rps=veg.ok / veg.seconds if veg.seconds else 0.0,
            p50_ms=veg.percentile(50),
            p99_ms=veg.percentile(99),
            p999_ms=veg.percentile(99.9),
            max_ms=max(veg.latencies_ms) if veg.latencies_ms else None,
            status_counts=veg.status_counts,
        )
        self._finish(subject, proc, run, before)
        targets.unlink(missing_ok=True)
        return run

    def _scrape_metrics(self, proc: SubjectProcess, result: SubjectResult) -> None:
        times: list[float] = []
        body = b""
        for _ in range(20):
            started = time.perf_counter()
            status, body = http_get(proc.url + "/metrics", timeout=5)
            times.append(time.perf_counter() - started)
            if status != 200:
                return
        result.metrics_scrape_ms = 1000 * statistics.median(times)
        result.metrics_bytes = len(body)
        result.metrics_samples = sum(
            1 for line in body.decode(errors="replace").splitlines() if line and line[0] != "#"
        )

    def _profile(
        self, subject: Subject, proc: SubjectProcess, result: SubjectResult, home: Path
    ) -> None:
        """Saturate once more with py-spy attached; the functions with most self time."""
        pyspy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
        if not Path(pyspy).is_file():
            say("py-spy not found (pip install py-spy): no profile")
            return
        raw = home / "profile.txt"
        seconds = self.plan.main_seconds
        cmd = pinned(
            [
                pyspy,
                "record",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--pid",
                str(proc.pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                "200",
                "--nonblocking",
            ],
            self.plan.load_cpus,
        )
        say(f"{subject.name}: profiling with py-spy for {seconds:g} s")
        with (home / "profile.log").open("w", encoding="utf-8") as log:
            spy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            time.sleep(1.0)
            run = self._wrk_run(subject, proc, home, "profiled", seconds, drain=2.0)
            result.runs.append(run)  # Kafka-checked like the others, and in the total
            spy.wait(timeout=seconds + 60)
        say(f"{subject.name}: profiled run {run.rps:,.0f} req/s ({run.verify_detail or 'n/a'})")
        by_function: Counter[str] = Counter()
        by_file: Counter[str] = Counter()
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for line in raw.read_text(errors="replace").splitlines():
                stack, _, count_text = line.rpartition(" ")
                if not stack or not count_text.isdigit():
                    continue
                # "function (file:line)" -> "function (file)": one row per function
                leaf = re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1])
                found = re.search(r"\(([^()]*)\)$", leaf)
                by_function[leaf] += int(count_text)
                by_file[found.group(1) if found else leaf] += int(count_text)
                total += int(count_text)
        if total:
            result.profile_samples = total
            result.profile_top = [(k, 100 * n / total) for k, n in by_function.most_common(15)]
            result.profile_files = [(k, 100 * n / total) for k, n in by_file.most_common(15)]
            result.profile_path = str(raw.relative_to(REPO))
            shutil.copy(raw, self.plan.out / "profile-broker.txt")


# --------------------------------------------------------------------------
# The run


def versions(wrk: str | None, vegeta: str | None) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("uvicorn", "starlette", "aiokafka", "uvloop", "httptools", "prometheus-client"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["Kafka"] = f"{KAFKA_VERSION} (single node, KRaft, on this machine)"
    found["wrk"] = tool_version(wrk, "wrk")
    found["vegeta"] = tool_version(vegeta, "vegeta")
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "bridge"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        found["bridge"] = head + (" + uncommitted changes in bridge/" if dirty else "")
    return found


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "memory": memory,
        "kernel": platform.release(),
    }


def main() -> int:
    plan = Plan.from_env()
    started = time.monotonic()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if plan.load_cpus:
        os.sched_setaffinity(0, plan.load_cpus)  # the harness stays off the subject's core
    plan.out.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(3)
    workdir = WORKDIR / "last-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    say(f"{'quick' if plan.quick else 'full'} run; work files in {workdir}")

    wrk = ensure_wrk()
    vegeta = ensure_vegeta()
    notes: list[str] = []
    if wrk is None:
        notes.append("wrk could not be installed: no saturation runs")
    if vegeta is None:
        notes.append("vegeta could not be installed: no fixed-rate latency runs")
    modes, mode_notes = supported_ack_modes()
    if not modes:  # a run of the baselines alone would measure nothing this is for
        raise SystemExit(f"bench: no ack mode of the bridge can be measured: {mode_notes}")
    notes += [f"ack mode `{m}`: {why}" for m, why in mode_notes.items()]
    workers_flag = bridge_serve_workers_flag()
    if plan.two_workers and workers_flag is None:
        notes.append(
            "`bridge serve` has no --workers option (one process, one core: scale with "
            "replicas): the bridge's two-worker rows are two replicas on two ports"
        )
    mix, mix_source = load_mix(TOKEN)

    kafka_home = REPO / ".cache" / "kafka"
    ensure_jars(kafka_home)
    port, controller_port = free_ports(2)
    results: list[SubjectResult] = []
    rounds: dict[str, list[RunResult]] = {}
    quiet_waited = retry_spent = 0.0
    say(f"starting Kafka {KAFKA_VERSION} on 127.0.0.1:{port}")
    with LocalKafka(
        kafka_home, workdir / "kafka" / "data", port, controller_port, heap="512m"
    ) as kafka:
        if plan.load_cpus and kafka.pid is not None:
            pin_all_threads(kafka.pid, plan.load_cpus)
        probe = KafkaProbe(kafka.bootstrap)
        try:
            bench = Bench(plan, kafka, probe, mix, wrk, vegeta, workdir)
            subjects = make_subjects(plan, kafka.bootstrap, run_id, modes, workers_flag)
            # What the ratios and the layer table compare: the single-worker baselines,
            # bridge modes and the bridge cut short at each layer.
            compared = [
                s for s in subjects if s.workers == 1 and s.kind in {"baseline", "bridge", "layer"}
            ]
            rounds = bench.interleaved(compared) if plan.rounds and len(compared) > 1 else {}
            for subject in subjects:
                result = bench.measure(subject)
                result.runs[:0] = rounds.get(subject.name, [])
                bench.check_total(subject, result)
                results.append(result)
                quiet_waited, retry_spent = bench.quiet_waited, bench.retry_spent
        finally:
            probe.close()

    elapsed = time.monotonic() - started
    if retry_spent >= 1:
        notes.append(
            f"spent {retry_spent:.0f} s measuring runs again that other processes had disturbed "
            "(both runs are in the Kafka check table; the less disturbed one counts)"
        )
    if quiet_waited >= 1:
        notes.append(
            f"waited {quiet_waited:.0f} s in all for other processes on the machine to "
            "calm down before starting subjects"
        )
    context = report.Context(
        date=date,
        quick=plan.quick,
        elapsed_seconds=elapsed,
        plan=plan.describe(),
        machine=machine(),
        versions=versions(wrk, vegeta),
        mix=[(t, share, shape.replace(TOKEN, "<token>")) for t, share, shape in describe(mix)],
        mix_source=mix_source,
        notes=notes,
        skipped_modes=sorted(mode_notes),
    )
    written = report.save(plan.out, results, context)
    say(f"done in {elapsed / 60:.1f} min: {', '.join(str(p) for p in written)}")
    problems = report.failures(results)
    for problem in problems:
        say(problem)
    for name, start, end in report.drifted(report.speed_drift(results)):
        say(
            f"the machine's speed changed during the run: {name} {start:,.0f} req/s at the "
            f"start, {end:,.0f} at the end; what was measured minutes apart mixes the two"
            + ("" if rounds else ", the ratios too")
            + " (see results.md)"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
