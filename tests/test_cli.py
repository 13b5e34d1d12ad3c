"""The bridge command: check-config, topics and tail (Kafka ones on the real broker)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from starlette.testclient import TestClient

from bridge import cli as cli_module
from bridge import devkafka, kafkaadmin
from bridge.app import create_app
from bridge.auth import UNAUTHENTICATED
from bridge.cli import _exit_code, main
from bridge.config import load_settings
from bridge.devkafka import free_port, free_ports
from bridge.errors import ConfigError, SpoolUnusable
from bridge.kafkaadmin import checked_pattern, tail
from bridge.metrics import Metrics
from bridge.publisher import KafkaPublisher
from bridge.routing import Destination, template_pattern
from bridge.server import listening_sockets
from bridge.spool import Spool
from tests.fakes import TOKEN
from tests.kafkaread import read_all_sync
from tests.polling import eventually, wait_until
from tests.process import BridgeProcess
from tests.test_cli_deadletter import delete_before, novel_voucher_letter


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("BRIDGE_CONFIG_FILE", "BRIDGE_TOKENS", "BRIDGE_KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BRIDGE_TOKENS", "secret-token")
    return monkeypatch


def test_check_config_prints_settings_without_tokens(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config shows the effective settings, as JSON alone on stdout (for jq: the
    example topic line followed it there), and an example topic, never a token."""
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tokens"] == "<1 token(s)>"
    assert err.splitlines()[-1] == (
        "settings are valid; an order/create event goes to topic geins.order.create"
    )
    assert "secret-token" not in out + err


def test_check_config_warns_of_a_template_whose_topics_can_be_shared(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("BRIDGE_TOKENS", "a-long-enough-token-here")
    env.setenv("BRIDGE_TOPIC_TEMPLATE", "geins.{account}-{environment}.{entity}.{action}")
    assert main(["check-config"]) == 0
    *err, _ = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: topic template 'geins.{account}-{environment}.{entity}.{action}' has "
        "only letters, digits and '-' between {account} and {environment}, which they can "
        "hold themselves: deliveries with different values can share a topic; put a '.' or "
        "'_' between them"
    ]


