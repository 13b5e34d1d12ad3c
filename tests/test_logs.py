"""logs: JSON lines with structured fields; one line per refused delivery, no secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import warnings
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.message_accumulator import MessageAccumulator
from aiokafka.producer.transaction_manager import TransactionManager
from aiokafka.structs import TopicPartition
from starlette.testclient import TestClient

from bridge import ingress, logs, publisher
from bridge.app import create_app
from bridge.config import load_settings
from bridge.errors import (
    BridgeError,
    SpoolFull,
    Unauthorized,
    Unavailable,
    UnsupportedTransferCoding,
)
from bridge.ingress import NO_WEBHOOK_ROUTE
from bridge.logs import JsonFormatter, TextFormatter
from bridge.redaction import LOGGED_LENGTH, MARKER, Redactor
from tests.fakes import TOKEN, FakePublisher, call_asgi


def record(fields: dict[str, object] | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("bridge.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    if fields is not None:
        rec.fields = fields
    return rec


def test_json_lines_carry_fields() -> None:
    """A record becomes one JSON object with time, level, logger, message and the fields."""
    line = json.loads(JsonFormatter().format(record({"key": "k1", "status": 400})))
    assert line["message"] == "hello you"
    assert (line["level"], line["logger"], line["key"], line["status"]) == (
        "info",
        "bridge.x",
        "k1",
        400,
    )
    assert line["time"].endswith("+00:00")


def test_text_lines_append_fields() -> None:
    """The text format is for people: fields follow the message as key=value."""
    assert TextFormatter().format(record({"key": "k1"})).endswith("hello you key=k1")


def test_text_lines_cannot_be_forged() -> None:
    """Control characters from a client (a path with %0A, which uvicorn decodes) are
    escaped, and values that could pass for another field are quoted: a record is one
    line, with the fields it was given."""
    forged = "/webhooks/geins/x\n2026-11-29 12:00:00,000 ERROR bridge.auth: leaked"
    rec = logging.LogRecord("bridge.x", logging.INFO, __file__, 1, "refused %s", (forged,), None)
    rec.fields = {"path": forged, "detail": "a b=c", "key": "k\x1b[2J\u202e", "status": 400}
    text = TextFormatter().format(rec)
    assert "\n" not in text
    assert text.endswith(
        "refused /webhooks/geins/x\\n2026-11-29 12:00:00,000 ERROR bridge.auth: leaked"
        ' path="/webhooks/geins/x\\n2026-11-29 12:00:00,000 ERROR bridge.auth: leaked"'
        ' detail="a b=c" key="k\\x1b[2J\\u202e" status=400'
    )


def test_text_tracebacks_are_indented() -> None:
    """A traceback keeps its lines, indented, so only records start a line."""
    try:
        raise ValueError("bad\n2026-11-29 12:00:00,000 ERROR forged")
    except ValueError:
        rec = logging.LogRecord("bridge.x", logging.ERROR, __file__, 1, "oops", (), sys.exc_info())
    first, *rest = TextFormatter().format(rec).split("\n")
    assert first.endswith("ERROR bridge.x: oops")
    assert rest[0] == "    Traceback (most recent call last):"
    assert rest[-1] == "    2026-11-29 12:00:00,000 ERROR forged"
    assert all(line.startswith("    ") for line in rest)


def test_a_forged_path_stays_on_its_refusal_line(caplog: pytest.LogCaptureFixture) -> None:
    """End to end: a refused request whose path holds a line break logs one line."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    app = create_app(settings, publisher=FakePublisher())
    forged = "/webhooks/geins/Order\n2026-11-29 12:00:00,000 ERROR bridge.auth: token leaked"
    caplog.set_level(logging.INFO)
    response = asyncio.run(call_asgi(app, "POST", forged, body_chunks=[b"{}"]))
    assert response.status == 401
    [refusal] = [r for r in caplog.records if r.getMessage().startswith("delivery refused")]
    line = TextFormatter().format(refusal)
    assert "\n" not in line
    assert 'path="/webhooks/geins/Order\\n2026-11-29 12:00:00,000 ERROR' in line


