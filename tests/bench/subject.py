"""Start one benchmark subject: ``python -m tests.bench.subject NAME --port P [--workers N]``.

``cli --replica-ports P1,P2`` starts one bridge per port instead (replicas: the
bridge has no ``--workers``), each in its own folder (so its own spool), and
stops them all when it is stopped or when one of them exits.

NAME is ``raw``, ``starlette`` or ``naive`` (the apps of baselines.py, run as
``uvicorn APP --loop uvloop --http httptools --no-access-log`` would) or ``cli``
(the bridge: exactly what ``python -m bridge serve`` runs, configured by the
BRIDGE_* variables; with ``--cut LAYER``, cut short as cutpoints.py says).

Why not run those commands directly: this machine is shared, and while the
harness was written its subjects were SIGTERMed mid-run, four times, by
short-lived processes outside it (strace showed the senders; most likely a
name-matching clean-up in another session). A command line that names neither
uvicorn nor the bridge has not been hit since; run.py also measures a subject
that dies once more.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from tests.bench.cutpoints import CUTS, install

APPS = {
    "raw": ("tests.bench.baselines:raw_asgi", False),
    "starlette": ("tests.bench.baselines:starlette_noop", False),
    "naive": ("tests.bench.baselines:naive_bridge", True),  # a factory
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.subject")
    parser.add_argument("name", choices=[*APPS, "cli"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cut", choices=CUTS, help="cut requests short (cutpoints.py)")
    parser.add_argument("--replica-ports", help="cli: one bridge per port (comma-separated)")
    args = parser.parse_args(argv)
    if args.name == "cli" and args.replica_ports:
        return replicas([int(p) for p in args.replica_ports.split(",")])
    if args.name == "cli":
        from bridge.cli import main as bridge_main  # noqa: PLC0415

        if args.cut:
            install(args.cut)

        extra = ["--workers", str(args.workers)] if args.workers > 1 else []
        return bridge_main(["serve", *extra])

    import uvicorn  # noqa: PLC0415

    app, factory = APPS[args.name]
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        workers=args.workers,
        factory=factory,
    )
    return 0


def replicas(ports: list[int]) -> int:
    """Run one bridge per port, each in folder ``replica-N`` of the current one, until
    a signal (passed on to all) or until one exits (the others are then stopped)."""
    children: list[subprocess.Popen[bytes]] = []
    for n, port in enumerate(ports):
        folder = Path(f"replica-{n}")
        folder.mkdir(exist_ok=True)
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.bench.subject", "cli"],
                env={**os.environ, "BRIDGE_PORT": str(port)},
                cwd=folder,
                stdin=subprocess.DEVNULL,
            )
        )
    stopping: list[int] = []

    def stop(sig: int, _: FrameType | None) -> None:
        stopping.append(sig)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.1)
    for child in children:
        if child.poll() is None:
            child.send_signal(stopping[0] if stopping else signal.SIGTERM)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)


if __name__ == "__main__":
    sys.exit(main())
