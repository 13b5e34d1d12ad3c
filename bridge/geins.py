"""What Geins sends, and how a delivery becomes an :class:`Event`.

Pure functions over plain data (no web framework): the entity/action table
from the Geins documentation, and :func:`parse_delivery`, which reads entity,
action, idempotency key, timestamp and subject out of the path, the query, the
headers and the body, the way ``shared/geins-webhooks.md`` says they can arrive.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson

from bridge.errors import (
    BadIdempotencyKey,
    BodyNotJson,
    MalformedEventType,
    MissingEventType,
    UnknownEventType,
)

#: Entity (PascalCase, as Geins spells it) -> its actions. From the Geins docs;
#: Geins adds to this list over time, so names outside it are not rejected
#: unless the operator asks for strict types.
ENTITY_ACTIONS: Mapping[str, tuple[str, ...]] = {
    "Brand": ("create", "update", "delete"),
    "Capture": ("create",),
    "Category": ("create", "update", "delete"),
    "Customer": ("create", "update", "delete", "passwordreset", "obfuscate"),
    "Order": (
        "create",
        "update",
        "cancel",
        "activate",
        "lock",
        "complete",
        "cancelrow",
        "return",
    ),
    "PageWidget": ("update", "delete"),
    "Product": ("create", "update", "delete"),
    "Refund": ("create",),
    "Supplier": ("create", "update", "delete"),
    "ProductMonitor": ("create", "notify"),
}

_CANONICAL_ENTITY = {name.lower(): name for name in ENTITY_ACTIONS}
KNOWN_ACTIONS: frozenset[str] = frozenset(a for acts in ENTITY_ACTIONS.values() for a in acts)
_KNOWN_PAIRS = frozenset((e, a) for e, acts in ENTITY_ACTIONS.items() for a in acts)

#: A well-formed entity or action name: what a topic name can safely carry.
NAME_PATTERN = re.compile(r"[A-Za-z0-9]{1,64}")
MAX_KEY_LENGTH = 200
#: What a CloudEvents string may not hold (CloudEvents 1.0, type String): the C0 and C1
#: control characters and the Unicode noncharacters. The key is the record's ce_id, the
#: entity id(s) its ce_subject; a consumer forwarding the event over HTTP cannot put
#: them in a header.
_NOT_IN_CE_STRINGS = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff]")
# The noncharacters past the first plane, apart: listed in one class with the others,
# they made every character's test about ten times slower (0.1 s for a 1 MB id).
_ASTRAL_NONCHARACTERS = re.compile(
    "["
    + "".join(
        chr(plane + 0xFFFE) + chr(plane + 0xFFFF) for plane in range(0x10000, 0x110000, 0x10000)
    )
    + "]"
)


def _no_ce_string(text: str) -> bool:
    """Whether ``text`` holds a character no CloudEvents string may (see above)."""
    if _NOT_IN_CE_STRINGS.search(text) is not None:
        return True
    return (
        not text.isascii()
        and max(text) > "\uffff"
        and _ASTRAL_NONCHARACTERS.search(text) is not None
    )


# RFC 3339 date-time; fromisoformat alone also takes dates and naive times.
# (an offset's hours 00-23 and minutes 00-59: fromisoformat read +05:99 as +06:39)
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    re.ASCII,
)
# A placeholder Geins did not substitute, e.g. a literal "{{id}}".
_UNSUBSTITUTED = re.compile(r"\{\{\s*\w+\s*\}\}")

_UTF8_BOM = b"\xef\xbb\xbf"
# UTF-32 first: its little-endian mark begins with UTF-16's.
_WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)

IDEMPOTENCY_HEADER = b"x-idempotency-key"
TIMESTAMP_HEADER = b"x-timestamp"
#: Query parameters that carry a credential: the webhook token, and those where a
#: gateway or a cloud service takes one in the URL (OAuth's ``access_token``, Azure API
#: Management's ``subscription-key``, an Azure SAS ``sig``, AWS's presigned URLs).
#: Never published nor kept in dead letters. By exact name (``_`` read as ``-``), not
#: by the words that mark credential headers: ``author=`` or a template's own
#: ``orderKey={{id}}`` are the event's data.
CREDENTIAL_PARAMETERS = frozenset(
    {
        "token",  # the webhook token's own
        "access-token",
        "id-token",
        "refresh-token",
        "auth-token",
        "api-token",
        "private-token",
        "subscription-key",
        "api-key",
        "apikey",
        "x-api-key",
        "access-key",
        "client-secret",
        "password",
        "secret",
        "signature",
        "sig",
        "hmac",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "auth",
        "authorization",
        "jwt",
    }
)


def is_credential_parameter(name: str) -> bool:
    """Whether a query parameter of this name carries a credential."""
    return name.lower().replace("_", "-") in CREDENTIAL_PARAMETERS


# Not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__, three times slower, and this is made once per request.
# Treat instances as read-only.
@dataclass(slots=True)
class Delivery:
    """The parts of one HTTP delivery that matter, free of any web framework.

    ``headers`` is the ASGI header list (lower-case names, raw bytes);
    ``query`` the decoded query parameters in order.
    """

    method: str
    path: str
    path_entity: str | None
    path_action: str | None
    query: Sequence[tuple[str, str]]
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes
    received_at: datetime

    @property
    def path_segments(self) -> str | None:
        """Entity and action as the path gave them, '/' between, and the trailing '/'
        the routes let go of (None without either): a token that holds a '/' (a
        base64 one) may span them, or end in that last '/'."""
        entity, action = self.path_entity, self.path_action
        if entity is None:
            return None
        segments = entity if action is None else f"{entity}/{action}"
        return segments + "/" if self.path.endswith("/") else segments


@dataclass(slots=True)  # read-only by convention (see above)
class Event:
    """A validated Geins event, ready to be routed."""

    entity: str  # canonical PascalCase when known, else as sent
    action: str  # lower case
    known_type: bool
    key: str
    key_generated: bool
    time: datetime  # aware, UTC
    time_from_header: bool
    raw_key: str | None  # the x-Idempotency-Key header as sent
    raw_timestamp: str | None  # the x-Timestamp header as sent
    subject: str | None  # the entity id(s), when the delivery names them
    account: str | None
    environment: str | None
    value: bytes  # what is published: the body as received, or a JSON object


def parse_delivery(
    delivery: Delivery,
    *,
    strict_types: bool = False,
    redact: Callable[[str], str] | None = None,
) -> Event:
    """Turn a delivery into an :class:`Event`, or raise a :class:`BridgeError`.

    Entity and action come from the path, then the query, then the top-level
    body fields (names matched case-insensitively; a blank query value counts
    as absent). A non-empty body must be a
    JSON object whatever the Content-Type says; an empty body publishes the query
    parameters as a JSON object instead. ``redact`` (the webhook tokens'
    :meth:`~bridge.redaction.Redactor.redact`) keeps tokens out of the detail of a
    refusal that shows what was sent, before it is cut to length.
    """
    query = _fields(delivery.query)
    body_fields: dict[str, Any]
    body = delivery.body
    if body[:3] == _UTF8_BOM:
        # RFC 8259 lets a parser ignore a byte order mark (and .NET writers add one);
        # consumers get the JSON without it, since many of their parsers refuse it.
        body = body[3:]
    if body.strip(_JSON_WHITESPACE):
        body_fields = _parse_body(body, len(delivery.body) - len(body))
        value = body
    else:
        body_fields = {}
        value = b""  # built below, once entity and action are known

    entity_raw = _pick("entity", delivery.path_entity, query, body_fields)
    action_raw = _pick("action", delivery.path_action, query, body_fields)
    entity, action, known = _resolve_type(
        entity_raw, action_raw, strict_types=strict_types, redact=redact
    )

    if not value:
        value = _query_object(delivery.query, entity, action)

    key, key_generated, raw_key = _idempotency_key(delivery.headers)
    time, time_from_header, raw_timestamp = _timestamp(delivery.headers, delivery.received_at)
    return Event(
        entity=entity,
        action=action,
        known_type=known,
        key=key,
        key_generated=key_generated,
        time=time,
        time_from_header=time_from_header,
        raw_key=raw_key,
        raw_timestamp=raw_timestamp,
        subject=_subject(_query_ids(delivery.query) or _pick("id", None, query, body_fields)),
        account=_optional_text(_pick("account", None, query, body_fields)),
        environment=_optional_text(_pick("environment", None, query, body_fields)),
        value=value,
    )


def _query_ids(query: Sequence[tuple[str, str]]) -> list[str] | None:
    """Every ``id`` of a query that repeats it (``?id=1&id=2``), for the subject: the
    first alone hid the others, where the value (see _query_object) lists them all.
    None for a query with one ``id`` or none, which _pick reads as before."""
    if len(query) < 2:
        return None
    ids = [v for n, v in query if n.lower() == "id"]
    if len(ids) < 2:
        return None
    # A blank one counts as absent wherever it is: `?id=&id=5` is 5, as `?id=5&id=` is
    return [v for v in ids if _filled(v)] or None


def _fields(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased name -> first value given (see _filled; else the first), for
    case-insensitive look-ups: `?action=&action=create` is create, as `?action=create&
    action=` is, not a blank action that hid it (a 422)."""
    fields: dict[str, str] = {}
    for name, value in pairs:
        lowered = name.lower()
        if lowered not in fields or (not _filled(fields[lowered]) and _filled(value)):
            fields[lowered] = value
    return fields