def test_refusals_and_access_log_are_structured(caplog: pytest.LogCaptureFixture) -> None:
    """A refused delivery logs key, entity, action, reason; the access log logs each request;
    neither carries the token, even when it was in the query string."""
    settings = load_settings(
        environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker", "BRIDGE_ACCESS_LOG": "true"}
    )
    caplog.set_level(logging.INFO)
    with TestClient(create_app(settings, publisher=FakePublisher())) as client:
        client.post(
            f"/webhooks/geins/Voucher/create?token={TOKEN}&strict=1",
            content=b"{bad",
            headers={"x-Idempotency-Key": "k-9"},
        )
        client.post(
            "/webhooks/geins/Order/create",
            content=b"{}",
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "k-10"},
        )
    refusals = [r for r in caplog.records if r.getMessage().startswith("delivery refused")]
    [refusal] = refusals
    assert refusal.fields == {  # type: ignore[attr-defined]  # set through extra=
        "method": "POST",
        "path": "/webhooks/geins/Voucher/create",
        "key": "k-9",
        "status": 400,
        "reason": "body_not_json",
        "detail": refusal.fields["detail"],  # type: ignore[attr-defined]
    }
    access = [r for r in caplog.records if r.name == "bridge.access"]
    fields = [r.fields for r in access]  # type: ignore[attr-defined]  # set through extra=
    assert [f["outcome"] for f in fields] == ["rejected", "accepted"]
    assert fields[1]["entity"] == "Order"
    # a refusal's reason; none on an accepted line (it said "reason=None" in text)
    assert [f.get("reason", "-") for f in fields] == ["body_not_json", "-"]
    ours = [r for r in caplog.records if r.name.startswith("bridge")]  # not the test client's
    everything = "\n".join(JsonFormatter().format(r) for r in ours)
    assert TOKEN not in everything


def test_a_long_path_is_logged_cut_with_no_part_of_a_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refusal logs the first kilobyte of an 8 KB path, marked as cut; a token across
    the cut is replaced whole. (It was redacted whole, then again by the log's filter:
    a 404 of 8 KB cost 2 ms of the event loop, a 414 of 17 KB 11 ms, and neither needs
    a token.) The 404's detail no longer repeats the path, which was redacted again."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker"})
    app = create_app(settings, publisher=FakePublisher())
    head = "/webhooks/geins/a/b/"
    path = head + "." * (1024 - len(head) - 4) + TOKEN + "%41" * 2300
    caplog.set_level(logging.INFO)
    assert asyncio.run(call_asgi(app, "POST", path)).status == 404
    [refusal] = [r for r in caplog.records if r.getMessage().startswith("delivery refused")]
    fields = refusal.fields  # type: ignore[attr-defined]  # set through extra=
    shown, _, rest = fields["path"].partition("…")
    assert re.fullmatch(r"\(cut: \d+ characters\)", rest)
    assert len(shown) <= 1024 + len(MARKER)
    assert TOKEN[:4] not in shown
    assert fields["detail"] == NO_WEBHOOK_ROUTE
    assert fields["path"].startswith(head + "....")
    assert MARKER in fields["path"]


