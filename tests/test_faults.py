"""Fault tests: real bridge processes, a real broker, and things going wrong.

Each prints sent / answered 2xx / found in Kafka / lost, and fails on any loss:
these are the proof of the promise that an event answered 2xx is never lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.producer.sender import Sender
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.structs import TopicPartition
from starlette.testclient import TestClient

from bridge.app import create_app
from bridge.config import load_settings
from bridge.devkafka import LocalKafka, free_ports
from bridge.errors import SpoolWriteFailed
from bridge.kafkaadmin import read_to_end
from bridge.metrics import Metrics
from bridge.publisher import KafkaPublisher
from bridge.routing import Destination
from bridge.spool import Spool
from tests import cluster
from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync
from tests.loadgen import Tally, load
from tests.polling import eventually, wait_until
from tests.process import BridgeProcess
from tests.test_kafka_end_to_end import create_topic, sample

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def bridge_env(bootstrap: str, prefix: str, ack: str, **extra: str) -> dict[str, str]:
    return {
        "BRIDGE_KAFKA_BOOTSTRAP": bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": prefix + ".{entity}.{action}",
        "BRIDGE_DEADLETTER_TOPIC": prefix + ".deadletter",
        "BRIDGE_ACK": ack,
        **extra,
    }


def hang(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it has stopped: a thread in the
    middle of a disk write stops only once the write is done, and under load a test
    found its stopped broker had acknowledged the records sent after the signal."""
    os.kill(pid, signal.SIGSTOP)

    def states() -> list[str]:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                stat = (task / "stat").read_text()
                found.append(stat[stat.rindex(")") + 2])
        return found

    stopped = wait_until(states, lambda found: set(found) <= {"T", "t"}, within=30, every=0.01)
    assert set(stopped) <= {"T", "t"}, f"threads of {pid} still running: {stopped}"


def found_keys(bootstrap: str, prefix: str) -> set[str]:
    return {r.key.decode() for r in read_all_sync(bootstrap, prefix)}


def wait_for_keys(bootstrap: str, prefix: str, wanted: set[str], within: float) -> set[str]:
    """Poll Kafka until every wanted key is there (or time runs out); the keys found.
    A broker just back from SIGSTOP may refuse the reader for a moment (it re-registers
    with its controller: NodeNotReadyError once in CI): that poll found nothing."""

    def found_now() -> set[str]:
        try:
            return found_keys(bootstrap, prefix)
        except KafkaError:
            return set()

    return wait_until(found_now, wanted.issubset, within=within, every=0.5)


def run_load_for(url: list[str], tally: Tally, seconds: float, *, pause: float = 0.0) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(load(lambda: url[0], tally, stop, workers=8, pause=pause))
        await asyncio.sleep(seconds)
        stop.set()
        await task

    asyncio.run(scenario())


@pytest.mark.parametrize("ack", ["durable", "broker"])
def test_kill_9_under_load_loses_no_2xx(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, ack: str
) -> None:
    """kill -9 at random moments under load, five times: every 2xx key ends up in Kafka."""
    env = bridge_env(kafka_bootstrap, topic_prefix, ack)
    tally = Tally()
    rng = random.Random(42)  # noqa: S311  # picks kill moments, not secrets
    for round_ in range(5):
        with BridgeProcess(env, tmp_path / f"bridge-{round_}.log") as bridge:
            url = [bridge.url]

            async def scenario(bridge: BridgeProcess = bridge, url: list[str] = url) -> None:
                stop = asyncio.Event()
                task = asyncio.create_task(load(lambda: url[0], tally, stop, workers=8))
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                bridge.signal(signal.SIGKILL)
                await asyncio.sleep(0.2)
                stop.set()
                await task

            asyncio.run(scenario())
            assert bridge.wait(10) == -signal.SIGKILL
    # A last, clean run delivers what the killed ones left in the spool.
    with BridgeProcess(env, tmp_path / "bridge-final.log") as bridge:
        found = wait_for_keys(kafka_bootstrap, topic_prefix, tally.accepted, within=60)
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(30) == 0
    print(f"[kill -9, {ack}] {tally.summary(found)}")
    assert len(tally.accepted) > 100
    assert tally.accepted <= found, f"{len(tally.accepted - found)} answered 2xx, not in Kafka"
    assert found <= tally.sent


@pytest.fixture(scope="module")
def faults_broker(
    session_kafka: LocalKafka | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKafka]:
    """The broker for the tests of this module that hang, stop or start it: the
    session's, which own_broker gives back running and taking records after each test
    (a broker of their own cost some 6-10 s of a loaded CI run); one of this module's
    own with an external Kafka (TEST_KAFKA_BOOTSTRAP), which is not to be stopped."""
    if session_kafka is not None:
        yield session_kafka
        return
    with cluster.own_broker(tmp_path_factory.mktemp("faults-kafka") / "data") as broker:
        yield broker


def takes_a_record(bootstrap: str) -> bool:
    """Whether Kafka acknowledges a record (acks=all) now: a broker back from SIGSTOP
    is fenced by its controller for a moment, and refuses them."""

    async def produce() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000
        )
        await producer.start()
        try:
            await producer.send_and_wait("faults.health", b"{}")
        finally:
            await producer.stop()

    try:
        asyncio.run(asyncio.wait_for(produce(), 10))
    except (KafkaError, TimeoutError, OSError):
        return False
    return True


def running_and_taking_records(broker: LocalKafka) -> None:
    """Resume ``broker`` (a test that failed between its SIGSTOP and SIGCONT) or start
    it again (one that failed while it was stopped); back once it takes a record."""
    if broker.is_running() and broker.pid is not None:
        os.kill(broker.pid, signal.SIGCONT)
    else:
        broker.start()
        broker.wait_ready()
    assert wait_until(lambda: takes_a_record(broker.bootstrap), bool, within=60, every=0.2)


@pytest.fixture
def own_broker(faults_broker: LocalKafka) -> Iterator[LocalKafka]:
    """A broker this test may hang, stop and start, running and taking records; and so
    again after the test, whatever it left (the session's other tests use it)."""
    running_and_taking_records(faults_broker)
    yield faults_broker
    running_and_taking_records(faults_broker)


def test_a_producer_that_cannot_flush_is_closed_and_fails_what_it_held(
    own_broker: LocalKafka, topic_prefix: str
) -> None:
    """A broker that stops answering (SIGSTOP) while the producer holds records: the
    flush gives up after BRIDGE_SHUTDOWN_TIMEOUT and the producer is closed anyway
    (no sender task or connection left behind, as aiokafka's own stop() would leave
    them), and the acknowledgements of the records it held fail rather than never
    coming, so the drainer sends those again. Rotation retires a producer the same way."""
    settings = load_settings(
        environ={"BRIDGE_KAFKA_BOOTSTRAP": own_broker.bootstrap, "BRIDGE_SHUTDOWN_TIMEOUT": "1"}
    )
    pid = own_broker.pid
    assert pid is not None

    async def scenario() -> None:
        publisher = KafkaPublisher(settings, Metrics())
        await publisher.start()
        topic = f"{topic_prefix}.held"
        await publisher.publish(Destination(topic, b"k0", b"{}", []))  # topic and metadata
        producer = publisher._producer
        assert producer is not None
        hang(pid)
        try:
            held = [
                await publisher.hand_over(Destination(topic, f"k{i}".encode(), b"{}", []))
                for i in range(1, 4)
            ]
            async with asyncio.timeout(10):  # not for ever, as with aiokafka's stop()
                await publisher.stop()
            outcomes = [f.exception() if f.done() and not f.cancelled() else f for f in held]
            assert all(isinstance(o, KafkaError) for o in outcomes), outcomes  # (once flaky)
            assert producer._sender.sender_task.done()
            assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        finally:
            os.kill(pid, signal.SIGCONT)

    asyncio.run(scenario())


