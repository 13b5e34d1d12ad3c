"""SIGTERM before the bridge serves: during the spool's check at start (a minute for a
full spool), it stops at once and exits 0, also as a container's PID 1, for which
the kernel drops a signal that has no handler."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import uvicorn

from bridge.devkafka import free_port
from bridge.ingress import RuntimeState
from bridge.server import BridgeServer, StopBeforeServing
from bridge.spool import Spool
from tests.fakes import TOKEN
from tests.polling import wait_until
from tests.process import BridgeProcess, hang_up_as_at_a_terminal

#: `bridge serve`, its spool check replaced by a statement that never ends, as a huge
#: spool's check on a slow disk nearly does; it touches argv[1] when it begins. With
#: argv[2] "one-step", SQLite never calls the progress handler back during it, as in
#: quick_check's walk of a large table, which is one step.
SLOW_CHECK = r"""
import sqlite3, sys
from pathlib import Path

import bridge.spool

began = Path(sys.argv[1])
if sys.argv[2] == "one-step":
    bridge.spool.PROGRESS_STEPS = 2**31 - 1
connect = sqlite3.connect


class SlowCheck(sqlite3.Connection):
    def execute(self, sql, *args):
        if sql == "PRAGMA quick_check":
            began.touch()
            sql = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                   "SELECT 'ok' FROM c WHERE x = 0")
        return super().execute(sql, *args)


sqlite3.connect = lambda *args, **kwargs: connect(*args, factory=SlowCheck, **kwargs)
from bridge.cli import main

sys.exit(main(["serve"]))
"""


def _can_be_pid_1() -> bool:
    """Whether this user may make a PID namespace (root, or a permissive kernel)."""
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30, check=False
    )
    return done.returncode == 0


def _child_of(pid: int) -> int | None:
    """The one child process of ``pid``, once there is one."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return None
    return int(children[0]) if children else None


