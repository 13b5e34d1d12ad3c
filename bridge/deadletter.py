"""Dead letters: authenticated deliveries refused for their content, kept for an operator.

A delivery that fails parsing (not JSON, entity/action missing or malformed,
unknown type in strict mode) still gets its 4xx, and its raw body goes to the
dead-letter topic with the reason and the request's metadata, so nothing an
authenticated sender sent is silently gone. Credentials are scrubbed first:
the ``token`` query parameter, credential headers, and any other header or
query value that contains a token the bridge accepts never reach Kafka.
``bridge deadletter replay`` rebuilds the delivery from such a record.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

import orjson

from bridge.errors import BridgeError
from bridge.geins import (
    IDEMPOTENCY_HEADER,
    SECRET_QUERY_PARAMS,
    Delivery,
    key_problem,
    key_text,
)
from bridge.routing import Destination

#: Request headers that carry credentials; never stored.
CREDENTIAL_HEADERS = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"x-api-key", b"x-apikey"}
)
PREFIX = "x-bridge-"
#: What :func:`set_aside` adds to an event that Kafka refused for good; the event's own
#: headers come before them, its own ``x-bridge-*`` ones (``key-generated``,
#: ``time-source``) included.
SET_ASIDE_HEADERS = frozenset({PREFIX + "reason", PREFIX + "detail", PREFIX + "original-topic"})


def set_aside(event: Destination, detail: str, topic: str) -> Destination:
    """The ``kafka_rejected`` dead letter, on ``topic``, of an event Kafka refused for
    good (``detail`` says why): the event's record as it was, with SET_ASIDE_HEADERS."""
    return Destination(
        topic=topic,
        key=event.key,
        value=event.value,
        headers=[
            *event.headers,
            (PREFIX + "reason", b"kafka_rejected"),
            (PREFIX + "detail", detail.encode()),
            (PREFIX + "original-topic", event.topic.encode()),
        ],
    )


def dead_letter(
    delivery: Delivery, error: BridgeError, topic: str, tokens: Sequence[str]
) -> Destination:
    """The dead-letter record for a delivery refused with ``error``; ``tokens`` are
    the tokens accepted now (values that contain one are left out)."""
    secrets = [t.encode() for t in tokens if t]
    # A list of [name, value] pairs, not an object: a repeated header (two different
    # x-Timestamp values, which parsing trusts neither of) must come back as it came.
    headers = [
        [name.decode("latin-1").lower(), value.decode("latin-1")]
        for name, value in delivery.headers
        if name.lower() not in CREDENTIAL_HEADERS and not any(s in value for s in secrets)
    ]
    query = [
        (n, v)
        for n, v in delivery.query
        if n.lower() not in SECRET_QUERY_PARAMS and not any(s in v.encode() for s in secrets)
    ]
    record_headers: list[tuple[str, bytes]] = [
        (PREFIX + "reason", error.reason.encode()),
        (PREFIX + "status", str(error.status).encode()),
        (PREFIX + "detail", error.detail.encode()),
        (PREFIX + "method", delivery.method.encode()),
        (PREFIX + "path", delivery.path.encode()),
        (PREFIX + "query", urlencode(query).encode()),
        (PREFIX + "received-at", delivery.received_at.isoformat().encode()),
        (PREFIX + "request-headers", orjson.dumps(headers)),
    ]
    if delivery.path_entity is not None:
        record_headers.append((PREFIX + "path-entity", delivery.path_entity.encode()))
    if delivery.path_action is not None:
        record_headers.append((PREFIX + "path-action", delivery.path_action.encode()))
    return Destination(
        topic=topic,
        key=(delivery_key(delivery, tokens) or str(uuid.uuid4())).encode(),
        value=delivery.body,
        headers=record_headers,
    )


def delivery_key(delivery: Delivery, tokens: Sequence[str]) -> str | None:
    """The delivery's idempotency key when usable (a dead letter keeps it, so replays
    and Geins retries are recognised), None when there is none, it is unusable, or it
    contains one of ``tokens``."""
    secrets = [t.encode() for t in tokens if t]
    for name, value in delivery.headers:
        if name.lower() == IDEMPOTENCY_HEADER and not any(s in value for s in secrets):
            key = key_text(value.decode("latin-1"))
            # The rule parsing applies, so that a key the event would have kept is
            # the dead letter's key too.
            if key and key_problem(key) is None:
                return key
    return None


def delivery_from_dead_letter(headers: Sequence[tuple[str, bytes | None]], body: bytes) -> Delivery:
    """Rebuild the original delivery (minus credentials) from a dead-letter record."""
    fields = {
        name: value.decode()
        for name, value in headers
        if name.startswith(PREFIX) and value is not None  # Kafka allows null values
    }
    stored = orjson.loads(fields.get(PREFIX + "request-headers", "[]"))
    # Dead letters kept before the list form hold an object (one value per name).
    pairs = stored.items() if isinstance(stored, dict) else stored
    return Delivery(
        method=fields.get(PREFIX + "method", "POST"),
        path=fields.get(PREFIX + "path", ""),
        path_entity=fields.get(PREFIX + "path-entity"),
        path_action=fields.get(PREFIX + "path-action"),
        query=parse_qsl(fields.get(PREFIX + "query", ""), keep_blank_values=True),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs],
        body=body,
        received_at=datetime.fromisoformat(fields[PREFIX + "received-at"])
        if PREFIX + "received-at" in fields
        else datetime.now(UTC),
    )
