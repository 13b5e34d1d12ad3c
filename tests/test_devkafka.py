"""devkafka and the test broker: no broker outlives whoever owns it."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from bridge import devkafka
from bridge.devkafka import dies_with_parent, ensure_jars, free_ports, kafka_home
from bridge.devkafka import main as devkafka_main
from tests.conftest import REPO
from tests.polling import wait_until
from tests.process import hang_up_as_at_a_terminal

# A test run that holds the session broker until it is signalled.
HOLDING_TEST = """
import time
from pathlib import Path


def test_hold(kafka_bootstrap: str) -> None:
    Path("held").write_text(kafka_bootstrap)
    time.sleep(600)
"""


def kafka_jvms(under: Path) -> list[int]:
    """Pids of live broker JVMs whose command line names a file under ``under``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and b"kafka.Kafka" in args and any(str(under).encode() in a for a in args):
            found.append(int(entry.name))
    return found


def kill_all(pids: list[int]) -> None:
    """Leave nothing running whatever the test found (each broker leads its group)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def start_test_run(
    folder: Path, test: str, *, wrapper: tuple[str, ...] = (), args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """A pytest run of ``test`` (a test module's source) in ``folder``, with this suite's
    conftest, its output in ``folder``/run.log (the log returned, to close); ``wrapper``
    runs it (``nohup``), ``args`` go to pytest."""
    (folder / "test_run.py").write_text(test)
    (folder / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "TEST_KAFKA_BOOTSTRAP"}
    env["PYTHONPATH"] = str(REPO)
    log = (folder / "run.log").open("wb")
    run = subprocess.Popen(
        [
            *(*wrapper, sys.executable, "-m", "pytest", "-q", "-s", "-p", "tests.conftest"),
            *("-p", "no:cacheprovider", "-c", "pytest.ini", *args, "test_run.py"),
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=hang_up_as_at_a_terminal,  # noqa: PLW1509 - a signal call only
    )
    return run, log


def end_test_run(run: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    if run.poll() is None:
        run.kill()
        run.wait()
    log.close()


@pytest.fixture
def holding_run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A pytest run (this suite's conftest) holding its session broker; killed after."""
    base = tmp_path / "base"
    run, log = start_test_run(tmp_path, HOLDING_TEST, args=(f"--basetemp={base}",))
    try:
        held = wait_until(
            lambda: (tmp_path / "held").exists() or run.poll() is not None,
            bool,
            within=180,
            every=0.2,
        )
        output = (tmp_path / "run.log").read_text(errors="replace")
        assert held, f"the run never held its broker:\n{output}"
        assert run.poll() is None, output
        assert len(kafka_jvms(base)) == 1, output
        yield run, base
    finally:
        end_test_run(run, log)
        kill_all(kafka_jvms(base))


@pytest.mark.kafka
@pytest.mark.slow
def test_a_signalled_test_run_stops_its_broker(
    holding_run: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """SIGTERM (a CI timeout) ends a test run as Ctrl-C does: pytest exits 2 after its
    teardown stopped the broker. It used to die at once, leaving the broker JVM (in its
    own session) running. SIGHUP takes the same way (the next test), without a broker
    of its own to start: one costs some 12 s of the suite."""
    run, base = holding_run
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 2  # interrupted, not killed by the signal
    assert kafka_jvms(base) == []


WAITING_TEST = """
import time
from pathlib import Path

import pytest


@pytest.fixture
def torn_down():
    yield
    Path("torn-down").write_text("")


def test_wait(torn_down) -> None:
    Path("waiting").write_text("")
    time.sleep(600)
"""


def waiting_begun(run: subprocess.Popen[bytes], folder: Path) -> None:
    """Until WAITING_TEST's test runs (or the run ended)."""
    assert wait_until(
        lambda: (folder / "waiting").exists() or run.poll() is not None,
        bool,
        within=60,
        every=0.1,
    )


def test_a_hung_up_test_run_stops_as_after_ctrl_c(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed) ends a test run as SIGTERM does, through the same
    handler (tests/conftest.py): interrupted, exit 2, its fixtures torn down (a broker
    stopped, as the test above shows for SIGTERM)."""
    run, log = start_test_run(tmp_path, WAITING_TEST)
    try:
        waiting_begun(run, tmp_path)
        run.send_signal(signal.SIGHUP)
        assert run.wait(30) == 2, (tmp_path / "run.log").read_text(errors="replace")
        assert (tmp_path / "torn-down").exists()
    finally:
        end_test_run(run, log)


def test_a_test_run_under_nohup_outlives_sighup(tmp_path: Path) -> None:
    """``nohup make test``: SIGHUP (the terminal closed) was taken over by the suite's
    handler and stopped the run. Ignored at start, it stays ignored; SIGTERM still
    stops the run as Ctrl-C does."""
    run, log = start_test_run(tmp_path, WAITING_TEST, wrapper=("nohup",))
    try:
        waiting_begun(run, tmp_path)
        run.send_signal(signal.SIGHUP)
        time.sleep(1)
        output = (tmp_path / "run.log").read_text(errors="replace")
        assert run.poll() is None, output
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 2  # interrupted, as before
    finally:
        end_test_run(run, log)


@pytest.mark.kafka
@pytest.mark.slow
def test_a_killed_test_run_takes_its_broker_along(
    holding_run: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """SIGKILL skips every teardown; the broker still goes, sent SIGTERM by the kernel
    when its parent died (PR_SET_PDEATHSIG)."""
    run, base = holding_run
    run.kill()
    run.wait(10)
    assert wait_until(lambda: kafka_jvms(base), lambda pids: not pids, within=60, every=0.2) == []


# The child's start, as LocalKafka.start does it, from the main thread or from a worker
# thread that has ended (asyncio.to_thread) by the time its parent is killed.
FROM_THE_MAIN_THREAD = """
child = start()
"""
FROM_AN_ENDED_WORKER_THREAD = """
import threading
started = []
worker = threading.Thread(target=lambda: started.append(devkafka.from_a_lifelong_thread(start)))
worker.start()
worker.join()
child = started[0]
"""


@pytest.mark.parametrize("started", [FROM_THE_MAIN_THREAD, FROM_AN_ENDED_WORKER_THREAD])
def test_dies_with_parent_signals_the_child_when_its_parent_is_killed(started: str) -> None:
    """The preexec_fn behind LocalKafka(die_with_parent=True): a child of a process
    killed with SIGKILL gets SIGTERM, though it leads its own session. The signal
    comes when the thread that forked the child ends: a test broker restarted from a
    worker thread died with that thread, or (without die_with_parent) outlived a
    killed test run."""
    if dies_with_parent() is None:
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from bridge import devkafka\n"
            "def start():\n"
            "    return subprocess.Popen(['sleep', '60'], start_new_session=True,\n"
            "                            preexec_fn=devkafka.dies_with_parent())\n"
            f"{started}\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        try:
            time.sleep(0.3)
            assert _alive(child), "the child died before its parent"
            parent.kill()
            parent.wait()
            # The child is reparented (to init, or to a subreaper) and sent SIGTERM.
            alive = wait_until(
                lambda: _alive(child), lambda alive: not alive, within=10, every=0.05
            )
            assert not alive
        finally:
            if _alive(child):
                os.kill(child, signal.SIGKILL)


def test_a_forked_child_starts_its_own_lifelong_thread() -> None:
    """The pool's thread is not forked with the process: a child's start waited forever
    on a pool that took its thread for idle (a reviewer's repro)."""
    code = (
        "import os, signal, subprocess\n"
        "from bridge import devkafka\n"
        "start = lambda: subprocess.Popen(['true'])\n"
        "devkafka.from_a_lifelong_thread(start).wait()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(5)\n"
        "    devkafka.from_a_lifelong_thread(start).wait()\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert run.stdout.strip() == "0"  # not -14: SIGALRM after 5 s of waiting


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def up_home(tmp_path: Path) -> Iterator[Path]:
    """A devkafka home of its own (data, logs, pid files) on the shared jars; any broker
    left under it is killed after the test."""
    home = tmp_path / "home"
    home.mkdir()
    shared = kafka_home(REPO / ".cache" / "kafka")
    ensure_jars(shared.parent)
    (home / shared.name).symlink_to(shared.resolve())
    try:
        yield home
    finally:
        kill_all(kafka_jvms(home))


def start_up(home: Path, port: int, controller_port: int) -> subprocess.Popen[bytes]:
    """`devkafka up` on ``port``, as a process of its own."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "bridge.devkafka", "up", "--home", str(home)),
            *("--port", str(port), "--controller-port", str(controller_port)),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=hang_up_as_at_a_terminal,  # noqa: PLW1509 - a signal call only
    )


def booting_broker(up: subprocess.Popen[bytes], home: Path) -> int:
    """Wait until ``up`` has spawned the broker JVM (it is still booting); its pid."""
    pids = wait_until(lambda: kafka_jvms(home), bool, within=60, every=0.02)
    assert len(pids) == 1, pids
    assert up.poll() is None, "up finished before it could be interrupted"
    return pids[0]


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_up_signalled_while_the_broker_boots_stops_it(up_home: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGHUP to `devkafka up` while the broker boots stops that broker and
    removes its pid file (exit 128 + signal). It used to die at once, leaving a broker
    that `down` could not find and the next `up` took for one already up."""
    port, controller_port = free_ports(2)
    up = start_up(up_home, port, controller_port)
    booting_broker(up, up_home)
    up.send_signal(sig)
    assert up.wait(60) == 128 + sig
    assert kafka_jvms(up_home) == []
    assert not (up_home / f"broker-{port}.pid").exists()


@pytest.mark.kafka
@pytest.mark.slow
def test_down_stops_a_broker_whose_up_was_killed_while_it_booted(up_home: Path) -> None:
    """The pid file is written as soon as the broker runs, so after `up` was killed
    (SIGKILL: no cleanup) `down` still finds and stops it. It used to say "no broker to
    stop (no pid file ...)" and leave the broker running."""
    port, controller_port = free_ports(2)
    up = start_up(up_home, port, controller_port)
    pid = booting_broker(up, up_home)
    up.kill()
    up.wait()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert devkafka_main(["down", "--home", str(up_home), "--port", str(port)]) == 0
    assert out.getvalue().startswith(f"stopped Kafka on port {port} (pid {pid})"), out.getvalue()
    assert kafka_jvms(up_home) == []


def fake_broker(config_file: Path) -> subprocess.Popen[bytes]:
    """A process whose command line looks like a broker's running from ``config_file``
    (``... kafka.Kafka <config>``), leading its own group as a broker does."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka", str(config_file)],
        start_new_session=True,
    )
    # Right after the exec, /proc may still show an empty command line.
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    wait_until(cmdline.read_bytes, lambda args: b"kafka.Kafka" in args, within=10, every=0.01)
    return process


@pytest.mark.parametrize("owner", ["this port", "another port"])
def test_down_stops_only_the_broker_of_its_own_port(tmp_path: Path, owner: str) -> None:
    """`down` signals the pid in the pid file only if that process runs from this port's
    properties file: a pid reused by another broker (after a container restart, say)
    is left alone and the pid file called stale. Any kafka.Kafka JVM used to be killed."""
    home = tmp_path / "home"
    home.mkdir()
    port = 19494
    other = 19496 if owner == "another port" else port
    with fake_broker(home.resolve() / f"data-{other}.properties") as process:
        try:
            (home / f"broker-{port}.pid").write_text(f"{process.pid}\n")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                devkafka_main(["down", "--home", str(home), "--port", str(port), "--timeout", "10"])
            if owner == "this port":
                assert out.getvalue().startswith(f"stopped Kafka on port {port}")
                assert process.wait(10) == -signal.SIGTERM
            else:
                assert out.getvalue().startswith("no broker was running (stale pid file")
                assert process.poll() is None
        finally:
            process.kill()
    assert not (home / f"broker-{port}.pid").exists()


def test_down_without_a_pid_file_finds_the_broker_by_its_config(tmp_path: Path) -> None:
    """The pid file gone (a clean-up): `down` said "no broker to stop" and the broker
    ran on. It finds it by the config file its command line names."""
    home = tmp_path / "home"
    home.mkdir()
    port = 19498
    with fake_broker(home.resolve() / f"data-{port}.properties") as process:
        try:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                devkafka_main(["down", "--home", str(home), "--port", str(port), "--timeout", "10"])
            assert out.getvalue().startswith(f"stopped Kafka on port {port} (pid {process.pid}")
            assert process.wait(10) == -signal.SIGTERM
        finally:
            process.kill()


def test_up_signalled_inside_the_spawn_still_stops_its_broker(
    up_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal landing inside the broker's spawn, after the fork but before Popen
    returned, left a broker `up` did not know of (it could only stop the one it had a
    handle on): it is found by its command line and stopped."""
    port, controller_port = free_ports(2)
    spawned: list[subprocess.Popen[bytes]] = []

    def start_then_interrupted(self: devkafka.LocalKafka) -> None:
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        spawned.append(fake_broker(self.config_file))  # running, and no handle kept
        raise devkafka.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(devkafka.LocalKafka, "start", start_then_interrupted)
    code = devkafka_main(["up", "--home", str(up_home), "--port", str(port),
                          "--controller-port", str(controller_port)])  # fmt: skip
    assert code == 128 + signal.SIGTERM
    [broker] = spawned
    assert broker.wait(30) is not None
    assert not (up_home / f"broker-{port}.pid").exists()


def test_free_ports_when_the_ephemeral_range_starts_low(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ephemeral range from 1024 left no room below it: randrange(10000, 1024)
    raised, and every test needing a broker errored. Ports come from apart then."""
    monkeypatch.setattr(devkafka, "_ephemeral_range", lambda: (1024, 65000))
    ports = free_ports(3)
    assert len(set(ports)) == 3
    assert all(10000 <= p < 20000 for p in ports)


# Maven as far as ensure_jars sees it: copy-dependencies fills the local repository
# from "central" where a jar is missing there, then copies the local one out unchecked.
FAKE_MVN = """#!/usr/bin/env python3
import os, shutil, sys
from pathlib import Path
local, central = Path(os.environ["FAKE_M2"]), Path(os.environ["FAKE_CENTRAL"])
if "help:evaluate" in sys.argv:
    print(f"\\x1b[0m{local}\\x1b[0m", end="")  # as Maven 3.8 does, asked not to
    sys.exit(0)
out = Path(next(a for a in sys.argv if a.startswith("-DoutputDirectory=")).split("=", 1)[1])
out.mkdir(parents=True)
for jar in central.rglob("*.jar"):
    cached = local / jar.relative_to(central)
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(jar, cached)
    shutil.copy(cached, out / jar.name)
"""


def a_jar(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("org/apache/kafka/A.class", b"\xca\xfe\xba\xbe" * 1000)
    return path


@pytest.fixture
def fake_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(local repository, central) of a fake `mvn` put first on PATH."""
    bin_dir, local, central = tmp_path / "bin", tmp_path / "m2", tmp_path / "central"
    bin_dir.mkdir()
    (bin_dir / "mvn").write_text(FAKE_MVN)
    (bin_dir / "mvn").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_M2", str(local))
    monkeypatch.setenv("FAKE_CENTRAL", str(central))
    name = f"kafka_2.13-{devkafka.KAFKA_VERSION}.jar"
    a_jar(central / "org/apache/kafka/kafka_2.13" / devkafka.KAFKA_VERSION / name)
    a_jar(central / "org/example/fake-dependency/1.0/fake-dependency-1.0.jar")
    return local, central


def test_a_jar_damaged_in_mavens_local_repository_is_downloaded_again(
    tmp_path: Path, fake_maven: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Maven copies a cut jar out of ~/.m2 without a check: every fetch brought it back
    and the broker never started. The fetch now deletes it there and fetches again."""
    local, _ = fake_maven
    dependency = local / "org/example/fake-dependency/1.0/fake-dependency-1.0.jar"
    a_jar(dependency).write_bytes(b"PK\x03\x04 cut short")

    libs = ensure_jars(tmp_path / "cache")

    assert devkafka._damaged_jars(libs) == []
    assert sorted(j.name for j in libs.glob("*.jar")) == [
        "fake-dependency-1.0.jar",
        f"kafka_2.13-{devkafka.KAFKA_VERSION}.jar",
    ]
    assert zipfile.is_zipfile(dependency)  # the local repository is repaired too
    assert str(dependency) in capsys.readouterr().err


def test_a_jar_damaged_at_its_source_is_named(
    tmp_path: Path, fake_maven: tuple[Path, Path]
) -> None:
    _, central = fake_maven
    (central / "org/example/fake-dependency/1.0/fake-dependency-1.0.jar").write_bytes(b"not a zip")

    with pytest.raises(devkafka.DevKafkaError, match=r"damaged .*: fake-dependency-1\.0\.jar"):
        ensure_jars(tmp_path / "cache")
    assert not (kafka_home(tmp_path / "cache") / devkafka._MARKER_FILE).exists()


def test_a_damaged_jar_is_not_a_complete_cache(tmp_path: Path) -> None:
    """A cut jar (an interrupted copy, a full disk) passed as a complete cache, and the
    broker failed with NoClassDefFoundError, never fetched again."""
    libs = tmp_path / "libs"
    libs.mkdir()
    assert not devkafka._jars_whole(libs)  # no jars: not complete either
    jar = a_jar(libs / "kafka.jar")
    assert devkafka._jars_whole(libs)
    jar.write_bytes(jar.read_bytes()[:100])
    assert not devkafka._jars_whole(libs)


def test_up_and_down_of_a_port_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `up` of one port at once (make run in two terminals): the second took the
    broker the first was booting for an unresponsive one and killed it. Each holds
    the port's lock for its whole run."""
    held: list[bool] = []

    def is_locked() -> bool:
        with (tmp_path / "broker-61555.lock").open("w") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(other, fcntl.LOCK_UN)
            return False

    def record(*_: object) -> int:
        held.append(is_locked())
        return 0

    monkeypatch.setattr(devkafka, "_up", record)
    monkeypatch.setattr(devkafka, "_down", record)
    for command in ("up", "down"):
        assert devkafka_main([command, "--home", str(tmp_path), "--port", "61555"]) == 0
    assert held == [True, True]
    assert not is_locked()


def test_an_ignored_sighup_stays_ignored_while_up_waits() -> None:
    """Under ``nohup make run`` (SIGHUP ignored), a closed terminal no longer stops the
    broker ``up`` is starting (a review): only SIGTERM interrupts then."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with devkafka._signals_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)  # a handler would have run by now
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with pytest.raises(devkafka.Interrupted):
                signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_taken_port_is_named_with_its_role_and_a_way_out(tmp_path: Path) -> None:
    """It said only "port N is already in use": not which of the broker's ports, nor
    what to do about it."""
    port, controller_port = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", controller_port))
        taken.listen()
        broker = devkafka.LocalKafka(tmp_path / "home", tmp_path / "data", port, controller_port)
        with pytest.raises(devkafka.DevKafkaError) as refused:
            broker.start()
    message = str(refused.value)
    assert f"port {controller_port}" in message
    assert "controller port (KAFKA_CONTROLLER_PORT)" in message
    assert "BRIDGE_KAFKA_BOOTSTRAP" in message


def test_a_java_home_without_java_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale JAVA_HOME said "'java' was not found", with java on PATH."""
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk-gone"))
    with pytest.raises(devkafka.DevKafkaError, match="jdk-gone has no bin/java"):
        devkafka.find_java()


def test_up_says_when_the_kafka_on_its_port_is_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another checkout's broker (or the user's) on the port: `up` said "Kafka already
    up ...; log <a file that does not exist>", and `down` then did nothing."""
    monkeypatch.setattr(devkafka, "probe", lambda port, *a, **k: True)
    home = tmp_path / "home"
    home.mkdir()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert devkafka_main(["up", "--home", str(home), "--port", "19500"]) == 0
    assert "a Kafka not started from" in out.getvalue()
    assert "will not stop it" in out.getvalue()
    assert ".log" not in out.getvalue()


@pytest.mark.kafka
def test_a_controller_port_is_no_kafka_to_use(
    kafka_bootstrap: str, kafka_controller_port: int, tmp_path: Path
) -> None:
    """A KRaft controller answers ApiVersions too, but serves neither Metadata nor
    Produce: `make run KAFKA_PORT=9093` next to a running `make run` (its controller
    on 9093) said "a Kafka ... answers at 127.0.0.1:9093: using it", and the bridge
    could publish nothing there (a review's test). The port is taken, and said so."""
    assert devkafka.probe(int(kafka_bootstrap.rsplit(":", 1)[1]))  # the broker's: yes
    assert not devkafka.probe(kafka_controller_port)
    home = REPO / ".cache" / "kafka"
    other_home = tmp_path / "other"
    other_home.mkdir()
    (other_home / kafka_home(home).name).symlink_to(kafka_home(home).resolve())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = devkafka_main(
            [
                *("up", "--home", str(other_home), "--port", str(kafka_controller_port)),
                *("--controller-port", str(free_ports(1)[0]), "--timeout", "30"),
            ]
        )
    said = out.getvalue() + err.getvalue()
    assert code == 1, said
    assert "using it" not in said
    assert f"port {kafka_controller_port}" in said or str(kafka_controller_port) in said


@pytest.mark.parametrize("kind", ["other architecture", "not executable"])
def test_a_java_that_cannot_run_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Its OSError escaped as a traceback from `devkafka up` (and `make run`), where
    every other Java problem is one "devkafka: error:" line (a review's test)."""
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    if kind == "other architecture":
        java.write_bytes(b"\xca\xfe\xba\xbe" + b"\x00" * 64)  # no ELF for this machine
        java.chmod(0o755)
    else:
        java.write_text("#!/bin/sh\necho 'openjdk version \"17\"' >&2\n")
        java.chmod(0o644)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(devkafka.DevKafkaError, match="cannot be run"):
        devkafka.find_java()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = devkafka_main(["up", "--home", str(tmp_path / "home"), "--port", "19502"])
    assert code == 1
    assert err.getvalue().startswith("devkafka: error:"), err.getvalue()


def test_a_file_system_error_is_one_error_line(tmp_path: Path) -> None:
    """A full disk or a home that cannot be made (here: under a regular file) was a
    traceback; every other failure is one "devkafka: error:" line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = devkafka_main(["fetch", "--home", str(blocker / "home"), "--port", "19503"])
    assert code == 1
    assert err.getvalue().startswith("devkafka: error:"), err.getvalue()
    assert "Not a directory" in err.getvalue()