def test_broker_outage_durable_accepts_broker_mode_refuses(
    own_broker: LocalKafka, topic_prefix: str, tmp_path: Path
) -> None:
    """Kafka down for 20 s under load: durable answers 2xx throughout (even across a
    SIGTERM restart mid-outage) and delivers everything later; broker mode answers 503
    with Retry-After and loses no 2xx."""
    bootstrap = own_broker.bootstrap
    durable_env = bridge_env(bootstrap, topic_prefix + "d", "durable")
    broker_env = bridge_env(bootstrap, topic_prefix + "b", "broker", BRIDGE_PUBLISH_TIMEOUT="2")
    durable_tally, broker_tally, outage_tally = Tally(), Tally(), Tally()
    durable = BridgeProcess(
        {**durable_env, "BRIDGE_SHUTDOWN_TIMEOUT": "2"}, tmp_path / "durable.log"
    )
    brokered = BridgeProcess(broker_env, tmp_path / "broker.log")
    successor = BridgeProcess(durable_env, tmp_path / "durable-2.log")
    durable_url, broker_url = [""], [""]
    with durable, brokered, contextlib.closing(successor):
        durable_url[0], broker_url[0] = durable.url, brokered.url

        async def scenario() -> None:
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(
                    load(lambda: durable_url[0], durable_tally, stop, workers=4, pause=0.02)
                ),
                asyncio.create_task(
                    load(lambda: broker_url[0], broker_tally, stop, workers=4, pause=0.02)
                ),
            ]
            await asyncio.sleep(2)
            await asyncio.to_thread(own_broker.stop)
            outage = asyncio.Event()
            tasks.append(
                asyncio.create_task(
                    load(lambda: durable_url[0], outage_tally, outage, workers=2, pause=0.05)
                )
            )
            await asyncio.sleep(8)
            # SIGTERM the durable bridge in the middle of the outage: what it holds
            # stays in the spool, and its successor (same spool) sends it later.
            durable.signal(signal.SIGTERM)
            assert await asyncio.to_thread(durable.wait, 30) == 0
            await asyncio.to_thread(successor.start)
            durable_url[0] = successor.url
            await asyncio.sleep(8)
            outage.set()
            async with httpx2.AsyncClient() as client:
                ready = (await client.get(successor.url + "/readyz")).status_code
                unready = (await client.get(broker_url[0] + "/readyz")).status_code
            await asyncio.to_thread(own_broker.start)
            await asyncio.to_thread(own_broker.wait_ready)
            await asyncio.sleep(3)
            stop.set()
            await asyncio.gather(*tasks)
            assert (ready, unready) == (200, 503)
            successor.signal(signal.SIGTERM)
            assert await asyncio.to_thread(successor.wait, 60) == 0

        asyncio.run(scenario())

    durable_found = wait_for_keys(
        bootstrap, topic_prefix + "d", durable_tally.accepted | outage_tally.accepted, 30
    )
    broker_found = found_keys(bootstrap, topic_prefix + "b")
    print(f"[outage, durable] {durable_tally.summary(durable_found)}")
    print(f"[outage, durable, sent during the outage] {outage_tally.summary(durable_found)}")
    print(f"[outage, broker] {broker_tally.summary(broker_found)} statuses={broker_tally.statuses}")
    assert outage_tally.refused == 0, outage_tally.statuses  # 2xx all through the outage
    assert len(outage_tally.accepted) > 50
    assert (durable_tally.accepted | outage_tally.accepted) <= durable_found
    assert broker_tally.statuses.get(503, 0) > 0
    assert broker_tally.accepted <= broker_found


def test_broker_mode_a_503_that_lands_later_makes_the_retry_a_duplicate(
    own_broker: LocalKafka, topic_prefix: str, tmp_path: Path
) -> None:
    """Kafka hangs (SIGSTOP) past BRIDGE_PUBLISH_TIMEOUT: the delivery gets its 503, but
    its record stays queued and lands once Kafka answers. The sender's retry is then
    answered 200 duplicate and nothing is published again: in a review's outage one
    order became 3 records (two timed-out attempts, then the retry's). A retry while
    the first copy is still queued gets a 503 too, and is not published either."""
    env = bridge_env(own_broker.bootstrap, topic_prefix, "broker", BRIDGE_PUBLISH_TIMEOUT="1")
    pid = own_broker.pid
    assert pid is not None

    def deliver(client: httpx2.Client, key: str) -> httpx2.Response:
        return client.post(
            "/webhooks/geins/Order/create",
            content=b'{"id":"1"}',
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": key},
        )

    with (
        BridgeProcess(env, tmp_path / "bridge.log") as bridge,
        httpx2.Client(base_url=bridge.url, timeout=30) as client,
    ):
        assert deliver(client, "warm-up").status_code == 202  # topic and metadata known
        hang(pid)
        try:
            timed_out = deliver(client, "late")
            early_retry = deliver(client, "late")  # while the first copy is still queued
        finally:
            os.kill(pid, signal.SIGCONT)
        assert timed_out.status_code == 503, timed_out.text
        assert timed_out.json()["reason"] == "publish_timeout"
        assert early_retry.status_code == 503, early_retry.text
        assert "may still land" in early_retry.json()["detail"]  # and was not published
        wait_for_keys(own_broker.bootstrap, topic_prefix, {"late"}, 30)
        retried = wait_until(
            lambda: deliver(client, "late"),
            lambda answer: answer.status_code != 503,  # readiness may lag Kafka's return
            within=30,
            every=0.5,
        )
        assert retried.status_code == 200, retried.text
        assert retried.json()["status"] == "duplicate"
    keys = [r.key for r in read_all_sync(own_broker.bootstrap, topic_prefix)]
    assert keys.count(b"late") == 1, keys


