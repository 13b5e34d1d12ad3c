"""A real Prometheus scrapes a running bridge: the series arrive with the right values.

Prometheus runs from Debian's package (`make install` installs it) with the
scrape job of deploy/prometheus/prometheus.yml, re-pointed at the bridge on a
free port and sped up to one scrape and one rule evaluation a second, and with
deploy/prometheus/alerts.yml loaded, so the shipped rules are evaluated
against the bridge's real series too.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from starlette.testclient import TestClient

from bridge import errors
from bridge.app import create_app
from bridge.config import Settings, load_settings
from bridge.metrics import Metrics
from tests.deploy_support.prometheus import PrometheusServer, Sample
from tests.fakes import TOKEN, FakePublisher
from tests.polling import wait_until
from tests.process import BridgeProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
JOB = "geins-bridge"
WAIT = 30.0  # seconds any one condition may take to show up in Prometheus


def scrape_config(bridge_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml: only the bridge job, every second, at the test bridge."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{bridge_port}"]}]
    config["scrape_configs"] = [job]
    return config


def wait_for(
    prometheus: PrometheusServer, expr: str, check: Callable[[list[Sample]], bool]
) -> list[Sample]:
    """Query ``expr`` until ``check`` accepts the result (or fail after WAIT seconds)."""
    result = wait_until(lambda: prometheus.query(expr), check, within=WAIT, every=0.25)
    if not check(result):
        pytest.fail(f"{expr} is still {result} after {WAIT}s\n{prometheus.log()}")
    return result


def value_is(expected: float) -> Callable[[list[Sample]], bool]:
    """A check: exactly one series, with this value."""

    def check(result: list[Sample]) -> bool:
        return len(result) == 1 and float(result[0]["value"][1]) == expected

    return check


def test_prometheus_scrapes_bridge_series_and_evaluates_the_alert_rules(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Pins Prometheus seeing 5 accepted, 2 unauthorized, Kafka connected; alerts.yml loaded."""
    env = {
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": f"{topic_prefix}.{{entity}}.{{action}}",
    }
    if "spool_dir" in Settings.model_fields:  # durable ack: keep its spool out of the work tree
        env["BRIDGE_SPOOL_DIR"] = str(tmp_path / "spool")
    with (
        BridgeProcess(env, tmp_path / "bridge.log") as bridge,
        PrometheusServer(scrape_config(bridge.port), tmp_path / "prometheus") as prometheus,
    ):
        # One scrape before any traffic: the counters are then seen to move.
        wait_for(prometheus, f'up{{job="{JOB}"}}', value_is(1))

        with httpx2.Client(base_url=bridge.url, timeout=10) as client:
            for number in range(5):
                answer = client.post(
                    "/webhooks/geins/Order/create",
                    headers={
                        "Authorization": f"Bearer {TOKEN}",
                        "x-Idempotency-Key": str(uuid.uuid4()),
                        "x-Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    },
                    json={"id": str(1000 + number)},
                )
                assert answer.status_code == 202, answer.text
            for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                answer = client.post(
                    "/webhooks/geins/Order/create", headers=headers, json={"id": "1"}
                )
                assert answer.status_code == 401, answer.text

        selector = f'job="{JOB}", instance="127.0.0.1:{bridge.port}"'
        wait_for(
            prometheus,
            f'bridge_requests_total{{{selector}, entity="order", action="create", '
            'outcome="accepted"}',
            value_is(5),
        )
        wait_for(
            prometheus, f'bridge_rejections_total{{{selector}, reason="unauthorized"}}', value_is(2)
        )
        wait_for(prometheus, f"bridge_kafka_connected{{{selector}}}", value_is(1))
        wait_for(prometheus, f"bridge_published_records_total{{{selector}}}", value_is(5))
        build = wait_for(prometheus, f"bridge_build_info{{{selector}}}", value_is(1))
        assert build[0]["metric"]["version"]

        # The shipped rules load and evaluate cleanly against the real series;
        # a healthy bridge fires none of them.
        alerts = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
        expected = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}

        def rule_health() -> dict[str, str]:
            groups = prometheus.api("rules")["groups"]
            return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}

        def all_ok(health: dict[str, str]) -> bool:
            return set(health) == expected and set(health.values()) == {"ok"}

        health = wait_until(rule_health, all_ok, within=WAIT, every=0.25)
        if not all_ok(health):
            pytest.fail(f"rules not all evaluated ok after {WAIT}s: {health}")
        assert prometheus.api("alerts")["alerts"] == []


def test_refusal_series_and_fine_stage_buckets_exist_from_the_start() -> None:
    """A reviewer's findings: the series of refusals before entity and action are known
    appeared with their first increment (which rate() and increase() then miss), and
    auth and parse, a few microseconds each, all fell in the first stage bucket."""
    text = Metrics().exposition().decode()
    for outcome in ("rejected", "rate_limited", "unavailable", "error"):
        series = f'bridge_requests_total{{action="none",entity="none",outcome="{outcome}"}} 0.0'
        assert series in text
    assert 'bridge_stage_duration_seconds_bucket{le="1e-05",stage="auth"} 0.0' in text
    assert 'bridge_request_duration_seconds_bucket{le="1e-05",outcome="accepted"}' not in text


def test_the_5xx_and_accepted_series_of_each_known_event_type_exist_from_the_start() -> None:
    """BridgeServerErrors watches outcome=~"unavailable|error": a parsed delivery's 503
    made its series appear at 1, which rate() cannot see, so an outage at Geins' low,
    mixed traffic (each failure of a type that had not failed yet) never fired it. The
    acceptances likewise: the first deliveries after a start counted no rate, and two
    401s among five 202s read as all refused (BridgeDeliveriesRefused pending)."""
    text = Metrics().exposition().decode()
    for entity, action in (("order", "create"), ("refund", "create"), ("brand", "delete")):
        for outcome in ("accepted", "unavailable", "error"):
            labels = f'action="{action}",entity="{entity}",outcome="{outcome}"'
            assert f"bridge_requests_total{{{labels}}} 0.0" in text
    assert 'bridge_requests_total{action="create",entity="order",outcome="duplicate"}' not in text


@pytest.mark.parametrize("ack", ["durable", "memory"])
def test_the_spool_volume_s_free_room_is_exported_in_durable_mode(
    ack: str, private_spool: Path
) -> None:
    """BridgeSpoolNearlyFull watched the limit only: a volume smaller than the spool
    may grow filled first, unwarned. Its free room is a gauge now (NaN without a
    spool, so that the alert cannot fire on a memory queue's limit)."""
    settings = load_settings(
        environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": ack, "BRIDGE_SPOOL_DIR": str(private_spool)}
    )
    metrics = Metrics()
    with TestClient(create_app(settings, publisher=FakePublisher(), metrics=metrics)):
        free = metrics.registry.get_sample_value("bridge_spool_disk_free_bytes")
    assert free is not None
    if ack == "durable":
        assert free > 0
    else:
        assert math.isnan(free)


def test_every_rejection_reason_is_pre_created() -> None:
    """errors.ALL_ERRORS pre-creates the rejection series, so that rate() sees the first
    of each: the 501 unsupported_transfer_coding was missing from it (a review's test).
    Every BridgeError subclass's reason is there."""

    def subclasses(cls: type[errors.BridgeError]) -> set[type[errors.BridgeError]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    reasons = {e.reason for e in subclasses(errors.BridgeError)} | {errors.BridgeError.reason}
    text = Metrics().exposition().decode()
    missing = [r for r in reasons if f'bridge_rejections_total{{reason="{r}"}} 0.0' not in text]
    assert sorted(missing) == []
