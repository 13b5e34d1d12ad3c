"""Dead letters: authenticated deliveries refused for their content, kept for an operator.

A delivery that fails parsing (not JSON, entity/action missing or malformed,
unknown type in strict mode) still gets its 4xx, and its raw body goes to the
dead-letter topic with the reason and the request's metadata, so nothing an
authenticated sender sent is silently gone. Credentials are scrubbed first:
the query parameters that carry a credential (``token``, ``api_key``, ``password``, ...:
bridge.geins.CREDENTIAL_PARAMETERS), headers whose names say they carry one, and
any other header holding a token the bridge has used (see :mod:`bridge.redaction`)
never reach Kafka; a token in the path, the detail or a query value is replaced by
``<token>``. The body is kept as it came, as an event's is published.
``bridge deadletter replay`` rebuilds the delivery from such a record: it reads the
method, the path's entity and action, the query, and the headers x-Idempotency-Key
and x-Timestamp, none of which a credential needs.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode

import orjson

from bridge.errors import KAFKA_REJECTED, BridgeError
from bridge.geins import (
    IDEMPOTENCY_HEADER,
    TIMESTAMP_HEADER,
    Delivery,
    is_credential_parameter,
    key_problem,
    key_text,
)
from bridge.redaction import Redactor
from bridge.routing import Destination

#: Request headers that carry credentials; never stored.
CREDENTIAL_HEADERS = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"x-api-key", b"x-apikey"}
)
#: Words that make a header name look like a credential's (``x-auth-token``,
#: ``x-forwarded-access-token``, ``ocp-apim-subscription-key``, ``x-goog-iap-jwt-assertion``,
#: ``x-hub-signature-256``, ``set-cookie``...): such headers are never stored either.
CREDENTIAL_WORDS = (
    b"auth",
    b"token",
    b"key",
    b"secret",
    b"passw",
    b"passphrase",
    b"cookie",
    b"session",
    b"signature",
    b"hmac",
    b"jwt",
    b"assertion",
    b"credential",
    b"bearer",
    b"saml",
    b"csrf",
    b"xsrf",
    b"principal",
)
#: Headers stored although a credential word is in their names: replays need them.
KEPT_HEADERS = frozenset({IDEMPOTENCY_HEADER})


def is_credential_header(name: bytes) -> bool:
    """Whether a request header of this name is left out of dead letters for its name."""
    name = name.lower().replace(b"_", b"-")
    if name in KEPT_HEADERS:
        return False
    return name in CREDENTIAL_HEADERS or any(word in name for word in CREDENTIAL_WORDS)


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
            (PREFIX + "reason", KAFKA_REJECTED.encode()),
            (PREFIX + "detail", detail.encode()),
            (PREFIX + "original-topic", event.topic.encode()),
        ],
    )


def dead_letter(
    delivery: Delivery, error: BridgeError, topic: str, secrets: Redactor
) -> Destination:
    """The dead-letter record for a delivery refused with ``error``, without the tokens
    ``secrets`` knows: credential headers and headers holding one are left out, and a
    token in the path, the query or the detail is replaced by a marker. A path segment
    holding one is no entity or action: its ``path-entity`` or ``path-action`` header
    is left out, so that a replay reads them from the query or the body."""
    # A list, not an object: a repeated header (two different x-Timestamp values, which
    # parsing trusts neither of) must come back as it came. Each [name, value], with how
    # the value's bytes were read where the pair alone would not give them back (see
    # _stored_entry): without it, bytes that were not UTF-8 came back as UTF-8, and
    # UTF-8 that reads as latin-1 mojibake ("Ã©") as other bytes, a key among them (a
    # replay then published it under another key).
    headers = [
        _stored_entry(name, value)
        for name, value in delivery.headers
        if not is_credential_header(name)
        and not secrets.contains_bytes(value)
        and not secrets.contains_bytes(name)
    ]
    query = [
        (secrets.redact(n), secrets.redact(v))
        for n, v in delivery.query
        if not is_credential_parameter(n)
    ]
    record_headers: list[tuple[str, bytes]] = [
        (PREFIX + "reason", error.reason.encode()),
        (PREFIX + "status", str(error.status).encode()),
        (PREFIX + "detail", secrets.redact(error.detail).encode()),
        (PREFIX + "method", secrets.redact(delivery.method).encode()),
        (PREFIX + "path", secrets.redact(delivery.path).encode()),
        # Percent-encoded as the bridge reads a query (a space as %20, a '+' as %2B),
        # so the URL `deadletter list` shows means the same pasted back; replay's
        # form decoding reads it (and the '+' for a space of older dead letters) alike.
        (PREFIX + "query", urlencode(query, quote_via=quote).encode()),
        (PREFIX + "received-at", delivery.received_at.isoformat().encode()),
        (PREFIX + "request-headers", orjson.dumps(headers)),
    ]
    entity, action = delivery.path_entity, delivery.path_action
    # Neither is kept when only the segments together, as sent, hold a token (one
    # with a '/', spanning both or ending in the trailing '/'): each is part of it.
    segments = delivery.path_segments
    split = (
        segments is not None
        and secrets.contains(segments)
        and not (entity is not None and secrets.contains(entity))
        and not (action is not None and secrets.contains(action))
    )
    for name, segment in (("path-entity", entity), ("path-action", action)):
        if segment is not None and not split and not secrets.contains(segment):
            record_headers.append((PREFIX + name, segment.encode()))
    return Destination(
        topic=topic,
        key=(delivery_key(delivery, secrets) or str(uuid.uuid4())).encode(),
        value=delivery.body,
        headers=record_headers,
    )


#: Headers a replay reads as they came; any other header's URL query loses its credentials.
REPLAYED_HEADERS = frozenset({IDEMPOTENCY_HEADER, TIMESTAMP_HEADER})
#: A URL's query in a header value (x-original-url, x-forwarded-uri, referer...): from
#: its '?' to a fragment, a space or the end.
_URL_QUERY = re.compile(r"\?([^#\s]*)")


def _stored_entry(name: bytes, value: bytes) -> list[str]:
    """A request header as its dead letter keeps it: [name, value], or [name, value,
    encoding] where the pair would not give the value's bytes back (bytes that are not
    UTF-8, UTF-8 that reads as mojibake; see header_bytes). Pairs wherever they do (any
    ASCII value): a bridge rolled back to a version that reads only pairs reads those
    dead letters, where every triple made each one "not a dead letter it can read"."""
    text, encoding = _header_kept(name, value)
    entry = [name.decode("latin-1").lower(), text]
    if header_bytes(text) != text.encode(encoding):
        entry.append(encoding)
    return entry


def _header_kept(name: bytes, value: bytes) -> tuple[str, str]:
    """A header's value as its dead letter keeps it, and how its bytes were read
    (:func:`header_text`): a URL's query in it (a proxy's x-original-url, a referer)
    without the parameters that carry a credential, as the request's own query is
    kept; the headers a replay reads, as they came."""
    text, encoding = header_text(value)
    if "?" not in text or name.lower() in REPLAYED_HEADERS:
        return text, encoding
    return _URL_QUERY.sub(_query_without_credentials, text), encoding


def _query_without_credentials(query: re.Match[str]) -> str:
    kept = [
        pair
        for pair in query.group(1).split("&")
        if not is_credential_parameter(unquote_plus(pair.partition("=")[0]))
    ]
    return "?" + "&".join(kept) if any(kept) else ""


def header_text(value: bytes) -> tuple[str, str]:
    """A request header's value as a dead letter keeps it, in JSON, and the encoding it
    was read with: UTF-8 as UTF-8 (as sent, for whoever reads it), other bytes one
    latin-1 character each. Read as latin-1 throughout, a UTF-8 key arrived as
    mojibake: "ключ" as its bytes' latin-1 reading, "Ðº…"."""
    try:
        return value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return value.decode("latin-1"), "latin-1"


