"""``python -m bridge`` and the ``bridge`` command.

A light module on purpose: the stop signals are held (:mod:`bridge.signals`) before
the command's imports, which take up to a second.
"""

import os
import sys

from bridge.signals import hold_early_stops


def main() -> int:
    hold_early_stops()
    # One process with its own registry: never prometheus-client's multiprocess mode,
    # which an inherited variable turns on at import.
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        os.environ.pop(name, None)
    from bridge.cli import main as run  # noqa: PLC0415  # after the signals are held

    return run()


if __name__ == "__main__":
    sys.exit(main())
