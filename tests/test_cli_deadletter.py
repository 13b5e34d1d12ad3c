"""bridge deadletter list / replay against the real broker: what a replay publishes."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from bridge.app import create_app
from bridge.cli import main
from bridge.config import load_settings
from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync

pytestmark = pytest.mark.kafka

AUTH = {"Authorization": f"Bearer {TOKEN}"}


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
