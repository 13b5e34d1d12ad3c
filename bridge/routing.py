"""Where an event goes: topic, key and headers. Pure and cheap per event.

Headers follow the CloudEvents Kafka protocol binding in binary mode (``ce_*``
headers, the body untouched as the value), so consumers that speak CloudEvents
read the events without knowing about the bridge.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING

from bridge.geins import Event, header_text

if TYPE_CHECKING:
    from bridge.config import Settings

#: The placeholders a topic template may use.
PLACEHOLDERS = ("entity", "action", "account", "environment")
#: The longest value each placeholder can produce: entity/action are validated to
#: at most 64 characters in geins.py; account/environment are cut to 48 here, so
#: a template using all four still fits Kafka's limit.
MAX_LENGTH = {"entity": 64, "action": 64, "account": 48, "environment": 48}
MAX_TOPIC_LENGTH = 249  # Kafka's own limit
TOPIC_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,249}")
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9._-]*")
#: What topic_safe replaces with '-': '.' and '_' too, so that an account or
#: environment can neither look like two fields of a '.'-separated template nor
#: make a name Kafka takes for another (it treats '.' and '_' alike).
_NOT_SAFE_CHAR = re.compile(r"[^a-z0-9-]+")
#: What each placeholder can put into a topic name: entity and action are 1-64 letters
#: and digits (geins.NAME_PATTERN), lower-cased; account and environment what
#: :func:`topic_safe` leaves.
_PLACEHOLDER_PATTERN = {
    "entity": "[a-z0-9]{1,64}",
    "action": "[a-z0-9]{1,64}",
    "account": "[a-z0-9-]{1,48}",
    "environment": "[a-z0-9-]{1,48}",
}

#: The placeholders whose values can hold a '-' (see _PLACEHOLDER_PATTERN).
_HOLD_DASHES = frozenset({"account", "environment"})

#: What a placeholder's value can hold: a character outside it in the template's own
#: text marks a place no value can move (see _ambiguity).
_RUN_CHARS = frozenset(string.ascii_lowercase + string.digits + "-")

CE_SPECVERSION = b"1.0"
CONTENT_TYPE_JSON = b"application/json"


@dataclass(slots=True)  # read-only; not frozen for speed (see bridge.geins.Delivery)
class Destination:
    """One Kafka record: everything the publisher needs, nothing it must compute."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class TopicTemplate:
    """A validated topic template such as ``geins.{entity}.{action}``.

    Validation happens once, at startup: a template that could produce an
    illegal Kafka topic name for any delivery is refused there, not per event.
    Placeholder values are lower-cased; the literal text is kept as written.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        fields: list[str] = []
        literal_length = 0
        for literal, field, spec, conversion in string.Formatter().parse(template):
            if not _TOPIC_CHARS.fullmatch(literal):
                raise ValueError(
                    f"topic template {template!r} has characters Kafka does not allow in "
                    f"{literal!r}: use letters, digits, '.', '_' and '-'"
                )
            literal_length += len(literal)
            if field is None:
                continue
            if field not in PLACEHOLDERS:
                raise ValueError(
                    f"topic template {template!r} uses unknown placeholder {{{field}}}; "
                    f"available: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                )
            if spec or conversion:
                raise ValueError(f"topic template {template!r}: {{{field}}} takes no format spec")
            fields.append(field)
        #: Why two deliveries with different values can share a topic, if they can.
        self.ambiguity = _ambiguity(template)
        longest = literal_length + sum(MAX_LENGTH[f] for f in fields)
        if longest > MAX_TOPIC_LENGTH:
            raise ValueError(
                f"topic template {template!r} can produce names of {longest} characters; "
                f"Kafka allows {MAX_TOPIC_LENGTH}"
            )
        if not fields and template in ("", ".", ".."):
            raise ValueError(f"topic template {template!r} is not a valid topic name")
        self.fields = tuple(fields)

    def render(self, entity: str, action: str, account: str, environment: str) -> str:
        return self.template.format(
            entity=entity.lower(),
            action=action.lower(),
            account=account,
            environment=environment,
        )


@lru_cache(maxsize=4096)
def _ce_type(entity: str, action: str) -> bytes:
    return f"com.geins.{entity.lower()}.{action}".encode()


def _rfc3339(moment: datetime) -> bytes:
    """An aware UTC datetime as CloudEvents writes time: RFC 3339, ``Z`` for UTC."""
    return moment.isoformat().replace("+00:00", "Z").encode()


_ce_time = lru_cache(maxsize=1024)(_rfc3339)


def _ambiguity(template: str) -> str | None:
    """Why the template can name one topic for deliveries with different values, if it
    can (account acme-prod in environment eu and account acme in prod-eu, with
    ``{account}-{environment}``).

    A character no placeholder holds ('.', '_', an upper-case letter) marks a fixed
    place; between two such, placeholders and the text joining them form a run. A run
    reads one way only when every join has a '-' in it (entity and action hold none,
    so each ends at the next '-', or starts after the last) and at most one of its
    placeholders can hold a '-' (the one left in the middle): account-order-product-eu
    is account acme-order with product in eu, or acme with order in product-eu.
    """
    dashes: str | None = None  # the run's placeholder so far that can hold a '-'
    previous: str | None = None
    for joint, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if previous is not None:
            if not set(joint) <= _RUN_CHARS:
                dashes = None  # a fixed place: a new run
            elif "-" not in joint:
                return _shared(template, previous, field, repr(joint) if joint else "nothing")
        if field in _HOLD_DASHES:
            if dashes is not None:
                return _shared(template, dashes, field, "only letters, digits and '-'")
            dashes = field
        previous = field
    return None


def _shared(template: str, first: str, second: str, between: str) -> str:
    return (
        f"topic template {template!r} has {between} between {{{first}}} and {{{second}}}, "
        "which they can hold themselves: deliveries with different values can share a "
        "topic; put a '.' or '_' between them"
    )


def topic_safe(value: str | None, default: str) -> str:
    """An account or environment as it may appear in a topic name: lower-case letters,
    digits and '-'; letters with accents lose them first (Malmö is malmo, Åre are), then
    every run of other characters ('.' and '_' included) becomes one '-', and a '-' at
    either end is dropped."""
    if value is None:
        return default
    cleaned = _NOT_SAFE_CHAR.sub("-", plain_letters(value).lower()).strip("-")
    cleaned = cleaned[: MAX_LENGTH["account"]].rstrip("-")
    return cleaned or default


#: Letters that no Unicode decomposition takes to ASCII, as they are written without
#: their marks (Danish, Norwegian, German, Icelandic, Polish, Croatian).
_PLAIN_LETTERS = str.maketrans(
    {
        "ø": "o",
        "Ø": "O",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ß": "ss",
        "þ": "th",
        "Þ": "TH",
        "ð": "d",
        "Ð": "D",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
    }
)


#: Most characters of a non-ASCII account or environment that are made plain: folding
#: costs about a microsecond a character (U+FDFA alone becomes 18), and a review's
#: account of 300,000 of them held the event loop for a second. A topic keeps 48.
PLAIN_LETTERS_AT_MOST = 1024


def plain_letters(value: str) -> str:
    """An account or environment as its topic name is made from: ASCII as it is, else
    its first PLAIN_LETTERS_AT_MOST characters with their letters made plain. What the
    token check looks at too (bridge.pipeline), so a token written with accents or in
    full-width letters cannot reach a topic name."""
    return value if value.isascii() else ascii_letters(value[:PLAIN_LETTERS_AT_MOST])


def ascii_letters(text: str) -> str:
    """``text`` with its letters' accents and marks dropped (NFKD), so that the shop
    names of a Swedish merchant stay apart in topic names: Öland and Åland were both
    "land", Malmö was "malm" like Malm. What has no such form is left as it is."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_PLAIN_LETTERS))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def template_pattern(template: str) -> str:
    """A regular expression matching every topic name ``template`` can produce."""
    pattern = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if field is not None:
            pattern += _PLACEHOLDER_PATTERN[field]
    return f"^{pattern}$"