def _env(tmp_path: Path, ack: str) -> dict[str, str]:
    """A bridge that is stopped before it serves: Kafka is never asked."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": ack,
        "BRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
        "BRIDGE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # not asked before serving
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_LOG_FORMAT": "text",
    }


def _signalled_once_begun(
    argv: list[str],
    env: dict[str, str],
    began: Path,
    stop: signal.Signals,
    *,
    as_pid_1: bool,
    after: float = 0.0,
) -> tuple[int, str]:
    """Run ``argv`` (as its namespace's PID 1 when ``as_pid_1``), send it ``stop``
    ``after`` seconds once ``began`` exists; its exit status and output."""
    if as_pid_1:
        argv = ["unshare", "--pid", "--fork", "--kill-child", *argv]
    log_path = began.with_name(began.name + ".log")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=hang_up_as_at_a_terminal,  # noqa: PLW1509 - a signal call only
        )
    try:
        assert wait_until(began.exists, bool, within=30, every=0.05), log_path.read_text()
        target = proc.pid
        if as_pid_1:  # unshare's child is the bridge, PID 1 of its namespace
            found = wait_until(lambda: _child_of(proc.pid), bool, within=10, every=0.05)
            assert found is not None
            target = found
        time.sleep(after)
        os.kill(target, stop)
        began.with_name(began.name + ".sent").touch()
        status = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, log_path.read_text()


@pytest.mark.parametrize(
    ("as_pid_1", "steps", "stop"),
    [
        (False, "many-steps", signal.SIGTERM),
        (True, "many-steps", signal.SIGTERM),
        (False, "one-step", signal.SIGTERM),
        (False, "many-steps", signal.SIGHUP),
        (False, "one-step", signal.SIGHUP),
    ],
    ids=["process", "pid-1", "one-long-step", "sighup", "sighup-one-long-step"],
)
def test_sigterm_during_the_spool_check_stops_the_bridge_at_once(
    tmp_path: Path, as_pid_1: bool, steps: str, stop: signal.Signals
) -> None:
    """In one long step of SQLite's, too: the signal interrupts the statement (quick_check
    walks a table in one step, 2.4 s for a cold 1 GB spool and most of a minute for
    2.5 GB, in which Python's handler could not run)."""
    if as_pid_1 and not _can_be_pid_1():
        pytest.skip("no PID namespace for this user (unshare --pid)")
    began = tmp_path / "check-began"
    status, log_text = _signalled_once_begun(
        [sys.executable, "-c", SLOW_CHECK, str(began), steps],
        _env(tmp_path, "durable"),
        began,
        stop,
        as_pid_1=as_pid_1,
        after=0.3,  # well inside the statement
    )
    assert status == 0, log_text
    assert f"{stop.name} received before serving: stopped, nothing was accepted" in log_text
    assert "Traceback" not in log_text
    assert "listening on" not in log_text


#: SLOW_CHECK with the signal let in only through SQLite's progress handler (it comes in
#: that way whenever the handler runs there before the statement is interrupted): SQLite
#: then ends the statement as "interrupted", a SpoolUnusable, and drops the handler's
#: StopBeforeServing.
PROGRESS_HANDLER_ONLY = SLOW_CHECK.replace(
    "import bridge.spool\n",
    "import bridge.spool, contextlib\n"
    "bridge.spool._stopped_by_signals = lambda connection: contextlib.nullcontext()\n",
)


def test_sigterm_during_a_leftover_spool_s_check_stops_the_bridge(tmp_path: Path) -> None:
    """Broker mode over a spool a durable bridge left checks it before serving too
    (bridge.leftover), and takes a spool it cannot open for no reason to stop: the
    signal's "interrupted" check was logged as an unusable spool and the bridge went on
    to serve, the SIGTERM lost (2 in 11 runs of a review's; here every time)."""
    spool = Spool(tmp_path / "spool", max_bytes=10**7, dedup_window=7200)
    spool.connect()
    spool.release()  # an empty spool file: the check runs all the same
    began = tmp_path / "check-began"
    status, log_text = _signalled_once_begun(
        [sys.executable, "-c", PROGRESS_HANDLER_ONLY, str(began), "many-steps"],
        _env(tmp_path, "broker"),
        began,
        signal.SIGTERM,
        as_pid_1=False,
        after=0.3,
    )
    assert status == 0, log_text
    assert "SIGTERM received before serving: stopped, nothing was accepted" in log_text
    assert "listening on" not in log_text
    # Not said as a spool that cannot be opened first: the signal is the only news.
    assert "cannot be opened" not in log_text
    assert "ERROR" not in log_text


def test_sighup_ignored_at_start_is_left_ignored(tmp_path: Path) -> None:
    """Started under nohup (SIGHUP ignored, so that it outlives a closed session), the
    bridge keeps serving on SIGHUP, as before it stopped on one; SIGTERM still stops it."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": "memory",
        "BRIDGE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # need not answer
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_PORT": str(port),
        "BRIDGE_LOG_FORMAT": "text",
    }
    log_path = tmp_path / "bridge.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["nohup", sys.executable, "-m", "bridge", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until(
            lambda: "listening on" in log_path.read_text(), bool, within=30, every=0.05
        ), log_path.read_text()
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, log_path.read_text()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "SIGHUP" not in log_path.read_text()


#: The ``bridge`` command (argv[2:]), its imports after the signals are held made as
#: slow as on a loaded machine: pydantic's takes seconds; argv[1] is touched as it
#: begins.
SLOW_IMPORTS = r"""
import importlib.abc, sys, time
from pathlib import Path

began = Path(sys.argv[1])


class SlowImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pydantic":
            sys.meta_path.remove(self)
            began.touch()
            sent = began.with_name(began.name + ".sent")
            deadline = time.monotonic() + 30
            while not sent.exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # the imports go on once the signal was sent
        return None


sys.meta_path.insert(0, SlowImports())
sys.argv = ["bridge", *sys.argv[2:]]
from bridge.__main__ import main

sys.exit(main())
"""


@pytest.mark.parametrize(
    ("as_pid_1", "command", "status"),
    [
        (False, "serve", 0),
        (True, "serve", 0),
        (False, "check-config", -signal.SIGTERM),
        (True, "check-config", 128 + signal.SIGTERM),
    ],
    ids=["serve", "serve-as-pid-1", "check-config", "check-config-as-pid-1"],
)
def test_sigterm_during_the_imports(
    tmp_path: Path, as_pid_1: bool, command: str, status: int
) -> None:
    """A SIGTERM while the command still imports (up to a second on a slow machine)
    ended the process with the signal (-15), and was dropped for a container's PID 1,
    which then served until SIGKILL. It is held until serve can act on it: stopped
    before serving, exit 0. Another command ends by the signal as before; as PID 1,
    which the kernel drops it for, exit 143 (it ran to its end)."""
    if as_pid_1 and not _can_be_pid_1():
        pytest.skip("no PID namespace for this user (unshare --pid)")
    began = tmp_path / "imports-began"
    status_now, log_text = _signalled_once_begun(
        [sys.executable, "-c", SLOW_IMPORTS, str(began), command],
        _env(tmp_path, "memory"),
        began,
        signal.SIGTERM,
        as_pid_1=as_pid_1,
    )
    assert status_now == status, log_text
    assert "Traceback" not in log_text
    assert "listening on" not in log_text
    if command == "serve":
        assert "SIGTERM received before serving: stopped, nothing was accepted" in log_text


def test_a_stop_while_uvicorn_makes_its_loop_leaves_no_unawaited_coroutine() -> None:
    """A stop signal as uvicorn made its event loop, after it had made serve()'s
    coroutine: stderr got "RuntimeWarning: coroutine 'Server.serve' was never awaited"
    after the plain "stopped, nothing was accepted" (seen with SIGTERM 3 s after start)."""
    config = uvicorn.Config(app=lambda scope, receive, send: None)

    def signalled() -> None:
        raise StopBeforeServing("SIGTERM")

    config.get_loop_factory = signalled  # type: ignore[method-assign]
    server = BridgeServer(config, RuntimeState(), 0, lambda: None, signals=(signal.SIGTERM,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(StopBeforeServing):
            server.run()
        gc.collect()
    assert [str(w.message) for w in caught] == []


def test_sigterm_ends_the_process_though_a_tokens_file_reading_hangs(tmp_path: Path) -> None:
    """A reading of BRIDGE_TOKENS_FILE that never returns (a network volume gone; a FIFO
    nobody writes to here) held a thread of asyncio's executor, and the process never
    exited after SIGTERM: the stop was done, then Python's exit waited for that thread
    without end (killed at the end of its grace period instead of exiting 0; a review's
    test). The file is read in a daemon thread now."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    env = {
        "BRIDGE_ACK": "durable",
        "BRIDGE_TOKENS_FILE": str(tokens),
        "BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # no Kafka needed: durable serves
        "BRIDGE_KAFKA_CONNECT_TIMEOUT": "1",
        "BRIDGE_SHUTDOWN_TIMEOUT": "1",
        "BRIDGE_SHUTDOWN_DELAY": "0",
    }
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
        fifo = tmp_path / "tokens.fifo"
        os.mkfifo(fifo)
        fifo.replace(tokens)  # the next reading (within 1 s) blocks in open()
        time.sleep(2)
        bridge.signal(signal.SIGTERM)
        try:
            code = bridge.wait(timeout=20)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"no exit after SIGTERM ({code}); log tail:\n{bridge.log()[-1500:]}"
