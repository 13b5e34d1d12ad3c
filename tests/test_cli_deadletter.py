"""bridge deadletter list / replay against the real broker: what a replay publishes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from starlette.testclient import TestClient

from bridge.app import create_app
from bridge.cli import main
from bridge.config import load_settings
from bridge.deadletter import dead_letter
from bridge.errors import UnknownEventType
from bridge.geins import Delivery
from bridge.redaction import Redactor
from bridge.routing import Destination
from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync

pytestmark = pytest.mark.kafka

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def novel_voucher_letter(
    topic: str, *, headers: list[tuple[bytes, bytes]], body: bytes, received_at: datetime
) -> Destination:
    """The dead letter of a Voucher/create delivery refused as an unknown event type."""
    delivery = Delivery(
        method="POST",
        path="/webhooks/geins/Voucher/create",
        path_entity="Voucher",
        path_action="create",
        query=[],
        headers=headers,
        body=body,
        received_at=received_at,
    )
    return dead_letter(delivery, UnknownEventType("novel"), topic, Redactor([TOKEN]))


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, topic_prefix: str
) -> pytest.MonkeyPatch:
    """The bridge's settings for this test's topics, strict types on (so that a novel
    event type becomes a dead letter that a replay without them accepts)."""
    monkeypatch.delenv("BRIDGE_CONFIG_FILE", raising=False)
    monkeypatch.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("BRIDGE_TOPIC_TEMPLATE", topic_prefix + ".{entity}.{action}")
    monkeypatch.setenv("BRIDGE_DEADLETTER_TOPIC", topic_prefix + ".deadletter")
    monkeypatch.setenv("BRIDGE_TOKENS", TOKEN)
    monkeypatch.setenv("BRIDGE_STRICT_TYPES", "true")
    return monkeypatch


def refuse(*requests: tuple[str, list[tuple[str, str]]]) -> None:
    """POST each (path, headers) with a JSON body; each must be refused (a dead letter).
    Leaving the client drains the spool, so the dead letters are on Kafka after this."""
    with TestClient(create_app(load_settings())) as client:
        for path, headers in requests:
            response = client.post(path, content=b'{"code":"X"}', headers=[*AUTH.items(), *headers])
            assert response.status_code in (400, 422), response.text


def test_replays_of_a_dead_letter_without_a_key_carry_its_key(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """A delivery without an idempotency key: each replay publishes with the dead letter's
    own key (it used to draw a new random key per replay, so consumers could not tell a
    second replay from a new event); replaying twice publishes twice."""
    refuse(("/webhooks/geins/Voucher/create", []))
    [letter] = read_all_sync(kafka_bootstrap, f"{topic_prefix}.deadletter")
    env.setenv("BRIDGE_STRICT_TYPES", "false")
    assert main(["deadletter", "replay"]) == 0
    assert main(["deadletter", "replay"]) == 0
    capsys.readouterr()
    replayed = read_all_sync(kafka_bootstrap, f"{topic_prefix}.voucher")
    assert [r.key for r in replayed] == [letter.key, letter.key]
    for record in replayed:
        headers = dict(record.headers)
        assert headers["ce_id"] == letter.key
        assert headers["x-bridge-key-generated"] == b"true"


def set_max_message_bytes(bootstrap: str, topic: str, limit: int, *, create: bool) -> None:
    """Create ``topic`` (one partition) or change it, with this max.message.bytes."""

    async def configure() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            config = {"max.message.bytes": str(limit)}
            if create:
                await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=config)])
            else:
                await admin.alter_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, topic, configs=config)]
                )
        finally:
            await admin.close()

    asyncio.run(configure())


def test_resending_a_record_kafka_refused_keeps_its_own_bridge_headers(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """A kafka_rejected dead letter is resent with the event's headers as published,
    x-bridge-key-generated and x-bridge-time-source included (the replay used to strip
    every x-bridge-* header), without those the set-aside added."""
    topic = f"{topic_prefix}.order.create"
    set_max_message_bytes(kafka_bootstrap, topic, 2000, create=True)
    body = b'{"id":"' + b"x" * 3000 + b'"}'
    with TestClient(create_app(load_settings())) as client:  # no key, no x-Timestamp
        response = client.post("/webhooks/geins/Order/create", content=body, headers=AUTH)
        assert response.status_code == 202
    [letter] = read_all_sync(kafka_bootstrap, f"{topic_prefix}.deadletter")
    assert dict(letter.headers)["x-bridge-reason"] == b"kafka_rejected"
    assert read_all_sync(kafka_bootstrap, topic) == []

    set_max_message_bytes(kafka_bootstrap, topic, 1048588, create=False)
    assert main(["deadletter", "replay"]) == 0
    assert f"resent -> {topic}" in capsys.readouterr().out
    [resent] = read_all_sync(kafka_bootstrap, topic)
    assert (resent.key, resent.value) == (letter.key, body)
    headers = dict(resent.headers)
    assert headers["x-bridge-key-generated"] == b"true"
    assert headers["x-bridge-time-source"] == b"received"
    assert headers["ce_type"] == b"com.geins.order.create"
    assert not {"x-bridge-reason", "x-bridge-detail", "x-bridge-original-topic"} & set(headers)
    assert len(resent.headers) == len(letter.headers) - 3


def produce(bootstrap: str, topic: str, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes | None]]) -> None:  # fmt: skip
    """One record, as any Kafka client may write it (null key, value, header values)."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
        finally:
            await producer.stop()

    asyncio.run(send())


