"""deploy/systemd: the unit passes systemd's own check, gives the bridge the time it
needs to stop, and its settings run a bridge that delivers (no systemd runs here as
PID 1, so the unit is not started by systemd itself)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx2
import pytest

from bridge.config import DEFAULT_MAX_CONNECTIONS, FILE_RESERVE, load_settings
from bridge.devkafka import free_ports
from tests.deploy_support.shutdown import shutdown_seconds
from tests.deploy_support.systemd import environment_file, one, parse_unit, values
from tests.kafkaread import read_all_sync
from tests.polling import wait_until
from tests.process import BridgeProcess

SYSTEMD = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
UNIT = SYSTEMD / "geins-bridge.service"
ENV_EXAMPLE = SYSTEMD / "bridge.env.example"
STATE = "/var/lib/geins-bridge"
CONFIG = "/etc/geins-bridge"


def unit_environment() -> dict[str, str]:
    """What the service's process gets: the unit's Environment= lines, then the
    EnvironmentFile (the example), which systemd applies after them."""
    service = parse_unit(UNIT)["Service"]
    env = dict(value.split("=", 1) for value in values(service, "Environment"))
    assert one(service, "EnvironmentFile") == f"{CONFIG}/bridge.env"
    return env | environment_file(ENV_EXAMPLE)


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """No unknown key, no bad value: systemd-analyze says nothing about the unit. It also
    checks that ExecStart's program exists, so the copy checked runs this venv's bridge."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    installed = Path(sys.executable).parent / "bridge"
    assert installed.exists()
    text = UNIT.read_text()
    assert "ExecStart=/opt/geins-bridge/bin/bridge serve" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/geins-bridge/bin/bridge", str(installed)))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    said_about_unit = [line for line in done.stderr.splitlines() if UNIT.name in line]
    assert done.returncode == 0, done.stderr
    assert said_about_unit == [], done.stderr


def test_systemd_unit_lets_the_bridge_drain_and_keeps_its_spool() -> None:
    """Pins a stop timeout above the bridge's shutdown, SIGTERM to the bridge only, the
    spool and SQLite's temporary files in the state directory, no restart on exit 2,
    and a file limit leaving the bridge its full default of connections."""
    service = parse_unit(UNIT)["Service"]
    env = unit_environment()
    assert float(one(service, "TimeoutStopSec")) > shutdown_seconds(env)
    # and the comment above it says the sum it counts (it said 36 s when it was 37)
    said = re.search(r"\((\d+) s with\s*#?\s*the defaults", UNIT.read_text())
    assert said is not None
    assert float(said.group(1)) == shutdown_seconds({})
    assert one(service, "KillMode") == "mixed"
    assert one(service, "StateDirectory") == Path(STATE).name
    assert Path(env["BRIDGE_SPOOL_DIR"]).is_relative_to(STATE)
    assert env["SQLITE_TMPDIR"] == STATE
    assert one(service, "RestartPreventExitStatus") == "2"
    assert int(one(service, "LimitNOFILE")) - FILE_RESERVE >= DEFAULT_MAX_CONNECTIONS
    assert one(service, "ExecStart").split()[1:] == ["serve"]
    # Writes only its state directory (the spool): the rest of the system is read-only.
    assert one(service, "ProtectSystem") == "strict"


def test_systemd_settings_run_a_bridge_that_delivers_and_stops_in_time(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The unit's and the example file's settings, with the host's paths moved under
    tmp_path and the test broker as Kafka: the bridge starts, takes a webhook in the
    example's ack mode, publishes it, and exits 0 on SIGTERM within TimeoutStopSec."""
    state, config = tmp_path / "state", tmp_path / "etc"
    state.mkdir(mode=0o700)
    config.mkdir()
    token = uuid.uuid4().hex
    (config / "tokens").write_text(token + "\n")
    env = {
        name: value.replace(STATE, str(state)).replace(CONFIG, str(config))
        for name, value in unit_environment().items()
    }
    assert env["BRIDGE_ACK"] == "durable"
    env["BRIDGE_KAFKA_BOOTSTRAP"] = kafka_bootstrap
    env["BRIDGE_TOPIC_TEMPLATE"] = f"{topic_prefix}.{{entity}}.{{action}}"
    env["BRIDGE_DEADLETTER_TOPIC"] = f"{topic_prefix}.deadletter"
    # not the example's ports: make run uses 8080, and others may be taken
    assert env["BRIDGE_OPS_PORT"], "the operations endpoints on their own port"
    env["BRIDGE_PORT"], env["BRIDGE_OPS_PORT"] = (str(p) for p in free_ports(2))
    load_settings(environ=env).check_serving()
    bridge = BridgeProcess(env, tmp_path / "bridge.log", port=int(env["BRIDGE_PORT"]))
    try:
        bridge.start()
        answer = httpx2.post(
            f"{bridge.url}/webhooks/geins",
            headers={"Authorization": f"Bearer {token}", "x-Idempotency-Key": "systemd-1"},
            json={"entity": "Order", "action": "create", "id": "1"},
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        records = wait_until(
            lambda: read_all_sync(kafka_bootstrap, topic_prefix), bool, within=30, every=0.5
        )
        assert [r.key for r in records] == [b"systemd-1"]
        assert (state / "spool" / "spool.db").exists()
        bridge.signal(signal.SIGTERM)
        stop_timeout = float(one(parse_unit(UNIT)["Service"], "TimeoutStopSec"))
        assert bridge.wait(stop_timeout) == 0, bridge.log()
    finally:
        bridge.close()
