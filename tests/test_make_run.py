"""`make run` as the README tells a user to run it: the curl it prints works, and the
record it sends is what the printed `bridge tail` shows."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path

import httpx2
import pytest

from bridge.devkafka import free_port
from tests.polling import wait_until

REPO = Path(__file__).resolve().parent.parent


def _printed_commands(output: str) -> tuple[str, str]:
    """The curl (its continued lines joined) and the tail command make run printed."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    curl: list[str] = []
    for line in lines[start:]:
        curl.append(line)
        if not line.endswith("\\"):
            break
    tail = next(line for line in lines if line.startswith("See it arrive:"))
    return "\n".join(curl), tail.removeprefix("See it arrive:").strip()


@pytest.mark.parametrize("configured_by", ["environment", "file"])
def test_make_run_prints_a_curl_that_works_and_a_tail_that_shows_it(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, configured_by: str
) -> None:
    """Configured by BRIDGE_CONFIG_FILE, make run exported its own defaults, which win
    over the file: its dev-token was taken and the file's refused, its spool folder
    used, and the curl named port 8080 whatever the file said (a review)."""
    port = free_port()
    settings = {
        "kafka_bootstrap": kafka_bootstrap,
        "port": port,
        "spool_dir": str(tmp_path / "spool"),
        "topic_template": f"{topic_prefix}.{{entity}}.{{action}}",
        "deadletter_topic": f"{topic_prefix}.deadletter",
        "create_topics": True,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    if configured_by == "environment":
        env.update({f"BRIDGE_{name.upper()}": str(value) for name, value in settings.items()})
        env.pop("BRIDGE_CREATE_TOPICS")  # make run's own default
    else:
        settings["tokens"] = ["a-token-of-the-file-0123456789"]
        config = tmp_path / "bridge.toml"
        config.write_text(
            "".join(f"{name} = {json.dumps(value)}\n" for name, value in settings.items())
        )
        env["BRIDGE_CONFIG_FILE"] = str(config)
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # make, its shell and the bridge: one group to stop
        )
    try:

        def ready() -> bool:
            assert make.poll() is None, log_path.read_text(errors="replace")
            try:
                return httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx2.TransportError:
                return False

        assert wait_until(ready, bool, within=60, every=0.2), log_path.read_text()
        curl, tail = _printed_commands(log_path.read_text())
        if configured_by == "environment":
            assert "dev-token" in curl  # no tokens configured: make run's own
        else:
            assert "a-token-of-the-file-0123456789" in curl
            assert f"http://localhost:{port}/" in curl

        sent = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, timeout=30, check=True
        )
        assert sent.stdout.startswith("HTTP/1.1 202"), sent.stdout + sent.stderr

        # The tail line names the template, so it works from a terminal without it.
        tail_env = {k: v for k, v in env.items() if not k.startswith("BRIDGE_")}
        shown = subprocess.run(
            ["bash", "-c", f"{tail} --limit 1"],
            cwd=REPO,
            env=tail_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert f"{topic_prefix}.order.create" in shown.stdout, shown.stdout + shown.stderr
        assert '"id":"12345"' in shown.stdout, shown.stdout
    finally:
        _stop_group(make)


def _stop_group(make: subprocess.Popen[bytes]) -> None:
    """SIGTERM make's group (the bridge shuts down as under Ctrl-C), and wait until no
    process of it is left: the bridge may outlive make by its shutdown."""

    def gone() -> bool:
        try:
            os.killpg(make.pid, 0)
        except ProcessLookupError:
            return True
        return False

    if not gone():
        os.killpg(make.pid, signal.SIGTERM)
    make.wait(timeout=60)
    if not wait_until(gone, bool, within=30, every=0.1):
        os.killpg(make.pid, signal.SIGKILL)


def _kafka_answering_probes(listener: socket.socket) -> None:
    """A stand-in Kafka for `devkafka up`'s probe: an ApiVersions reply that lists
    Produce and Metadata, to each connection, until the listener is closed."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                (size,) = struct.unpack(">i", conn.recv(4))
                request = b""
                while len(request) < size:
                    request += conn.recv(size - len(request))
                apis = struct.pack(">hhh", 0, 0, 9) + struct.pack(">hhh", 3, 0, 12)
                reply = request[4:8] + struct.pack(">hi", 0, 2) + apis
                conn.sendall(struct.pack(">i", len(reply)) + reply)
            except (OSError, struct.error):
                pass


def test_make_run_reads_a_settings_file_with_a_byte_order_mark_as_the_bridge_does(
    tmp_path: Path,
) -> None:
    """Windows editors put one first; the bridge drops it (bridge.config), make run's
    own reader failed on it and read nothing: it used a local Kafka and exported its
    address, which wins over the file's, and printed a curl to port 8080 with a
    placeholder token (a review's test). No real broker nor bridge is started: a
    stand-in answers the probe a local Kafka would get, and a stand-in `bridge` says
    what it was started with."""
    kafka_port, bridge_port = free_port(), free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", kafka_port))
    listener.listen()
    threading.Thread(target=_kafka_answering_probes, args=(listener,), daemon=True).start()
    config = tmp_path / "bridge.toml"
    config.write_bytes(
        b"\xef\xbb\xbf"
        b'kafka_bootstrap = "kafka.example.internal:9092"\n'
        + f"port = {bridge_port}\n".encode()
        + b'tokens = ["a-token-of-the-file-0123456789"]\n'
    )
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text(f'#!/bin/sh\nexec "{REPO}/.venv/bin/python" "$@"\n')
    (fake_bin / "bridge").write_text(
        '#!/bin/sh\necho "started with ${BRIDGE_KAFKA_BOOTSTRAP:-the file\'s Kafka}"\n'
    )
    for script in fake_bin.iterdir():
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.pop("KAFKA_PORT", None)
    env["BRIDGE_CONFIG_FILE"] = str(config)
    try:
        run = subprocess.run(
            ["make", "--no-print-directory", "run", f"KAFKA_PORT={kafka_port}", f"BIN={fake_bin}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        listener.close()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "started with the file's Kafka" in output, output
    assert f"http://localhost:{bridge_port}/" in output, output
    assert "Bearer a-token-of-the-file-0123456789" in output, output
