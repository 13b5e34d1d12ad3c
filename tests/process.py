"""Running the real ``bridge serve`` process for tests that signal or kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx2

from bridge.devkafka import dies_with_parent, free_port, from_a_lifelong_thread
from tests.polling import wait_until


def wait_until_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    name: str,
    within: float,
    log: Callable[[], str],
) -> None:
    """Poll ``url`` until it answers 200; fail with the process's log if it dies or
    stays unready for ``within`` seconds."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log()}")
        try:
            return httpx2.get(url, timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    if not wait_until(ready, bool, within=within, every=0.1):
        raise RuntimeError(f"{name} not ready within {within}s:\n{log()}")


def hang_up_as_at_a_terminal() -> None:
    """A ``preexec_fn``: the child starts with SIGHUP's default action, as from a
    terminal, though this test run ignores it (``nohup make test``, which the bridge
    then leaves ignored): for a test that sends it SIGHUP."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class BridgeProcess:
    """``python -m bridge serve`` on a free port, its output in a log file; with
    ``hang_up``, started with SIGHUP's default action (see hang_up_as_at_a_terminal)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        port: int | None = None,
        hang_up: bool = False,
    ) -> None:
        self._hang_up = hang_up
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
            "BRIDGE_HOST": "127.0.0.1",
            "BRIDGE_PORT": str(self.port),
            "BRIDGE_SPOOL_DIR": str(log_path.parent / "spool"),
            **env,
        }
        ops_port = self._env.get("BRIDGE_OPS_PORT")  # where the operations endpoints are
        self.ops_url = self.url if not ops_port else f"http://127.0.0.1:{ops_port}"
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_within: float = 30.0) -> None:
        self._log = self.log_path.open("ab")
        log = self._log

        dies = dies_with_parent()
        hang_up = self._hang_up

        def preexec() -> None:
            if dies is not None:
                dies()
            if hang_up:
                hang_up_as_at_a_terminal()

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,  # noqa: PLW1509 - see dies_with_parent
            )

        # Gone with a pytest killed by SIGKILL (a CI job's end), as the brokers are,
        # whichever thread starts it (asyncio.to_thread too).
        self.proc = from_a_lifelong_thread(spawn)
        try:
            wait_until_ready(self.proc, self.ops_url + "/readyz", "bridge", ready_within, self.log)
        except BaseException:
            # Raised from __enter__, the with statement never calls __exit__: a bridge
            # that never turned ready was left running after its test.
            self.close()
            raise

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill the process if it still runs; close the log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log is not None:
            self._log.close()
