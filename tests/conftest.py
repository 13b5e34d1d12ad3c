"""Shared fixtures: one real Kafka broker per test session, unique topics per test.

The broker is started lazily, only when a test asks for ``kafka_bootstrap``,
from the jars cached under .cache/kafka (fetched from Maven Central on first
use). Set TEST_KAFKA_BOOTSTRAP to use a broker you already run instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.devkafka import LocalKafka, ensure_jars, free_ports

REPO = Path(__file__).resolve().parents[1]


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
    with LocalKafka(home, data_dir, port, controller_port) as broker:
        yield broker.bootstrap


@pytest.fixture(autouse=True)
def private_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test spools into its own folder, never into the working directory."""
    spool = tmp_path / "spool"
    monkeypatch.setenv("BRIDGE_SPOOL_DIR", str(spool))
    return spool


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses, so each test sees only its own topics."""
    return f"t{uuid.uuid4().hex[:12]}"