def test_a_delivery_still_waiting_at_the_shutdown_timeout_gets_a_503(
    own_broker: LocalKafka, topic_prefix: str, tmp_path: Path
) -> None:
    """Kafka hangs while a delivery waits for it and a SIGTERM comes: once
    BRIDGE_SHUTDOWN_TIMEOUT runs out uvicorn cancels the request. Its answer was
    uvicorn's text/plain 500, logged as an error in the application with a traceback
    and counted as accepted; it is a problem+json 503 to retry now."""
    env = bridge_env(
        own_broker.bootstrap,
        topic_prefix,
        "broker",
        BRIDGE_PUBLISH_TIMEOUT="20",
        BRIDGE_SHUTDOWN_TIMEOUT="1",
    )
    pid = own_broker.pid
    assert pid is not None
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with (
        BridgeProcess(env, tmp_path / "bridge.log") as bridge,
        httpx2.Client(base_url=bridge.url, timeout=30) as client,
    ):
        warm_up = client.post("/webhooks/geins/Order/create", content=b"{}", headers=headers)
        assert warm_up.status_code == 202, warm_up.text
        hang(pid)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(
                    client.post, "/webhooks/geins/Order/create", content=b"{}", headers=headers
                )
                time.sleep(0.5)
                bridge.signal(signal.SIGTERM)
                answer = waiting.result(timeout=20)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["reason"] == "shutting_down"
        assert bridge.wait(30) == 0
    assert "Exception in ASGI application" not in bridge.log()


@pytest.mark.parametrize("second", ["while-a-request-waits", "while-draining"])
def test_ctrl_c_twice_still_hands_accepted_events_to_kafka(
    own_broker: LocalKafka, topic_prefix: str, tmp_path: Path, second: str
) -> None:
    """Memory mode, Kafka hanging with three events answered 202: Ctrl-C, then Ctrl-C
    again while a slow upload is in flight, or while the app drains. uvicorn's forced
    quit skipped the app's shutdown and cancelled the drainer, so the events were lost
    although Kafka came back, with a CancelledError traceback. The second Ctrl-C cuts
    the upload short (a 503); the events still reach Kafka, the app's shutdown once."""
    env = bridge_env(
        own_broker.bootstrap,
        topic_prefix,
        "memory",
        BRIDGE_PUBLISH_TIMEOUT="2",
        BRIDGE_SHUTDOWN_TIMEOUT="5",
    )
    pid = own_broker.pid
    assert pid is not None
    headers = {"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "warm"}
    keys = {f"twice-{n}" for n in range(3)}
    with (
        BridgeProcess(env, tmp_path / "bridge.log") as bridge,
        httpx2.Client(base_url=bridge.url, timeout=30) as client,
        socket.create_connection(("127.0.0.1", bridge.port)) as upload,
    ):
        warm_up = client.post("/webhooks/geins/Order/create", content=b"{}", headers=headers)
        assert warm_up.status_code == 202, warm_up.text
        assert wait_for_keys(own_broker.bootstrap, topic_prefix, {"warm"}, within=30)
        hang(pid)
        try:
            for key in sorted(keys):
                answer = client.post(
                    "/webhooks/geins/Order/create",
                    content=b"{}",
                    headers={**headers, "x-Idempotency-Key": key},
                )
                assert answer.status_code == 202, answer.text
            if second == "while-a-request-waits":
                upload.sendall(
                    b"POST /webhooks/geins/Order/create HTTP/1.1\r\nhost: x\r\n"
                    b"authorization: Bearer " + TOKEN.encode() + b"\r\n"
                    b"content-length: 100\r\n\r\n{"
                )
            time.sleep(0.3)
            bridge.signal(signal.SIGINT)
            time.sleep(1.0)
            bridge.signal(signal.SIGINT)
            if second == "while-a-request-waits":
                upload.settimeout(10)
                assert upload.recv(100).startswith(b"HTTP/1.1 503 ")
            time.sleep(0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert bridge.wait(30) == 0
        log = bridge.log()
    assert "Traceback" not in log, log
    assert log.count("Waiting for application shutdown.") == 1, log
    assert wait_for_keys(own_broker.bootstrap, topic_prefix, keys, within=30) >= keys, log


def tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk: {result.stderr.strip()}")


def test_full_or_read_only_spool(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """A spool whose disk fills: 503 with Retry-After and readiness off, no crash. On a
    read-only disk: startup stops with a clear message. Every 2xx ends up in Kafka."""
    spool = tmp_path / "small-disk"
    tmpfs(spool, "256k")
    env = bridge_env(
        kafka_bootstrap,
        topic_prefix,
        "durable",
        BRIDGE_SPOOL_DIR=str(spool),
        BRIDGE_RETRY_AFTER="3",
        # Keep the events in the spool so the disk fills: Kafka stays unreachable.
        BRIDGE_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_ports(1)[0]}",
        BRIDGE_KAFKA_CONNECT_TIMEOUT="1",
        BRIDGE_SHUTDOWN_TIMEOUT="1",
    )
    tally = Tally()
    try:
        with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
            big = b'{"pad":"' + b"x" * 4000 + b'"}'
            with httpx2.Client(base_url=bridge.url, timeout=10) as client:
                last = None
                for i in range(200):
                    tally.sent.add(f"f{i}")
                    last = client.post(
                        "/webhooks/geins/Order/create",
                        content=big,
                        headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": f"f{i}"},
                    )
                    if last.status_code == 202:
                        tally.accepted.add(f"f{i}")
                    else:
                        break
                assert last is not None
                assert last.status_code == 503, last.text
                assert last.headers["retry-after"] == "3"
                # spool_full: refused while the room to remove what is spooled is all
                # that is left (a 256 KiB disk has no room for the reserve file)
                assert last.json()["reason"] == "spool_full", last.text
                assert client.get("/readyz").status_code == 503
                assert client.get("/healthz").status_code == 200  # alive, not crashed
            bridge.signal(signal.SIGTERM)
            assert bridge.wait(30) == 0
        assert len(tally.accepted) > 5
        # The same spool on a read-only disk: refuse to start, and say why.
        subprocess.run(["mount", "-o", "remount,ro", str(spool)], check=True)
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "serve"],
            env={**env, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2
        assert "not writable" in result.stderr
        # Writable with room again, and Kafka: everything answered 2xx goes out.
        subprocess.run(["mount", "-o", "remount,rw,size=8m", str(spool)], check=True)
        env["BRIDGE_KAFKA_BOOTSTRAP"] = kafka_bootstrap
        with BridgeProcess(env, tmp_path / "bridge-2.log") as bridge:
            found = wait_for_keys(kafka_bootstrap, topic_prefix, tally.accepted, 30)
            bridge.signal(signal.SIGTERM)
            assert bridge.wait(30) == 0
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)
    print(f"[full spool] {tally.summary(found)}")
    assert tally.accepted <= found


def _small_disk_env(bootstrap: str, topic_prefix: str, spool: Path, **extra: str) -> dict[str, str]:
    """A durable bridge whose spool's disk (a small tmpfs) is far smaller than its
    BRIDGE_SPOOL_MAX_BYTES, which makes a reserve file of 1 MiB."""
    return bridge_env(
        bootstrap,
        topic_prefix,
        "durable",
        BRIDGE_SPOOL_DIR=str(spool),
        BRIDGE_SPOOL_MAX_BYTES=str(64 * 1024 * 1024),
        BRIDGE_KAFKA_CONNECT_TIMEOUT="1",
        BRIDGE_SHUTDOWN_TIMEOUT="1",
        **extra,
    )


def _fill_until_refused(
    bridge: BridgeProcess,
    tally: Tally,
    prefix: str,
    sizes: list[int],
    *,
    workers: int = 1,
    refusals: int = 1,
) -> httpx2.Response:
    """Deliveries of these sizes in turn, fresh keys, from ``workers`` clients at once,
    until ``refusals`` are refused (20,000 sent at most); the last refusal."""
    lock = threading.Lock()
    refused: list[httpx2.Response] = []
    sent = itertools.count()

    def worker(number: int) -> None:
        with httpx2.Client(base_url=bridge.url, timeout=30) as client:
            for i in itertools.count():
                with lock:
                    if len(refused) >= refusals or next(sent) >= 20_000:
                        return
                key = f"{prefix}{number}-{i}"
                size = sizes[(number + i) % len(sizes)]
                body = b'{"pad":"' + b"x" * size + b'"}'
                tally.sent.add(key)
                answer = client.post(
                    "/webhooks/geins/Order/create",
                    content=body,
                    headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": key},
                )
                with lock:
                    if answer.status_code == 202:
                        tally.accepted.add(key)
                    else:
                        refused.append(answer)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(refused) >= refusals, "the small disk never filled"
    return refused[-1]


@pytest.mark.parametrize(
    ("disk", "sizes", "workers"),
    [("24m", [3000], 1), ("6m", [200, 3000, 3000, 3000, 200_000], 32)],
    ids=["24m-3KB-serial", "6m-to-200KB-32-at-once"],
)
def test_a_small_disk_drains_after_each_of_two_outages(
    own_broker: LocalKafka,
    topic_prefix: str,
    tmp_path: Path,
    disk: str,
    sizes: list[int],
    workers: int,
) -> None:
    """What two reviews found: on a volume smaller than the spool may grow, the spool
    stopped draining with Kafka up. After a first outage the reserve file was never made
    again (the WAL file kept the backlog's size), so a second outage filled the disk
    with no reserve to give up (stuck at 10,543 events); and a reserve of 1 MiB was less
    than a checkpoint of the WAL needed, so even the first outage stuck with large
    events (69 of 70 left). Now the emptied spool gives the WAL's room back and makes
    its reserve again, the reserve is at least 8 MiB, and without one, deliveries are
    refused (503 spool_full) before the disk fills. One bridge throughout (a restart
    closes the database, which deletes the WAL file); Kafka hangs (SIGSTOP) meanwhile."""
    spool = tmp_path / "small-disk"
    tmpfs(spool, disk)
    env = _small_disk_env(own_broker.bootstrap, topic_prefix, spool, BRIDGE_PUBLISH_TIMEOUT="2")
    tally = Tally()
    found: set[str] = set()
    pid = own_broker.pid
    assert pid is not None
    try:
        with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
            for outage in ("first", "second"):
                hang(pid)
                try:
                    last = _fill_until_refused(
                        bridge, tally, f"{outage}-", sizes, workers=workers, refusals=50
                    )
                finally:
                    os.kill(pid, signal.SIGCONT)
                assert last.status_code == 503
                found = wait_for_keys(own_broker.bootstrap, topic_prefix, tally.accepted, 120)
                missing = len(tally.accepted - found)
                assert not missing, f"after the {outage} outage, {missing} not in Kafka"
                ready = wait_until(
                    lambda: httpx2.get(bridge.url + "/readyz", timeout=5).status_code,
                    lambda status: status == 200,
                    within=30,
                    every=0.5,
                )
                assert ready == 200, bridge.log()[-3000:]
            bridge.signal(signal.SIGTERM)
            assert bridge.wait(30) == 0
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)
    print(f"[two outages, {disk}] {tally.summary(found)}")
    assert len(tally.accepted) > 40


