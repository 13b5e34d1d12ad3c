"""logs: JSON lines with structured fields; one line per refused delivery, no secrets."""

from __future__ import annotations

import json
import logging

import pytest
from starlette.testclient import TestClient

from bridge.app import create_app
from bridge.config import load_settings
from bridge.logs import JsonFormatter, TextFormatter
from tests.fakes import TOKEN, FakePublisher


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
    ours = [r for r in caplog.records if r.name.startswith("bridge")]  # not the test client's
    everything = "\n".join(JsonFormatter().format(r) for r in ours)
    assert TOKEN not in everything