def template_can_make(template: str, topic: str, *, as_kafka_sees_it: bool = True) -> bool:
    """Whether ``template`` can produce ``topic``, or (``as_kafka_sees_it``) a name
    Kafka takes for the same (it treats '.' and '_' alike: of two such topics only the
    first can be created)."""
    if not as_kafka_sees_it:
        return re.fullmatch(template_pattern(template), topic) is not None
    folded = re.compile(template_pattern(template.replace("_", ".")))
    return folded.fullmatch(topic.replace("_", ".")) is not None


class Router:
    """Maps an :class:`Event` to its :class:`Destination`."""

    def __init__(
        self,
        template: TopicTemplate,
        *,
        default_account: str,
        default_environment: str,
        ce_source: str,
    ) -> None:
        self.template = template
        self.default_account = topic_safe(default_account, "default")
        self.default_environment = topic_safe(default_environment, "default")
        self._ce_source = ce_source.encode()
        # Topic names and event types repeat endlessly; render each one once.
        self.topic_for = lru_cache(maxsize=4096)(self._topic)

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        """The router the settings describe (the server's and the operator tools')."""
        return cls(
            TopicTemplate(settings.topic_template),
            default_account=settings.default_account,
            default_environment=settings.default_environment,
            ce_source=settings.ce_source,
        )

    def _topic(self, entity: str, action: str, account: str, environment: str) -> str:
        return self.template.render(entity, action, account, environment)

    def route(self, event: Event) -> Destination:
        topic = self.topic_for(
            event.entity,
            event.action,
            topic_safe(event.account, self.default_account),
            topic_safe(event.environment, self.default_environment),
        )
        key = event.key.encode()
        headers: list[tuple[str, bytes]] = [
            ("ce_specversion", CE_SPECVERSION),
            ("ce_id", key),
            ("ce_source", self._ce_source),
            ("ce_type", _ce_type(event.entity, event.action)),
            # a sender's timestamps repeat (second resolution); receive times do not
            ("ce_time", _ce_time(event.time) if event.time_from_header else _rfc3339(event.time)),
            ("content-type", CONTENT_TYPE_JSON),
        ]
        if event.subject is not None:
            headers.append(("ce_subject", event.subject.encode()))
        if event.raw_key is not None:
            # (always UTF-8: one that was not stopped the CloudEvents SDK's Kafka
            # binding, which decodes every header; the latin-1 reading, as ce_id's)
            headers.append(("x-idempotency-key", header_text(event.raw_key).encode()))
        if event.raw_timestamp is not None:
            headers.append(("x-timestamp", header_text(event.raw_timestamp).encode()))
        if event.key_generated:
            headers.append(("x-bridge-key-generated", b"true"))
        if not event.time_from_header:
            headers.append(("x-bridge-time-source", b"received"))
        return Destination(topic=topic, key=key, value=event.value, headers=headers)

    def known_topics(self, pairs: list[tuple[str, str]]) -> list[str]:
        """The topics of the given entity/action pairs with the default account/environment."""
        return sorted(
            {self.topic_for(e, a, self.default_account, self.default_environment) for e, a in pairs}
        )
