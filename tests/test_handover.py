"""DirectHandover against the real broker: records land on Kafka's partition for their key,
the slow way still works, and a partition count change is seen."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.structs import TopicPartition

from bridge import handover as handover_module
from bridge.config import Settings, load_settings
from bridge.handover import DirectHandover
from bridge.kafkaadmin import read_to_end
from bridge.metrics import Metrics
from bridge.partitioner import partition_index
from bridge.publisher import KafkaPublisher
from bridge.routing import Destination

pytestmark = pytest.mark.kafka


def destination(topic: str, key: str) -> Destination:
    return Destination(
        topic=topic, key=key.encode(), value=b'{"k":"%s"}' % key.encode(), headers=[]
    )


@pytest.fixture
def appends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(topic, whether it took the fast way) for every record handed over."""
    taken: list[tuple[str, bool]] = []
    append = DirectHandover.append

    def counting(self: DirectHandover, topic: str, *args: Any) -> Any:
        future = append(self, topic, *args)
        taken.append((topic, future is not None))
        return future

    monkeypatch.setattr(DirectHandover, "append", counting)
    return taken


def settings_for(kafka_bootstrap: str) -> Settings:
    return load_settings(
        environ={
            "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "BRIDGE_TOKENS": "test-token",
            "BRIDGE_SPOOL_DIR": os.environ["BRIDGE_SPOOL_DIR"],
        }
    )


def test_records_land_on_kafkas_partition_for_their_key(
    kafka_bootstrap: str, topic_prefix: str, appends: list[tuple[str, bool]]
) -> None:
    """Every record takes the fast way once the topic's partitions are known, lands on
    Kafka's default partition for its key, and follows a growing partition count."""
    topic = topic_prefix + ".grows"
    settings = settings_for(kafka_bootstrap)

    async def run() -> list[Any]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 2, 1)])
            publisher = KafkaPublisher(settings, Metrics())
            await publisher.start()
            try:
                await publisher.publish(destination(topic, "a-first"))  # learns the topic
                await asyncio.gather(
                    *(publisher.publish(destination(topic, f"a{i}")) for i in range(39))
                )
                await admin.create_partitions({topic: NewPartitions(5)})
                producer = publisher._producer  # to see the new count now
                assert producer is not None
                cluster = producer.client.cluster
                while len(cluster.partitions_for_topic(topic) or ()) < 5:
                    await producer.client.force_metadata_update()
                    await asyncio.sleep(0.1)
                await asyncio.gather(
                    *(publisher.publish(destination(topic, f"b{i}")) for i in range(40))
                )
            finally:
                await publisher.stop()
        finally:
            await admin.close()
        return await read_to_end({"bootstrap_servers": kafka_bootstrap}, prefix=topic)

    records = asyncio.run(run())
    assert len(records) == 80
    for record in records:
        count = 2 if record.key.startswith(b"a") else 5
        assert record.partition == partition_index(record.key, count), record.key
    assert [fast for _, fast in appends].count(True) >= 79  # the first may wait for metadata


def test_a_topic_known_at_start_keeps_its_metadata(
    kafka_bootstrap: str, topic_prefix: str, appends: list[tuple[str, bool]]
) -> None:
    """aiokafka refreshes metadata only for the topics send() registered. A topic that
    existed when the producer started is known without send() and taken the fast way;
    once another topic goes through send(), the next refresh must still cover it, or its
    records lose their leader (a batch waiting after a leader change would never find one)."""
    early, late = topic_prefix + ".early", topic_prefix + ".late"
    settings = settings_for(kafka_bootstrap)

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(early, 3, 1)])
            publisher = KafkaPublisher(settings, Metrics())
            await publisher.start()
            try:
                producer = publisher._producer
                assert producer is not None
                cluster = producer.client.cluster
                while not cluster.partitions_for_topic(early):  # created just now
                    await producer.client.force_metadata_update()
                    await asyncio.sleep(0.1)
                assert publisher.ready_for(early)  # the drainer's probe test
                await publisher.publish(destination(early, "e1"))
                assert appends == [(early, True)]  # known at start: no send()
                assert publisher.ready_for(early)
                assert not publisher.ready_for(late)
                await admin.create_topics([NewTopic(late, 1, 1)])
                await publisher.publish(destination(late, "l1"))  # send() registers it
                assert appends[-1] == (late, False)
                assert publisher.ready_for(late)
                await producer.client.force_metadata_update()
                assert cluster.partitions_for_topic(early) == {0, 1, 2}
                assert cluster.leader_for_partition(TopicPartition(early, 0)) is not None
                await publisher.publish(destination(early, "e2"))
                assert appends[-1] == (early, True)
            finally:
                await publisher.stop()
        finally:
            await admin.close()

    asyncio.run(run())


