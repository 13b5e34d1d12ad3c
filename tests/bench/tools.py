"""The load generators: wrk (Debian) for saturation, vegeta (Go module) for fixed rates."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.mix import REPO

CACHE_BIN = REPO / ".cache" / "bin"
VEGETA_MODULE = "github.com/tsenart/vegeta/v12"
VEGETA_VERSIONS = ("latest", "v12.13.0", "v12.12.0", "v12.11.1")


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> bool:
    try:
        result = subprocess.run(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"{' '.join(cmd)}: {exc}")
        return False
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        say(f"{' '.join(cmd)} failed ({result.returncode}):\n{tail}")
    return result.returncode == 0


def ensure_wrk() -> str | None:
    """wrk from PATH, else from Debian's packages (apt-get, as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say("wrk is missing and cannot be installed here (needs root and apt-get)")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say("installing wrk from Debian's packages")
    if not _run(["apt-get", "install", "-y", "-q", "wrk"], env=env):
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", "wrk"], env=env)
    return shutil.which("wrk")


def ensure_vegeta() -> str | None:
    """vegeta from .cache/bin, else PATH, else ``go install`` into .cache/bin."""
    cached = CACHE_BIN / "vegeta"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    found = shutil.which("vegeta")
    if found:
        return found
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None
    )
    if go is None:
        say("vegeta is missing and Go is not installed: no fixed-rate latency runs")
        return None
    CACHE_BIN.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(CACHE_BIN), "GOFLAGS": "-mod=mod"}
    for version in VEGETA_VERSIONS:
        say(f"installing vegeta ({VEGETA_MODULE}@{version}) into {CACHE_BIN}")
        if _run([go, "install", f"{VEGETA_MODULE}@{version}"], env=env) and cached.is_file():
            return str(cached)
    return None


def tool_version(path: str | None, kind: str) -> str:
    if path is None:
        return "not available"
    try:
        if kind == "wrk":
            out = subprocess.run(
                [path, "-v"], capture_output=True, text=True, timeout=10, check=False
            )
            first = (out.stdout + out.stderr).strip().splitlines()[0]
            return first.split(" Copyright")[0].removeprefix("wrk ")
        go = shutil.which("go") or "/usr/local/go/bin/go"
        out = subprocess.run(
            [go, "version", "-m", path], capture_output=True, text=True, timeout=10, check=False
        )
        found = re.search(r"^\s*mod\s+\S+\s+(\S+)", out.stdout, re.MULTILINE)
        return found.group(1) if found else "(version unknown)"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "(version unknown)"


def pinned(cmd: list[str], cpus: set[int] | None) -> list[str]:
    """Prefix ``cmd`` with taskset so it (and every thread it starts) runs on ``cpus``."""
    if not cpus or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *cmd]


# --------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    sent: int  # webhook requests sent in the measured window
    ok: int  # 2xx (and 3xx) answers to them
    non_2xx: int  # webhook requests without a 2xx answer (an error status, or none at all)
    socket_errors: int  # timeouts and connection errors (wrk's own count)
    seconds: float
    raw: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def run_wrk(
    wrk: str,
    *,
    url: str,
    script: Path,
    result_path: Path,
    connections: int,
    main_seconds: float,
    drain_seconds: float,
    cpus: set[int] | None,
    log: Path,
    on_switch: Callable[[int], None] | None = None,
    threads: int = 1,
) -> WrkResult:
    """Run wrk (one thread, or ``threads``) for main + drain seconds; count the
    measured window's answers.

    ``on_switch(wrk's pid)`` is called when the measured window ends (wrk still runs).
    """
    duration = max(1, round(main_seconds + drain_seconds))
    cmd = pinned(
        [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        cpus,
    )
    result_path.unlink(missing_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            if on_switch is not None:
                # wrk's clock starts a few ms after ours: at worst a few ms of the
                # measured window fall outside the counters read here.
                time.sleep(max(0.0, started + main_seconds - time.monotonic()))
                on_switch(proc.pid)
            code = proc.wait(timeout=duration + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    raw = json.loads(result_path.read_text(encoding="utf-8"))
    # Every drain request that got an answer got a 404, so the drained answers
    # cancel out: 2xx answers to webhooks = all answers - all answers >= 400.
    ok = int(raw["responses"]) - int(raw["status_errors"])
    sent = int(raw["sent"])
    socket_errors = sum(
        int(raw[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return WrkResult(
        sent=sent,
        ok=ok,
        non_2xx=sent - ok,
        socket_errors=socket_errors,
        seconds=main_seconds,
        raw={k: float(v) for k, v in raw.items()},
    )


# --------------------------------------------------------------------------
# vegeta


@dataclass
class VegetaResult:
    rate: int
    seconds: float
    sent: int
    ok: int
    non_2xx: int
    errors: int  # no HTTP answer (timeouts, connection errors)
    latencies_ms: list[float]
    status_counts: dict[str, int]

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile of every answered request's latency, in ms."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        rank = max(1, -(-len(ordered) * q // 100))
        return ordered[int(rank) - 1]

    @property
    def achieved_rps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def run_vegeta(
    vegeta: str,
    *,
    targets: Path,
    rate: int,
    seconds: float,
    workdir: Path,
    cpus: set[int] | None,
    log: Path,
) -> VegetaResult:
    """An open-loop attack at ``rate``/s; every request's status and latency."""
    results = workdir / f"vegeta-{rate}.bin"
    attack = pinned(
        [
            vegeta,
            "attack",
            "-format=json",
            f"-targets={targets}",
            f"-rate={rate}/1s",
            f"-duration={seconds:g}s",
            "-timeout=10s",
            "-max-body=0",
            f"-output={results}",
        ],
        cpus,
    )
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(attack)}\n")
        out.flush()
        subprocess.run(
            attack,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=seconds + 120,
            check=True,
        )
    encoded = workdir / f"vegeta-{rate}.csv"
    with encoded.open("w", encoding="utf-8") as out:
        subprocess.run(
            [vegeta, "encode", "-to=csv", str(results)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            timeout=120,
            check=True,
        )
    latencies: list[float] = []
    counts: dict[str, int] = {}
    sent = ok = non_2xx = errors = 0
    with encoded.open(encoding="utf-8", newline="") as fh:
        # timestamp, code, latency (ns), bytes out, bytes in, error, body, attack, seq, ...
        for row in csv.reader(fh):
            if len(row) < 6:
                continue
            sent += 1
            code = int(row[1])
            counts[str(code)] = counts.get(str(code), 0) + 1
            if code == 0:
                errors += 1
                continue
            latencies.append(int(row[2]) / 1e6)
            if 200 <= code < 400:
                ok += 1
            else:
                non_2xx += 1
    results.unlink(missing_ok=True)
    return VegetaResult(
        rate=rate,
        seconds=seconds,
        sent=sent,
        ok=ok,
        non_2xx=non_2xx,
        errors=errors,
        latencies_ms=latencies,
        status_counts=counts,
    )
