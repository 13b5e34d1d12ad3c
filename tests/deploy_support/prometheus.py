"""A real Prometheus server (the ``prometheus`` binary of Debian's package) for tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx2
import yaml

from bridge.devkafka import free_port
from tests.process import wait_until_ready

Sample = dict[str, Any]  # one element of a query's "result": {"metric": {...}, "value": [t, "v"]}


def binary(name: str) -> str:
    """Path of ``prometheus`` or ``promtool``; fails with the install hint when missing."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"{name} not found: `make test` installs Debian's prometheus package "
            "(apt-get install -y --no-install-recommends prometheus)"
        )
    return found


class PrometheusServer:
    """``prometheus`` on a free loopback port with the given configuration and a fresh TSDB."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self._config = config
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_within: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self._config, sort_keys=False))
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_until_ready(self.proc, self.url + "/-/ready", "prometheus", ready_within, self.log)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns ``data`` of a successful answer."""
        answer = httpx2.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[Sample] = data["result"]
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