def test_null_keys_values_and_header_values_print_as_none(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """tail, deadletter list and replay show a null key or header value as <none>
    (they used to end in a traceback), and a null x-bridge-original-topic is no topic."""
    produce(kafka_bootstrap, f"{topic_prefix}.order.create", None, b"{}", [("h", None)])
    assert main(["tail", f"{topic_prefix}.order.create", "--from-beginning", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "key=<none>" in out
    assert "  h: <none>" in out.splitlines()

    nulls = ["x-bridge-reason", "x-bridge-original-topic", "x-bridge-path-entity"]
    produce(kafka_bootstrap, f"{topic_prefix}.deadletter", None, b"", [(n, None) for n in nulls])
    assert main(["deadletter", "list"]) == 0
    assert "key=<none>  <none>: " in capsys.readouterr().out
    assert main(["deadletter", "replay", "--key", "<none>"]) == 1
    out = capsys.readouterr().out
    assert "key=<none>  still refused: missing_event_type" in out
    assert main(["deadletter", "replay", "--offset", "0"]) == 1  # one partition: N alone
    assert capsys.readouterr().out.startswith("[0]@0     key=<none>  still refused")


def test_dead_letters_are_listed_oldest_first_by_partition_and_offset(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """On a dead-letter topic of 3 partitions (as topics create makes it), list shows
    [partition]@offset in arrival order, replay --offset takes P:N, and N alone is refused
    (it used to match one record per partition, and list showed @0 three times); filters
    that match nothing exit 1."""
    topic = f"{topic_prefix}.deadletter"

    async def keep() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 3, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:  # (key, partition) in the order they arrived
            for second, (key, partition) in enumerate([("a", 2), ("b", 0), ("c", 1), ("d", 0)]):
                letter = novel_voucher_letter(
                    topic,
                    headers=[(b"x-idempotency-key", key.encode())],
                    body=b"{}",
                    received_at=datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC),
                )
                await producer.send_and_wait(
                    topic,
                    letter.value,
                    key=letter.key,
                    headers=letter.headers,
                    partition=partition,
                    timestamp_ms=1_700_000_000_000 + second * 1000,
                )
        finally:
            await producer.stop()

    asyncio.run(keep())
    assert main(["deadletter", "list"]) == 0
    listing = [line.split()[0] + " " + line.split()[2] for line in
               capsys.readouterr().out.splitlines() if "key=" in line]  # fmt: skip
    assert listing == ["[2]@0 key=a", "[0]@0 key=b", "[1]@0 key=c", "[0]@1 key=d"]

    env.setenv("BRIDGE_STRICT_TYPES", "false")
    assert main(["deadletter", "replay", "--offset", "0", "--dry-run"]) == 2
    assert "give PARTITION:OFFSET, such as 0:0" in capsys.readouterr().err
    for nothing in (["--offset", "1:5"], ["--key", "z"], ["--reason", "body_not_json"]):
        assert main(["deadletter", "replay", *nothing]) == 1  # used to exit 0
        err = capsys.readouterr().err
        assert f"no dead letter on {topic} matches" in err
    assert main(["deadletter", "replay", "--offset", "0:1", "--offset", "2:0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["[2]@0", "key=a"],
        ["[0]@1", "key=d"],
    ]


def test_a_missing_dead_letter_topic_is_an_error_and_is_not_created(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """deadletter list and replay on a topic that does not exist (a misspelt
    BRIDGE_DEADLETTER_TOPIC) exit 2 naming it, and leave no such topic behind (listing
    used to create it, on a broker that creates topics on first use)."""
    env.setenv("BRIDGE_DEADLETTER_TOPIC", f"{topic_prefix}.deadleter")
    assert main(["deadletter", "list"]) == 2
    assert main(["deadletter", "replay", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"bridge: the dead-letter topic {topic_prefix}.deadleter does not exist" in err
    assert main(["topics", "list"]) == 0
    assert f"{topic_prefix}.deadleter" not in capsys.readouterr().out.split()
