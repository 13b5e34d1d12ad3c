"""Coverage-guided fuzzing of the request parsing (atheris), for a bounded time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FUZZ_SECONDS = 20


@pytest.mark.slow
def test_parsing_survives_coverage_guided_fuzzing(tmp_path: Path) -> None:
    """atheris drives parse_delivery, routing and dead letters with arbitrary input for a
    bounded time: nothing but a clean 4xx or a legal topic may come out."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(
        [
            b'{"entity":"Order","action":"create","id":"1"}',
            b"{oops",
            b"",
            b'{"entity":"{{entity}}"}',
        ]
    ):
        (corpus / f"seed{i}").write_bytes(seed)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz_parse",
            f"-max_total_time={FUZZ_SECONDS}",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 60,
        check=False,
    )
    tail = result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert "Done" in tail, tail
