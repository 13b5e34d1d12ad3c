"""Kafka's authorizer denying the bridge: said as a denial, not as Kafka away or a
topic missing.

One module-scoped KRaft broker with StandardAuthorizer: its PLAINTEXT listener (the
inter-broker and controller one, User:ANONYMOUS) is a super user and serves as the
admin connection; the bridge connects over SCRAM as User:bridge, allowed everything
by default, and each test adds DENY ACLs and removes them after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest, DescribeAclsRequest
from starlette.testclient import TestClient

from bridge.app import create_app
from bridge.cli import main
from bridge.config import load_settings
from bridge.devkafka import Listener, LocalKafka, ensure_jars, free_ports
from tests.conftest import REPO, thrown_away
from tests.fakes import TOKEN

pytestmark = pytest.mark.kafka

PASSWORD = "scram-Secret-1"
# Kafka's ACL codes: resource types, operations, permissions, pattern
TOPIC, GROUP, CLUSTER = 2, 3, 4
ALL, WRITE, DESCRIBE, IDEMPOTENT_WRITE = 2, 4, 8, 12
DENY, ALLOW = 2, 3
LITERAL = 3

Acl = tuple[int, str, int, int]  # resource type, name, operation, permission


@pytest.fixture(scope="module")
def acl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    home = REPO / ".cache" / "kafka"
    ensure_jars(home)
    port, controller, scram = free_ports(3)
    broker = LocalKafka(
        home,
        tmp_path_factory.mktemp("acl-kafka") / "data",
        port,
        controller,
        listeners=[Listener("SCRAM", scram, "SASL_PLAINTEXT")],
        extra_properties={
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
            "auto.create.topics.enable": "false",
            "listener.name.scram.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.scram.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
        },
        format_args=["--add-scram", f"SCRAM-SHA-512=[name=bridge,password={PASSWORD}]"],
        die_with_parent=True,
    )
    with broker, thrown_away(broker):
        asyncio.run(
            _acls(
                broker,
                CreateAclsRequest,
                [
                    (TOPIC, "*", ALL, ALLOW),
                    (GROUP, "*", ALL, ALLOW),
                    (CLUSTER, "kafka-cluster", ALL, ALLOW),
                ],
            )
        )
        yield broker


async def _acls(broker: LocalKafka, request: type, acls: list[Acl]) -> None:
    """Create (CreateAclsRequest) or delete (DeleteAclsRequest) ACLs of User:bridge."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        for resource, name, operation, permission in acls:
            answer = await admin._send_request(  # aiokafka has no ACL API of its own
                request(resource, name, LITERAL, "User:bridge", "*", operation, permission)
            )
            errors = getattr(answer, "creation_responses", None) or answer.filter_responses
            assert all(error[0] == 0 for error in errors), errors
        # until the broker's authorizer has them: what DescribeAcls answers from
        wanted = request is CreateAclsRequest
        for resource, name, operation, permission in acls:
            described = DescribeAclsRequest(
                resource, name, LITERAL, "User:bridge", "*", operation, permission
            )
            deadline = time.monotonic() + 10
            while bool((await admin._send_request(described)).resources) != wanted:
                assert time.monotonic() < deadline, f"ACL {name} not in force within 10 s"
                await asyncio.sleep(0.01)
    finally:
        await admin.close()


@contextlib.contextmanager
def denied(broker: LocalKafka, *acls: Acl) -> Iterator[None]:
    """The ACLs ``acls`` in force for the ``with`` block."""
    asyncio.run(_acls(broker, CreateAclsRequest, list(acls)))
    try:
        yield
    finally:
        asyncio.run(_acls(broker, DeleteAclsRequest, list(acls)))


def create_topics(broker: LocalKafka, *names: str) -> None:
    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, 1, 1) for name in names])
        finally:
            await admin.close()

    asyncio.run(create())


def bridge_env(broker: LocalKafka, prefix: str, ack: str, **more: str) -> dict[str, str]:
    return {
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": ack,
        "BRIDGE_KAFKA_BOOTSTRAP": broker.listener_bootstrap("SCRAM"),
        "BRIDGE_KAFKA_CONNECT_TIMEOUT": "10",
        "BRIDGE_PUBLISH_TIMEOUT": "4",
        "BRIDGE_TOPIC_TEMPLATE": prefix + ".{entity}.{action}",
        "BRIDGE_DEADLETTER_TOPIC": prefix + ".deadletter",
        "BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "BRIDGE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "BRIDGE_KAFKA_SASL_USERNAME": "bridge",
        "BRIDGE_KAFKA_SASL_PASSWORD": PASSWORD,
        **more,
    }