def test_check_config_warns_of_short_tokens(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A token under 16 characters, in BRIDGE_TOKENS or the file, is accepted with a
    warning on stderr that gives its length, not the token."""
    file = tmp_path / "tokens"
    file.write_text("a-long-enough-file-token\nshort-tok\n")
    env.setenv("BRIDGE_TOKENS_FILE", str(file))
    assert main(["check-config"]) == 0
    *err, valid = capsys.readouterr().err.splitlines()
    assert valid.startswith("settings are valid")
    assert [line.split(":")[0] for line in err] == ["warning", "warning"]
    assert err[0].startswith("warning: a token of BRIDGE_TOKENS has 12 characters")
    assert err[1].startswith("warning: a token of the tokens file has 9 characters")
    assert "secret-token" not in str(err)
    assert "short-tok" not in str(err)


def test_check_config_warns_of_an_open_bridge(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No token with BRIDGE_ALLOW_UNAUTHENTICATED=true is valid, and said to be open."""
    env.setenv("BRIDGE_TOKENS", "")
    env.setenv("BRIDGE_ALLOW_UNAUTHENTICATED", "true")
    assert main(["check-config"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {UNAUTHENTICATED}",
        "settings are valid; an order/create event goes to topic geins.order.create",
    ]


def test_serve_says_why_it_stops_in_its_log_format(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve's last words are a JSON log line when it logs JSON (the default), so a log
    pipeline reading JSON keeps the line that says why the bridge would not start; with
    text logs, and for the operator commands, the plain ``bridge: ...`` line."""
    env.delenv("BRIDGE_LOG_FORMAT", raising=False)
    env.setenv("BRIDGE_ACK", "bogus")
    assert main(["serve"]) == 2
    line = json.loads(capsys.readouterr().err)
    assert (line["level"], line["logger"]) == ("error", "bridge")
    assert line["message"].startswith("invalid settings:\n  BRIDGE_ACK: Input should be")
    assert main(["topics", "list"]) == 2
    assert capsys.readouterr().err.startswith("bridge: invalid settings:\n  BRIDGE_ACK:")
    env.setenv("BRIDGE_LOG_FORMAT", "text")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("bridge: invalid settings:\n  BRIDGE_ACK:")


def test_serve_says_why_it_stops_in_the_log_format_of_its_file(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A settings file's log_format = "text" was not heeded for that line: JSON, as
    if nothing asked (a review's test); the variable still wins over the file."""
    env.delenv("BRIDGE_LOG_FORMAT", raising=False)
    config = tmp_path / "bridge.toml"
    config.write_text('log_format = "text"\nport = 0\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("bridge: invalid settings:\n  port")
    env.setenv("BRIDGE_LOG_FORMAT", "json")
    assert main(["serve", "--config", str(config)]) == 2
    assert json.loads(capsys.readouterr().err)["level"] == "error"


def test_check_config_warns_of_more_connections_than_the_file_limit_allows(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = resource.getrlimit
    env.setattr(
        resource,
        "getrlimit",
        lambda which: (1024, 1024) if which == resource.RLIMIT_NOFILE else real(which),
    )
    env.setenv("BRIDGE_TOKENS", "a-token-long-enough-for-no-warning")
    env.setenv("BRIDGE_MAX_CONNECTIONS", "5000")
    assert main(["check-config"]) == 0
    captured = capsys.readouterr()
    [warning, valid] = captured.err.splitlines()
    assert valid.startswith("settings are valid")
    assert warning.startswith("warning: BRIDGE_MAX_CONNECTIONS=5000 is more than the open-file")
    assert '"max_connections_in_effect": 5000' in captured.out
    # By default: at `ulimit -n` 128 or so, 1 connection, said nowhere (a review's note)
    env.delenv("BRIDGE_MAX_CONNECTIONS")
    env.setattr(
        resource,
        "getrlimit",
        lambda which: (150, 1024) if which == resource.RLIMIT_NOFILE else real(which),
    )
    assert main(["check-config"]) == 0
    captured = capsys.readouterr()
    assert "warning: the open-file limit (150, `ulimit -n`) leaves 22 connection(s)" in captured.err
    assert '"max_connections_in_effect": 22' in captured.out


def test_serve_warns_of_a_short_token(
    env: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`bridge serve` logs a warning for a token under 16 characters, by its length."""
    import bridge.server  # noqa: PLC0415

    env.setattr(bridge.server, "serve", lambda _: 0)
    assert main(["serve"]) == 0
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    warnings = [line["message"] for line in lines if line["level"] == "warning"]
    assert [w.split(":")[0] for w in warnings] == ["a token of BRIDGE_TOKENS has 12 characters"]
    assert "secret-token" not in str(lines)


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{file}", "check-config"],
        ["check-config", "--config", "{file}"],
        ["topics", "create", "--config", "{file}", "--help"],
    ],
)
def test_config_is_taken_before_or_after_the_command(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    """`bridge serve --config f.toml`, as users write it, was refused as an
    unrecognised argument: only `bridge --config f.toml serve` worked."""
    file = tmp_path / "bridge.toml"
    file.write_text("port = 9000\n")
    try:
        code = main([arg.format(file=file) for arg in argv])
    except SystemExit as exit_:  # --help
        code = int(exit_.code or 0)
    assert code == 0
    out = capsys.readouterr().out
    assert '"port": 9000' in out or "--config CONFIG" in out


def test_check_config_example_topic_uses_the_default_account_and_environment(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example topic is where an order/create without account or environment
    goes: BRIDGE_DEFAULT_ACCOUNT/ENVIRONMENT fill the template, not "default"."""
    env.setenv("BRIDGE_TOPIC_TEMPLATE", "geins.{account}.{environment}.{entity}.{action}")
    env.setenv("BRIDGE_DEFAULT_ACCOUNT", "acme")
    env.setenv("BRIDGE_DEFAULT_ENVIRONMENT", "prod")
    assert main(["check-config"]) == 0
    assert "goes to topic geins.acme.prod.order.create\n" in capsys.readouterr().err


def test_bad_setting_exits_2_naming_it(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad setting stops any command with exit 2 and its name."""
    env.setenv("BRIDGE_PORT", "eighty")
    assert main(["check-config"]) == 2
    assert "BRIDGE_PORT" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["not_a_host", " 127.0.0.1"])
def test_check_config_refuses_a_host_serve_cannot_listen_on(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    """check-config said valid for a BRIDGE_HOST that does not resolve, which serve
    then refused: it now resolves the host as serve does (nothing is bound)."""
    env.setenv("BRIDGE_HOST", host)
    assert main(["check-config"]) == 2
    assert "BRIDGE_HOST" in capsys.readouterr().err


def test_check_config_refuses_a_spool_folder_that_is_a_file(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """BRIDGE_SPOOL_DIR=/etc/passwd (a file) passed check-config and stopped serve: it
    is now checked as the spool checks it, in durable mode, without making anything."""
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0::/root:/bin/sh\n")
    for spool in (a_file, a_file / "spool"):
        env.setenv("BRIDGE_SPOOL_DIR", str(spool))
        assert main(["check-config"]) == 2
        assert f"spool folder {spool} cannot be used" in capsys.readouterr().err
    env.setenv("BRIDGE_ACK", "broker")  # no spool: not checked
    assert main(["check-config"]) == 0
    env.setenv("BRIDGE_ACK", "durable")
    env.setenv("BRIDGE_SPOOL_DIR", str(tmp_path / "new" / "spool"))
    assert main(["check-config"]) == 0
    assert not (tmp_path / "new").exists(), "check-config made the spool folder"


def test_kafka_unreachable_is_one_clear_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator command that cannot reach Kafka exits 1 with a line naming it and what
    to check, no traceback (it ended in aiokafka's "KafkaConnectionError: Unable to
    bootstrap from [('127.0.0.1', 9, <AddressFamily.AF_INET: 2>)]")."""
    bootstrap = f"127.0.0.1:{free_port()}"
    env.delenv("BRIDGE_LOG_FORMAT", raising=False)
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", bootstrap)
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "2")
    env.setenv("BRIDGE_DEADLETTER_TOPIC", "geins.deadletter")
    for command in (["topics", "list"], ["tail", "geins.order.create"], ["deadletter", "list"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == (
            f"bridge: cannot talk to Kafka at {bootstrap}: no broker there answered "
            "(is Kafka running, and is BRIDGE_KAFKA_BOOTSTRAP its address?)"
        ), err
        assert "Traceback" not in err
        # the Kafka client's line before it as text, in a terminal (it was JSON)
        assert re.search(r" ERROR aiokafka: Unable connect to ", err), err
    env.setenv("BRIDGE_LOG_FORMAT", "json")  # asked for: JSON
    assert main(["topics", "list"]) == 1
    assert json.loads(capsys.readouterr().err.splitlines()[0])["logger"] == "aiokafka"


def test_a_replay_whose_producer_cannot_connect_says_so_in_one_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The producer of a replay not connected (Kafka gone after the dead letters were
    read, say): "bridge: Kafka at X: KafkaError: Kafka at X is not reachable", said
    twice, no check named; now as the other commands say it."""
    bootstrap = f"127.0.0.1:{free_port()}"
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", bootstrap)
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "2")

    async def not_connected(self: object) -> None:
        return None

    env.setattr(KafkaPublisher, "start", not_connected)
    env.setattr(KafkaPublisher, "connected", False)
    with pytest.raises(KafkaError) as failed:
        asyncio.run(kafkaadmin._started_publisher(load_settings()))
    assert _exit_code(failed.value, load_settings()) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"bridge: cannot talk to Kafka at {bootstrap}: no broker there answered "
        "(is Kafka running, and is BRIDGE_KAFKA_BOOTSTRAP its address?)"
    )


def test_kafka_that_never_answers_is_named_with_the_deadline(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Kafka that accepts connections but never answers: the line says how long the
    tool waited (it used to end in an empty reason: str(TimeoutError()) is '')."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        bootstrap = f"127.0.0.1:{silent.getsockname()[1]}"
        env.setenv("BRIDGE_KAFKA_BOOTSTRAP", bootstrap)
        env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "1")
        assert main(["topics", "list"]) == 1
        assert main(["deadletter", "list"]) == 1  # reading them may take 3 deadlines
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"bridge: cannot talk to Kafka at {bootstrap}: no answer within 1 s",
        f"bridge: cannot talk to Kafka at {bootstrap}: no answer within 3 s",
    ]


def test_version_is_the_installed_one(capsys: pytest.CaptureFixture[str]) -> None:
    """`bridge --version`: which bridge is deployed, as bridge_build_info says it."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"bridge {version('geins-kafka-bridge')}\n"
    [info] = Metrics().build_info.collect()
    assert info.samples[0].labels["version"] == version("geins-kafka-bridge")


def test_a_record_time_no_date_holds_is_none() -> None:
    """A producer may set any timestamp: one past year 9999 ended `tail --json` (and
    `deadletter list`) in a ValueError at that record."""
    record = SimpleNamespace(
        topic="t", partition=0, offset=1, timestamp=2**63 - 1, key=b"k", headers=[], value=b""
    )
    assert json.loads(kafkaadmin.record_json(record))["timestamp"] is None
    assert json.loads(kafkaadmin.record_json(record))["timestamp_ms"] == 2**63 - 1
    assert kafkaadmin.kafka_time(253402300800000) is None  # year 10000
    assert kafkaadmin.kafka_time(-1) is None
    assert kafkaadmin.kafka_time(1700000000123) == "2023-11-14T22:13:20.123000+00:00"
    assert "-" in kafkaadmin.describe_dead_letter(record)


@pytest.mark.parametrize("limit", ["0", "-3", "two"])
def test_tail_limit_below_one_is_refused(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    """tail --limit 0 (or less) is a usage error, exit 2, before Kafka is asked (it used to
    print one record and then wait forever)."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit) as exited:
        main(["tail", "some.topic", "--limit", limit])
    assert exited.value.code == 2
    assert f"--limit: {limit!r} is not a number of records (1 or more)" in capsys.readouterr().err


def test_template_pattern_matches_its_topics() -> None:
    """The default tail pattern matches every topic the template makes, and no other."""
    pattern = re.compile(template_pattern("geins.{entity}.{action}"))
    assert pattern.match("geins.order.create")
    assert not pattern.match("other.order.create")
    assert not pattern.match("geinsXorder.create")


def test_tail_pattern_is_taken_alone() -> None:
    """Joined with the topics named beside it, a global flag such as (?i) came in the
    middle of the pattern, which Python refuses (a review's find)."""
    assert checked_pattern("(?i)GEINS\\.refund") == "(?i)GEINS\\.refund"
    with pytest.raises(ConfigError, match="not a regular expression"):
        checked_pattern("geins.(")


def test_tail_with_a_named_topic_and_an_inline_flag_pattern_does_not_crash(
    env: pytest.MonkeyPatch,
) -> None:
    """`bridge tail T --pattern '(?i)geins'` was a traceback (re.error): now it runs
    (and, Kafka unreachable here, exits 1)."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "1")
    assert main(["tail", "geins.order.create", "--pattern", "(?i)GEINS\\.refund"]) == 1


def test_tail_with_a_bad_pattern_exits_2_naming_it(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    assert main(["tail", "some.topic", "--pattern", "geins.(order"]) == 2
    assert "--pattern 'geins.(order' is not a regular expression" in capsys.readouterr().err


@pytest.mark.kafka
def test_tail_topics_and_a_pattern(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """bridge tail TOPIC --pattern RE prints the records of both (it used to fail at once:
    a consumer cannot subscribe to names and to a pattern)."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for name in ("named", "matched.1", "other"):
                await producer.send_and_wait(f"{topic_prefix}.{name}", b"{}", key=name.encode())
        finally:
            await producer.stop()

    asyncio.run(produce())
    argv = ["tail", f"{topic_prefix}.named", "--pattern", rf"{topic_prefix}\.matched\."]
    assert main([*argv, "--from-beginning", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "key=named" in out
    assert "key=matched.1" in out
    assert "key=other" not in out
    # --json: a line each, for scripts
    assert main([*argv, "--from-beginning", "--limit", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["topic"], r["key"], r["value"]) for r in records) == [
        (f"{topic_prefix}.matched.1", "matched.1", "{}"),
        (f"{topic_prefix}.named", "named", "{}"),
    ]


async def test_a_tail_goes_on_when_kafka_does_not_answer_a_look_for_new_topics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker stalled longer than BRIDGE_KAFKA_CONNECT_TIMEOUT while tail looks for new
    topics (every 2 s) ended the tail, exit 1 ("no answer within 3 s"): tail runs until
    interrupted. The look is tried again, said once until one works."""
    caplog.set_level("INFO", logger="bridge.kafkaadmin")
    # two looks Kafka does not answer, then one it does
    answers: Iterator[list[Any] | None] = iter([None, None, []])

    class StalledAdmin:
        async def describe_topics(self) -> list[Any]:
            answer = next(answers)
            if answer is None:
                await asyncio.sleep(3600)
            return answer or []

    follow = kafkaadmin._Follower(StalledAdmin(), cast(Any, None), lambda _: True, 0.05)
    for _ in range(3):
        await follow.look_again()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "cannot look for new topics now (no answer within 0.05 s); the tail goes on and looks again"
    ]
    assert "looking for new topics again" in caplog.text


async def test_a_tail_names_the_topics_it_waits_for(caplog: pytest.LogCaptureFixture) -> None:
    """`bridge tail geins.ordr.create` (misspelt) waited in silence, as for a quiet topic:
    a topic named that is not there, and a pattern that matches none, are said at the
    start; a topic that appears later is said when it is followed."""
    caplog.set_level("INFO", logger="bridge.kafkaadmin")
    there = [["geins.order.create"], ["geins.order.create", "geins.ordr.create"]]

    class Admin:
        async def describe_topics(self) -> list[Any]:
            names = there.pop(0) if len(there) > 1 else there[0]
            return [
                {
                    "topic": name,
                    "error_code": 0,
                    "is_internal": False,
                    "partitions": [{"partition": 0}],
                }
                for name in names
            ]

    class Consumer:
        def assign(self, partitions: list[Any]) -> None:
            pass

        async def position(self, partition: Any) -> int:
            return 0

        def seek(self, partition: Any, offset: int) -> None:
            pass

        async def end_offsets(self, partitions: list[Any]) -> dict[Any, int]:
            return dict.fromkeys(partitions, 0)

        async def seek_to_beginning(self, *partitions: Any) -> None:
            pass

    named = ["geins.ordr.create", "geins.order.create"]
    follow = kafkaadmin._Follower(
        Admin(), cast(Any, Consumer()), lambda t: t in named or t.startswith("x."), 1
    )
    await follow.look(new_at_end=True)
    follow.say_what_is_missing(named, r"x\.")
    assert [r.getMessage() for r in caplog.records] == [
        "topic geins.ordr.create does not exist (yet): waiting for it "
        "(bridge topics list shows those there are)",
        r"no topic matches x\. (yet): waiting for one",
    ]
    caplog.clear()
    await follow.look_again()
    assert [r.getMessage() for r in caplog.records] == ["following new topic geins.ordr.create"]
    caplog.clear()
    follow.say_what_is_missing(named, r"geins\.")
    assert caplog.records == []


@pytest.mark.kafka
async def test_tail_prints_every_record_of_a_topic_created_while_tailing(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A topic the pattern matches that appears while tail runs is printed from its first
    record (tail used to start new topics at their end and miss the first ones); a topic
    that was there stays at its end; from the beginning, a new topic prints nothing twice
    (every partition used to start over whenever a topic appeared)."""
    settings = load_settings(environ={"BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap})
    pattern = rf"{re.escape(topic_prefix)}\.tail\."
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()

    async def stop(task: asyncio.Task[int]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def tailing(out: io.StringIO, *, from_beginning: bool) -> asyncio.Task[int]:
        ready = f"ready-{from_beginning}-".encode()
        task = asyncio.create_task(
            tail(settings, [], pattern=pattern, from_beginning=from_beginning, limit=None, out=out)
        )
        for n in range(60):  # it follows the topic that is there once a new record shows
            await producer.send_and_wait(f"{topic_prefix}.tail.early", b"{}", key=ready + b"%d" % n)
            with contextlib.suppress(AssertionError):
                await eventually(lambda: f"key={ready.decode()}" in out.getvalue(), within=0.5)
                return task
        await stop(task)
        raise AssertionError(f"tail printed nothing: {out.getvalue()!r}")

    try:
        await producer.send_and_wait(f"{topic_prefix}.tail.early", b"{}", key=b"old")
        out = io.StringIO()
        task = await tailing(out, from_beginning=False)
        for n in range(4):
            await producer.send_and_wait(f"{topic_prefix}.tail.late", b"{}", key=b"late-%d" % n)
        await eventually(lambda: out.getvalue().count("key=late-") == 4, within=20)
        await stop(task)
        assert "key=old" not in out.getvalue()

        again = io.StringIO()
        task = await tailing(again, from_beginning=True)
        await producer.send_and_wait(f"{topic_prefix}.tail.later", b"{}", key=b"later")
        await eventually(lambda: "key=later" in again.getvalue(), within=20)
        await asyncio.sleep(1)  # time to print anything twice
        await stop(task)
        keys = re.findall(r"key=(\S+)", again.getvalue())
        assert sorted(set(keys)) == sorted(keys)
        assert {"old", "late-0", "late-3", "later"} <= set(keys)
    finally:
        await producer.stop()


@pytest.mark.kafka
def test_topics_create_list_and_tail(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """topics create makes the known topics, list shows them, tail prints what arrived."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    env.setenv("BRIDGE_TOPIC_TEMPLATE", topic_prefix + ".{entity}.{action}")
    env.setenv("BRIDGE_TOKENS", TOKEN)
    assert main(["topics", "create"]) == 0
    assert f"created  {topic_prefix}.order.create" in capsys.readouterr().out
    assert main(["topics", "create", f"{topic_prefix}.order.create"]) == 0
    assert f"exists   {topic_prefix}.order.create" in capsys.readouterr().out
    assert main(["topics", "list"]) == 0
    assert f"{topic_prefix}.refund.create" in capsys.readouterr().out.split()

    with TestClient(create_app(load_settings())) as client:
        response = client.post(
            "/webhooks/geins/Refund/create",
            content=b'{"id":"r-9"}',
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "tail-key"},
        )
        assert response.status_code == 202
    assert main(["tail", f"{topic_prefix}.refund.create", "--from-beginning", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "key=tail-key" in out
    assert "ce_type: com.geins.refund.create" in out
    assert '{"id":"r-9"}' in out


@pytest.mark.kafka
def test_topics_create_makes_the_deadletter_topic(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """topics create makes the dead-letter topic with the event topics (on a broker that
    does not create topics on first use, every refused delivery would be answered 503),
    and none when dead letters are not kept."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    env.setenv("BRIDGE_TOPIC_TEMPLATE", topic_prefix + ".{entity}.{action}")
    env.setenv("BRIDGE_DEADLETTER_TOPIC", topic_prefix + "-dead")
    assert main(["topics", "create"]) == 0
    assert f"created  {topic_prefix}-dead" in capsys.readouterr().out.splitlines()
    env.setenv("BRIDGE_DEADLETTER_TOPIC", "")
    env.setenv("BRIDGE_TOPIC_TEMPLATE", topic_prefix + ".again.{entity}.{action}")
    assert main(["topics", "create"]) == 0
    out = capsys.readouterr().out
    assert f"created  {topic_prefix}.again.order.create" in out
    assert "dead" not in out


@pytest.mark.kafka
def test_topics_create_prints_every_result_when_one_fails(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """topics create good "bad name" creates good, prints both outcomes, exits 1 (it used
    to print only the error, though good was made)."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    assert main(["topics", "create", f"{topic_prefix}.good", f"{topic_prefix} bad"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"failed   {topic_prefix} bad  (")
    assert lines[1:] == [f"created  {topic_prefix}.good"]


@pytest.mark.kafka
def test_topics_create_takes_a_name_given_twice(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """Kafka refuses a request that names a topic twice: "failed (Duplicate topic name)",
    exit 1, for a topic that was there."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    assert main(["topics", "create", f"{topic_prefix}.twice", f"{topic_prefix}.twice"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"created  {topic_prefix}.twice"]


class AdminWithoutCreate:
    """What create_topics asks of Kafka's admin API, from a principal that may describe
    topics but not create them, on a cluster whose brokers 1 and 2 of 3 are up."""

    def __init__(self, **_: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"node_id": 1}, {"node_id": 2}]}

    async def describe_topics(self, topics: list[str] | None = None) -> list[dict[str, Any]]:
        return [{"topic": "there", "partitions": [{"partition": 0, "replicas": [1, 2, 3]}]}]

    async def list_topics(self) -> list[str]:
        return ["there"]

    async def create_topics(self, new: list[Any], timeout_ms: int | None = None) -> Any:
        assert [t.name for t in new] == ["there", "missing"]
        return SimpleNamespace(
            topic_errors=[(t.name, 29, "Authorization failed.") for t in new]  # 29: denied
        )


def test_topics_create_without_the_right_to_create_tells_existing_topics_apart(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka answers "not authorized" to CREATE before it looks whether the topic
    exists: on a cluster where topics are someone else's to make, each existing topic
    was "failed", and the bridge logged an ERROR naming them all at every start."""
    monkeypatch.setattr(kafkaadmin, "AIOKafkaAdminClient", AdminWithoutCreate)
    settings = load_settings(environ={"BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    with pytest.raises(kafkaadmin.TopicsNotCreated) as refused:
        asyncio.run(kafkaadmin.create_topics(settings, ["there", "missing", "there"]))
    assert refused.value.results == {
        "there": "exists",
        "missing": "failed: Authorization failed.",
    }
    assert "brokers 3, which hold replicas, are down" not in caplog.text  # none created


class AdminOfABusyController(AdminWithoutCreate):
    """A controller that answers REQUEST_TIMED_OUT (7) to every creation, and has made
    ``made`` of them by the second listing of the topics."""

    made = ("slow", "slower")

    def __init__(self, **_: Any) -> None:
        self.listings = 0

    async def list_topics(self) -> list[str]:
        self.listings += 1
        return ["there", *(self.made if self.listings > 1 else ())]

    async def create_topics(self, new: list[Any], timeout_ms: int | None = None) -> Any:
        return SimpleNamespace(topic_errors=[(t.name, 7, None) for t in new])


def test_topics_kafka_finishes_creating_after_its_answer_are_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka answers REQUEST_TIMED_OUT for topics it has not finished creating within the
    wait it was given (half of BRIDGE_KAFKA_REQUEST_TIMEOUT: a busy controller), and
    may go on creating them: they were "failed", exit 1, failing a deploy step, for
    topics then made (a review's find). Those Kafka lists within the request timeout
    are created; the others are said to be perhaps still on their way."""
    monkeypatch.setattr(kafkaadmin, "AIOKafkaAdminClient", AdminOfABusyController)
    settings = load_settings(
        environ={"BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9", "BRIDGE_KAFKA_REQUEST_TIMEOUT": "1"}
    )
    with pytest.raises(kafkaadmin.TopicsNotCreated) as refused:
        asyncio.run(kafkaadmin.create_topics(settings, ["slow", "slower", "never"]))
    assert refused.value.results == {
        "slow": "created",
        "slower": "created",
        "never": "failed: Kafka had not finished creating it (it may yet: run bridge "
        "topics create again to see)",
    }


def test_topics_created_while_a_broker_is_down_are_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The default replication factor is min(3, brokers up): with one of three brokers
    down the topics got 2 replicas for good, reported as created and nothing more."""

    class Admin(AdminWithoutCreate):
        async def create_topics(self, new: list[Any], timeout_ms: int | None = None) -> Any:
            assert {t.replication_factor for t in new} == {2}
            return SimpleNamespace(topic_errors=[(t.name, 0, None) for t in new])

    monkeypatch.setattr(kafkaadmin, "AIOKafkaAdminClient", Admin)
    settings = load_settings(environ={"BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    results = asyncio.run(kafkaadmin.create_topics(settings, ["there", "missing"]))
    assert results == {"there": "created", "missing": "created"}
    assert (
        "2 topics created with replication factor 2, the number of brokers up: brokers 3, "
        "which hold replicas, are down" in caplog.text
    )


@pytest.mark.kafka
def test_deadletter_list_and_replay(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """Refused deliveries are listed; after relaxing strict types a replay publishes them."""
    env.setenv("BRIDGE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    env.setenv("BRIDGE_TOPIC_TEMPLATE", topic_prefix + ".{entity}.{action}")
    env.setenv("BRIDGE_DEADLETTER_TOPIC", topic_prefix + ".deadletter")
    env.setenv("BRIDGE_TOKENS", TOKEN)
    env.setenv("BRIDGE_STRICT_TYPES", "true")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(load_settings())) as client:
        novel = client.post(
            f"/webhooks/geins/Voucher/create?token={TOKEN}&id=v1",
            content=b'{"code":"X"}',
            headers={**headers, "x-Idempotency-Key": "novel-1"},
        )
        broken = client.post(
            "/webhooks/geins", content=b"{oops", headers={**headers, "x-Idempotency-Key": "bad-1"}
        )
        # Durable mode: on Kafka a moment after the answers. The broker creates the
        # dead-letter topic on first use, which on a busy machine took longer than the
        # drain at shutdown gives a topic without metadata (they stayed in the spool).
        wait_until(
            lambda: read_all_sync(kafka_bootstrap, topic_prefix + ".deadletter"),
            lambda letters: len(letters) == 2,
            within=30,
            every=0.5,
        )
    assert (novel.status_code, broken.status_code) == (422, 400)

    assert main(["deadletter", "list"]) == 0
    listing = capsys.readouterr().out
    assert "key=novel-1  unknown_event_type" in listing
    assert "key=bad-1  body_not_json" in listing
    assert TOKEN not in listing

    env.setenv("BRIDGE_STRICT_TYPES", "false")
    assert main(["deadletter", "replay", "--dry-run"]) == 1  # one is still refused
    assert main(["deadletter", "replay", "--key", "novel-1"]) == 0
    assert f"accepted -> {topic_prefix}.voucher.create" in capsys.readouterr().out
    records = read_all_sync(kafka_bootstrap, f"{topic_prefix}.voucher")
    [replayed] = records
    assert (replayed.key, replayed.value) == (b"novel-1", b'{"code":"X"}')
    assert dict(replayed.headers)["ce_subject"] == b"v1"


DEAD_TOPIC = "geins.deadletter"


class _Record:
    """A consumed record as kafkaadmin reads it (a class of its own: weakly referable)."""

    def __init__(self, partition: int, offset: int, headers: list[tuple[str, bytes]]) -> None:
        self.topic = DEAD_TOPIC
        self.partition = partition
        self.offset = offset
        self.timestamp = offset * 10 + partition
        self.key: bytes | None = f"k{partition}-{offset}".encode()
        self.value: bytes | None = b'{"code":"X"}'
        self.headers = headers


class FakeDeadLetterTopic:
    """A dead-letter topic of 2 partitions x 1000 records, made as they are fetched (50 at
    a time, fewer when asked for fewer), standing in for the admin client and the consumer
    of bridge.kafkaadmin. It counts the records fetched, and the most held at once by
    anyone when a fetch begins. Each fetch takes ``delay`` seconds; from offset
    ``stall_at`` on, it answers nothing (a Kafka gone quiet)."""

    PARTITIONS, RECORDS, BATCH = 2, 1000, 50
    ODD_ONE = (1, 600)  # the only record refused for another reason

    def __init__(self) -> None:
        letter = novel_voucher_letter(
            DEAD_TOPIC,
            headers=[],
            body=b'{"code":"X"}',
            received_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        self.headers = list(letter.headers)
        self.odd_headers = [
            (n, b"missing_event_type" if n == "x-bridge-reason" else v) for n, v in self.headers
        ]
        self.alive: weakref.WeakSet[_Record] = weakref.WeakSet()
        self.fetched = 0
        self.most_held = 0
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.delay = 0.0
        self.stall_at = sys.maxsize
        self.stall_position_at = sys.maxsize

    def admin(self, **_: object) -> FakeDeadLetterTopic:
        return self

    def consumer(self, *_: object, **__: object) -> FakeDeadLetterTopic:
        return self

    async def start(self) -> None:
        pass

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self.PARTITIONS)) if topic == DEAD_TOPIC else None

    async def close(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def list_topics(self) -> list[str]:
        return [DEAD_TOPIC]

    async def describe_topics(self, topics: object = None) -> list[dict[str, Any]]:
        partitions = [{"partition": p} for p in range(self.PARTITIONS)]
        return [{"topic": DEAD_TOPIC, "error_code": 0, "partitions": partitions}]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(partitions, 0)
        self.paused = set()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions or list(self.positions):
            self.positions[tp] = 0

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, self.RECORDS)

    async def position(self, tp: TopicPartition) -> int:
        if self.positions[tp] >= self.stall_position_at:
            await asyncio.Event().wait()  # aiokafka after an offset reset, Kafka quiet
        return self.positions[tp]

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[_Record]]:
        self.most_held = max(self.most_held, len(self.alive))
        await asyncio.sleep(self.delay)
        asked = [tp for tp in partitions or self.positions if tp not in self.paused]
        if any(self.positions[tp] >= self.stall_at for tp in asked):
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        batches = {}
        room = max_records or self.PARTITIONS * self.BATCH  # in all, as aiokafka counts
        for tp in asked:
            first = self.positions[tp]
            stop = min(first + self.BATCH, first + room, self.RECORDS)
            if first >= stop:
                continue
            room -= stop - first
            batches[tp] = [self._record(tp.partition, offset) for offset in range(first, stop)]
            self.positions[tp] = stop
            self.fetched += stop - first
        return batches

    def _record(self, partition: int, offset: int) -> _Record:
        odd = (partition, offset) == self.ODD_ONE
        record = _Record(partition, offset, self.odd_headers if odd else self.headers)
        self.alive.add(record)
        return record


@pytest.fixture
def dead_topic(env: pytest.MonkeyPatch) -> FakeDeadLetterTopic:
    """bridge.kafkaadmin's Kafka clients replaced by a FakeDeadLetterTopic."""
    topic = FakeDeadLetterTopic()
    env.setenv("BRIDGE_DEADLETTER_TOPIC", DEAD_TOPIC)
    env.setattr(kafkaadmin, "AIOKafkaAdminClient", topic.admin)
    env.setattr(kafkaadmin, "reader", topic.consumer)
    return topic


def test_deadletter_list_holds_only_the_dead_letters_it_shows(
    dead_topic: FakeDeadLetterTopic, capsys: pytest.CaptureFixture[str]
) -> None:
    """list --reason reads the whole topic but keeps only the matches: it used to hold
    every record before filtering (about 4 KB each), so a pod with 512Mi was killed
    at some 100,000 dead letters."""
    assert main(["deadletter", "list", "--reason", "missing_event_type"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("[1]@600   ")
    assert "1 dead letter(s) on" in out.err
    assert dead_topic.fetched == 2000
    assert dead_topic.most_held <= 2 * FakeDeadLetterTopic.BATCH + 1


def shown_positions(out: str) -> list[str]:
    """The [partition]@offset of each dead letter (or replay result) in the output."""
    return [line.split()[0] for line in out.splitlines() if "key=" in line]


def oldest_first(topic: FakeDeadLetterTopic) -> list[str]:
    """Every record of the fake topic as [partition]@offset, by (timestamp, partition,
    offset): the order list promises."""
    records = [(o * 10 + p, p, o) for p in range(topic.PARTITIONS) for o in range(topic.RECORDS)]
    return [f"[{p}]@{o}" for _, p, o in sorted(records)]


def test_deadletter_list_shows_every_dead_letter_holding_a_few_per_partition(
    dead_topic: FakeDeadLetterTopic, capsys: pytest.CaptureFixture[str]
) -> None:
    """list without filters shows the whole topic oldest first while holding a fetch or
    so per partition: it used to read every dead letter into a list and sort it before
    showing any (100,000 dead letters: 321 MB)."""
    assert main(["deadletter", "list"]) == 0
    out = capsys.readouterr()
    assert shown_positions(out.out) == oldest_first(dead_topic)
    assert "2000 dead letter(s) on" in out.err
    assert dead_topic.fetched == 2000
    assert dead_topic.most_held <= 2 * FakeDeadLetterTopic.BATCH + 1


def test_deadletter_replay_takes_every_dead_letter_holding_a_few_per_partition(
    dead_topic: FakeDeadLetterTopic, capsys: pytest.CaptureFixture[str]
) -> None:
    """replay without filters goes through the whole topic oldest first, as list shows
    it, holding a fetch or so per partition (it read them all into a list first too)."""
    assert main(["deadletter", "replay", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert shown_positions(out.out) == oldest_first(dead_topic)
    assert out.out.count(" accepted -> ") == 2000
    assert "2000 would be replayed, 0 still refused" in out.err
    assert dead_topic.most_held <= 2 * FakeDeadLetterTopic.BATCH + 1


def test_deadletter_list_gives_kafka_the_deadline_for_each_answer(
    dead_topic: FakeDeadLetterTopic, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading the dead letters is bounded by three BRIDGE_KAFKA_CONNECT_TIMEOUTs for each
    answer from Kafka, not for the whole topic: a listing taking longer in all (a large
    topic, or a reader such as a pager taking its time) used to be cut off."""
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "0.1")
    dead_topic.delay = 0.03  # each answer in a tenth of the deadline; 20 or more of them
    assert main(["deadletter", "list"]) == 0
    assert shown_positions(capsys.readouterr().out) == oldest_first(dead_topic)


def test_deadletter_list_stops_with_the_deadline_named_when_kafka_goes_quiet(
    dead_topic: FakeDeadLetterTopic, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Kafka that stops answering halfway: what was read is shown, then one line naming
    the deadline, exit 1 (as when it never answers)."""
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "0.1")
    dead_topic.stall_at = 500
    assert main(["deadletter", "list"]) == 1
    out = capsys.readouterr()
    shown = shown_positions(out.out)
    assert shown == oldest_first(dead_topic)[: len(shown)]
    assert "[0]@0" in shown
    assert "[0]@500" not in shown
    assert out.err.splitlines() == [
        "bridge: cannot talk to Kafka at localhost:9092: no answer within 0.3 s"
    ]


def test_deadletter_list_gives_the_position_the_deadline_too(
    dead_topic: FakeDeadLetterTopic, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After records were deleted under it, aiokafka asks Kafka for the position, and
    waits as long as Kafka takes: read outside the deadline, a quiet Kafka then hung
    the command instead of ending it with the deadline's message."""
    env.setenv("BRIDGE_KAFKA_CONNECT_TIMEOUT", "0.1")
    dead_topic.stall_position_at = 500
    assert main(["deadletter", "list"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "bridge: cannot talk to Kafka at localhost:9092: no answer within 0.3 s"
    ]


def test_deadletter_replay_offset_fetches_only_around_the_records_named(
    dead_topic: FakeDeadLetterTopic, capsys: pytest.CaptureFixture[str]
) -> None:
    """replay --offset P:N seeks to each record named instead of reading the topic from
    its start; an offset past the end or on a partition the topic lacks is none, and
    said (exit 1)."""
    offsets = ["--offset", "1:900", "--offset", "0:3", "--offset", "0:1000", "--offset", "5:0"]
    assert main(["deadletter", "replay", "--dry-run", *offsets]) == 1
    captured = capsys.readouterr()
    assert [line.split()[:3] for line in captured.out.splitlines()] == [
        ["[0]@3", "key=k0-3", "accepted"],
        ["[1]@900", "key=k1-900", "accepted"],
    ]
    assert [line.split(" matches ")[0] for line in captured.err.splitlines()[-2:]] == [
        "--offset 0:1000",
        "--offset 5:0",
    ]
    assert dead_topic.fetched == 2 * FakeDeadLetterTopic.BATCH


def test_a_cluster_id_never_looks_like_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    # uuid bytes whose base64url starts with "-" (0xf8...), then ordinary ones
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(int=42)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    cluster_id = devkafka._random_cluster_id()
    assert not cluster_id.startswith("-")
    assert len(cluster_id) == 22


def test_a_reader_that_goes_away_ends_the_tool_quietly() -> None:
    """`bridge tail | head`: the closed pipe is not blamed on Kafka, and exits 0."""
    script = (
        "import sys\n"
        "from bridge import cli\n"
        "def flood(settings, args):\n"
        "    while True:\n"
        "        print('x' * 1000)\n"
        "cli._tail = flood\n"
        "sys.exit(cli.main(['tail']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "BRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:9"},
    )
    assert proc.stdout is not None
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"Kafka" not in err, err


@pytest.mark.kafka
@pytest.mark.parametrize("taken", ["BRIDGE_PORT", "BRIDGE_OPS_PORT"])
def test_serve_on_a_taken_port_exits_2_before_starting(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, taken: str
) -> None:
    """A second `bridge serve` on a port in use exits 2 with one line naming the address,
    having neither started the bridge nor opened the spool (uvicorn binds only after the
    lifespan: the bridge used to connect to Kafka, open the spool and start draining it,
    and only then exit 3 on "address already in use"). The operations port alike."""
    spool = tmp_path / "spool"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
        "BRIDGE_SPOOL_DIR": str(spool),
        "BRIDGE_LOG_FORMAT": "text",  # the last words as people read them
    }
    with socket.socket() as running:  # the bridge already serving there
        running.bind(("127.0.0.1", 0))
        running.listen()
        port = running.getsockname()[1]
        free = iter(free_ports(2))
        ports = {name: str(next(free)) for name in ("BRIDGE_PORT", "BRIDGE_OPS_PORT")}
        ports[taken] = str(port)
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "serve"],
            env=env | ports,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert result.stderr.splitlines()[-1] == (
        f"bridge: cannot listen on 127.0.0.1:{port} (BRIDGE_HOST, {taken}): "
        "the address is already in use (another bridge running?)"
    ), output
    assert "accepting deliveries" not in output
    assert "Traceback" not in output
    assert not spool.exists(), "the spool was opened"


#: A sitecustomize for a `bridge serve` under test: writes gc.get_freeze_count() to
#: $FROZEN_REPORT once objects are frozen.
FREEZE_WATCH = """
import gc, os, threading, time

def watch(report=os.environ["FROZEN_REPORT"]):
    while not gc.get_freeze_count():
        time.sleep(0.02)
    with open(report + ".part", "w") as out:  # whole when the test sees it
        out.write(str(gc.get_freeze_count()))
    os.replace(report + ".part", report)

threading.Thread(target=watch, daemon=True).start()
"""


def test_serve_leaves_its_start_up_objects_out_of_full_collections(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Once it serves, the bridge's start-up objects are frozen (gc.freeze): a full
    collection walked all of them, the event loop standing still 35-46 ms under load."""
    (tmp_path / "sitecustomize.py").write_text(FREEZE_WATCH)
    report = tmp_path / "frozen"
    env = {
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": "memory",
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "FROZEN_REPORT": str(report),
    }
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
        assert wait_until(report.exists, bool, within=10, every=0.05), bridge.log()
        assert int(report.read_text() or 0) > 10_000


def test_two_bridges_binding_at_the_same_instant_cannot_both_hold_the_port() -> None:
    """The second of two bridges started together is refused when it binds, not after
    its startup: with SO_REUSEADDR two sockets may share a port while neither listens,
    so sockets bound but not yet listening let both bridges start, connect to Kafka and
    drain, and only then one of them failed inside uvicorn."""
    first = listening_sockets("127.0.0.1", 0)
    second: list[socket.socket] = []
    try:
        with pytest.raises(ConfigError, match="already in use"):
            second = listening_sockets("127.0.0.1", first[0].getsockname()[1])
    finally:
        for sock in first + second:
            sock.close()


def test_bridge_host_ipv6_any_serves_ipv4_clients_too() -> None:
    """BRIDGE_HOST=:: listened on IPv6 only (V6ONLY, as asyncio sets it), so IPv4
    clients, IPv4 probes included, could not connect, while the README and the
    guards take them to arrive as ::ffff:a.b.c.d."""
    try:
        sockets = listening_sockets("::", 0)
    except ConfigError:
        pytest.skip("no IPv6 here")
    try:
        (server,) = sockets
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, peer = server.accept()
            accepted.close()
        assert peer[0] == "::ffff:127.0.0.1"
    finally:
        for sock in sockets:
            sock.close()


def test_check_config_to_a_full_disk_says_so(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`bridge check-config > settings.json` on a full disk said "cannot talk to Kafka
    at ...", a command that never talks to Kafka (a review's find)."""
    env.setenv("BRIDGE_TOKENS", "a-long-enough-token-here")
    env.setenv("BRIDGE_SPOOL_DIR", str(tmp_path))
    with open("/dev/full", "w") as full:
        env.setattr(sys, "stdout", full)
        assert main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert "bridge: cannot write to stdout: [Errno 28] No space left on device" in err, err


@pytest.mark.parametrize("ack", ["broker", "memory", "durable"])
def test_check_config_tells_of_a_durable_spool_another_mode_publishes(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, ack: str
) -> None:
    """Switching BRIDGE_ACK away from durable over a spool that may still hold events:
    check-config said nothing of it (serve publishes them in the background now)."""
    (tmp_path / "spool.db").write_bytes(b"")
    env.setenv("BRIDGE_TOKENS", "a-long-enough-token-here")
    env.setenv("BRIDGE_SPOOL_DIR", str(tmp_path))
    env.setenv("BRIDGE_ACK", ack)
    assert main(["check-config"]) == 0
    *err, _ = capsys.readouterr().err.splitlines()
    if ack == "durable":
        assert err == []
    else:
        assert err == [
            f"warning: {tmp_path / 'spool.db'} is a durable bridge's spool: the events it "
            f"may still hold are published by serve with BRIDGE_ACK={ack}, in the background"
        ]


def test_check_config_does_not_promise_a_spool_folder_it_cannot_look_into(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A BRIDGE_SPOOL_DIR it may not look into (simulated: the tests run as root) was
    said to hold a spool serve publishes, which serve then cannot open."""
    real_exists = Path.exists

    def exists(self: Path) -> bool:
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self)

    env.setattr(Path, "exists", exists)
    env.setenv("BRIDGE_TOKENS", "a-long-enough-token-here")
    env.setenv("BRIDGE_SPOOL_DIR", str(tmp_path))
    env.setenv("BRIDGE_ACK", "broker")
    assert main(["check-config"]) == 0
    *err, _ = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: {tmp_path / 'spool.db'} cannot be looked into (Permission denied): if a "
        "durable bridge's spool is there, serve with BRIDGE_ACK=broker cannot publish it"
    ]


def test_check_config_refuses_a_spool_a_newer_version_wrote(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A rollback over a spool a newer bridge wrote passed check-config, then serve
    refused to start (durable) or left the spool unpublished (the other modes). Told
    now, the way serve tells it, without a file made in the folder."""

    async def left_by_a_newer_bridge(delivered: bool, version: int = 2) -> None:
        spool = Spool(tmp_path, max_bytes=10**6, dedup_window=60)
        spool.open()
        destination = Destination(topic="geins.order.create", key=b"k", value=b"{}", headers=[])
        assert await spool.append(destination, "k")
        if delivered:
            await spool.remove([r.seq for r in await spool.oldest(10, 10**6)])
        await spool.close()
        connection = sqlite3.connect(tmp_path / "spool.db")
        connection.execute(f"PRAGMA user_version = {version}")
        connection.close()  # the last connection: -wal and -shm go with it

    asyncio.run(left_by_a_newer_bridge(delivered=False))
    files = sorted(tmp_path.iterdir())
    env.setenv("BRIDGE_TOKENS", "a-long-enough-token-here")
    env.setenv("BRIDGE_SPOOL_DIR", str(tmp_path))
    assert main(["check-config"]) == 2
    said = (
        f"spool file {tmp_path / 'spool.db'} was written by a newer version of the bridge "
        "(spool schema 2; this one knows 1) and may hold accepted events"
    )
    assert said in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == files
    env.setenv("BRIDGE_ACK", "broker")
    assert main(["check-config"]) == 0
    err = capsys.readouterr().err
    assert said in err
    assert "serve with BRIDGE_ACK=broker does not publish what it may hold" in err
    for name in files:
        name.unlink()
    asyncio.run(left_by_a_newer_bridge(delivered=True))
    env.setenv("BRIDGE_ACK", "durable")
    assert main(["check-config"]) == 2
    assert "holds no event: to go back to this version" in capsys.readouterr().err
    (tmp_path / "spool.db").unlink()
    (tmp_path / "spool.db").write_bytes(b"not a database")  # serve's open says what is wrong
    assert main(["check-config"]) == 0
    # A newer version killed before its first checkpoint: its version is in the
    # write-ahead log alone, which serve reads and check-config read past (a review's
    # test)
    (tmp_path / "spool.db").unlink()
    asyncio.run(left_by_a_newer_bridge(delivered=False, version=1))
    subprocess.run(
        [sys.executable, "-c", "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1], "
         "isolation_level=None); c.execute('PRAGMA journal_mode=WAL'); "
         "c.execute('PRAGMA user_version = 2'); os._exit(0)", str(tmp_path / "spool.db")],
        check=True,
    )  # fmt: skip
    assert (tmp_path / "spool.db-wal").stat().st_size > 0
    assert main(["check-config"]) == 2
    assert "(spool schema 2; this one knows 1) and may hold" in capsys.readouterr().err
    # (after: its close checkpoints the log into the file)
    with pytest.raises(SpoolUnusable, match="written by a newer version"):  # as serve does
        Spool(tmp_path, max_bytes=10**6, dedup_window=60).connect()


@pytest.mark.parametrize("ack", ["broker", "memory", "durable"])
def test_check_config_refuses_a_log_without_its_spool_file_as_serve_does(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, ack: str
) -> None:
    """A spool.db-wal with content beside a missing spool.db stops serve (durable), or
    keeps it from publishing the log (the other modes); check-config passed it, and
    promised the other modes would publish it (a review's find)."""
    wal = tmp_path / "spool.db-wal"
    wal.write_bytes(b"\x37\x7f\x06\x82" + bytes(4000))
    env.setenv("BRIDGE_TOKENS", "a-long-enough-token-here")
    env.setenv("BRIDGE_SPOOL_DIR", str(tmp_path))
    env.setenv("BRIDGE_ACK", ack)
    said = f"spool file {tmp_path / 'spool.db'} is missing or empty, but its write-ahead log"
    if ack == "durable":
        assert main(["check-config"]) == 2
        assert said in capsys.readouterr().err
        assert [p.name for p in tmp_path.iterdir()] == ["spool.db-wal"]  # nothing made
        with pytest.raises(SpoolUnusable, match="missing or empty"):  # as serve does
            Spool(tmp_path, max_bytes=10**6, dedup_window=60).connect()
    else:
        assert main(["check-config"]) == 0
        err = capsys.readouterr().err
        assert said in err
        assert f"serve with BRIDGE_ACK={ack} does not publish what it may hold" in err


def _write(bootstrap: str, topic: str, count: int, size: int) -> None:
    async def write() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2_000_000)
        await producer.start()
        try:
            for n in range(count):
                await producer.send_and_wait(topic, b"x" * size, key=f"k{n}".encode())
        finally:
            await producer.stop()

    asyncio.run(write())


@pytest.mark.kafka
def test_tail_from_beginning_goes_on_from_the_oldest_record_left_after_retention(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Retention deleting the oldest records while `tail --from-beginning` is still
    before them: aiokafka's default offset reset (latest) jumps to the end of the
    partition, silently leaving out every record still on Kafka after those deleted
    (deadletter list guards against exactly this with auto_offset_reset=earliest)."""
    topic = f"{topic_prefix}.order.create"
    _write(kafka_bootstrap, topic, 60, 100_000)  # 6 MB: aiokafka fetches 1 MiB at a time
    settings = load_settings(
        environ={"BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap, "BRIDGE_TOKENS": "x" * 32}
    )
    shown: list[int] = []

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("---"):
                offset = int(text.split("@")[1].split(maxsplit=1)[0])
                if not shown:  # the first fetch is in: delete up to 40, as retention does
                    delete_before(kafka_bootstrap, TopicPartition(topic, 0), 40)
                shown.append(offset)
            return len(text)

    async def run() -> None:
        task = asyncio.create_task(
            kafkaadmin.tail(
                settings, [topic], pattern=None, from_beginning=True, limit=None, out=Out()
            )
        )
        for _ in range(200):  # at most 20 s
            await asyncio.sleep(0.1)
            if 59 in shown:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    # The records still on Kafka, 40..59, are all shown after what was read before.
    assert list(range(40, 60)) == [o for o in shown if o >= 40], str(shown)


def _admin_call(bootstrap: str, action: str, topic: str) -> list[str]:
    async def call() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            if action == "delete":
                await admin.delete_topics([topic])
                return []
            listed: list[str] = await admin.list_topics()
            return listed
        finally:
            await admin.close()

    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # from the tail's event loop
        topics: list[str] = thread.submit(asyncio.run, call()).result()
    return topics


@pytest.mark.kafka
def test_a_tail_does_not_bring_back_a_topic_deleted_while_it_follows_it(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator deletes a topic (an old template's) while `bridge tail` follows it
    (any topic the default pattern matches): the tail's consumer asks Kafka for the
    metadata of the topic it is assigned, which a broker that creates topics on first
    use (Apache Kafka's default) takes as a request to create it again, with the
    broker's defaults (1 partition, 1 replica), not the bridge's. A tool that only
    reads recreated the topic; `tail` itself looks with describe_topics() of all
    topics precisely so that it "creates none"."""
    topic = f"{topic_prefix}.old.create"
    _write(kafka_bootstrap, topic, 1, 10)
    settings = load_settings(
        environ={"BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap, "BRIDGE_TOKENS": "x" * 32}
    )

    looked = asyncio.Event()
    look_again = kafkaadmin._Follower.look_again

    async def look_again_said(self: Any) -> None:
        await look_again(self)
        looked.set()

    async def next_look() -> None:
        looked.clear()
        await looked.wait()

    async def run() -> list[str]:
        out = io.StringIO()
        task = asyncio.create_task(
            kafkaadmin.tail(
                settings, [topic], pattern=None, from_beginning=True, limit=None, out=out
            )
        )
        # following it: its consumer fetched the record
        await eventually(lambda: "key=k0" in out.getvalue(), within=30, what="the record")
        # Deleted just after one of the looks (every 2 s) for new topics, as it may be:
        # the tail's consumer goes on fetching the topic until the next look.
        await next_look()
        await asyncio.to_thread(_admin_call, kafka_bootstrap, "delete", topic)
        # Two more looks: the consumer fetched the deleted topic (asking Kafka for its
        # metadata) until the first, and after the second it follows it no more, unless
        # it was made again meanwhile.
        await next_look()
        await next_look()
        there = await asyncio.to_thread(_admin_call, kafka_bootstrap, "list", topic)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return there

    monkeypatch.setattr(kafkaadmin._Follower, "look_again", look_again_said)
    assert topic not in asyncio.run(run())


def test_sigterm_stops_an_operator_command_with_its_exit_status(tmp_path: Path) -> None:
    """Handled, not left to the default action: a container's PID 1 (`docker run ...
    bridge tail`) never got a SIGTERM, which the kernel drops for it, and the tail ran
    on until SIGKILL (a review's note). Here: exit 143, not killed by the signal."""
    silent = socket.create_server(("127.0.0.1", 0))  # connects, and never answers
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_KAFKA_BOOTSTRAP": f"127.0.0.1:{silent.getsockname()[1]}",
        "BRIDGE_KAFKA_CONNECT_TIMEOUT": "60",
    }
    errors = tmp_path / "stderr"
    with silent, errors.open("w") as stderr:
        tail_process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "tail"], env=env, stderr=stderr
        )
        try:
            time.sleep(3)  # imported, and trying to reach Kafka
            tail_process.send_signal(signal.SIGTERM)
            code = tail_process.wait(timeout=30)
        finally:
            tail_process.kill()
    assert code == 128 + signal.SIGTERM, errors.read_text()


@pytest.mark.parametrize(
    ("encoding", "text"),
    [("latin-1", "Жук"), ("latin-1", "Party 🎉 pack"), ("ascii", "Café")],
    ids=["latin1-cyrillic", "latin1-emoji", "ascii-e-acute"],
)
def test_a_json_line_stays_json_on_a_stdout_that_cannot_encode_it(
    monkeypatch: pytest.MonkeyPatch, encoding: str, text: str
) -> None:
    """backslashreplace wrote \\U0001f389 and \\xe9, which are no JSON escapes: a
    `tail --json` line was no JSON (a review's test)."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding)
    monkeypatch.setattr(sys, "stdout", out)
    cli_module._escape_what_stdout_cannot_encode()  # as main() does, but for serve
    value = json.dumps({"name": text}, ensure_ascii=False).encode()
    record = SimpleNamespace(
        topic="geins.product.update",
        partition=0,
        offset=1,
        timestamp=1_700_000_000_000,
        key=b"k",
        headers=[],
        value=value,
    )
    print(kafkaadmin.record_json(record))  # as `bridge tail --json` prints a record
    out.flush()
    assert json.loads(raw.getvalue().decode(encoding))["value"] == value.decode()


def test_a_machine_error_that_stops_serve_is_not_said_as_kafkas(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An OSError that ends serve is the machine's (a file, a folder): serve deals with
    Kafka's failures itself. It was said as "cannot talk to Kafka at ...", which sent
    the operator after Kafka (a review: an inherited PROMETHEUS_MULTIPROC_DIR's missing
    folder); the operator tools' are still Kafka's."""
    settings = load_settings(environ={"BRIDGE_TOKENS": "t" * 16, "BRIDGE_LOG_FORMAT": "text"})
    missing = FileNotFoundError(2, "No such file or directory", "/gone/counter_1.db")
    assert cli_module._exit_code(missing, settings, serving=True) == 1
    err = capsys.readouterr().err
    assert "cannot talk to Kafka" not in err, err
    assert "the bridge stopped: [Errno 2] No such file or directory" in err, err
    assert cli_module._exit_code(ConnectionRefusedError(111, "refused"), settings) == 1
    assert "cannot talk to Kafka" in capsys.readouterr().err
