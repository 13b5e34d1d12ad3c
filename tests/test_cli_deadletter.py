"""bridge deadletter list / replay against the real broker: what a replay publishes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import io
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from starlette.testclient import TestClient

import bridge.publisher as publisher_module
from bridge import kafkaadmin
from bridge.app import create_app
from bridge.cli import REPORT_LINES, main
from bridge.config import load_settings
from bridge.deadletter import dead_letter
from bridge.devkafka import LocalKafka
from bridge.errors import UnknownEventType
from bridge.publisher import KafkaPublisher
from bridge.redaction import Redactor
from bridge.routing import Destination
from tests.fakes import TOKEN, voucher_delivery
from tests.kafkaread import read_all_sync
from tests.polling import wait_until

pytestmark = pytest.mark.kafka

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def novel_voucher_letter(
    topic: str,
    *,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    received_at: datetime,
    action: str = "create",
) -> Destination:
    """The dead letter of a Voucher/create (or ``action``) delivery refused as an
    unknown event type."""
    delivery = voucher_delivery(headers, body, received_at, action)
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


def test_a_replay_that_would_name_a_topic_after_a_token_is_still_refused(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], topic_prefix: str
) -> None:
    """A delivery refused (422) because its account, which the template puts in topic
    names, holds the token: its replay is still refused, and exits 1 as for any refusal
    (it used to publish to a topic named after the token, and exit 0)."""
    env.setenv("BRIDGE_TOPIC_TEMPLATE", topic_prefix + ".{entity}.{action}.{account}")
    body = b'{"entity":"Order","action":"create","account":"%s"}' % TOKEN.encode()
    with TestClient(create_app(load_settings())) as client:
        assert client.post("/webhooks/geins", content=body, headers=AUTH).status_code == 422
    capsys.readouterr()
    assert main(["deadletter", "replay"]) == 1
    captured = capsys.readouterr()
    assert "still refused: malformed_event_type" in captured.out
    assert "0 replayed, 1 still refused" in captured.err
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize("dry_run", [False, True], ids=["replay", "dry-run"])
def test_a_replay_without_the_webhook_tokens_is_refused(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
    dry_run: bool,
    tmp_path: Path,
) -> None:
    """Run without BRIDGE_TOKENS (another terminal, as for `bridge check-config`), a
    replay knew no token to look for: a dead letter refused for the token in its
    entity was published to a topic named after the token, exit 0. It exits 2 saying
    why, before reading a dead letter; so too with a tokens file that holds none."""
    body = b'{"entity":"%s","action":"create"}' % TOKEN.encode()
    with TestClient(create_app(load_settings())) as client:
        assert client.post("/webhooks/geins", content=body, headers=AUTH).status_code == 422
    capsys.readouterr()
    env.delenv("BRIDGE_TOKENS")
    env.setenv("BRIDGE_STRICT_TYPES", "false")
    comments_only = tmp_path / "tokens"  # rotated out, say: a file, and no token
    comments_only.write_text("# the tokens, one a line\n")
    for tokens_file in (None, comments_only):
        if tokens_file is not None:
            env.setenv("BRIDGE_TOKENS_FILE", str(tokens_file))
        assert main(["deadletter", "replay", *(["--dry-run"] if dry_run else [])]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(
            "bridge: a replay checks dead letters for the webhook"
            " tokens, so it needs those the bridge uses"
        ), captured
        assert "BRIDGE_TOKENS is empty" in captured.err
        assert captured.out == ""
        assert TOKEN not in captured.err
    assert read_all_sync(kafka_bootstrap, f"{topic_prefix}.{TOKEN.lower()}.create") == []


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


def test_dead_letters_listed_as_json_lines(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """`deadletter list --json`: a line of JSON per dead letter, for jq and scripts,
    with what the text lines show and the headers whole; a null key or header is
    null."""
    refuse(("/webhooks/geins/Voucher/create", [("x-Idempotency-Key", "v-1")]))
    produce(kafka_bootstrap, f"{topic_prefix}.deadletter", None, b"", [("h", None)])
    assert main(["deadletter", "list", "--json", "--reason", "unknown_event_type"]) == 0
    captured = capsys.readouterr()
    assert captured.err.endswith("1 dead letter(s) on " + topic_prefix + ".deadletter\n")
    [line] = captured.out.splitlines()
    letter = json.loads(line)
    headers = dict(letter["headers"])
    assert (letter["topic"], letter["partition"], letter["offset"]) == (
        f"{topic_prefix}.deadletter",
        0,
        0,
    )
    assert letter["key"] == "v-1"
    assert letter["value"] == '{"code":"X"}'
    assert headers["x-bridge-reason"] == "unknown_event_type"
    assert headers["x-bridge-path"] == "/webhooks/geins/Voucher/create"
    assert datetime.fromisoformat(letter["timestamp"]).tzinfo is not None
    assert main(["deadletter", "list", "--json"]) == 0
    nulls = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (nulls["key"], nulls["value"], nulls["headers"]) == (None, "", [["h", None]])


#: A record timestamp (ms) an hour before the tests began, and a second of them. Not a
#: fixed date: the broker deletes records older than its retention (7 days) at its next
#: check (once a minute), and with records of 2023 that took the first ones of a topic
#: while a test wrote or read it, now and then, under load.
EPOCH_MS, SECOND = (int(time.time()) - 3600) * 1000, 1000


def keep(
    bootstrap: str,
    topic: str,
    partitions: int,
    letters: list[tuple[str, int, int]],
    *,
    body: bytes = b"{}",
    action_of: Callable[[str], str] = lambda key: "create",
) -> None:
    """Create ``topic`` with ``partitions`` and write a dead letter of ``body`` for each
    (key, partition, milliseconds after EPOCH_MS, the record's timestamp), in order, of
    a Voucher delivery of ``action_of(key)``."""

    async def write() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, partitions, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        try:
            sent = []
            for key, partition, after in letters:
                letter = novel_voucher_letter(
                    topic,
                    headers=[(b"x-idempotency-key", key.encode())],
                    body=body,
                    received_at=datetime.fromtimestamp((EPOCH_MS + after) / 1000, UTC),
                    action=action_of(key),
                )
                # Not awaited one by one: a partition keeps the order they were sent in.
                sent.append(
                    await producer.send(
                        topic,
                        letter.value,
                        key=letter.key,
                        headers=letter.headers,
                        partition=partition,
                        timestamp_ms=EPOCH_MS + after,
                    )
                )
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

    asyncio.run(write())


def listed(out: str) -> list[str]:
    """``[partition]@offset key=K`` of each dead letter list (or replay) shows."""
    return [
        f"{words[0]} {next(w for w in words if w.startswith('key='))}"
        for words in (line.split() for line in out.splitlines() if "key=" in line)
    ]


def test_thousands_of_dead_letters_are_listed_oldest_first_holding_a_few_per_partition(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """3000 dead letters on 4 partitions, the partitions drawn at random and three at a
    time sharing a timestamp: list shows them by (timestamp, partition, offset), and
    while it prints, at most a chunk per partition of Kafka records are alive (it used
    to read all 3000 into a list and sort them first)."""
    topic = f"{topic_prefix}.deadletter"
    draw = random.Random(7)  # noqa: S311  # spreads them over partitions, not secrets
    letters = [(f"k{n}", draw.randrange(4), (n // 3) * SECOND) for n in range(3000)]
    keep(kafka_bootstrap, topic, 4, letters)
    offsets = {p: itertools.count() for p in range(4)}
    written = sorted((after, p, next(offsets[p]), key) for key, p, after in letters)

    describe, calls = kafkaadmin.describe_dead_letter, itertools.count()
    alive: list[int] = []  # Kafka records alive as one of them is shown

    def describe_counting(record: Any) -> str:
        if next(calls) % 100 == 0:  # gc.get_objects() is slow: now and then
            alive.append(sum(type(o) is ConsumerRecord for o in gc.get_objects()))
        return describe(record)

    env.setattr(kafkaadmin, "describe_dead_letter", describe_counting)
    gc.collect()
    assert main(["deadletter", "list"]) == 0
    out = capsys.readouterr()
    assert listed(out.out) == [f"[{p}]@{o} key={key}" for _, p, o, key in written]
    assert "3000 dead letter(s) on" in out.err
    assert alive
    # A chunk per partition (400 measured), with room for aiokafka decoding one more
    # ahead; all 3,000 were alive before.
    assert max(alive) <= 2 * 4 * kafkaadmin.DEAD_LETTER_CHUNK


def test_a_dead_letter_older_than_the_one_before_it_on_its_partition_is_not_moved_up(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """Timestamps that go back on a partition (bridges whose clocks differ): each
    partition is shown in offset order, merged with the others by timestamp, so the
    late one comes after the record written before it (list and replay alike). It used
    to be sorted in among the others, which took holding the whole topic."""
    topic = f"{topic_prefix}.deadletter"
    at = {"a": 1, "b": 5, "c": 2, "d": 3, "e": 4}  # seconds; c is written after b
    arrived = [("a", 0), ("d", 1), ("e", 1), ("b", 0), ("c", 0)]
    keep(kafka_bootstrap, topic, 2, [(k, p, at[k] * SECOND) for k, p in arrived])
    shown = ["[0]@0 key=a", "[1]@0 key=d", "[1]@1 key=e", "[0]@1 key=b", "[0]@2 key=c"]
    assert main(["deadletter", "list"]) == 0
    assert listed(capsys.readouterr().out) == shown
    assert main(["deadletter", "replay", "--dry-run"]) == 1  # strict types: still refused
    assert listed(capsys.readouterr().out) == shown


def delete_before(bootstrap: str, tp: TopicPartition, offset: int) -> None:
    """Delete the records of ``tp`` before ``offset``, as retention does (see _admin)."""
    _admin(bootstrap, lambda admin: admin.delete_records({tp: RecordsToDelete(offset)}))


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Delete ``topics`` (see _admin)."""
    _admin(bootstrap, lambda admin: admin.delete_topics(topics))


def _admin(bootstrap: str, act: Callable[[AIOKafkaAdminClient], Awaitable[Any]]) -> None:
    """``act`` with an admin client, from a thread of its own: a test calls it from
    within the event loop of the command under test."""

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await act(admin)
        finally:
            await admin.close()

    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, run()).result()


