"""The Makefile's installation steps, with stub tools: a .venv made by an older Makefile
(pip only, no uv) is brought up to date rather than used as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB = """#!/usr/bin/env bash
echo "$0 $*" >> "{log}"
# 'python -m pip install uv==...' makes the uv that the Makefile then runs
if [[ "$*" == *"uv=="* ]]; then
  printf '#!/usr/bin/env bash\\necho "uv $*" >> "{log}"\\n' > "{bin}/uv"; chmod +x "{bin}/uv"
fi
"""


def _old_clone(tmp_path: Path, stamps: list[str]) -> Path:
    """A clone whose .venv the old Makefile made (python and pip, no uv), with the
    stamps it touched, newer than pyproject.toml and the constraints."""
    clone = tmp_path / "clone"
    (clone / "deploy").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "deploy/constraints.txt"):
        shutil.copy(ROOT / name, clone / name)
    (clone / ".cache").mkdir()
    bin_ = clone / ".venv" / "bin"
    bin_.mkdir(parents=True)
    log = clone / "calls.log"
    for name in ("python", "pip"):
        (bin_ / name).write_text(STUB.format(log=log, bin=bin_))
        (bin_ / name).chmod(0o755)
    earlier = time.time() - 100
    for name in ("pyproject.toml", "deploy/constraints.txt"):
        os.utime(clone / name, (earlier, earlier))
    for stamp in stamps:  # made before the pull that brought the new Makefile
        (clone / ".venv" / stamp).touch()
        os.utime(clone / ".venv" / stamp, (earlier + 50, earlier + 50))
    return clone


@pytest.mark.parametrize(
    ("stamps", "target"),
    [
        ([".runtime"], "install"),  # `make run` before the pull, `make test` after
        ([".runtime", ".installed"], "bench"),  # `make test` before, `make bench` after
    ],
)
def test_a_venv_made_by_the_old_makefile_still_installs(
    tmp_path: Path, stamps: list[str], target: str
) -> None:
    """Its stamps newer than pyproject.toml and the constraints, the steps that run uv
    ran on a .venv without it: `flock: failed to execute .venv/bin/uv` (a review's
    find). The Makefile is a prerequisite of the runtime's stamp now."""
    clone = _old_clone(tmp_path, stamps)
    args = ["make", "--no-print-directory", "-C", str(clone), target]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert "No such file or directory" not in done.stderr, done.stderr
    assert (clone / ".venv" / "bin" / "uv").exists(), done.stderr
