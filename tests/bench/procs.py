"""Subject processes and what /proc says about them (CPU time, resident memory)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.bench.tools import pinned

CLK_TCK = os.sysconf("SC_CLK_TCK")
_RSS_SAMPLE_SECONDS = 0.25


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's workers, say)."""
    found = [pid]
    queue = [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found.append(int(child))
                    queue.append(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    total = 0
    for proc in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every CPU of the machine spent busy since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def harness_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (wrk, vegeta)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _status_kb(pid: int, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, now."""
    return 1024 * sum(_status_kb(p, "VmRSS") for p in descendants(pid))


def hwm_bytes(pid: int) -> int:
    """The largest VmHWM (peak resident memory) of ``pid`` or one of its descendants."""
    return 1024 * max((_status_kb(p, "VmHWM") for p in descendants(pid)), default=0)


def pin_all_threads(pid: int, cpus: set[int]) -> None:
    """Move every thread of a running process (a JVM, say) to ``cpus``."""
    for proc in descendants(pid):
        for task in Path(f"/proc/{proc}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), cpus)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body (urllib: no client library in the subject's way)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our URL
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class SubjectProcess:
    """One server under test on 127.0.0.1:``port`` (and ``more_ports``, if it runs
    several processes that each listen on their own), its output in ``log``."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        port: int,
        log: Path,
        cpus: set[int] | None,
        more_ports: Sequence[int] = (),
    ) -> None:
        self.argv = pinned(argv, cpus)
        self.ports = [port, *more_ports]
        self.env = env
        self.cwd = cwd
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._sampler: threading.Thread | None = None
        self._stop_sampling = threading.Event()
        self.peak_rss = 0
        self.rss_samples: list[tuple[float, int]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_within: float = 60.0) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + ready_within
        while True:
            if self.proc.poll() is not None:
                msg = f"exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                raise RuntimeError(msg)
            if all(self._ready(port) for port in self.ports):
                break
            if time.monotonic() > deadline:
                msg = f"not ready within {ready_within:.0f} s:\n{self.log_tail()}"
                raise RuntimeError(msg)
            time.sleep(0.1)
        self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._sampler.start()

    @staticmethod
    def _ready(port: int) -> bool:
        with contextlib.suppress(OSError):
            return http_get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)[0] == 200
        return False

    def _sample(self) -> None:
        started = time.monotonic()
        while not self._stop_sampling.wait(_RSS_SAMPLE_SECONDS):
            rss = rss_bytes(self.pid)
            self.peak_rss = max(self.peak_rss, rss)
            self.rss_samples.append((time.monotonic() - started, rss))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_bytes(self) -> int:
        """Peak resident memory: the kernel's high-water mark of one process, or the
        sampled peak of the sum over worker processes, whichever is larger."""
        return max(self.peak_rss, hwm_bytes(self.pid))

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (an orderly shutdown), SIGKILL after ``timeout``; the exit status."""
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join()
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