def _parse_body(body: bytes, skipped: int = 0) -> dict[str, Any]:
    """The body's top-level fields (names lower-cased, the last of a name kept, as
    JSON parsers keep it); ``skipped``: bytes before ``body`` in what was sent (a byte
    order mark), for the offsets an error names."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        encoding = _wide_encoding(body)
        if encoding is not None:
            raise BodyNotJson(
                f"the body is {encoding}; JSON between systems must be UTF-8 (RFC 8259)"
            ) from None
        # orjson refuses a few documents RFC 8259 allows (numbers beyond a double,
        # such as 1e400); the standard library decides before we refuse an event.
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as bad:  # orjson's message names neither that nor where
            raise BodyNotJson(
                f"the body is not UTF-8 (byte {body[bad.start]:#04x} at offset "
                f"{skipped + bad.start}); "
                "JSON between systems must be UTF-8 (RFC 8259)"
            ) from None
        try:
            parsed = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise BodyNotJson(f"the body is not valid JSON ({exc})") from None
        try:  # the other thing orjson refuses: a \u escape of a lone UTF-16 surrogate
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BodyNotJson(
                "the body escapes a lone UTF-16 surrogate (such as \\ud800), which is "
                "no Unicode character and cannot be published as text"
            ) from None
    if not isinstance(parsed, dict):
        raise BodyNotJson(
            f"the body is JSON but a {type(parsed).__name__}, not an object; "
            "a Geins body template must produce a JSON object"
        )
    # The last of a name wins, whatever its case: JSON parsers keep the last of two
    # equal names (orjson, the json module, a consumer's Jackson), so the first of
    # `entity`/`Entity` but the last of `entity`/`entity` routed the event.
    fields = {str(k).lower(): v for k, v in parsed.items()}
    if any(_maybe_inexact(fields.get(name)) for name in _EXACT_NUMBERS):
        # A whole number read as a double past 2**53 may not be the number written:
        # orjson reads an integer past 64 bits as one, and 18446744073709551616 and
        # ...617 became one ce_subject (a review's find). Read again, those fields
        # only, exactly: the standard library's integers have no bound, and a
        # fraction is a Decimal (see _optional_text). Rare: a body of floats read
        # twice took 133 ms for 1 MB.
        try:
            exact = json.loads(body, parse_float=Decimal, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):  # an integer past int_max_str_digits
            return fields  # the doubles, then
        for name, value in exact.items():
            if str(name).lower() in _EXACT_NUMBERS:
                fields[str(name).lower()] = value
    return fields


#: The body fields that become text (ce_subject, topic names): their numbers are read
#: exactly (see _parse_body).
_EXACT_NUMBERS = ("id", "account", "environment")

#: JSON's whitespace (RFC 8259): bytes.strip() also takes a form feed or vertical tab,
#: and a body of one was taken for no body (accepted, published bodiless).
_JSON_WHITESPACE = b" \t\r\n"


def _maybe_inexact(value: object) -> bool:
    """Whether ``value`` holds a double that may be a whole number other than the one
    written (past 2**53, where doubles no longer hold every whole number)."""
    if isinstance(value, list):
        return any(_maybe_inexact(item) for item in value)
    return isinstance(value, float) and value.is_integer() and abs(value) >= 2**53


def _wide_encoding(body: bytes) -> str | None:
    """UTF-16 or UTF-32 by its byte order mark, or by the zero bytes around the
    first ASCII character (RFC 4627's detection), else None."""
    for mark, name in _WIDE_BOMS:
        if body.startswith(mark):
            return name
    head = body[:4]
    if len(head) == 4 and head.count(0):
        if head[:3] == b"\0\0\0" or head[1:] == b"\0\0\0":
            return "UTF-32"
        if head[0] == 0 or head[1] == 0:
            return "UTF-16"
    return None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _pick(name: str, from_path: str | None, query: dict[str, str], body: dict[str, Any]) -> Any:
    # A blank query value counts as absent, and so does a placeholder left as it
    # was: Geins does not say whether one it has no value for becomes nothing
    # (`?action=`) or stays literal (`?action={{action}}`), and neither may hide
    # the body's value.
    if from_path is not None:
        return from_path
    value = query.get(name)
    if value is not None and _filled(value):
        return value
    return body.get(name)


def _filled(value: str) -> bool:
    """Whether a query value counts as given: neither blank nor a placeholder left as it
    was (see _pick)."""
    return bool(value.strip()) and not _is_placeholder(value)


def _is_placeholder(text: str) -> bool:
    return "{{" in text and _UNSUBSTITUTED.fullmatch(text.strip()) is not None


def _resolve_type(
    entity_raw: Any,
    action_raw: Any,
    *,
    strict_types: bool,
    redact: Callable[[str], str] | None = None,
) -> tuple[str, str, bool]:
    if (
        type(entity_raw) is str  # exact str (not a subclass): cacheable
        and type(action_raw) is str
        and len(entity_raw) <= CACHED_TEXT_LENGTH
        and len(action_raw) <= CACHED_TEXT_LENGTH
    ):
        try:
            return _resolve_names(entity_raw, action_raw, strict_types)
        except (MalformedEventType, UnknownEventType):
            if redact is None:
                raise
        # refused: once more, for a detail without tokens
    return _resolve_type_uncached(entity_raw, action_raw, strict_types=strict_types, redact=redact)


#: The longest text the caches below keep as a key: a name (64 characters at most) or
#: a timestamp, with a few spaces around it. Spaces and tabs around a name are no part
#: of it, so a sender padded one to hundreds of kilobytes, and the cache kept 1,024
#: such keys (some 1 GB) long after the events were published (a review's test).
CACHED_TEXT_LENGTH = 80


# The same few dozen event types arrive again and again; a refused pair raises
# and is not cached.
@lru_cache(maxsize=1024)
def _resolve_names(entity_raw: str, action_raw: str, strict_types: bool) -> tuple[str, str, bool]:
    return _resolve_type_uncached(entity_raw, action_raw, strict_types=strict_types)


def _resolve_type_uncached(
    entity_raw: Any,
    action_raw: Any,
    *,
    strict_types: bool,
    redact: Callable[[str], str] | None = None,
) -> tuple[str, str, bool]:
    # Spaces and tabs around a name are no part of it (a template's "{{action}} ", a
    # query's action=create%20), as around the id, the key and the account: they were
    # a 422.
    if isinstance(entity_raw, str):
        entity_raw = entity_raw.strip(" \t")
    if isinstance(action_raw, str):
        action_raw = action_raw.strip(" \t")
    missing = [n for n, v in (("entity", entity_raw), ("action", action_raw)) if v in (None, "")]
    if missing:
        raise MissingEventType(
            f"no {' and no '.join(missing)} found in the path, the query or the body; "
            "put {{entity}} and {{action}} in the webhook's URL or body template"
        )
    for name, raw in (("entity", entity_raw), ("action", action_raw)):
        if not isinstance(raw, str) or not NAME_PATTERN.fullmatch(raw):
            shown = _shown(raw, redact)
            raise MalformedEventType(f"{name} {shown} is not a name of 1 to 64 letters and digits")
    entity = _CANONICAL_ENTITY.get(entity_raw.lower(), entity_raw)
    action = action_raw.lower()
    known = (entity, action) in _KNOWN_PAIRS
    if not known and strict_types:
        shown = f"{entity}/{action}" if redact is None else redact(f"{entity}/{action}")
        unknown = UnknownEventType(
            f"{shown} is not a known Geins event type and strict types are on (BRIDGE_STRICT_TYPES)"
        )
        unknown.names = (entity, action)
        try:
            raise unknown
        finally:
            del unknown  # else frame -> exception -> traceback -> frame (see Spool.append)
    return entity, action, known


def _shown(raw: Any, redact: Callable[[str], str] | None) -> str:
    """``raw`` as a refusal's detail shows it: JSON, its tokens redacted, then cut to
    80 characters (after: a token cut in two would no longer be recognised)."""
    if redact is not None and isinstance(raw, str):
        raw = redact(raw)
    shown = orjson.dumps(raw).decode() if _jsonable(raw) else repr(raw)
    return (shown if redact is None else redact(shown))[:80]


def _jsonable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def _query_object(query: Sequence[tuple[str, str]], entity: str, action: str) -> bytes:
    """The JSON object published for a delivery without a body (a GET, usually)."""
    obj: dict[str, str | list[str]] = {}
    for name, value in query:
        if is_credential_parameter(name):
            continue
        previous = obj.get(name)
        if previous is None:
            obj[name] = value
        elif isinstance(previous, list):
            previous.append(value)
        else:
            obj[name] = [previous, value]
    for name in [n for n in obj if n.lower() in _ROUTED_BY]:
        given = obj[name]
        if not any(_filled(v) for v in (given if isinstance(given, list) else [given])):
            # Blank, or a placeholder left as it was: absent, as routing took it. Kept,
            # the value said "action": "{{action}}" of an event routed as create.
            del obj[name]
    lowered = {name.lower() for name in obj}
    if "entity" not in lowered:
        obj["entity"] = entity
    if "action" not in lowered:
        obj["action"] = action
    return orjson.dumps(obj)


#: The query parameters an event is routed by, when it has no body.
_ROUTED_BY = frozenset({"entity", "action"})


class _ConflictingHeader(ValueError):
    """A header sent more than once with different values."""


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The header's value (latin-1, as HTTP allows) without the spaces and tabs around
    it, which HTTP does not count as part of it (the HTTP parser drops those before a
    value, not those after); repeated values must agree."""
    found: bytes | None = None
    for header_name, sent in headers:
        if header_name.lower() == name:
            value = sent.strip(_HTTP_OWS_BYTES)
            if found is not None and value != found:
                raise _ConflictingHeader(name.decode())
            found = value
    return None if found is None else found.decode("latin-1")


def _idempotency_key(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, bool, str | None]:
    try:
        raw = _header(headers, IDEMPOTENCY_HEADER)
    except _ConflictingHeader:
        raise BadIdempotencyKey("x-Idempotency-Key is sent twice with different values") from None
    key = key_text(raw or "")
    if not key:
        return str(uuid.uuid4()), True, raw or None  # a blank header: nothing to keep
    problem = key_problem(key)
    if problem is not None:
        raise BadIdempotencyKey(problem)
    return key, False, raw


def key_problem(key: str) -> str | None:
    """Why a non-empty key (from :func:`key_text`) is refused, or None when it is usable."""
    if len(key) > MAX_KEY_LENGTH:
        return f"x-Idempotency-Key is {len(key)} characters long; at most {MAX_KEY_LENGTH} allowed"
    if _no_ce_string(key):
        return "x-Idempotency-Key contains control characters (or Unicode noncharacters)"
    return None


#: What HTTP itself takes for optional whitespace around a header value (RFC 9110
#: section 5.5): the only characters a key loses. str.strip() would also take
#: \x1c-\x1f (sparing them key_problem's 400) and Unicode spaces (a no-break space),
#: which are part of the key as sent.
_HTTP_OWS = " \t"
_HTTP_OWS_BYTES = _HTTP_OWS.encode()


def key_text(raw: str) -> str:
    """An idempotency key header, read as latin-1 (which maps every byte), as the key:
    without the spaces and tabs around it, and nothing else changed. Parsing and dead
    letters (deadletter.delivery_key) both take the key from here.

    UTF-8 is read as UTF-8, so that the record key, encoded as UTF-8, is the bytes
    sent; other bytes keep the latin-1 reading, the same on every retry.
    """
    return header_text(raw.strip(_HTTP_OWS))


def header_text(raw: str) -> str:
    """A header's value (its bytes read as latin-1) as text: UTF-8 read as UTF-8, other
    bytes keep the latin-1 reading. Encoded as UTF-8 it is the bytes sent, when they
    were UTF-8."""
    if not raw.isascii():
        with contextlib.suppress(UnicodeDecodeError):
            return raw.encode("latin-1").decode("utf-8")
    return raw


def _timestamp(
    headers: Sequence[tuple[bytes, bytes]], received_at: datetime
) -> tuple[datetime, bool, str | None]:
    """x-Timestamp as RFC 3339; a missing or bad one never rejects a delivery."""
    try:
        raw = _header(headers, TIMESTAMP_HEADER)
    except _ConflictingHeader:
        # Two different timestamps: trust neither, but keep what was sent (joined, as
        # HTTP reads a repeated header); the record's x-timestamp went missing.
        sent = (  # less the spaces and tabs around each, as for one (httptools keeps
            # those after a value)
            value.strip(_HTTP_OWS_BYTES)
            for name, value in headers
            if name.lower() == TIMESTAMP_HEADER
        )
        return received_at, False, b", ".join(sent).decode("latin-1")
    parsed = parse_rfc3339(raw) if raw else None
    if parsed is None:
        return received_at, False, raw
    return parsed, True, raw


def parse_rfc3339(text: str) -> datetime | None:
    """An aware UTC datetime, or None when ``text`` is not an RFC 3339 date-time."""
    if len(text) <= CACHED_TEXT_LENGTH:
        return _parse_rfc3339_cached(text)
    return _parse_rfc3339(text)


# Pure, and timestamps repeat within a second across deliveries: a cache hit
# costs a tenth of the parse.
@lru_cache(maxsize=1024)
def _parse_rfc3339_cached(text: str) -> datetime | None:
    return _parse_rfc3339(text)


def _parse_rfc3339(text: str) -> datetime | None:
    text = text.strip()
    if not _RFC3339.fullmatch(text):
        return None
    normalised = text.upper().replace(" ", "T")
    if "." in normalised:  # fromisoformat takes at most microseconds: the rest is cut
        head, _, tail = normalised.partition(".")
        digits = len(tail) - len(tail.lstrip("0123456789"))
        normalised = f"{head}.{tail[: min(digits, 6)]}{tail[digits:]}"
    # A leap second (23:59:60, which RFC 3339 allows) is the second after :59, as POSIX
    # time counts it: datetime has no second 60.
    leap = normalised[17:19] == "60"
    if leap:
        normalised = f"{normalised[:17]}59{normalised[19:]}"
    try:
        parsed = datetime.fromisoformat(normalised).astimezone(UTC)
        return parsed + timedelta(seconds=1) if leap else parsed
    except ValueError:  # e.g. month 13 or hour 25 pass the pattern
        return None
    except OverflowError:  # year 1 or 9999 moved past the ends by its offset
        return None


def _subject(value: Any) -> str | None:
    """The entity id(s) as text: Geins sends several as one comma-separated string, and
    a template may send them as a JSON array (which gave no subject), joined the same
    way."""
    if isinstance(value, list):
        ids = [text for text in map(_optional_text, value) if text is not None]
        subject = ",".join(ids) or None
    else:
        subject = _optional_text(value)
    if subject is not None and _no_ce_string(subject):
        return None  # no CloudEvents string: left out, as a token in it is
    return subject


def _optional_text(value: Any) -> str | None:
    """A routing attribute as text, or None when absent, empty or unsubstituted."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, Decimal) and value != value.to_integral_value():
        value = float(value)  # a fraction read exactly (see _parse_body): as a double
    if isinstance(value, float | Decimal):  # a Decimal: a whole number read exactly
        if not math.isfinite(value):
            return None  # 1e400 in the JSON (read by the fallback parser as inf)
        # 1e3 or 1000.0 in the JSON: 1000, not 1000.0, and 1e23 its whole number
        # 100000000000000000000000, as written (the shortest repr of the float), not
        # the double's binary value 99999999999999991611392 that int() gives
        number = Decimal(repr(value)) if isinstance(value, float) else value
        whole = number.to_integral_value()
        # (-0.0: 0)
        text = format(whole if whole else whole.copy_abs(), "f") if number == whole else str(value)
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    if not text or _is_placeholder(text):
        return None
    return text