def test_a_refusal_redacts_its_path_once_for_both_its_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The refusal's line and its access line show the same redacted path, redacted
    once: a review's path of 2,700 '%' cost 2 ms of CPU a 401, redacted three times
    (the 404's detail held the path too)."""
    calls: list[str] = []
    logged = Redactor.logged

    def counted(self: Redactor, text: str, limit: int = LOGGED_LENGTH) -> str:
        calls.append(text)
        return logged(self, text, limit)

    monkeypatch.setattr(Redactor, "logged", counted)
    settings = load_settings(
        environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker", "BRIDGE_ACCESS_LOG": "true"}
    )
    app = create_app(settings, publisher=FakePublisher())
    caplog.set_level(logging.INFO)
    for path in ("/webhooks/geins/" + "%" * 2700, "/webhooks/geins/a/b/c/" + "%" * 2700):
        calls.clear()
        assert asyncio.run(call_asgi(app, "POST", path)).status in {401, 404}
        assert calls.count(path) == 1, len(calls)


def test_the_filter_does_not_redact_again_what_its_redactor_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line whose fields were redacted as they were made (a refusal's, the access
    log's) says by which Redactor: the log's filter redacts them again only when that
    was another one."""
    secrets, other = Redactor([TOKEN]), Redactor([TOKEN])
    redacted: list[str] = []
    redact = secrets.redact

    def spied(text: str) -> str:
        redacted.append(text)
        return redact(text)

    monkeypatch.setattr(secrets, "redact", spied)
    for by, again in ((secrets, False), (other, True), (None, True)):
        line = record({"path": "/webhooks/geins/a/b/c"})
        if by is not None:
            setattr(line, logs.REDACTED_WITH, by.logged)
        redacted.clear()
        assert logs.Redacting(secrets).filter(line)
        assert ("/webhooks/geins/a/b/c" in redacted) == again


def test_webhook_404_and_rate_limit_log_one_info_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A webhook URL that matches no route (a webhook set up wrong) logs its
    refusal; a rate-limited client is logged at INFO, so it cannot flood the log
    at WARNING."""
    settings = load_settings(
        environ={
            "BRIDGE_TOKENS": TOKEN,
            "BRIDGE_ACK": "broker",
            "BRIDGE_RATE_LIMIT": "0.5",
            "BRIDGE_RATE_BURST": "1",
        }
    )
    app = create_app(settings, publisher=FakePublisher())
    auth = [(b"authorization", f"Bearer {TOKEN}".encode())]
    caplog.set_level(logging.INFO)
    statuses = [
        asyncio.run(call_asgi(app, "POST", path, headers=auth, body_chunks=[b"{}"])).status
        for path in ("/webhooks/geins/a/b/c", "/webhooks/geins/a/b/c")
    ]
    assert statuses == [404, 429]
    lines = [r for r in caplog.records if r.getMessage().startswith("delivery refused")]
    assert [(r.levelno, r.fields["reason"]) for r in lines] == [  # type: ignore[attr-defined]
        (logging.INFO, "not_found"),
        (logging.INFO, "rate_limited"),
    ]
    assert lines[0].fields["path"] == "/webhooks/geins/a/b/c"  # type: ignore[attr-defined]


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def test_a_path_cannot_add_fields_to_text_lines(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path with spaces and '=' (a decoded %20) stays inside the quoted path field of
    the text format: on the access line, the refusal line and a 500's line, nothing
    outside quotes says outcome=accepted or key=forged."""
    settings = load_settings(
        environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker", "BRIDGE_ACCESS_LOG": "true"}
    )
    app = create_app(settings, publisher=FakePublisher())
    forged = "/webhooks/geins/order/create outcome=accepted key=forged"
    caplog.set_level(logging.INFO)
    assert asyncio.run(call_asgi(app, "POST", forged, body_chunks=[b"{}"])).status == 401

    def broken(*_: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ingress, "read_body", broken)
    authorized = [(b"authorization", f"Bearer {TOKEN}".encode())]
    response = asyncio.run(call_asgi(app, "POST", forged, headers=authorized, body_chunks=[b"{}"]))
    assert response.status == 500
    lines = [TextFormatter().format(r) for r in caplog.records if r.name.startswith("bridge")]
    assert len(lines) == 4  # refusal and access line of the 401, traceback and access of the 500
    for line in lines:
        head = line.splitlines()[0]
        assert 'path="/webhooks/geins/order/create outcome=accepted key=forged"' in head
        unquoted = _QUOTED.sub('""', head)
        assert "outcome=accepted" not in unquoted
        assert "key=forged" not in unquoted


def test_aiokafkas_repeated_errors_pass_once_a_minute() -> None:
    """During an outage aiokafka logs each retry at ERROR (a reviewer counted 195
    such lines in 20 s for one waiting event); each of its messages passes once per
    AIOKAFKA_REPEAT_SECONDS, whatever its arguments. The bridge's own lines pass."""
    once = logs.OncePerInterval("aiokafka", 60)

    def passes(name: str, msg: str, at: float, *args: object) -> bool:
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)
        record.created = at
        return once.filter(record)

    assert passes("aiokafka.conn", "Unable connect to node with id %s: %s", 0.0, 1, "x")
    assert not passes("aiokafka.conn", "Unable connect to node with id %s: %s", 30.0, 2, "y")
    assert passes("aiokafka.client", "Unable to update metadata from %s", 31.0, 1)
    assert passes("aiokafka.conn", "Unable connect to node with id %s: %s", 61.0, 1, "x")
    for at in (0.0, 1.0, 2.0):
        assert passes("bridge.drainer", "records for %s are held back", at, "t")
        assert passes("aiokafkaesque", "not aiokafka's", at)


def test_aiokafkas_unknown_topic_error_is_a_warning() -> None:
    """The first event of a new type makes aiokafka log, at ERROR, that Kafka does not
    know its topic, while a broker that creates topics on first use creates it: an
    operator grepping for errors found one for every new event type."""
    record = logging.LogRecord(
        "aiokafka.cluster",
        logging.ERROR,
        __file__,
        1,
        "Topic %s not found in cluster metadata",
        ("geins.order.create",),
        None,
    )
    assert logs.demote_unknown_topic(record)
    assert (record.levelno, record.levelname) == (logging.WARNING, "WARNING")
    other = logging.LogRecord(
        "aiokafka.cluster", logging.ERROR, __file__, 1, "Topic %s is not authorized", ("t",), None
    )
    assert logs.demote_unknown_topic(other)
    assert other.levelno == logging.ERROR


async def test_aiokafkas_error_as_a_producer_ends_is_no_error_traceback() -> None:
    """A producer closed during an outage: its sender task's done-callback fails in
    aiokafka 0.14 (TransactionManager.fatal_error on a non-transactional producer),
    and so does a batch's (the set of pending batches no longer holds it), which the
    loop logged as ERROR tracebacks, read as a crash. They are logged at DEBUG; any
    other uncaught exception still reaches the loop's handler."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        publisher.quiet_aiokafka_sender_end(loop)
        publisher.quiet_aiokafka_sender_end(loop)  # once per loop, however many publishers
        with pytest.raises(AttributeError) as noise:
            TransactionManager(None, 60000).fatal_error(RuntimeError("the sender died"))
        loop.call_exception_handler({"message": "Sender._fail_all", "exception": noise.value})
        # A batch's done-callback when the producer is force-closed while Kafka hangs
        # (a review saw several at ERROR): the pending batch is gone already.
        accumulator = MessageAccumulator(None, 16384, 0, 30)
        partition = TopicPartition("t", 0)
        sent = await accumulator.add_message(partition, b"k", b"v", 1)
        batch = accumulator._pop_batch(partition)
        accumulator._pending_batches.discard(batch)
        batch.failure(KafkaTimeoutError())
        await asyncio.sleep(0)
        for failed in (batch.future, sent):  # retrieved, as the bridge's senders do
            assert isinstance(failed.exception(), KafkaTimeoutError)
        ours = AttributeError("'NoneType' object has no attribute 'done'")
        loop.call_exception_handler({"message": "a bug of ours", "exception": ours})
        assert [c["exception"] for c in seen] == [ours]
    finally:
        loop.set_exception_handler(None)


def test_no_line_names_a_token_whoever_logs_it() -> None:
    """The serving bridge's handler filter (logs.redact_with) replaces every token its
    authenticator has used in each line's message, fields and traceback, whoever logs
    it: a topic held back that a token names, the Kafka client, a traceback."""
    hex_token = "0123456789abcdef" * 4
    secrets = Redactor([hex_token, "old-token"])
    secrets.use([hex_token])  # old-token is retired: still kept out
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonFormatter().format(record))

    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logs.redact_with(Redactor(["replaced-token"]))
        logs.redact_with(secrets)  # replaces the first filter
        assert sum(isinstance(f, logs.Redacting) for f in handler.filters) == 1
        held = logging.getLogger("bridge.drainer")
        held.warning("records for %s are held back", f"geins.{hex_token}.create")
        held.warning("plain", extra={"fields": {"key": "r4-old-token", "n": 3, "p": None}})
        try:
            raise ValueError(f"a value of old%2Dtoken and {hex_token}")
        except ValueError:
            logging.getLogger("aiokafka").exception("failed for %s", hex_token)
    finally:
        for each in root.handlers:  # pytest's too
            for added in [f for f in each.filters if isinstance(f, logs.Redacting)]:
                each.removeFilter(added)
        root.removeHandler(handler)
    parsed = [json.loads(line) for line in lines]
    assert parsed[0]["message"] == "records for geins.<token>.create are held back"
    assert (parsed[1]["key"], parsed[1]["n"], parsed[1]["p"]) == ("r4-<token>", 3, None)
    assert parsed[2]["message"] == "failed for <token>"
    assert "a value of <token> and <token>" in parsed[2]["exception"]
    text = "\n".join(lines)
    assert hex_token not in text
    assert "old-token" not in text
    assert "old%2Dtoken" not in text


def test_the_bridges_own_refusals_are_a_warning_once_a_minute_per_reason(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every refused delivery still logs its line, but a 503 is a WARNING once a minute
    for each reason, INFO in between: in an outage every delivery is refused alike (a
    reviewer counted 1,705 WARNING lines in 7 minutes at 4 requests a second). A
    client's refusals stay INFO."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # as bridge.ingress reads it
    caplog.set_level(logging.INFO, logger="bridge.ingress")
    scope = {"method": "POST", "path": "/webhooks/geins"}

    def refuse(error: BridgeError) -> None:
        ingress.log_refusal(error, scope, lambda text, *_: text)

    for seconds in (0, 1, 59):  # one minute of Kafka away
        now[0] = 1000.0 + seconds
        refuse(Unavailable("Kafka did not answer"))
    refuse(SpoolFull("the spool is full"))  # another trouble: said at once
    refuse(Unauthorized("no token"))
    refuse(UnsupportedTransferCoding("gzip"))  # a 5xx, but the client's request earns it
    now[0] = 1060.0  # a minute after the first WARNING
    refuse(Unavailable("Kafka did not answer"))
    lines = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("delivery refused")
    ]
    assert lines == [
        ("WARNING", "delivery refused: unavailable"),
        ("INFO", "delivery refused: unavailable"),
        ("INFO", "delivery refused: unavailable"),
        ("WARNING", "delivery refused: spool_full"),
        ("INFO", "delivery refused: unauthorized"),
        ("INFO", "delivery refused: unsupported_transfer_coding"),
        ("WARNING", "delivery refused: unavailable"),
    ]


def test_a_json_line_may_name_a_path_that_is_not_utf8() -> None:
    """A byte that is not UTF-8 in a path (a surrogate, as the environment gives it)
    made orjson refuse the line: "--- Logging error ---" for every line naming the
    spool folder, and a traceback for a folder that could not be used (a review's
    test). Written as the escape \\udcff instead."""
    record = logging.LogRecord(
        "bridge.spool", logging.INFO, __file__, 1,
        "spool: events are kept in the folder %s", ("/data/sp\udcffool",), None,
    )  # fmt: skip
    record.fields = {"path": "/data/sp\udcffool", "count": 3}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "spool: events are kept in the folder /data/sp\\udcffool"
    assert line["path"] == "/data/sp\\udcffool"
    assert line["count"] == 3


def test_a_python_warning_is_a_line_of_the_log_s_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A library's RuntimeWarning went to stderr as Python writes it, two bare lines in
    a log of JSON lines (which a collector parsing JSON drops or fails on)."""
    root = logging.getLogger()
    kept = root.handlers[:], root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # as in the bridge (the suite's: error)
            # Another test's configure may have turned it on already, and pytest has put
            # its own recorder in place since: off first, so that configure's takes.
            logging.captureWarnings(False)
            logs.configure("info", "json")
            warnings.warn("coroutine 'x' was never awaited", RuntimeWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:], level = kept
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["level"] == "warning"
    assert "coroutine 'x' was never awaited" in line["message"]