def test_dead_letters_deleted_while_they_are_read_leave_the_rest_shown(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """Retention deleting the oldest dead letters while list (or a replay, which reads as
    it publishes) is still before them: reading goes on from the oldest one left.
    aiokafka's default jumped to the end of the partition, silently leaving out every
    dead letter after those deleted."""
    topic = f"{topic_prefix}.deadletter"
    # 4 KB each: aiokafka fetches up to 1 MiB at a time, a few hundred of them.
    keep(kafka_bootstrap, topic, 1, [(f"k{n}", 0, n) for n in range(1000)], body=b"x" * 4000)
    describe = kafkaadmin.describe_dead_letter

    def describe_deleting(record: Any) -> str:
        if record.offset == 0:  # the first fetch is in; the next one will be past it
            delete_before(kafka_bootstrap, TopicPartition(topic, 0), 600)
        return describe(record)

    env.setattr(kafkaadmin, "describe_dead_letter", describe_deleting)
    assert main(["deadletter", "list"]) == 0
    captured = capsys.readouterr()
    shown = [int(line.split()[0].split("@")[1]) for line in captured.out.splitlines()
             if "key=" in line]  # fmt: skip
    # what was read, should this fail (retention took records of 2023 before EPOCH_MS moved)
    assert 600 in shown, (
        len(shown),
        shown[:3],
        [a for a, b in itertools.pairwise(shown) if b != a + 1],
    )
    gap = shown.index(600)
    assert shown[:gap] == list(range(gap)), "the first fetch, read before the deletion"
    assert shown[gap:] == list(range(600, 1000))
    # and said, once: the skip went unsaid
    said = f"[0]@{gap} to [0]@599 of {topic} were deleted while being read"
    assert captured.err.count(said) == 1, captured.err


def test_dead_letters_deleted_to_the_end_while_they_are_read_are_said(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """As above, but retention took every record left (all of the partition up to the
    end it had when reading began): the offset reset jumped past the end, and reading
    stopped without the line naming them, exit 0 (a review's find)."""
    topic = f"{topic_prefix}.deadletter"
    keep(kafka_bootstrap, topic, 1, [(f"k{n}", 0, n) for n in range(1000)], body=b"x" * 4000)
    describe = kafkaadmin.describe_dead_letter

    def describe_deleting(record: Any) -> str:
        if record.offset == 0:
            delete_before(kafka_bootstrap, TopicPartition(topic, 0), 1000)
        return describe(record)

    env.setattr(kafkaadmin, "describe_dead_letter", describe_deleting)
    assert main(["deadletter", "list"]) == 0
    captured = capsys.readouterr()
    shown = [line for line in captured.out.splitlines() if "key=" in line]
    assert 0 < len(shown) < 1000, len(shown)
    assert f"to [0]@999 of {topic} were deleted while being read" in captured.err, captured.err


def test_a_dead_letter_topic_deleted_while_it_is_read_is_said_so(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """The topic deleted while list reads it: its fetches failed (no such topic) until
    the deadline, and the command said it could not talk to Kafka, which answered
    every request (a review's find)."""
    topic = f"{topic_prefix}.deadletter"
    keep(kafka_bootstrap, topic, 1, [(f"k{n}", 0, n) for n in range(1000)], body=b"x" * 4000)
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "1")  # reads wait 3 s for an answer
    describe = kafkaadmin.describe_dead_letter

    def describe_deleting(record: Any) -> str:
        if record.offset == 0:
            delete_topics(kafka_bootstrap, [topic])
        return describe(record)

    env.setattr(kafkaadmin, "describe_dead_letter", describe_deleting)
    assert main(["deadletter", "list"]) == 2
    err = capsys.readouterr().err
    assert f"bridge: the dead-letter topic {topic} was deleted while being read" in err, err


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
    arrived = [("a", 2), ("b", 0), ("c", 1), ("d", 0)]  # (key, partition), a second apart
    keep(kafka_bootstrap, topic, 3, [(k, p, SECOND * n) for n, (k, p) in enumerate(arrived)])
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
    assert "replay stopped" not in err  # nothing was replayed: no summary to give
    assert main(["topics", "list"]) == 0
    assert f"{topic_prefix}.deadleter" not in capsys.readouterr().out.split()


def consumed(
    partition: int, offset: int, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
) -> Any:
    """A dead letter as the consumer gives it, written by Kafka at 2025-11-30 01:02:03 UTC."""
    return SimpleNamespace(
        partition=partition,
        offset=offset,
        timestamp=1_764_464_523_000,
        key=key,
        value=value,
        headers=headers,
    )


def test_describe_dead_letter_shows_what_each_kind_holds() -> None:
    """A delivery's dead letter shows `?query` only when there was one (it printed
    `POST /webhooks/geins?`); an event Kafka refused shows Kafka's time and the topic
    it was for (it printed `-` and `? ?`)."""
    refused = consumed(
        0,
        7,
        b"k-1",
        b'{"entity":"Order"}',
        [
            ("x-bridge-received-at", b"2026-11-30T01:02:03+00:00"),
            ("x-bridge-reason", b"unknown_event_type"),
            ("x-bridge-detail", b"novel"),
            ("x-bridge-method", b"POST"),
            ("x-bridge-path", b"/webhooks/geins"),
        ],
    )
    first, second = kafkaadmin.describe_dead_letter(refused).splitlines()
    assert first.split()[:3] == ["[0]@7", "2026-11-30T01:02:03+00:00", "key=k-1"]
    assert second.split() == ["POST", "/webhooks/geins", '{"entity":"Order"}']
    refused.headers.append(("x-bridge-query", b"id=1"))
    assert "POST /webhooks/geins?id=1 " in kafkaadmin.describe_dead_letter(refused)
    rejected = consumed(
        1,
        2,
        b"k-2",
        b"{}",
        [
            ("ce_time", b"2026-11-30T01:00:00Z"),
            ("x-bridge-reason", b"kafka_rejected"),
            ("x-bridge-detail", b"too large"),
            ("x-bridge-original-topic", b"geins.order.create"),
        ],
    )
    first, second = kafkaadmin.describe_dead_letter(rejected).splitlines()
    assert first.split()[:2] == ["[1]@2", "2025-11-30T01:02:03+00:00"]
    assert second.split() == ["event", "for", "geins.order.create", "{}"]


def test_describe_dead_letter_keeps_to_two_lines_whatever_the_body_holds() -> None:
    """A pretty-printed body broke the two lines per dead letter, and a sender's escape
    sequences reached the operator's terminal: both are escaped now."""
    body = b'{\n  "id": "9",\n  "note": "x\x1b[31mRED\x1b[0m\x00"\n}'
    letter = consumed(0, 1, b"k\x1b[2J", body, [("x-bridge-path", b"/webhooks/geins\r\n")])
    lines = kafkaadmin.describe_dead_letter(letter).splitlines()
    assert len(lines) == 2
    assert "\x1b" not in "".join(lines)
    assert "key=k\\x1b[2J" in lines[0]
    assert '{\\n  "id": "9",\\n  "note": "x\\x1b[31mRED' in lines[1]


def test_a_replay_whose_reader_goes_away_replays_everything_and_says_so(
    env: pytest.MonkeyPatch, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """`bridge deadletter replay | head -1`: the broken pipe stopped the replay after a
    few dead letters and exited 0 without its summary. It replays all of them now,
    the summary on stderr and the exit code as for any replay."""
    refuse(
        *(("/webhooks/geins/Voucher/create", [("x-Idempotency-Key", f"v-{i}")]) for i in range(40))
    )
    env.setenv("BRIDGE_STRICT_TYPES", "false")
    replay = subprocess.Popen(
        [sys.executable, "-m", "bridge", "deadletter", "replay"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert replay.stdout is not None
    first = replay.stdout.readline()  # `| head -1`
    replay.stdout.close()
    _, errors = replay.communicate(timeout=120)
    assert replay.returncode == 0
    assert first.count(b"key=") == 1
    assert b"40 replayed, 0 still refused" in errors, errors
    replayed = read_all_sync(kafka_bootstrap, f"{topic_prefix}.voucher")
    assert sorted(r.key.decode() for r in replayed) == sorted(f"v-{i}" for i in range(40))


def test_a_dead_letter_the_bridge_cannot_read_is_still_refused_and_the_replay_goes_on(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """A record on the dead-letter topic whose x-bridge-* header is not UTF-8 (not one
    the bridge wrote) ended the replay in a traceback, the dead letters after it
    never replayed."""
    produce(
        kafka_bootstrap,
        f"{topic_prefix}.deadletter",
        b"odd",
        b"{}",
        [("x-bridge-path", b"/webhooks/geins\xff"), ("x-bridge-reason", b"body_not_json")],
    )
    refuse(("/webhooks/geins/Voucher/create", [("x-Idempotency-Key", "after-it")]))
    env.setenv("BRIDGE_STRICT_TYPES", "false")
    capsys.readouterr()
    assert main(["deadletter", "replay"]) == 1
    captured = capsys.readouterr()
    assert "key=odd  still refused: not a dead letter the bridge can read" in captured.out
    assert "key=after-it  accepted" in captured.out
    assert "1 replayed, 1 still refused" in captured.err


def test_describe_dead_letter_shows_the_path_as_a_url_gives_it() -> None:
    """The path is kept decoded: a segment holding '?' or a space was shown as it is,
    so the URL listed meant another path and query pasted back (a review's find)."""
    letter = consumed(
        0,
        1,
        b"k",
        b"{}",
        [
            ("x-bridge-method", b"POST"),
            ("x-bridge-path", "/webhooks/geins/Or der?ref=1/<token>/é".encode()),
            ("x-bridge-query", b"note=a%20b"),
        ],
    )
    second = kafkaadmin.describe_dead_letter(letter).splitlines()[1]
    assert "POST /webhooks/geins/Or%20der%3Fref%3D1/<token>/%C3%A9?note=a%20b " in second


def test_a_replay_names_the_offsets_and_keys_that_matched_nothing(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
) -> None:
    """`--offset P:N` or `--key K` naming no dead letter was left unsaid, exit 0, when
    another value matched: a typo in one of several looked like a replay of all."""
    refuse(("/webhooks/geins/Voucher/create", [("x-Idempotency-Key", "found-1")]))
    [letter] = read_all_sync(kafka_bootstrap, os.environ["BRIDGE_DEADLETTER_TOPIC"])
    env.setenv("BRIDGE_STRICT_TYPES", "false")  # replayable now
    at, away = f"{letter.partition}:{letter.offset}", f"{letter.partition}:{letter.offset + 9}"
    capsys.readouterr()
    dry_run = ["deadletter", "replay", "--dry-run"]
    assert main([*dry_run, "--offset", at]) == 0
    assert main([*dry_run, "--key", "found-1"]) == 0
    capsys.readouterr()
    assert main([*dry_run, "--offset", at, "--offset", away]) == 1
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "1 would be replayed, 0 still refused",
        f"--offset {away} matches no dead letter on {letter.topic}",
    ]
    assert main([*dry_run, "--key", "found-1", "--key", "typo-1"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"--key typo-1 matches no dead letter on {letter.topic}"
    )


@pytest.mark.parametrize("command", ["list", "replay"])
def test_a_repeated_option_matches_either_value(command: str) -> None:
    """`--reason A --reason B` wants the dead letters of either reason, as `--key` does
    (the README says so); `--reason` kept only the last one given."""
    from bridge.cli import _dead_letter_query, _parser  # noqa: PLC0415  # its helpers

    args = _parser().parse_args(
        ["deadletter", command, "--reason", "token_in_path", "--reason", "body_not_json"]
    )
    query = _dead_letter_query(load_settings(environ={}), args)

    def letter(reason: bytes | None) -> SimpleNamespace:
        headers = [] if reason is None else [("x-bridge-reason", reason)]
        return SimpleNamespace(key=b"k", headers=headers)

    assert query.wants(letter(b"token_in_path"))
    assert query.wants(letter(b"body_not_json"))
    assert not query.wants(letter(b"kafka_rejected"))
    assert not query.wants(letter(None))
    everything = _dead_letter_query(
        load_settings(environ={}), _parser().parse_args(["deadletter", command])
    )
    assert everything.wants(letter(None))


@pytest.mark.parametrize("command", ["list", "replay"])
def test_a_misspelt_reason_is_refused_naming_those_there_are(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deadletter list --reason bdy_not_json` said "0 dead letter(s)", exit 0, as if the
    topic held none of them."""
    from bridge.cli import _parser  # noqa: PLC0415  # its helper

    with pytest.raises(SystemExit) as exited:
        main(["deadletter", command, "--reason", "bdy_not_json"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bdy_not_json'" in err
    assert "'body_not_json'" in err
    assert "'kafka_rejected'" in err
    for reason in ("token_in_path", "unknown_event_type", "kafka_rejected"):
        assert _parser().parse_args(["deadletter", command, "--reason", reason]).reason == [reason]


def test_a_key_copied_from_the_list_matches() -> None:
    """`deadletter list` shows a key with a no-break space (which parsing accepts) as
    `order\\xa042`; given to --key so, it matched nothing."""
    from bridge.cli import _dead_letter_query, _parser  # noqa: PLC0415  # its helpers

    def query(key: str) -> kafkaadmin.DeadLetterQuery:
        args = _parser().parse_args(["deadletter", "replay", "--key", key])
        return _dead_letter_query(load_settings(environ={}), args)

    letter = SimpleNamespace(key="order\u00a042".encode(), headers=[])
    assert kafkaadmin.shown([kafkaadmin.text(letter.key)]) == "order\\xa042"
    assert query("order\\xa042").wants(letter)
    assert query("order\u00a042").wants(letter)
    assert not query("order 42").wants(letter)


def test_records_the_bridge_did_not_write_are_not_replayed(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """Records on the dead-letter topic that are no dead letters of the bridge (a review
    wrote them by hand): one without x-bridge-reason holding an entity and action was
    published as an event; a kafka_rejected one naming an illegal topic or the
    dead-letter topic itself was resent there; a received-at without its UTC offset
    became a ce_time without one."""
    letters = f"{topic_prefix}.deadletter"
    rejected = ("x-bridge-reason", b"kafka_rejected")
    event = b'{"entity":"Order","action":"create","id":"x"}'
    produce(kafka_bootstrap, letters, b"plain", event, [])
    produce(kafka_bootstrap, letters, b"illegal", b"{}",
            [rejected, ("x-bridge-original-topic", b"bad topic!")])  # fmt: skip
    produce(kafka_bootstrap, letters, b"itself", b"{}",
            [rejected, ("x-bridge-original-topic", letters.encode())])  # fmt: skip
    produce(kafka_bootstrap, letters, b"naive", event,
            [("x-bridge-reason", b"body_not_json"),
             ("x-bridge-received-at", b"2026-01-01T00:00:00")])  # fmt: skip
    env.setenv("BRIDGE_STRICT_TYPES", "false")
    assert main(["deadletter", "replay"]) == 1
    captured = capsys.readouterr()
    unreadable = "still refused: not a dead letter the bridge can read"
    assert "key=plain  still refused: not a dead letter (no x-bridge-reason header)" in captured.out
    assert f"key=illegal  {unreadable} (x-bridge-original-topic 'bad topic!'" in captured.out
    assert f"key=itself  {unreadable} (x-bridge-original-topic '{letters}'" in captured.out
    assert f"key=naive  {unreadable} (x-bridge-received-at has no UTC offset)" in captured.out
    assert "0 replayed, 4 still refused" in captured.err
    assert read_all_sync(kafka_bootstrap, f"{topic_prefix}.order") == []
    assert len(read_all_sync(kafka_bootstrap, letters)) == 4


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_replay_interrupted_says_what_it_did_and_which_record_may_be_on_kafka(
    sent: signal.Signals,
    code: int,
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """Ctrl-C in the middle of a replay exited 130 with nothing said: no summary, and the
    record being published when it came was on Kafka without a line in the report (a
    review counted one more record published than reported). SIGTERM ended it at once,
    exit 143, unsaid as well."""
    refuse(
        *(("/webhooks/geins/Voucher/create", [("x-Idempotency-Key", f"v-{i}")]) for i in range(5))
    )
    env.setenv("BRIDGE_STRICT_TYPES", "false")
    publish, calls = KafkaPublisher.publish, itertools.count(1)

    async def publish_interrupted(self: KafkaPublisher, destination: Destination) -> None:
        if next(calls) == 3:
            os.kill(os.getpid(), sent)  # the command's task is cancelled
        await publish(self, destination)

    env.setattr(KafkaPublisher, "publish", publish_interrupted)
    capsys.readouterr()
    # Python's own Ctrl-C, whatever this run inherited: a test run started in the
    # background of a script (nohup, `cmd &`) ignores SIGINT, and so did the command.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["deadletter", "replay"]) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    captured = capsys.readouterr()
    assert listed(captured.out) == ["[0]@0 key=v-0", "[0]@1 key=v-1"]
    assert "stopped while publishing [0]@2: it may be on Kafka" in captured.err
    assert "2 replayed, 0 still refused before the replay stopped" in captured.err
    replayed = {r.key.decode() for r in read_all_sync(kafka_bootstrap, f"{topic_prefix}.voucher")}
    assert {"v-0", "v-1"} <= replayed <= {"v-0", "v-1", "v-2"}


def test_a_replay_whose_report_nobody_reads_stops_on_sigterm(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Its report's reader takes nothing (a paused pager, a stalled log pipe): the
    write waited, and the event loop with it, so the loop's SIGTERM handler never ran
    and the replay went on until SIGKILL. It stops with its summary, exit 143."""
    deadletters = f"{topic_prefix}.deadletter"

    async def fill() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20)
        await producer.start()
        try:
            reason = [("x-bridge-reason", b"body_not_json")]
            sent = [
                await producer.send(deadletters, b"not json", key=b"k-%d" % n, headers=reason)
                for n in range(3000)
            ]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

    asyncio.run(fill())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_DEADLETTER_TOPIC": deadletters,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
    }
    errors = tmp_path / "stderr"
    with errors.open("wb") as err:
        replay = subprocess.Popen(
            [sys.executable, "-m", "bridge", "deadletter", "replay", "--dry-run"],
            env=env,
            stdout=subprocess.PIPE,  # never read: full after some 600 lines
            stderr=err,
        )

    def waits() -> list[str]:  # what each thread waits for
        return [(task / "wchan").read_text() for task in Path(f"/proc/{replay.pid}/task").iterdir()]

    try:
        waiting = wait_until(waits, lambda now: any("pipe" in w for w in now), within=60, every=0.1)
        assert any("pipe" in w for w in waiting), (waiting, errors.read_text())
        replay.send_signal(signal.SIGTERM)
        assert replay.wait(timeout=20) == 128 + signal.SIGTERM, errors.read_text()
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        assert replay.stdout is not None
        written = replay.stdout.read().count(b"\n")
        replay.stdout.close()
    said = errors.read_text()
    counts = re.search(
        r"(\d+) would be replayed, (\d+) still refused before the replay stopped", said
    )
    assert counts, said
    # every line written counted (the one whose write the stop cut short was not)
    assert int(counts[1]) + int(counts[2]) >= written > 0
    assert "Traceback" not in said


def replaying(env: pytest.MonkeyPatch, count: int, *, each: Any = None) -> None:
    """Replays of ``count`` dead letters, each accepted, as kafkaadmin would yield them
    (no Kafka); ``each`` awaited before each."""

    async def no_letters(*_: Any) -> Any:
        return
        yield

    async def replayed(*_: Any, **__: Any) -> Any:
        for n in range(count):
            result = "replayed" if each is None else await each()
            yield SimpleNamespace(partition=0, offset=n, key=b"k-%d" % n), result, "ok", "t"

    env.setattr(kafkaadmin, "dead_letters", no_letters)
    env.setattr(kafkaadmin, "replay_dead_letters", replayed)


def test_a_replay_stopped_while_its_report_waits_counts_every_record_it_dealt_with(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM while a line waited for its reader: the record (published already) was
    counted after its line, so the summary left it out, and the stop could end in a
    traceback (exit 1) as the handler for that write was swapped in and out."""
    yielded = 0
    reader = threading.Event()  # never set: a reader that takes nothing

    class StalledStdout:
        encoding = "utf-8"

        def write(self, text: str) -> int:
            reader.wait()
            return len(text)

        def flush(self) -> None:
            pass

    async def counted() -> str:
        nonlocal yielded
        yielded += 1
        await asyncio.sleep(0)
        return "replayed"

    replaying(env, 10**9, each=counted)  # more than the stop lets through
    env.setattr(sys, "stdout", StalledStdout())

    def stop_once_the_report_waits() -> None:
        wait_until(lambda: yielded, lambda n: n > REPORT_LINES, within=60, every=0.05)
        time.sleep(0.2)  # the replay waits for room among the lines
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_the_report_waits)
    stopper.start()
    try:
        assert main(["deadletter", "replay", "--dry-run"]) == 128 + signal.SIGTERM
    finally:
        reader.set()
        stopper.join()
    said = capsys.readouterr().err
    assert f"{yielded} would be replayed, 0 still refused before the replay stopped" in said
    assert yielded > REPORT_LINES


def test_a_sigterm_as_a_publish_times_out_still_stops_the_replay(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM handled in the same turn as a publish timeout expiring was dropped
    (the stop looked at task.cancelling(), which the timeout had raised): the replay
    went on to its end, exit 1, every record "not published"."""

    async def publish() -> str:
        loop = asyncio.get_running_loop()

        def busy() -> None:  # the loop busy past the timeout, a SIGTERM meanwhile
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)

        loop.call_later(0.05, busy)
        try:
            async with asyncio.timeout(0.1):
                await asyncio.sleep(5)
        except TimeoutError:
            return "unpublished"
        return "replayed"

    replaying(env, 5, each=publish)
    assert main(["deadletter", "replay"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().out.count("key=") < 5  # stopped before its end


def test_a_replay_without_stdout_still_ends(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge deadletter replay >&-`: no sys.stdout at all. Its report's thread died on
    it, and the replay waited for that thread forever."""
    replaying(env, 3)
    env.setattr(sys, "stdout", None)
    assert main(["deadletter", "replay"]) == 0
    assert "3 replayed, 0 still refused" in capsys.readouterr().err


def test_a_report_that_cannot_be_written_is_said_and_exits_1(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report to a full disk (/dev/full): its lines were dropped as if the reader
    had gone away, exit 0. Only a reader that went away is that; this is said, exit 1."""
    replaying(env, 3)
    with open("/dev/full", "w") as full:
        env.setattr(sys, "stdout", full)
        assert main(["deadletter", "replay"]) == 1
    err = capsys.readouterr().err
    assert "3 replayed, 0 still refused" in err
    assert "bridge: the report could not be written to stdout: [Errno 28]" in err, err


def test_a_listing_that_cannot_be_written_is_not_blamed_on_kafka(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge deadletter list > file` on a full disk (/dev/full) said "cannot talk to
    Kafka at ...: [Errno 28] No space left on device", though Kafka answered every
    request (a review's find): every OSError was taken for Kafka's."""

    async def letters(*_: Any) -> Any:
        for n in range(3000):  # past the buffer of a file's stdout
            yield n

    env.setattr(kafkaadmin, "dead_letters", letters)
    env.setattr(kafkaadmin, "describe_dead_letter", lambda n: f"[0]@{n} key=k-{n}")
    with open("/dev/full", "w") as full:
        env.setattr(sys, "stdout", full)
        assert main(["deadletter", "list"]) == 1
    err = capsys.readouterr().err
    assert "bridge: cannot write to stdout: [Errno 28] No space left on device" in err, err
    assert "cannot talk to Kafka" not in err


def test_a_report_in_utf_16_has_one_byte_order_mark(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each line was encoded alone: a byte order mark before every line."""
    replaying(env, 3)
    path = tmp_path / "report"
    with path.open("w", encoding="utf-16") as out:
        env.setattr(sys, "stdout", out)
        assert main(["deadletter", "replay"]) == 0
    assert path.read_text(encoding="utf-16").splitlines() == [
        f"[0]@{n}     key=k-{n}  ok -> t" for n in range(3)
    ]


@pytest.fixture
def lone(lone_kafka: LocalKafka, env: pytest.MonkeyPatch) -> LocalKafka:
    """The session's lone broker (conftest: it creates no topics, and a test may kill
    it), running, as the bridge's Kafka, with short timeouts."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", lone_kafka.bootstrap)
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "1")
    env.setenv("BRIDGE_PUBLISH_TIMEOUT", "1")
    env.setenv("BRIDGE_STRICT_TYPES", "false")
    return lone_kafka


def test_a_replay_to_a_missing_topic_tries_it_once(
    lone: LocalKafka, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], topic_prefix: str
) -> None:
    """On a broker that creates no topics, a replay to a topic nobody made (a new
    template, say) waited the whole publish timeout for each dead letter (about 14 hours
    for 10,000), each "not acknowledged", the reason only in aiokafka's log. The topic
    is tried once, and its other dead letters are not published, at once, saying why."""
    keep(lone.bootstrap, f"{topic_prefix}.deadletter", 1, [(f"k{n}", 0, n) for n in range(6)])
    publish, calls = KafkaPublisher.publish, itertools.count(1)

    async def publish_counted(self: KafkaPublisher, destination: Destination) -> None:
        next(calls)
        await publish(self, destination)

    env.setattr(KafkaPublisher, "publish", publish_counted)
    assert main(["deadletter", "replay"]) == 1
    captured = capsys.readouterr()
    missing = f"not published: Kafka has no topic {topic_prefix}.voucher.create"
    lines = captured.out.splitlines()
    assert len(lines) == 6
    assert all(missing in line and "bridge topics create" in line for line in lines), lines
    assert "0 replayed, 0 still refused, 6 not published" in captured.err
    assert next(calls) == 2  # one publish


def test_kafka_going_away_before_a_topics_first_replay_is_not_a_missing_topic(
    lone: LocalKafka, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], topic_prefix: str
) -> None:
    """Kafka gone (here paused) as a replay reaches the first dead letter of a topic it
    has not published to: the producer's metadata (refreshed for the topics in use) still
    counted as fresh, and the topic had none, so each of its dead letters was "Kafka
    has no topic ...: create it", though it exists, and the replay never said it
    could not talk to Kafka (a review's find). A topic is missing only if Kafka
    answered since its publish began."""
    for action in ("create", "update"):
        set_max_message_bytes(
            lone.bootstrap, f"{topic_prefix}.voucher.{action}", 1048588, create=True
        )
    keep(
        lone.bootstrap,
        f"{topic_prefix}.deadletter",
        1,
        [(key, 0, n) for n, key in enumerate(["c0", "u0", "u1", "u2", "u3"])],
        action_of=lambda key: "create" if key.startswith("c") else "update",
    )
    env.setattr(publisher_module, "HEARTBEAT_SECONDS", 0.5)
    env.setattr(publisher_module, "STALE_AFTER_SECONDS", 3)
    pid = lone.pid
    assert pid is not None
    publish, calls = KafkaPublisher.publish, itertools.count(1)

    async def publish_pausing(self: KafkaPublisher, destination: Destination) -> None:
        await publish(self, destination)
        if next(calls) == 1:
            await asyncio.sleep(1.0)  # the heartbeat refreshed create's metadata
            os.kill(pid, signal.SIGSTOP)  # not killed: the next test needs no restart

    env.setattr(KafkaPublisher, "publish", publish_pausing)
    try:
        assert main(["deadletter", "replay"]) == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    captured = capsys.readouterr()
    assert "Kafka has no topic" not in captured.out, captured.out
    assert f"bridge: cannot talk to Kafka at {lone.bootstrap}" in captured.err, captured.err
    assert "1 replayed, 0 still refused, " in captured.err, captured.err


def test_kafka_going_away_mid_read_is_said_in_a_line(
    lone: LocalKafka, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], topic_prefix: str
) -> None:
    """Kafka killed while list or replay reads: list ended in a traceback (aiokafka's
    consumer raises CancelledError out of its stop when a fetch was in flight), and
    replay too, without its summary. Both now say they cannot talk to Kafka and exit 1,
    replay after the summary of what it did."""
    topic = f"{topic_prefix}.deadletter"
    set_max_message_bytes(lone.bootstrap, f"{topic_prefix}.voucher.create", 1048588, create=True)
    keep(
        lone.bootstrap,
        topic,
        1,
        [(f"k{n}", 0, n) for n in range(400)],
        body=b"{" + b" " * 4000 + b"}",
    )
    pid = lone.pid
    assert pid is not None
    describe = kafkaadmin.describe_dead_letter

    def describe_killing(record: Any) -> str:
        if record.offset == 5 and lone.is_running():
            os.kill(pid, signal.SIGKILL)
        return describe(record)

    env.setattr(kafkaadmin, "describe_dead_letter", describe_killing)
    assert main(["deadletter", "list"]) == 1
    cannot = f"bridge: cannot talk to Kafka at {lone.bootstrap}"
    err = capsys.readouterr().err
    assert cannot in err, err
    lone.stop()

    lone.start()
    lone.wait_ready()
    restarted = lone.pid
    assert restarted is not None
    publish, calls = KafkaPublisher.publish, itertools.count(1)

    async def publish_killing(self: KafkaPublisher, destination: Destination) -> None:
        if next(calls) == 10:
            os.kill(restarted, signal.SIGKILL)
        await publish(self, destination)

    env.setattr(KafkaPublisher, "publish", publish_killing)
    # Kafka counts as away (what stops a replay) once it has answered no metadata for
    # this long: 20 s, 20 records not published after a second each.
    env.setattr(publisher_module, "STALE_AFTER_SECONDS", 3)
    assert main(["deadletter", "replay"]) == 1
    captured = capsys.readouterr()
    assert "9 replayed, 0 still refused, " in captured.err, captured.err
    assert "not published before the replay stopped" in captured.err, captured.err
    stopped = f"{cannot}: Kafka answered nothing for 3 s or more; the replay stopped"
    assert stopped in captured.err, captured.err
    # not the 15 s of BRIDGE_SHUTDOWN_TIMEOUT, past a container's 10 s to stop
    assert "record(s) within 2.0 s" in captured.err, captured.err
    lone.stop()


def test_offsets_without_records_are_no_deletion(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """A transactional producer's commit markers take offsets that hold no record (as
    compaction leaves gaps): reading goes past them without saying records were
    deleted."""
    topic = f"{topic_prefix}.deadletter"
    letter = novel_voucher_letter(topic, headers=[], body=b"{}", received_at=datetime.now(UTC))

    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=topic)
        await producer.start()
        try:
            for n in range(3):
                async with producer.transaction():
                    for i in range(2):
                        key = f"t{n}-{i}".encode()
                        await producer.send(topic, letter.value, key=key, headers=letter.headers)
        finally:
            await producer.stop()

    asyncio.run(write())
    assert main(["deadletter", "list"]) == 0
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines() if "key=" in line] == [
        "[0]@0", "[0]@1", "[0]@3", "[0]@4", "[0]@6", "[0]@7"
    ]  # fmt: skip
    assert "deleted while being read" not in captured.err


@pytest.mark.kafka
@pytest.mark.parametrize("command", ["deadletter list", "tail"])
def test_a_key_the_terminal_cannot_encode_is_escaped_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, topic_prefix: str, command: str
) -> None:
    """On a latin-1 terminal (LANG=…ISO-8859-1, PYTHONIOENCODING=latin-1), `deadletter
    replay` writes a Cyrillic key as \\u escapes (its report's encoder uses
    backslashreplace), but `deadletter list` and `tail` print() it: UnicodeEncodeError,
    a traceback and exit 1 at the first such record, nothing after it shown."""
    topic = f"{topic_prefix}.deadletter"
    produce(kafka_bootstrap, topic, "ключ".encode(), b"{}", [("x-bridge-reason", b"body_not_json")])
    monkeypatch.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("BRIDGE_TOKENS", "x" * 32)
    monkeypatch.setenv("BRIDGE_DEADLETTER_TOPIC", topic)
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    argv = command.split() + (
        [topic, "--from-beginning", "--limit", "1"] if command == "tail" else []
    )
    assert main(argv) == 0
    sys.stdout.flush()
    assert b"key=\\u043a\\u043b\\u044e\\u0447" in raw.getvalue()


def test_a_deletion_past_the_span_read_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A fetch ran past the span's end (records up to 699 read for a span ending at 600),
    then retention deleted up to 800: nothing of the span was skipped. The line said
    "[0]@700 to [0]@599 were deleted", an inverted range of records nobody asked for."""

    class Consumer:
        async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            return dict.fromkeys(tps, 800)

    tp = TopicPartition("geins.deadletter", 0)
    with caplog.at_level("WARNING"):
        asyncio.run(kafkaadmin._say_if_deleted(Consumer(), tp, 700, 600, 5))
        asyncio.run(kafkaadmin._say_if_deleted(Consumer(), tp, 500, 600, 5))
    said = [r.getMessage() for r in caplog.records]
    assert said == ["[0]@500 to [0]@599 of geins.deadletter were deleted while being read "
                    "(retention, or records deleted by hand): they are not shown"]  # fmt: skip
