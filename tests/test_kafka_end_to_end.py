"""The bridge against a real Kafka broker: samples in, the right records out."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from starlette.testclient import TestClient

from bridge import kafkaadmin
from bridge.app import create_app
from bridge.config import load_settings
from bridge.devkafka import free_port
from bridge.metrics import Metrics
from tests.fakes import TOKEN, samples
from tests.kafkaread import read_all_sync

pytestmark = pytest.mark.kafka


def bridge_env(bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "BRIDGE_KAFKA_BOOTSTRAP": bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": prefix + ".geins.{entity}.{action}",
        **extra,
    }


def test_shared_samples_land_on_their_topics(kafka_bootstrap: str, topic_prefix: str) -> None:
    """Accepted samples are on the expected topic with key, value and headers; rejects nowhere."""
    settings = load_settings(environ=bridge_env(kafka_bootstrap, topic_prefix))
    metrics = Metrics()
    accepted: dict[str, dict[str, Any]] = {}
    with TestClient(create_app(settings, metrics=metrics)) as client:
        for sample in samples():
            response = client.request(
                sample["method"], sample["path"], headers=sample["headers"], content=sample["body"]
            )
            if sample["expect"]["status"] == "2xx":
                assert response.status_code == 202, (sample["name"], response.text)
                accepted[sample["expect"]["key"]] = sample
            else:
                assert 400 <= response.status_code < 500, sample["name"]

    records = read_all_sync(kafka_bootstrap, topic_prefix)
    by_key = {r.key.decode(): r for r in records}
    assert len(records) == len(by_key) == len(accepted)  # nothing rejected, nothing twice
    for key, sample in accepted.items():
        record = by_key[key]
        assert record.topic == f"{topic_prefix}.{sample['expect']['topic']}"
        headers = {name: value.decode() for name, value in record.headers}
        if sample["body"]:
            assert record.value == sample["body"].encode()
        else:
            assert json.loads(record.value)["entity"]
        entity, action = sample["expect"]["topic"].split(".")[1:]
        assert headers["ce_type"] == f"com.geins.{entity}.{action}"
        assert headers["ce_id"] == key
        assert headers["ce_specversion"] == "1.0"
        assert headers["ce_time"] == "2024-01-15T10:30:00Z"
        assert headers["content-type"] == "application/json"
        assert headers["x-idempotency-key"] == key
        assert headers["x-timestamp"] == sample["headers"]["x-Timestamp"]
        assert TOKEN not in json.dumps(headers) + record.value.decode()
    exposition = metrics.exposition().decode()
    assert f"bridge_published_records_total {float(len(accepted))}" in exposition


def test_topics_created_at_startup(kafka_bootstrap: str, topic_prefix: str) -> None:
    """BRIDGE_CREATE_TOPICS creates every known topic with the configured partitions."""

    env = bridge_env(kafka_bootstrap, topic_prefix, BRIDGE_CREATE_TOPICS="true",
                     BRIDGE_TOPIC_PARTITIONS="2")  # fmt: skip
    settings = load_settings(environ=env)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
    topics = [
        t for t in asyncio.run(kafkaadmin.list_topics(settings)) if t.startswith(topic_prefix)
    ]
    assert f"{topic_prefix}.geins.productmonitor.notify" in topics
    assert len(topics) == 31  # every entity/action pair of the Geins table


def test_kafka_unreachable_answers_503_then_recovers(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """With no broker at the address the bridge starts, is unready and answers 503 + Retry-After."""
    env = bridge_env(f"127.0.0.1:{free_port()}", topic_prefix, BRIDGE_KAFKA_CONNECT_TIMEOUT="1")
    settings = load_settings(environ=env)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 503
        response = client.post(
            "/webhooks/geins/Order/create",
            content=b"{}",
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": str(uuid.uuid4())},
        )
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.headers["content-type"] == "application/problem+json"
    assert read_all_sync(kafka_bootstrap, topic_prefix) == []
