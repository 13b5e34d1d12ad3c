"""Shared fixtures: one real Kafka broker per test session, unique topics per test.

The broker is started lazily, only when a test asks for ``kafka_bootstrap``,
from the jars cached under .cache/kafka (fetched from Maven Central on first
use). Set TEST_KAFKA_BOOTSTRAP to use a broker you already run instead.

The broker leads its own session (a Ctrl-C in the terminal must not hit it
first), so only the fixture's teardown stops it. SIGTERM and SIGHUP (a CI
timeout, a closed terminal; SIGHUP not under nohup) are therefore turned into an
interrupt, as Ctrl-C is: pytest stops and tears the fixtures down. Against SIGKILL the broker,
as every test broker (tests/cluster.py), is started to die with this process (LocalKafka's
``die_with_parent``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from bridge import ingress
from bridge.devkafka import LocalKafka, ensure_jars, free_ports
from bridge.signals import stop_signals

REPO = Path(__file__).resolve().parents[1]
#: As bridge serve (bridge.signals): SIGHUP only when it was not ignored at start, so
#: that ``nohup make test`` outlives the terminal; SIGINT is pytest's own.
_STOP_SIGNALS = tuple(sig for sig in stop_signals() if sig != signal.SIGINT)
_previous_handlers: dict[signal.Signals, Callable[[int, FrameType | None], object] | int] = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the test run: stop as after Ctrl-C, fixtures torn down."""


def _interrupt(signum: int, _: FrameType | None) -> None:
    for sig in _STOP_SIGNALS:  # a second signal must not cut the teardown short
        signal.signal(sig, lambda *_: None)
    raise Terminated(f"{signal.Signals(signum).name} received: stopping the test run")


def pytest_configure() -> None:
    """Turn SIGTERM and SIGHUP into an interrupt for the session (see the module doc)."""
    for sig in _STOP_SIGNALS:
        previous = signal.signal(sig, _interrupt)
        _previous_handlers[sig] = signal.SIG_DFL if previous is None else previous


def pytest_unconfigure() -> None:
    """Give SIGTERM and SIGHUP back their handlers from before the session."""
    for sig, handler in _previous_handlers.items():
        signal.signal(sig, handler)
    _previous_handlers.clear()


@contextlib.contextmanager
def thrown_away(broker: LocalKafka) -> Iterator[None]:
    """Kill ``broker`` (SIGKILL) at the end of the block, rather than stop it cleanly: its
    storage is thrown away after the run, and a clean stop flushes and checkpoints every
    partition first (some 6 s for a broker of 300 topics on a loaded machine; the
    session's has more by the end of a run). Tests of a clean stop use their own."""
    try:
        yield
    finally:
        broker.stop(timeout=0)  # SIGTERM, then SIGKILL at once


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a real Apache Kafka broker (KRaft, single node)."""
    external = os.environ.get("TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    home = REPO / ".cache" / "kafka"
    ensure_jars(home)
    port, controller_port = free_ports(2)
    data_dir = tmp_path_factory.mktemp("kafka") / "data"
    # Started from the main thread, which lives as long as the session.
    with LocalKafka(home, data_dir, port, controller_port, die_with_parent=True) as broker:
        _session_broker_ports[:] = [port, controller_port]
        _session_broker[:] = [broker]
        with thrown_away(broker):
            yield broker.bootstrap


@pytest.fixture(scope="session")
def _lone_kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    home = REPO / ".cache" / "kafka"
    ensure_jars(home)
    port, controller_port = free_ports(2)
    data_dir = tmp_path_factory.mktemp("lone-kafka") / "data"
    extra = {"auto.create.topics.enable": "false"}
    with (
        LocalKafka(
            home, data_dir, port, controller_port, die_with_parent=True, extra_properties=extra
        ) as broker,
        thrown_away(broker),
    ):
        yield broker


@pytest.fixture
def lone_kafka(_lone_kafka_broker: LocalKafka) -> LocalKafka:
    """A second broker of the session's, running: it creates no topics (as managed Kafka
    usually does not), and a test may stop or kill it (the session's must stay up); the
    next test that asks for it gets it started again. One for the modules that need
    such a broker: one each cost some 10-14 s of a loaded CI run."""
    broker = _lone_kafka_broker
    if not broker.is_running():
        broker.start()
        broker.wait_ready()
    return broker


#: The session broker's listener and controller ports, once it runs (none with
#: TEST_KAFKA_BOOTSTRAP).
_session_broker_ports: list[int] = []
#: The session's broker, once it runs (none with TEST_KAFKA_BOOTSTRAP).
_session_broker: list[LocalKafka] = []


@pytest.fixture(scope="session")
def session_kafka(kafka_bootstrap: str) -> LocalKafka | None:
    """The session's broker, for a test that hangs, stops or starts it and leaves it as
    it found it (tests/test_faults.py's own_broker); None with an external one."""
    return _session_broker[0] if _session_broker else None


@pytest.fixture
def kafka_controller_port(kafka_bootstrap: str) -> int:
    """The KRaft controller port of the session's broker (skips with an external one)."""
    if not _session_broker_ports:
        pytest.skip("an external Kafka (TEST_KAFKA_BOOTSTRAP): its controller is unknown")
    return _session_broker_ports[1]


@pytest.fixture(autouse=True)
def private_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test spools into its own folder, never into the working directory."""
    spool = tmp_path / "spool"
    monkeypatch.setenv("BRIDGE_SPOOL_DIR", str(spool))
    return spool


@pytest.fixture(autouse=True)
def fresh_refusal_warnings() -> None:
    """Each test starts as a new bridge process would: no 503 refusal WARNING said yet
    (bridge.ingress.log_refusal says one a minute per reason, process-wide)."""
    ingress.warned_at.clear()


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses, so each test sees only its own topics."""
    return f"t{uuid.uuid4().hex[:12]}"