@pytest.fixture
def with_a_dead_letter(
    acl_kafka: LocalKafka, topic_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> str:
    """The operator commands' settings, with a Voucher/create dead letter on Kafka (kept
    under strict types, replayed without them); the topic it replays to."""
    target = f"{topic_prefix}.voucher.create"
    create_topics(acl_kafka, f"{topic_prefix}.deadletter", target)
    env = bridge_env(acl_kafka, topic_prefix, "broker", BRIDGE_STRICT_TYPES="true")
    with TestClient(create_app(load_settings(environ=env))) as client:
        response = client.post(
            "/webhooks/geins/Voucher/create",
            content=b'{"code":"X"}',
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "v1"},
        )
        assert response.status_code == 422, response.text
    monkeypatch.delenv("BRIDGE_CONFIG_FILE", raising=False)
    for name, value in {**env, "BRIDGE_STRICT_TYPES": "false"}.items():
        monkeypatch.setenv(name, value)
    return target


NO_WRITE = ((CLUSTER, "kafka-cluster", IDEMPOTENT_WRITE, DENY), (TOPIC, "*", WRITE, DENY))


def test_a_producer_kafka_denies_is_said_so_not_kafka_away(
    acl_kafka: LocalKafka, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No IdempotentWrite on the cluster nor WRITE on a topic (an ACL for the wrong
    principal, say): Kafka refuses the producer its start, and the bridge said "Kafka
    at ... is not reachable yet", /readyz "Kafka is not connected" (a review's find)."""
    caplog.set_level(logging.INFO)
    settings = load_settings(environ=bridge_env(acl_kafka, topic_prefix, "broker"))
    with denied(acl_kafka, *NO_WRITE), TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        answer = client.post(
            "/webhooks/geins/Order/create",
            content=b'{"id":"1"}',
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    said = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bridge"))
    assert "not reachable" not in said, said
    assert (
        f"Kafka at {settings.kafka_bootstrap} denies the bridge (User:bridge) IdempotentWrite "
        "on the cluster (or WRITE on the topics it publishes to): grant it with kafka-acls "
        "(ClusterAuthorizationFailedError); trying again in the background"
    ) in said, said
    assert ready.status_code == 503
    assert ready.json()["reason"] == "Kafka refuses the bridge (see its log)"
    assert answer.status_code == 503
    assert answer.json()["detail"] == "Kafka refuses the bridge (see its log)"


def test_a_replay_kafka_denies_the_producer_says_so(
    acl_kafka: LocalKafka, with_a_dead_letter: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same denial in a replay: "cannot talk to Kafka: no broker there answered",
    exit 1, though Kafka answered and refused."""
    capsys.readouterr()
    with denied(acl_kafka, *NO_WRITE):
        assert main(["deadletter", "replay"]) == 2
    err = capsys.readouterr().err
    assert "denies the bridge (User:bridge) IdempotentWrite on the cluster" in err, err
    assert "cannot talk to Kafka" not in err


def test_a_replay_to_a_topic_kafka_denies_is_not_a_missing_topic(
    acl_kafka: LocalKafka,
    with_a_dead_letter: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESCRIBE denied on the topic a dead letter replays to, which exists: it was "Kafka
    has no topic ... (no metadata for it within BRIDGE_PUBLISH_TIMEOUT); create it",
    wrong on every count (a review's find)."""
    monkeypatch.setenv("BRIDGE_PUBLISH_TIMEOUT", "30")  # a wait for metadata: 30 s
    capsys.readouterr()
    with denied(acl_kafka, (TOPIC, with_a_dead_letter, DESCRIBE, DENY)):
        started = time.monotonic()
        assert main(["deadletter", "replay"]) == 1
        took = time.monotonic() - started
    out = capsys.readouterr().out
    assert "not published: Kafka denies the bridge WRITE or DESCRIBE on the record's topic" in out
    assert "has no topic" not in out
    assert took < 20  # refused at once, no wait for metadata


def test_a_dead_letter_topic_kafka_hides_is_not_only_said_missing(
    acl_kafka: LocalKafka,
    with_a_dead_letter: str,
    topic_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """DESCRIBE denied on the dead-letter topic: Kafka leaves it out of the topics it
    lists, and list said it does not exist, sending the operator after a spelling."""
    capsys.readouterr()
    with denied(acl_kafka, (TOPIC, f"{topic_prefix}.deadletter", DESCRIBE, DENY)):
        assert main(["deadletter", "list"]) == 2
    assert "or Kafka's ACLs deny the bridge DESCRIBE on it" in capsys.readouterr().err
