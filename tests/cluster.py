"""Brokers of a test's own, for tests that stop, kill or reconfigure Kafka (the
session's broker must stay up): :func:`own_broker` is one node, broker and controller;
a test that needs a cluster (replicas, an in-sync quorum to lose) starts one and then
joins a :class:`JoiningBroker` to it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from bridge.devkafka import DevKafkaError, LocalKafka, ensure_jars, free_ports
from tests.conftest import REPO

#: The broker jars, fetched once (make kafka-fetch) and shared with the session's broker.
KAFKA_HOME = REPO / ".cache" / "kafka"


def own_broker(data_dir: Path, **options: Any) -> LocalKafka:
    """A single-node broker on free ports, its storage in ``data_dir``; ``options`` as
    LocalKafka takes them. Not started. It dies with a killed test run, from whichever
    thread it is (re)started."""
    ensure_jars(KAFKA_HOME)
    port, controller_port = free_ports(2)
    options.setdefault("die_with_parent", True)
    return LocalKafka(KAFKA_HOME, data_dir, port, controller_port, **options)


def cluster_id_of(broker: LocalKafka) -> str:
    """The cluster id ``broker``'s storage was formatted with."""
    for line in (broker.data_dir / "meta.properties").read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "cluster.id":
            return value.strip()
    raise DevKafkaError(f"no cluster.id in {broker.data_dir / 'meta.properties'}")


class JoiningBroker(LocalKafka):
    """A broker-only node (``node_id``) of the cluster whose controller is ``first``.

    It has no controller of its own, so stopping it leaves the cluster's metadata
    answering: what a cluster that lost a broker looks like to a client. Of its two
    free ports the controller one is only held, never listened on (LocalKafka wants one).
    """

    def __init__(self, first: LocalKafka, node_id: int, data_dir: Path) -> None:
        port, controller_port = free_ports(2)
        super().__init__(
            first.home,
            data_dir,
            port,
            controller_port,
            extra_properties={
                "process.roles": "broker",
                "node.id": str(node_id),
                "controller.quorum.bootstrap.servers": f"127.0.0.1:{first.controller_port}",
                "listeners": f"PLAINTEXT://127.0.0.1:{port}",
            },
            die_with_parent=True,
        )
        self.first = first

    def format(self) -> None:
        """Format with the first node's cluster id, as a node that is no controller."""
        self._write_config()
        if self.is_formatted():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = self._java_cmd(
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id_of(self.first),
            "--config",
            str(self.config_file),
            "--no-initial-controllers",
        )
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise DevKafkaError(
                f"formatting {self.data_dir} failed:\n{result.stdout}{result.stderr}"
            )