def test_a_spool_that_filled_its_disk_drains_once_kafka_is_back(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A disk that fills before BRIDGE_SPOOL_MAX_BYTES (a volume smaller than it): with
    Kafka back, the drainer could not remove what Kafka took (SQLite needs room for
    WAL pages even to delete), so it sent one batch and nothing more, on every start
    (a reviewer's spool stayed at 3,136 events with Kafka up). The spool gives up its
    reserve file then, and everything drains by itself, on the same full disk."""
    spool = tmp_path / "small-disk"
    tmpfs(spool, "16m")
    away = f"127.0.0.1:{free_ports(1)[0]}"  # Kafka away: the disk fills
    env = _small_disk_env(kafka_bootstrap, topic_prefix, spool, BRIDGE_KAFKA_BOOTSTRAP=away)
    tally = Tally()
    found: set[str] = set()
    try:
        with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
            answer = _fill_until_refused(bridge, tally, "d", [3000])
            assert answer.json()["reason"] == "spool_write_failed", answer.text
            bridge.signal(signal.SIGTERM)
            assert bridge.wait(30) == 0
        assert len(tally.accepted) > 600  # more than a drainer batch of 500
        env["BRIDGE_KAFKA_BOOTSTRAP"] = kafka_bootstrap  # back; the disk is still full
        with BridgeProcess(env, tmp_path / "bridge-2.log") as bridge:
            found = wait_for_keys(kafka_bootstrap, topic_prefix, tally.accepted, 60)
            bridge.signal(signal.SIGTERM)
            assert bridge.wait(30) == 0
        assert "reserve file" in (tmp_path / "bridge-2.log").read_text()
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)
    print(f"[disk full] {tally.summary(found)}")
    assert tally.accepted <= found


def test_damaged_spool_stops_startup_clearly(tmp_path: Path) -> None:
    """A damaged spool file: exit 2 with a message naming it; the file is kept as it was."""
    spool = tmp_path / "spool"
    spool.mkdir()
    damaged = spool / "spool.db"
    damaged.write_bytes(b"\x00garbage" * 512)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env={"BRIDGE_TOKENS": TOKEN, "BRIDGE_SPOOL_DIR": str(spool), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert str(damaged) in result.stderr
    assert "move it aside" in result.stderr
    assert damaged.read_bytes() == b"\x00garbage" * 512


@pytest.mark.parametrize("ack", ["durable", "broker", "memory"])
def test_geins_retries_publish_once_even_across_restart(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, ack: str
) -> None:
    """The same delivery three times (a Geins retry): within one process exactly one
    record in Kafka; in durable mode the key is remembered across a restart (one record
    in all), in broker and memory mode it is not (one record before, one after)."""
    env = bridge_env(kafka_bootstrap, topic_prefix, ack)
    headers = {"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "geins-retry-1"}
    statuses: list[int] = []
    for run, attempts in enumerate((2, 1)):  # two tries, a restart, a third try
        with BridgeProcess(env, tmp_path / f"bridge-{run}.log") as bridge:
            url = bridge.url + "/webhooks/geins/Order/create"
            statuses += [
                httpx2.post(url, content=b"{}", headers=headers).status_code
                for _ in range(attempts)
            ]
            bridge.signal(signal.SIGTERM)
            assert bridge.wait(30) == 0
    records = read_all_sync(kafka_bootstrap, topic_prefix)
    print(f"[retry x3, {ack}] statuses={statuses} records={len(records)}")
    assert statuses[:2] == [202, 200]
    if ack == "durable":
        assert statuses[2] == 200
        assert len(records) == 1
    else:  # in-memory key records die with the process: consumers de-duplicate by key
        assert statuses[2] == 202
        assert len(records) == 2
        assert len({r.key for r in records}) == 1


async def create_quorum_topics(bootstrap: str, orders: str, products: str) -> None:
    """On a cluster of brokers 1 and 2: ``orders`` on both, min.insync.replicas 2 (below
    its quorum once broker 2 stops), and ``products`` on broker 1 alone, both led by 1."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(orders, -1, -1, {0: [1, 2]}, {"min.insync.replicas": "2"}),
                NewTopic(products, -1, -1, {0: [1]}),
            ]
        )
    finally:
        await admin.close()