def test_the_batch_of_a_record_sent_the_slow_way_is_found(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A record that went through send() or send_batch() (its topic new to the producer,
    its partition's batch full, a resend alone) had no batch known, so a broker-mode 503
    at its deadline could not tell whether it landed later: the sender's retry was
    published again (a review: 45 of 45 such retries). Its batch is found right after
    send() returns, as nothing ran since the append, and tells when the record lands."""
    topic = topic_prefix + ".slow"
    settings = settings_for(kafka_bootstrap)

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 3, 1)])
            publisher = KafkaPublisher(settings, Metrics())
            await publisher.start()
            try:
                producer, handover = publisher._producer, publisher._handover
                assert producer is not None
                assert handover is not None
                sent = []
                for i in range(12):  # several records per batch, some batches opened
                    key = f"k{i}".encode()
                    acked = await producer.send(topic, value=b"v", key=key)
                    batch = handover.batch_of_send(topic, key, acked)
                    assert batch is not None
                    assert batch.tp.partition == partition_index(key, 3)
                    sent.append((acked, batch))
                assert handover.batch_of_send(topic, b"k0", sent[0][0]) is None  # not last
                builder = producer.create_batch()
                builder.append(timestamp=None, key=b"alone", value=b"v", headers=[])
                builder.close()
                shielded = await producer.send_batch(builder, topic, partition=1)
                made = handover.batch_of_send_batch(topic, 1, builder)
                assert made is not None
                assert made.record_count == 1
                await asyncio.gather(shielded, *(acked for acked, _ in sent))
                assert made.future.done()
                assert all(batch.future.done() for _, batch in sent)
            finally:
                await publisher.stop()
        finally:
            await admin.close()

    asyncio.run(run())


def test_internals_that_changed_shape_give_the_fast_way_up_for_send(
    kafka_bootstrap: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An aiokafka patch release whose MessageBatch.append took its timestamp by keyword
    only (the start-up check sees names, not arguments): every record was a 503
    ("the Kafka client failed: TypeError"), though send() worked. The fast way is
    given up, said once, and every record goes through send()."""
    topic = topic_prefix + ".shape"
    calls: list[str] = []

    def changed(self: DirectHandover, *_: Any) -> Any:
        calls.append("fast")
        raise TypeError("append() takes 3 positional arguments but 4 were given")

    async def run() -> list[Any]:
        publisher = KafkaPublisher(settings_for(kafka_bootstrap), Metrics())
        await publisher.start()
        try:
            await publisher.publish(destination(topic, "first"))  # learns the topic
            monkeypatch.setattr(DirectHandover, "_append", changed)
            for n in range(3):
                await publisher.publish(destination(topic, f"k{n}"))
        finally:
            await publisher.stop()
        return await read_to_end({"bootstrap_servers": kafka_bootstrap}, prefix=topic)

    records = asyncio.run(run())
    assert sorted(r.key for r in records) == [b"first", b"k0", b"k1", b"k2"]
    assert calls == ["fast"]  # tried once, then send() only
    warnings = [r.getMessage() for r in caplog.records if "changed shape" in r.getMessage()]
    assert warnings == [
        "aiokafka's internals changed shape (TypeError: append() takes 3 positional "
        "arguments but 4 were given): every record goes through send() from now on"
    ]


def test_internals_that_fail_after_send_queued_a_record_send_it_once(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first record of a topic goes through send(); finding its batch after it
    (batch_of_send) reads the client's topic set. Internals that changed shape failed
    there, after send() had queued the record: the hand-over failed (a 503, a hold)
    and the record was sent again, twice on Kafka (a review)."""
    topic = topic_prefix + ".after-send"

    def changed(self: DirectHandover, _topic: str) -> None:
        raise AttributeError("'AIOKafkaClient' object has no attribute '_topics'")

    async def run() -> list[Any]:
        publisher = KafkaPublisher(settings_for(kafka_bootstrap), Metrics())
        await publisher.start()
        try:
            monkeypatch.setattr(DirectHandover, "_track", changed)
            await publisher.publish(destination(topic, "k"))
            await publisher.publish(destination(topic, "k2"))
        finally:
            await publisher.stop()
        return await read_to_end({"bootstrap_servers": kafka_bootstrap}, prefix=topic)

    assert sorted(r.key for r in asyncio.run(run())) == [b"k", b"k2"]


class _Batch:
    def append(self, *_: Any, **__: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()


class _Accumulator:
    """What DirectHandover uses of aiokafka's accumulator: every append opens a batch."""

    _closed = False
    _exception = None

    def __init__(self) -> None:
        self._batches: dict[TopicPartition, list[_Batch]] = {}

    def create_builder(self) -> None:
        return None

    def _append_batch(self, _builder: None, tp: TopicPartition) -> _Batch:
        return _Batch()


def _handover_of_fakes(topics: set[str]) -> tuple[DirectHandover, Any, Callable[[], None]]:
    """A DirectHandover over fakes of aiokafka's producer: its client asks about
    ``topics``, every topic has partition 0; and what a metadata update aiokafka
    completed calls (its listeners)."""
    listeners: list[Any] = []
    client = SimpleNamespace(
        _topics=topics,
        cluster=SimpleNamespace(
            add_listener=listeners.append,
            remove_listener=listeners.remove,
            partitions_for_topic=lambda topic: {0},
        ),
    )
    producer: Any = SimpleNamespace(_message_accumulator=_Accumulator(), client=client)

    def refreshed() -> None:
        for listener in listeners:
            listener(client.cluster)

    return DirectHandover(producer, 1_000_000), client, refreshed


async def test_a_topic_nothing_went_to_for_five_minutes_is_no_longer_asked_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every topic the bridge had sent to stayed in the topics its client asks Kafka about
    at each refresh (every 5 s) for the process's life: one per {account} and
    {environment} with such a template, and a refresh asks Kafka to create the topics
    it names: one an operator deleted came back within 3 s, with the broker's
    defaults, though nothing was sent to it (a review's find). Dropped after
    TOPIC_IDLE_SECONDS without a record, as Java's producer does; never the last one
    (none left, aiokafka would ask for every topic of the cluster)."""
    clock = [1000.0]
    monkeypatch.setattr(handover_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    handover, client, refreshed = _handover_of_fakes({"busy", "quiet"})
    assert handover.enabled

    for topic in ("busy", "quiet"):
        assert handover.append(topic, b"k", b"v", []) is not None
    for _ in range(72):  # six minutes of refreshes every 5 s, records for "busy" only
        clock[0] += 5
        refreshed()
        assert handover.append("busy", b"k", b"v", []) is not None
    assert client._topics == {"busy"}
    for _ in range(72):  # and six minutes more without any
        clock[0] += 5
        refreshed()
    assert client._topics == {"busy"}  # the last one stays
    assert handover.append("quiet", b"k", b"v", []) is not None  # asked about again
    assert client._topics == {"busy", "quiet"}


async def test_a_topic_appended_to_during_an_outage_is_not_dropped_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While no metadata update succeeds (Kafka away), appends go on with the partitions
    known before, and the topic's stamp (taken at its first append after an update)
    aged: the first update after an outage of 5 minutes dropped every topic, one with a
    record a second before and its batch waiting for a leader included (a review's
    find). That update is no time to look; the next check, a minute on, is."""
    clock = [1000.0]
    monkeypatch.setattr(handover_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    handover, client, refreshed = _handover_of_fakes({"other", "busy"})

    for _ in range(36):  # six minutes of outage, a record every 10 s
        assert handover.append("busy", b"k", b"v", []) is not None
        clock[0] += 10
    refreshed()  # Kafka is back
    assert "busy" in client._topics
    for _ in range(24):  # records go on after it
        clock[0] += 5
        refreshed()
        assert handover.append("busy", b"k", b"v", []) is not None
    assert "busy" in client._topics