def header_bytes(text: str) -> bytes:
    """The bytes of a header value kept by the versions that stored no encoding with it
    (a pair, not a triple): those that read every value as latin-1, and those that read
    it as :func:`header_text` does. A value whose latin-1 bytes are UTF-8 is such
    an older reading of UTF-8 (written by header_text, it would have been read as UTF-8
    already, unless the sender's own text was mojibake)."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")  # beyond latin-1: header_text read it as UTF-8
    if raw.isascii():
        return raw
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        # "é" as header_text reads UTF-8; also a byte sent as latin-1, which comes back
        # as UTF-8: the same key all the same (key_text reads both as "é")
        return text.encode("utf-8")
    return raw


def delivery_key(delivery: Delivery, secrets: Redactor) -> str | None:
    """The delivery's idempotency key when usable (a dead letter keeps it, so replays
    and Geins retries are recognised), None when there is none, it is unusable, or it
    holds a token ``secrets`` knows."""
    for name, value in delivery.headers:
        if name.lower() == IDEMPOTENCY_HEADER and not secrets.contains_bytes(value):
            key = key_text(value.decode("latin-1"))
            # The rule parsing applies, so that a key the event would have kept is
            # the dead letter's key too.
            if key and key_problem(key) is None:
                return key
    return None


def _stored_header(entry: Sequence[str]) -> tuple[bytes, bytes]:
    """A request header as a dead letter holds it: [name, value, encoding], or the
    [name, value] of the versions before (see header_bytes)."""
    if len(entry) == 3:  # [name, value, encoding]
        name, text, encoding = entry
        if encoding not in {"utf-8", "latin-1"}:
            raise ValueError(f"a request header read as {encoding!r}")
        return name.encode("latin-1"), text.encode(encoding)
    name, text = entry
    return name.encode("latin-1"), header_bytes(text)


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
    received_at = (
        datetime.fromisoformat(fields[PREFIX + "received-at"])
        if PREFIX + "received-at" in fields
        else datetime.now(UTC)
    )
    if received_at.tzinfo is None:  # the bridge writes UTC, with its offset
        raise ValueError(f"{PREFIX}received-at has no UTC offset")
    return Delivery(
        method=fields.get(PREFIX + "method", "POST"),
        path=fields.get(PREFIX + "path", ""),
        path_entity=fields.get(PREFIX + "path-entity"),
        path_action=fields.get(PREFIX + "path-action"),
        query=parse_qsl(fields.get(PREFIX + "query", ""), keep_blank_values=True),
        headers=[_stored_header(entry) for entry in pairs],
        body=body,
        received_at=received_at,
    )