@pytest.mark.parametrize("ack", ["durable", "memory"])
def test_a_topic_kafka_does_not_create_holds_back_only_its_own_events(
    lone_kafka: LocalKafka, tmp_path: Path, topic_prefix: str, ack: str
) -> None:
    """A broker that creates no topics (as managed Kafka usually is) and a new event
    type whose topic nobody made yet: its event waits in the backlog while every other
    event goes on to Kafka, and goes out once the topic is created. The drainer used
    to stop at that event, so nothing reached Kafka until the spool filled and the
    bridge answered 503 to everything."""
    broker = lone_kafka  # creates no topics (conftest)
    orders, widgets = f"{topic_prefix}.order.create", f"{topic_prefix}.widget.create"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def create(topic: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()

    asyncio.run(create(orders))
    env = bridge_env(broker.bootstrap, topic_prefix, ack)
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
        with httpx2.Client(base_url=bridge.url, timeout=10) as client:
            widget = client.post(
                "/webhooks/geins/Widget/create",
                content=b"{}",
                headers={**headers, "x-Idempotency-Key": "widget-1"},
            )
            assert widget.status_code == 202, widget.text
            for i in range(50):
                answer = client.post(
                    "/webhooks/geins/Order/create",
                    content=b"{}",
                    headers={**headers, "x-Idempotency-Key": f"order-{i}"},
                )
                assert answer.status_code == 202, answer.text
            wanted = {f"order-{i}" for i in range(50)}
            found = wait_for_keys(broker.bootstrap, orders, wanted, within=60)
            assert found == wanted, f"{len(found)} of 50 orders reached Kafka"
            # held once the probe of its first record waited for metadata in vain
            exposition = wait_until(
                lambda: client.get("/metrics").text,
                lambda text: "bridge_topics_held 1.0" in text,
                within=10,
                every=0.1,
            )
            assert "bridge_topics_held 1.0" in exposition
            assert "bridge_spool_depth 1.0" in exposition
            asyncio.run(create(widgets))
            found = wait_for_keys(broker.bootstrap, widgets, {"widget-1"}, within=60)
            assert found == {"widget-1"}
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(30) == 0
    assert "records for " + widgets + " are held back" in bridge.log()


def test_broker_mode_is_unready_while_a_cluster_below_its_quorum_takes_no_record(
    lone_kafka: LocalKafka, tmp_path: Path, topic_prefix: str
) -> None:
    """Broker mode, a two-broker cluster, orders on a topic that needs both in sync
    (min.insync.replicas 2) and products on one that needs one. The second broker
    stops: Kafka still answers metadata but refuses every order as NOT_ENOUGH_REPLICAS,
    which the producer retries until the publish timeout. /readyz said 200 all along
    while each order waited the whole timeout for its 503. It is 503 now, until Kafka
    takes a record again (a product here), and once the broker is back the next order
    goes through and the bridge is ready. Nothing answered 2xx is missing.

    The cluster is the session's lone broker (its controller, node 1; the topics are
    made here) and a second one joined to it for this test, left fenced after it."""
    first = lone_kafka
    second = cluster.JoiningBroker(first, 2, tmp_path / "kafka-2" / "data")
    orders, products = f"{topic_prefix}.order.create", f"{topic_prefix}.product.create"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    accepted: set[str] = set()
    keys = (f"k{n}" for n in itertools.count())

    def post(client: httpx2.Client, entity: str) -> int:
        key = next(keys)
        answer = client.post(
            f"/webhooks/geins/{entity}/create",
            content=b'{"id":"1"}',
            headers={**headers, "x-Idempotency-Key": key},
        )
        if answer.status_code == 202:
            accepted.add(key)
        return answer.status_code

    def ready(client: httpx2.Client) -> int:
        return client.get("/readyz").status_code

    with second:
        asyncio.run(create_quorum_topics(first.bootstrap, orders, products))
        env = bridge_env(first.bootstrap, topic_prefix, "broker", BRIDGE_PUBLISH_TIMEOUT="2")
        with (
            BridgeProcess(env, tmp_path / "bridge.log") as bridge,
            httpx2.Client(base_url=bridge.url, timeout=30) as client,
        ):
            assert (post(client, "Order"), ready(client)) == (202, 200)
            second.stop()
            # until the controller has taken the second broker out of the in-sync replicas
            refused = wait_until(
                lambda: post(client, "Order"), lambda s: s == 503, within=60, every=0
            )
            assert refused == 503
            assert ready(client) == 503, "a stalled Kafka left the bridge ready"
            assert client.get("/readyz").json()["accepting"] is False
            assert "bridge_kafka_stalled 1.0" in client.get("/metrics").text
            assert (post(client, "Product"), ready(client)) == (202, 200)
            assert "bridge_kafka_stalled 0.0" in client.get("/metrics").text
            assert (post(client, "Order"), ready(client)) == (503, 503)
            second.start()
            second.wait_ready()
            assert (
                wait_until(lambda: post(client, "Order"), lambda s: s == 202, within=60, every=0.5)
                == 202
            )
            assert ready(client) == 200
        found = found_keys(first.bootstrap, topic_prefix)
    print(f"[below quorum, broker] {len(accepted)} answered 2xx, {len(found)} in Kafka")
    assert accepted <= found, f"{len(accepted - found)} answered 2xx, not in Kafka"


def test_memory_mode_delivers_other_topics_at_a_stop_while_a_dead_letter_waits(
    lone_kafka: LocalKafka, topic_prefix: str
) -> None:
    """A record too large for its topic, whose dead letter cannot be kept (this broker
    creates no dead-letter topic): memory mode answered 202 to events of a topic Kafka
    takes at once, and lost all 20 at a stop, the drain's BRIDGE_SHUTDOWN_TIMEOUT spent
    waiting for the dead letter's publish (a review's test)."""
    bootstrap = lone_kafka.bootstrap
    orders = f"{topic_prefix}.order.create"
    products = f"{topic_prefix}.product.update"
    create_topic(bootstrap, orders, {"max.message.bytes": "2000"})
    create_topic(bootstrap, products, {})
    env = bridge_env(bootstrap, topic_prefix, "memory", BRIDGE_SHUTDOWN_TIMEOUT="3")
    metrics = Metrics()
    accepted: list[str] = []
    with TestClient(create_app(load_settings(environ=env), metrics=metrics)) as client:

        def post(path: str, key: str, body: bytes) -> None:
            headers = {"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": key}
            response = client.post(path, content=body, headers=headers)
            assert response.status_code == 202, response.text

        post("/webhooks/geins/Product/update", "p-warm", b"{}")
        wait_until(lambda: read_all_sync(bootstrap, products), bool, within=20, every=0.2)
        post("/webhooks/geins/Order/create", "big", b'{"pad":"' + b"x" * 5000 + b'"}')
        wait_until(
            lambda: sample(metrics, "bridge_publish_errors_total", {"reason": "too_large"}),
            bool,
            within=20,
            every=0.05,
        )
        for n in range(20):
            post("/webhooks/geins/Product/update", f"p{n}", b"{}")
            accepted.append(f"p{n}")
        # the operator sees the record waiting for its dead letter (parked)
        wait_until(
            lambda: sample(metrics, "bridge_dead_letters_waiting"), bool, within=20, every=0.05
        )
        # stopped now, as by a SIGTERM: Kafka is up and takes every product record
    landed = {r.key.decode() for r in read_all_sync(bootstrap, products)}
    assert [k for k in accepted if k not in landed] == []


def test_a_topic_below_its_quorum_does_not_slow_the_others_of_its_broker(
    lone_kafka: LocalKafka, tmp_path: Path, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orders on a topic below its min.insync.replicas (acks=all refused as
    NOT_ENOUGH_REPLICAS, retried), products on one the same broker leads: aiokafka 0.14
    waited each retry's backoff (100 ms) with the broker still marked in flight, so each
    product waited for the orders' next retry round (bridge.kafkafixes). Counted: the
    products handed over while their broker was held so, no produce request of the
    producer's on its way to it. The orders land once they can, in order.

    The cluster is the session's lone broker and a second one joined to it (as in the
    test above), stopped once the topics are made."""
    first = lone_kafka
    second = cluster.JoiningBroker(first, 2, tmp_path / "kafka-2" / "data")
    orders, products = f"{topic_prefix}.order.create", f"{topic_prefix}.product.create"
    # node -> whether a produce request of the sender's is on its way to it (made, not
    # answered yet): a node in the sender's in-flight set without one is held idle
    asked: dict[int, bool] = {}
    order_requests: list[int] = []
    real_request, real_send = Sender._send_produce_req, AIOKafkaClient.send

    def request(self: Sender, node_id: int, batches: dict[Any, Any]) -> Any:
        asked[node_id] = True
        return real_request(self, node_id, batches)

    async def send(self: AIOKafkaClient, node_id: int, request: Any, **kwargs: Any) -> Any:
        try:
            return await real_send(self, node_id, request, **kwargs)
        finally:
            if isinstance(request, ProduceRequest):
                asked[node_id] = False
                if any(topic == orders for topic, _ in request._topics):
                    order_requests.append(node_id)

    async def scenario() -> tuple[list[str], list[bytes]]:
        # made once the second broker is gone: one that knew it could ask it
        admin = AIOKafkaAdminClient(bootstrap_servers=first.bootstrap)
        await admin.start()
        try:
            for _ in range(300):  # until the controller took the second out of the ISR
                partition = (await admin.describe_topics([orders]))[0]["partitions"][0]
                if partition["isr"] == [1]:
                    break
                await asyncio.sleep(0.2)
            assert (partition["isr"], partition["leader"]) == ([1], 1)  # as the products'
            env = bridge_env(first.bootstrap, topic_prefix, "broker", BRIDGE_PUBLISH_TIMEOUT="60")
            publisher = KafkaPublisher(load_settings(environ=env), Metrics())
            await publisher.start()
            try:
                await publisher.publish(Destination(products, b"first", b"{}", []))
                producer = publisher._producer
                assert producer is not None
                sender = producer._sender
                node = producer.client.cluster.leader_for_partition(TopicPartition(products, 0))
                assert node == 1
                refused = [
                    asyncio.ensure_future(
                        publisher.publish(Destination(orders, f"o{n}".encode(), b"{}", []))
                    )
                    for n in range(3)
                ]
                await eventually(lambda: len(order_requests) >= 2, within=30, what="a retry")
                held = []
                for n in range(10):
                    if node in sender._in_flight and not asked.get(node):
                        held.append(f"p{n}")
                    await publisher.publish(Destination(products, f"p{n}".encode(), b"{}", []))
                assert not any(order.done() for order in refused)
                await admin.alter_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, orders, {"min.insync.replicas": "1"})]
                )
                async with asyncio.timeout(60):
                    await asyncio.gather(*refused)
            finally:
                await publisher.stop()
        finally:
            await admin.close()
        landed = await read_to_end({"bootstrap_servers": first.bootstrap}, prefix=orders)
        return held, [r.key for r in landed]

    monkeypatch.setattr(Sender, "_send_produce_req", request)
    monkeypatch.setattr(AIOKafkaClient, "send", send)
    with second:
        asyncio.run(create_quorum_topics(first.bootstrap, orders, products))
        second.stop()
        held, landed = asyncio.run(scenario())
    assert held == [], f"{len(held)} of 10 products waited behind the orders' backoff"
    assert landed == [b"o0", b"o1", b"o2"]


def test_a_parked_record_gets_one_dead_letter_once_its_topic_is_back_to_its_quorum(
    lone_kafka: LocalKafka, tmp_path: Path, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The dead-letter topic below its min.insync.replicas: each try of a parked record's
    dead letter timed out, leaving its copy with the idempotent producer (which retries
    a batch until Kafka takes it), and after its backoff the drainer handed over one
    more copy. Once the topic was back to its quorum every copy landed: 4 dead letters
    for one event (a review's test). No other copy goes while the last may land."""
    caplog.set_level(logging.DEBUG, logger="bridge.drainer")
    bootstrap = lone_kafka.bootstrap
    second = cluster.JoiningBroker(lone_kafka, 2, tmp_path / "kafka-2" / "data")
    orders, deadletter = f"{topic_prefix}.order.create", f"{topic_prefix}.deadletter"

    async def create_topics() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(orders, -1, -1, {0: [1]}, {"max.message.bytes": "2000"}),
                    NewTopic(deadletter, -1, -1, {0: [1, 2]}, {"min.insync.replicas": "2"}),
                ]
            )
        finally:
            await admin.close()

    async def in_sync() -> list[int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return list((await admin.describe_topics([deadletter]))[0]["partitions"][0]["isr"])
        finally:
            await admin.close()

    async def mend() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            config = {"min.insync.replicas": "1"}
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, deadletter, config)]
            )
        finally:
            await admin.close()

    def tries() -> int:
        return sum("cannot set aside a record" in r.getMessage() for r in caplog.records)

    env = bridge_env(bootstrap, topic_prefix, "memory", BRIDGE_PUBLISH_TIMEOUT="1")
    metrics = Metrics()
    with second:
        asyncio.run(create_topics())
        second.stop()
        isr = wait_until(lambda: asyncio.run(in_sync()), lambda i: i == [1], within=90, every=0.5)
        assert isr == [1]
        with TestClient(create_app(load_settings(environ=env), metrics=metrics)) as client:
            headers = {"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "big"}
            answer = client.post(
                "/webhooks/geins/Order/create",
                content=b'{"pad":"' + b"x" * 5000 + b'"}',
                headers=headers,
            )
            assert answer.status_code == 202
            wait_until(tries, bool, within=60, every=0.1)  # its first copy timed out
            time.sleep(8)  # the backoffs of three more tries (1, 2 and 4 s) passed
            assert sample(metrics, "bridge_dead_letters_waiting") == 1
            asyncio.run(mend())
            wait_until(
                lambda: sample(metrics, "bridge_dead_letters_waiting"),
                lambda n: n == 0,
                within=60,
                every=0.1,
            )
    letters = [r for r in read_all_sync(bootstrap, deadletter) if r.key == b"big"]
    assert len(letters) == 1, f"{len(letters)} dead letters for one event"
    assert sample(metrics, "bridge_dead_letters_total", {"reason": "kafka_rejected"}) == 1


def spool_until_the_disk_is_full(folder: Path, prefix: str) -> set[str]:
    """Spool events (Kafka away) until the disk refuses; the keys accepted. Events as
    Geins sends them, with the headers the bridge's router gives every record."""

    async def write() -> set[str]:
        spool = Spool(folder, max_bytes=1 << 30, dedup_window=7200)
        spool.open()
        accepted: set[str] = set()
        try:
            for start in itertools.count(0, 512):
                keys = [f"e{i:07d}-0000-4000-8000-000000000000" for i in range(start, start + 512)]
                outcomes = await asyncio.gather(
                    *(spool.append(_geins_event(prefix, key), key) for key in keys),
                    return_exceptions=True,
                )
                accepted.update(k for k, ok in zip(keys, outcomes, strict=True) if ok is True)
                if any(isinstance(ok, SpoolWriteFailed) for ok in outcomes):
                    return accepted
        finally:
            await spool.close()
        raise AssertionError("unreachable")

    return asyncio.run(write())


def _geins_event(prefix: str, key: str) -> Destination:
    return Destination(
        f"{prefix}.geins.order.create",
        key.encode(),
        b'{"entity":"Order","action":"create","id":"12345","account":"shop"}',
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", key.encode()),
            ("ce_source", b"geins"),
            ("ce_type", b"com.geins.order.create"),
            ("ce_time", b"2026-12-01T10:00:00Z"),
            ("content-type", b"application/json"),
            ("ce_subject", b"12345"),
            ("x-idempotency-key", key.encode()),
            ("x-timestamp", b"2026-12-01T10:00:00Z"),
        ],
    )


