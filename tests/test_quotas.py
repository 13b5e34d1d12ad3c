"""The bridge against a real broker that throttles its client id (Kafka client quotas;
a review's tests: aiokafka ignored the throttle, see bridge.kafkafixes).

Production clusters set quotas (producer_byte_rate, request_percentage) per client id
or user. A broker over a quota answers a ProduceResponse with throttle_time_ms and then
mutes the connection for that long (KIP-219): the client is expected to hold back.
Here the quota is set on the test's own BRIDGE_KAFKA_CLIENT_ID (AlterClientQuotas,
KIP-546, the same request kafka-configs.sh sends), so no other test is throttled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiokafka.conn import create_conn
from aiokafka.protocol.admin import DescribeClientQuotasRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Float64, Int16, Int32, Schema, String
from starlette.testclient import TestClient

from bridge.app import create_app
from bridge.config import load_settings
from bridge.metrics import Metrics
from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync
from tests.polling import wait_until
from tests.test_kafka_end_to_end import bridge_env, create_topic, sample

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


class AlterClientQuotasResponse_v0(Response):  # type: ignore[misc]  # untyped base
    API_KEY = 49
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "entries",
            Array(
                ("error_code", Int16),
                ("error_message", String("utf-8")),
                (
                    "entity",
                    Array(("entity_type", String("utf-8")), ("entity_name", String("utf-8"))),
                ),
            ),
        ),
    )


class AlterClientQuotasRequest_v0(RequestStruct):  # type: ignore[misc]  # untyped base
    API_KEY = 49
    API_VERSION = 0
    RESPONSE_TYPE = AlterClientQuotasResponse_v0
    SCHEMA = Schema(
        (
            "entries",
            Array(
                (
                    "entity",
                    Array(("entity_type", String("utf-8")), ("entity_name", String("utf-8"))),
                ),
                ("ops", Array(("key", String("utf-8")), ("value", Float64), ("remove", Boolean))),
            ),
        ),
        ("validate_only", Boolean),
    )


class AlterClientQuotasRequest(Request[AlterClientQuotasRequest_v0]):  # type: ignore[misc]
    API_KEY = 49

    def __init__(self, entries: list[object]) -> None:
        self._entries = entries

    def build(self, request_struct_class: type[AlterClientQuotasRequest_v0]) -> RequestStruct:
        return request_struct_class(self._entries, False)


def set_client_quota(bootstrap: str, client_id: str, **quotas: float) -> None:
    """Set ``quotas`` (producer_byte_rate=..., request_percentage=...) on ``client_id``,
    and wait until the broker describes them (it applies them from its metadata)."""

    async def alter() -> None:
        host, _, port = bootstrap.rpartition(":")
        conn = await create_conn(host, int(port))
        try:
            ops = [(key, float(value), False) for key, value in quotas.items()]
            answer = await conn.send(AlterClientQuotasRequest([([("client-id", client_id)], ops)]))
            assert [code for code, _, _ in answer.entries] == [0], answer
            for _ in range(200):
                described = await conn.send(
                    DescribeClientQuotasRequest([("client-id", 0, client_id)], True)
                )
                have = {name: value for _, values in described.entries for name, value in values}
                if all(have.get(key) == value for key, value in quotas.items()):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"the quota of {client_id} never applied: {have}")
        finally:
            conn.close()

    asyncio.run(alter())


def throttled_env(bootstrap: str, prefix: str, ack: str, byte_rate: int) -> dict[str, str]:
    """bridge_env for ``ack`` mode, with a client id of the test's own whose produce
    quota is ``byte_rate`` bytes a second."""
    client_id = f"{prefix}-bridge"
    set_client_quota(bootstrap, client_id, producer_byte_rate=byte_rate)
    return bridge_env(bootstrap, prefix, BRIDGE_ACK=ack, BRIDGE_KAFKA_CLIENT_ID=client_id)


def deliver(client: TestClient, key: str, body: bytes) -> tuple[int, str | None]:
    response = client.post(
        "/webhooks/geins/Order/create",
        content=body,
        headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": key},
    )
    return response.status_code, response.headers.get("retry-after")


def body_of(size: int) -> bytes:
    """An event of about ``size`` bytes (not in its id: the id is copied to ce_subject)."""
    return b'{"id":"1","note":"' + b"x" * size + b'"}'


def test_broker_mode_a_throttled_bridge_answers_503_and_says_it_is_throttled(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A produce quota well below the load: every delivery is 202 or a 503 with
    Retry-After (never a 5xx of another kind, nor a hang past the publish timeout),
    nothing lands twice; and the operator can tell the bridge is being throttled, from
    the metrics or the log (the broker says so in every ProduceResponse)."""
    environ = throttled_env(kafka_bootstrap, topic_prefix, "broker", 4096)
    metrics = Metrics()
    body = body_of(4096)
    keys = [f"k{i:04d}" for i in range(40)]
    with (
        TestClient(create_app(load_settings(environ=environ), metrics=metrics)) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        answers = list(pool.map(lambda key: deliver(client, key, body), keys))
    assert {status for status, _ in answers} <= {202, 503}, answers
    assert all(after == "5" for status, after in answers if status == 503)
    assert any(status == 503 for status, _ in answers)  # throttled: some timed out
    landed = Counter(r.key.decode() for r in read_all_sync(kafka_bootstrap, topic_prefix))
    assert max(landed.values()) == 1  # no duplicate
    assert {key for key, (status, _) in zip(keys, answers, strict=True) if status == 202} <= set(
        landed
    )
    # What tells the operator (nothing did: the 503s said "Kafka did not acknowledge the
    # record within 5 s", the log "Kafka metadata refresh failed: TimeoutError()")
    assert sample(metrics, "bridge_kafka_throttle_seconds_total") > 0
    said = [r.getMessage() for r in caplog.records if r.name == "bridge.publisher"]
    assert [line for line in said if "Kafka throttles the bridge" in line], said


def test_broker_mode_throttling_is_not_taken_for_kafka_away(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka answers every request of a throttled client, only later: the bridge must
    not call it unreachable ("Kafka is not connected", bridge_kafka_connected 0, "Kafka
    metadata refresh failed"), which sends the operator after the network. It did: the
    heartbeat's metadata request queued behind produce requests on the connection the
    broker muted for the throttle time (aiokafka ignored throttle_time_ms and sent the
    next produce request at once), and the metadata went stale."""
    caplog.set_level(logging.WARNING, logger="bridge.publisher")
    environ = throttled_env(kafka_bootstrap, topic_prefix, "broker", 1024)
    metrics = Metrics()
    body = body_of(8192)
    keys = [f"k{i:04d}" for i in range(80)]
    unready: list[str] = []
    done = threading.Event()
    with TestClient(create_app(load_settings(environ=environ), metrics=metrics)) as client:

        def probe() -> None:
            while not done.is_set():
                response = client.get("/readyz")
                if response.status_code != 200:
                    unready.append(response.text)
                done.wait(0.25)

        with ThreadPoolExecutor(9) as pool:
            prober = pool.submit(probe)
            answers = list(pool.map(lambda key: deliver(client, key, body)[0], keys[:8]))
            answers += list(pool.map(lambda key: deliver(client, key, body)[0], keys[8:]))
            done.set()
            prober.result()
    assert set(answers) <= {202, 503}
    assert not unready, f"/readyz said {len(unready)} times: {unready[0]}"
    said = [r.getMessage() for r in caplog.records if r.name == "bridge.publisher"]
    assert not [line for line in said if "metadata refresh failed" in line], said


def test_durable_drainer_keeps_to_the_quota_in_order_without_holds(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Durable mode under a produce quota: the spool takes the burst (202 each) and
    drains back, in order, nothing lost, nothing twice (all of which held before, at
    the quota's rate). But throttling is Kafka-wide, not a topic's trouble: no topic is
    to be put on hold for it, nor a WARNING say "no metadata or buffer space for it"
    (bridge.drainer's own rule: holds are for a topic's trouble only)."""
    caplog.set_level(logging.DEBUG, logger="bridge.drainer")
    environ = throttled_env(kafka_bootstrap, topic_prefix, "durable", 16384)
    metrics = Metrics()
    body = body_of(2000)
    keys = [f"k{i:05d}" for i in range(150)]
    with TestClient(create_app(load_settings(environ=environ), metrics=metrics)) as client:
        assert [deliver(client, key, body)[0] for key in keys] == [202] * len(keys)
        assert sample(metrics, "bridge_spool_depth") > 0  # the spool took the burst
        depth = wait_until(
            lambda: sample(metrics, "bridge_spool_depth"), lambda d: d == 0, within=300, every=0.5
        )
        assert depth == 0
    records = read_all_sync(kafka_bootstrap, topic_prefix)
    assert [r.key.decode() for r in sorted(records, key=lambda r: r.offset)] == keys
    holds = [r.getMessage() for r in caplog.records if "held back" in r.getMessage()]
    assert not holds, holds[0]


def test_an_existing_topic_new_to_a_throttled_producer_is_not_held(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A topic whose hand-over timed out while throttled, the producer having no
    metadata for it, was held (a missing topic must be: see test_ackmodes), as though
    a quota on bytes did not hold back a metadata request. It does: the broker mutes
    the throttled connection (KIP-219), and the metadata request queues behind it. So
    an existing topic the producer had no metadata for (new to it, or idle for 5
    minutes) was held and said as its own trouble ("no metadata or buffer space")
    while only the quota held it back (a review's test)."""
    caplog.set_level(logging.DEBUG, logger="bridge.drainer")
    product = f"{topic_prefix}.geins.product.update"
    create_topic(kafka_bootstrap, product, {})  # it exists: nothing wrong with it
    environ = throttled_env(kafka_bootstrap, topic_prefix, "durable", 1024)
    environ["BRIDGE_SHUTDOWN_TIMEOUT"] = "2"
    metrics = Metrics()
    body = body_of(4000)
    with TestClient(create_app(load_settings(environ=environ), metrics=metrics)) as client:
        assert [deliver(client, f"o{i:03d}", body)[0] for i in range(20)] == [202] * 20
        # throttled, and a heartbeat since (the producer's view is its own topics only)
        wait_until(
            lambda: sample(metrics, "bridge_kafka_throttle_seconds_total"),
            lambda s: s > 2,
            within=60,
            every=0.2,
        )
        headers = {"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "p1"}
        answer = client.post(
            "/webhooks/geins/Product/update", content=b'{"id":"1"}', headers=headers
        )
        assert answer.status_code == 202
        landed = wait_until(
            lambda: read_all_sync(kafka_bootstrap, product),
            lambda records: len(records) == 1,
            within=60,
            every=1,
        )
        assert len(landed) == 1
    said = [r.getMessage() for r in caplog.records]
    holds = [line for line in said if "held back" in line and product in line]
    assert not holds, holds