def test_a_spool_that_filled_its_disk_opens_again_with_the_deploy_sqlite_tmpdir(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """README: a disk that fills before BRIDGE_SPOOL_MAX_BYTES, and "what the spool holds
    still drains by itself once Kafka is there" (the reserve file is given up). Every
    deployment in deploy/ (Dockerfile, systemd unit, so compose and Kubernetes) sets
    SQLITE_TMPDIR to the spool's own folder. But the spool's opening sorts every waiting
    event by topic (bridge.spool._topics_held: GROUP BY topic, with the headers), which
    SQLite spills to a temporary file past a few MB: 327 MiB for 1.08 million events. On
    the full disk that fails, before the reserve could be given up: "spool file ...
    cannot be opened: database or disk is full", exit 2, at every start (a crash loop),
    and nothing drains (a review's test; the other full-disk tests leave SQLITE_TMPDIR
    unset, so their temporary files went to the roomy /tmp)."""
    spool = tmp_path / "small-disk"
    tmpfs(spool, "40m")
    try:
        accepted = spool_until_the_disk_is_full(spool, topic_prefix)
        assert len(accepted) > 20_000
        env = {
            "BRIDGE_SPOOL_DIR": str(spool),
            "SQLITE_TMPDIR": str(spool),  # as deploy/Dockerfile and the systemd unit set it
            "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "BRIDGE_TOKENS": TOKEN,
            "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".geins.{entity}.{action}",
        }
        with BridgeProcess(env, tmp_path / "bridge.log") as bridge:  # Kafka is back
            found = wait_for_keys(kafka_bootstrap, topic_prefix, accepted, 120)
            bridge.signal(signal.SIGTERM)
            assert bridge.wait(30) == 0
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)
    assert accepted <= found


CATCH_UP_TOPICS = ["order.create", "product.update", "customer.create"]


def spooled(folder: Path, prefix: str, count: int) -> None:
    """``count`` events, round robin over TOPICS, left in the spool in ``folder`` as an
    outage leaves them (written through the bridge's own Spool)."""

    async def write() -> None:
        spool = Spool(folder, max_bytes=10**8, dedup_window=7200)
        spool.open()

        def one(i: int) -> Coroutine[Any, Any, bool]:
            topic = f"{prefix}.geins.{CATCH_UP_TOPICS[i % len(CATCH_UP_TOPICS)]}"
            return spool.append(Destination(topic, f"k{i}".encode(), b"{}", []), f"k{i}")

        for start in range(0, count, 1024):  # group commits, as concurrent requests make
            assert all(await asyncio.gather(*map(one, range(start, min(start + 1024, count)))))
        await spool.close()

    asyncio.run(write())


def scraped(bridge: BridgeProcess, name: str) -> float:
    text = httpx2.get(bridge.ops_url + "/metrics", timeout=5).text
    return float(next(x for x in text.splitlines() if x.startswith(name + " ")).split()[1])


def test_a_clean_stop_in_the_middle_of_a_catch_up_publishes_nothing_twice(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A deploy the day after an outage: SIGTERM while the spool still holds a large
    backlog. The drain at the stop hands records over until its deadline, so a batch is
    in flight when the deadline comes; settle() removes only what was acknowledged by
    then, the spool is closed, and only then does the producer flush, with the deadline
    already spent ("did not flush within 0.0 s"). Kafka wrote those records anyway, and
    the next start sent them again: 312 duplicates in one of three such stops of a
    400,000-event catch-up (a review's test; README: a clean stop leaves what is left to
    the next start). A stop now keeps the end of its deadline for what is in flight. Topics with
    flush.messages=1 (the broker syncs each write, as a replicated cluster's acks=all
    takes milliseconds) make the batch in flight at the deadline the usual case."""
    for topic in CATCH_UP_TOPICS:  # a broker that syncs each write: a batch is in flight longer
        create_topic(kafka_bootstrap, f"{topic_prefix}.geins.{topic}", {"flush.messages": "1"})
    total = 100_000
    spooled(tmp_path / "spool", topic_prefix, total)
    env = {
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".geins.{entity}.{action}",
        "BRIDGE_SHUTDOWN_TIMEOUT": "1",
    }
    for stop in range(10):  # each a deploy in the middle of the catch-up
        with BridgeProcess(env, tmp_path / f"bridge-{stop}.log") as bridge:
            wait_until(
                lambda: scraped(bridge, "bridge_published_records_total"),
                bool,
                within=30,
                every=0.05,
            )
            bridge.signal(signal.SIGTERM)
            assert bridge.wait() == 0
        if "stay in the spool" not in bridge.log():
            break  # it emptied the spool before it stopped
    with BridgeProcess(env, tmp_path / "bridge-last.log") as bridge:  # the rest
        wait_until(
            lambda: httpx2.get(bridge.ops_url + "/metrics", timeout=5).text,
            lambda text: "bridge_spool_depth 0.0" in text,
            within=120,
            every=0.5,
        )
        bridge.signal(signal.SIGTERM)
        assert bridge.wait() == 0
    counts = Counter(r.key for r in read_all_sync(kafka_bootstrap, topic_prefix, within=120))
    assert len(counts) == total  # every event landed
    twice = sorted(key for key, n in counts.items() if n > 1)
    assert twice == [], f"{len(twice)} events published twice, e.g. {twice[:3]}"


CLOCK_AHEAD = """\
import time
_real = time.time
time.time = lambda: _real() + {seconds!r}  # the host's clock that far ahead
"""


def clock_ahead_env(
    bootstrap: str, prefix: str, ack: str, folder: Path, seconds: float, **extra: str
) -> dict[str, str]:
    """bridge_env for a bridge process whose clock runs ``seconds`` ahead of the
    broker's (a sitecustomize in ``folder``). aiokafka's compiled record builder reads
    the C library's clock: its Python one is used, which reads time.time."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(CLOCK_AHEAD.format(seconds=float(seconds)))
    return bridge_env(
        bootstrap, prefix, ack, PYTHONPATH=str(folder), AIOKAFKA_NO_EXTENSIONS="1", **extra
    )


@pytest.mark.parametrize("ack", ["broker", "durable"])
def test_a_bridge_whose_clock_kafka_refuses_says_so(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, ack: str
) -> None:
    """The bridge host's clock two hours ahead of the broker's: Kafka 4 refuses every
    record (INVALID_TIMESTAMP, more than message.timestamp.after.max.ms ahead). Broker
    mode answered each request 503 "Kafka refused the record: InvalidTimestampError"
    while /readyz said 200, and the log said nothing. Now the 503 and the log name the
    clock, and broker mode is unready; durable mode keeps accepting into its spool (as
    through an outage), the log saying why nothing lands."""
    env = clock_ahead_env(
        kafka_bootstrap,
        topic_prefix,
        ack,
        tmp_path / "site",
        2 * 3600,
        BRIDGE_PUBLISH_TIMEOUT="15",  # the topic's creation by Kafka first, on a busy CI
        BRIDGE_SPOOL_DIR=str(tmp_path / "spool"),
    )
    with (
        BridgeProcess(env, tmp_path / "bridge.log") as bridge,
        httpx2.Client(base_url=bridge.url, timeout=30) as client,
    ):
        answer = client.post(
            "/webhooks/geins/Order/create",
            content=b'{"id":"1"}',
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "k1"},
        )
        if ack == "broker":
            assert answer.status_code == 503, answer.text
            assert "timestamp" in answer.json()["detail"], answer.text
            readiness = client.get("/readyz")
            assert readiness.status_code == 503, readiness.text
            assert "clock" in readiness.text, readiness.text
        else:
            assert answer.status_code == 202, answer.text
            said = wait_until(
                bridge.log, lambda log: "InvalidTimestampError" in log, within=30, every=0.2
            )
            assert "InvalidTimestampError" in said
            assert client.get("/readyz").status_code == 200
    log = bridge.log()
    assert log.count("the bridge host's clock is more than") == 1, log


def test_a_refused_clock_is_said_once_not_at_every_producer_reset(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The clock is said "at most once a minute". But each refusal
    (InvalidTimestampError, not retriable) also breaks the producer (_after_ack), which
    is replaced (at most once a second) with a WARNING "Kafka refused a record for good
    ...; the producer cannot send to that partition any more" and an INFO each: under
    steady traffic the log says the same trouble about once a second, and the bridge
    reconnects a producer each second, for as long as the clock is off."""
    env = clock_ahead_env(
        kafka_bootstrap,
        topic_prefix,
        "broker",
        tmp_path / "site",
        2 * 3600,
        BRIDGE_PUBLISH_TIMEOUT="3",
    )
    with (
        BridgeProcess(env, tmp_path / "bridge.log") as bridge,
        httpx2.Client(base_url=bridge.url, timeout=30) as client,
    ):
        for n in range(12):  # one event every half second, as a steady sender
            answer = client.post(
                "/webhooks/geins/Order/create",
                content=b'{"id":"1"}',
                headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": f"k{n}"},
            )
            assert answer.status_code == 503, answer.text
            time.sleep(0.5)
    log = bridge.log()
    assert log.count("the bridge host's clock is more than") == 1, log
    resets = log.count("a fresh Kafka producer replaced")
    warnings = log.count("Kafka refused a record for good")
    assert (resets, warnings) == (0, 0), log


async def leave_in_spool(folder: Path, *destinations: Destination) -> None:
    spool = Spool(folder, max_bytes=10**7, dedup_window=7200)
    spool.open()
    for destination in destinations:
        assert await spool.append(destination, destination.key.decode())
    await spool.close()


def test_records_the_leftover_drainer_lands_count_against_the_clock_too(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Broker mode is unready while Kafka refuses timestamps "and has taken no
    record for 20 s (records landing meanwhile make it one topic's setting, not the
    clock)". A leftover spool's drainer publishes through the same publisher: its
    refusals (publisher.failure) renew clock_refused, at each retry of the held topic
    (every 10 s at most), but the records it lands never touch _landed_at. Here one
    topic's tighter message.timestamp.after.max.ms refuses the leftover record, the
    other topic takes its own: the bridge stays unready, "the bridge's clock is off",
    for as long as the refused record waits (for ever, with no traffic let in)."""
    tight = f"{topic_prefix}.product.update"
    orders = f"{topic_prefix}.order.create"
    create_topic(kafka_bootstrap, tight, {"message.timestamp.after.max.ms": "1000"})
    create_topic(kafka_bootstrap, orders, {})
    spool_dir = tmp_path / "spool"
    asyncio.run(
        leave_in_spool(
            spool_dir,
            Destination(topic=tight, key=b"p1", value=b'{"id":"1"}', headers=[]),
            Destination(topic=orders, key=b"o1", value=b'{"id":"1"}', headers=[]),
        )
    )
    env = clock_ahead_env(
        kafka_bootstrap,
        topic_prefix,
        "broker",
        tmp_path / "site",
        5,  # Kafka's default takes it, the tight topic not
        BRIDGE_SPOOL_DIR=str(spool_dir),
    )
    with (
        BridgeProcess(env, tmp_path / "bridge.log") as bridge,
        httpx2.Client(base_url=bridge.url, timeout=30) as client,
    ):
        landed = wait_until(
            lambda: [r.key for r in read_all_sync(kafka_bootstrap, orders)],
            lambda keys: keys == [b"o1"],
            within=60,
            every=0.5,
        )
        assert landed == [b"o1"]  # the bridge's clock is good enough for Kafka's default
        said = wait_until(
            bridge.log, lambda log: "InvalidTimestampError" in log, within=30, every=0.5
        )
        assert "InvalidTimestampError" in said  # the tight topic refuses p1
        readiness = wait_until(
            lambda: client.get("/readyz"), lambda r: r.status_code == 200, within=45, every=1
        )
        assert readiness.status_code == 200, readiness.text
        # a broker-mode event lands all the same, whatever /readyz said
        answer = client.post(
            "/webhooks/geins/Order/create",
            content=b'{"id":"2"}',
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "o2"},
        )
        assert answer.status_code == 202, answer.text
