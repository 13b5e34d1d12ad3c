"""What the bridge knows of the webhook tokens, to keep them out of what it writes.

One :class:`Redactor` per bridge, owned by its :class:`~bridge.auth.TokenAuthenticator`,
knows every token the process has used since it started: the tokens accepted now
and, up to MAX_RETIRED of them, tokens rotated out since (another replica may still
accept one, and a rollback brings it back). Log lines, dead letters and topic names
go through it.

A token is recognised in every form in which a sender can present it to the bridge,
and the encodings of those forms: as it is; percent-encoded, wholly or in part, in
upper or lower case, and once more (``%252B``); with a ``+`` for a space and a space
for a ``+`` (a form encoding's: authentication takes a query's ``+`` as sent, but a
token with a space or a ``+`` may reach a log either way round, through a form-encoding
client, say; redacted both ways); and
in base64, standard or URL-safe, at any offset (inside a Basic credential, say). Each
is replaced by MARKER; a base64 run holding one is replaced whole. Authentication
takes a token in its own letter case only, but a token in other ASCII letter cases is
recognised too (not its base64): a hex token lower-cased is the token all the same,
and entity and action are lower-cased on their way into a topic name.

Recognising costs a regular expression search of the text and of its percent-decoded
views, each made at C speed (:func:`unquoted`); where a token is, in a decoded view,
is worked out (:func:`percent_decoded`, in Python) only when a view holds one. The
checks an accepted delivery passes (:meth:`Redactor.contains` of its idempotency key,
the cached ones of its path segments, timestamp and topic) return at once for the
usual text shorter than the shortest token form. What a client sends reaches a log
line through :meth:`Redactor.logged`, which cuts it first: a refusal, which costs the
client nothing, costs the bridge a bounded amount of work too.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import orjson

log = logging.getLogger(__name__)

#: What a token is replaced with.
MARKER = "<token>"
#: Most tokens remembered once rotated out (the oldest go first); the tokens in use
#: are always known, however many.
MAX_RETIRED = 16
#: A base64 form of a token shorter than this is not looked for: a token of one or
#: two characters has hardly any base64 of its own, and it would match everywhere.
_MIN_BASE64_FORM = 4
#: The characters of a base64 run (both alphabets, padding, and '%' for a run that
#: is percent-encoded in part): a token's base64 form is replaced with its run.
_BASE64_RUN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=%")
_URL_SAFE = str.maketrans("+/", "-_")
_NOT_TOPIC_SAFE = re.compile(r"[^a-z0-9-]+")


_PERCENT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
#: A '%' that starts no percent-encoded byte.
_LONE_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
#: Every hex digit as 'h', every other byte but '%' as '.': a text has a lone '%'
#: when it has more '%' than '%hh'.
_HEX_AS_H = bytes(
    b"h"[0] if chr(i) in "0123456789ABCDEFabcdef" else i if i == b"%"[0] else b"."[0]
    for i in range(256)
)
#: Characters a percent-encoded byte of a form may take in the text: encoded twice,
#: with the hex digits of the first encoding encoded too (``%25%34%31`` for ``A``).
_ENCODED_BYTE = 9

#: Most characters of a client's text (a path, a detail, a key) a log line shows.
LOGGED_LENGTH = 1024
#: Longest text whose answer :meth:`Redactor.contains_cached` keeps: path segments,
#: timestamps, accounts and environments are short, and repeat. A longer one is
#: checked each time: the cache keeps the text too, and 4096 accounts of a body's
#: size (960 KB) would hold gigabytes.
CACHED_LENGTH = 128


def cut(text: str, limit: int = LOGGED_LENGTH) -> str:
    """``text`` when at most ``limit`` characters long; else its first ``limit``
    characters, marked as cut (tokens are not looked for: see :meth:`Redactor.logged`)."""
    if len(text) <= limit:
        return text
    return text[:limit] + _cut_mark(text)


def _cut_mark(text: str) -> str:
    return f"…(cut: {len(text)} characters)"


def _variants(form: str) -> set[str]:
    """``form``, and how a form encoding may show it: a '+' read as a space, and a
    space as a '+' (authentication takes a query's '+' as sent, but the text a log
    line holds may have passed a form encoding on its way)."""
    return {form, form.replace("+", " "), form.replace(" ", "+")}


def _json_escaped(token: str) -> str:
    """``token`` as a JSON string shows it, without its quotes: a token with a '"' or a
    '\\' (a legal one) inside a JSON array or object a refusal's detail shows
    (bridge.geins) came out escaped, which no other form matched."""
    return orjson.dumps(token).decode()[1:-1]


def percent_decoded(text: str) -> tuple[str, list[int]]:
    """``text`` with its percent-encoded bytes decoded (UTF-8; other bytes as
    surrogate escapes), and where each decoded character starts in ``text`` (one
    more entry: the end)."""
    pieces: list[str] = []
    origin: list[int] = []
    done = 0
    for run in _PERCENT_RUN.finditer(text):
        start = run.start()
        pieces.append(text[done:start])
        origin.extend(range(done, start))
        at = start
        for char in bytes.fromhex(run.group().replace("%", "")).decode("utf-8", "surrogateescape"):
            pieces.append(char)
            origin.append(at)
            at += 3 * (1 if "\udc80" <= char <= "\udcff" else len(char.encode()))
        done = run.end()
    pieces.append(text[done:])
    origin.extend(range(done, len(text) + 1))
    return "".join(pieces), origin


def unquoted(text: str) -> str:
    """``text`` percent-decoded as :func:`percent_decoded` decodes it, without saying
    where each character came from: a few passes over the text at C speed, where that
    function's Python loop takes a step per decoded character.

    The same text, but where ``text`` holds surrogate escapes (bytes that are not
    UTF-8, such as a first decoding leaves): decoded all together rather than a run of
    percent-encoded bytes at a time, they may make characters that percent_decoded
    leaves as escapes. Everything else is the same, so a token percent_decoded shows
    is here too.
    """
    if "%" not in text:
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate of another kind
        return percent_decoded(text)[0]
    # As Python escapes, which the unicode_escape codec decodes: a '%' that starts no
    # byte (kept by percent_decoded) encoded as one (the regular expression only when
    # there is one: it takes five times as long as counting), a backslash doubled, and
    # then each '%' made a '\x'. The codec reads other bytes as Latin-1, so the whole
    # text comes back as the bytes it encodes, for UTF-8 to decode.
    encoded = raw.translate(_HEX_AS_H).count(b"%hh")
    if encoded == 0:  # only lone '%', kept as they are: nothing to decode
        return text
    if encoded != raw.count(b"%"):
        raw = _LONE_PERCENT.sub(b"%25", raw)
    escaped = raw.replace(b"\\", b"\\\\").replace(b"%", b"\\x")
    return escaped.decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def base64_forms(token: str) -> list[str]:
    """What any base64 encoding of bytes holding ``token`` contains, whatever its
    offset: for each of the three alignments, the characters that only the token's
    bits make, in the standard and the URL-safe alphabet."""
    data = token.encode()
    forms: list[str] = []
    for pad in range(3):
        encoded = base64.b64encode(bytes(pad) + data).decode()
        middle = encoded[-(-8 * pad // 6) : (8 * (pad + len(data))) // 6]
        if len(middle) >= _MIN_BASE64_FORM:
            forms += [middle, middle.translate(_URL_SAFE)]
    return list(dict.fromkeys(forms))


def topic_forms(token: str) -> set[str]:
    """How ``token`` would look in a topic name: lower-cased as entity and action are,
    or made topic-safe (and cut to 48 characters) as account and environment are."""
    lowered = token.lower()
    safe = _NOT_TOPIC_SAFE.sub("-", lowered).strip("-")
    return {f for f in (lowered, safe, safe[:48].rstrip("-")) if f}


@dataclass(frozen=True, slots=True)
class _Forms:
    """What the tokens look like, replaced whole when they change: a thread that logs
    (the spool's writer) never sees a pattern with another one's bounds."""

    pattern: re.Pattern[str]  # every form, literally
    #: the forms that are not base64, their ASCII letters lower-cased, for a text's
    #: UTF-8 with its ASCII letters lower-cased (bytes.lower: the same length)
    folded: re.Pattern[bytes]
    base64: frozenset[str]  # the forms that are base64
    shortest: int  # characters of the shortest form
    reach: int  # most characters a form, encoded as redact recognises it, takes


class Redactor:
    """Recognises the tokens in text, and replaces them with MARKER."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self._current: tuple[str, ...] = ()
        self._retired: dict[str, None] = {}  # oldest first
        self._forms: _Forms | None = None  # None without tokens
        #: Characters of the shortest form of a token: no shorter text holds one (as
        #: contains knows at once; a caller may know it before calling). Without tokens,
        #: longer than any text.
        self.shortest = sys.maxsize
        self._topic_forms: tuple[str, ...] = ()
        # For text that repeats (path segments, timestamps, topics): a cache hit is
        # all an accepted delivery pays. Emptied whenever the tokens change. A topic
        # name is short (Kafka takes 249 characters at most); other text is cached
        # only when short (contains_cached).
        self._contains_lru = lru_cache(maxsize=4096)(self.contains)
        self.in_topic = lru_cache(maxsize=4096)(self._in_topic)
        self.use(tokens)

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token known: those in use, then the retired ones, latest first."""
        return (*self._current, *reversed(self._retired))

    def use(self, tokens: Iterable[str]) -> None:
        """``tokens`` are the ones accepted now; those accepted before and not now are
        remembered as retired (at most MAX_RETIRED, the oldest forgotten first)."""
        current = tuple(dict.fromkeys(t for t in tokens if t))
        if current == self._current:
            return
        for token in self._current:
            if token not in current:
                self._retired[token] = None
        for token in current:
            self._retired.pop(token, None)
        forgotten = 0
        while len(self._retired) > MAX_RETIRED:
            del self._retired[next(iter(self._retired))]
            forgotten += 1
        if forgotten:
            log.warning(
                "%d token(s) rotated out long ago are no longer kept out of logs and dead "
                "letters: at most %d rotated-out tokens are remembered",
                forgotten,
                MAX_RETIRED,
            )
        self._current = current
        self._compile()

    def _compile(self) -> None:
        tokens = self.tokens
        plain = {v for t in tokens for v in (*_variants(t), _json_escaped(t))}
        encoded = {v for t in tokens for f in base64_forms(t) for v in _variants(f)} - plain
        forms = sorted(plain | encoded, key=lambda f: (-len(f), f))  # the longest first
        folded = sorted({f.encode().lower() for f in plain}, key=lambda f: (-len(f), f))
        # Literal alternatives only: the regular expression engine then skips, at C
        # speed, every position whose character starts no form (a case-insensitive
        # pattern cannot: ten times as slow over a long path).
        self._forms = (
            _Forms(
                re.compile("|".join(map(re.escape, forms))),
                re.compile(b"|".join(map(re.escape, folded))),
                frozenset(encoded),
                len(forms[-1]),
                max(len(f.encode()) for f in forms) * _ENCODED_BYTE,
            )
            if forms
            else None
        )
        self.shortest = self._forms.shortest if self._forms else sys.maxsize
        self._topic_forms = tuple(sorted({f for t in tokens for f in topic_forms(t)}))
        self._contains_lru.cache_clear()
        self.in_topic.cache_clear()

    def __bool__(self) -> bool:
        return self._forms is not None

    def contains(self, text: str) -> bool:
        """Whether ``text`` holds a token, in any form."""
        forms = self._forms
        if forms is None or len(text) < forms.shortest:
            return False
        if _holds(text, forms):
            return True
        for _ in range(2):  # percent-encoded, then encoded twice
            if "%" not in text:
                return False
            decoded = unquoted(text)
            if decoded is text:  # nothing percent-encoded: decoding changes nothing
                return False
            text = decoded
            if _holds(text, forms):
                return True
        return False

    def contains_cached(self, text: str) -> bool:
        """:meth:`contains`, its answer kept for a text of at most CACHED_LENGTH
        characters."""
        if len(text) > CACHED_LENGTH:
            return self.contains(text)
        return self._contains_lru(text)

    def redact(self, text: str) -> str:
        """``text`` with every token in it replaced by MARKER."""
        forms = self._forms
        if forms is None or len(text) < forms.shortest:
            return text
        spans = self._spans(text, forms)
        return _replaced(text, spans, len(text)) if spans else text

    def logged(self, text: str, limit: int = LOGGED_LENGTH) -> str:
        """``text`` as a log line may show it: its tokens replaced by MARKER, and cut
        (:func:`cut`) after ``limit`` characters, whatever its length for the same
        work. A token with a character before the cut is replaced whole: the text is
        redacted as far as the longest form of a token could reach past the cut."""
        if len(text) <= limit:
            return self.redact(text)
        forms = self._forms
        if forms is None:
            return cut(text, limit)
        window = text[: limit + forms.reach]
        return _replaced(window, self._spans(window, forms), limit) + _cut_mark(text)

    def _spans(self, text: str, forms: _Forms) -> list[tuple[int, int]]:
        """Where the tokens are in ``text``: as they are, and percent-decoded once or
        twice. The positions in a decoded view (percent_decoded, a Python loop per
        character) are worked out only when its cheap decoding holds a form."""
        spans = _spans(text, forms)
        views = [text]
        while len(views) < 3 and "%" in views[-1]:  # percent-encoded, then encoded twice
            decoded = unquoted(views[-1])
            if decoded is views[-1]:  # nothing percent-encoded: decoding changes nothing
                break
            views.append(decoded)
        holding = [n for n in range(1, len(views)) if _holds(views[n], forms)]
        if not holding:
            return spans
        view, origin = text, list(range(len(text) + 1))
        for level in range(1, holding[-1] + 1):
            view, inner = percent_decoded(view)
            origin = [origin[i] for i in inner]
            if level in holding:
                spans += [(origin[a], origin[b]) for a, b in _spans(view, forms)]
        return spans

    def redact_bytes(self, value: bytes) -> bytes:
        """``value`` (a header, say) with every token in it replaced by MARKER; bytes
        that are not UTF-8 are kept as they are."""
        forms = self._forms
        if forms is None or len(value) < forms.shortest:
            return value
        text = value.decode("utf-8", "surrogateescape")
        redacted = self.redact(text)
        return value if redacted is text else redacted.encode("utf-8", "surrogateescape")

    def contains_bytes(self, value: bytes) -> bool:
        """Whether ``value`` holds a token, in any form (see :meth:`redact_bytes`), its
        bytes read as UTF-8 or a character a byte (latin-1): header values are kept
        and keyed in either reading (geins.key_text, deadletter's header entries),
        and a non-ASCII token sent as latin-1 (.NET's HttpClient writes header text
        so) became a dead letter's key, and sat in its headers."""
        if self.contains(value.decode("utf-8", "surrogateescape")):
            return True
        return not value.isascii() and self.contains(value.decode("latin-1"))

    def _in_topic(self, topic: str) -> bool:
        """Whether the topic name ``topic`` holds a token, as a template would have
        put it there (cached, as :attr:`in_topic`)."""
        lowered = topic.lower()
        return any(form in lowered for form in self._topic_forms) or self.contains(topic)


def _replaced(text: str, spans: list[tuple[int, int]], limit: int) -> str:
    """``text`` up to ``limit`` with MARKER for each of ``spans`` that starts before
    it (all of it, though it may end after ``limit``)."""
    pieces: list[str] = []
    done = 0
    for start, end in sorted(spans):
        if start >= limit:
            break
        if start < done:  # overlaps the last one replaced
            done = max(done, end)
            continue
        pieces += [text[done:start], MARKER]
        done = end
    pieces.append(text[done:limit])
    return "".join(pieces)


def _folded(text: str) -> bytes:
    """``text`` as UTF-8 with its ASCII letters lower-cased, for ``_Forms.folded``
    (surrogates kept, three bytes each)."""
    return text.encode("utf-8", "surrogatepass").lower()


def _holds(text: str, forms: _Forms) -> bool:
    """Whether ``text`` holds a form, or a form other than base64 in other ASCII
    letter cases."""
    return forms.pattern.search(text) is not None or forms.folded.search(_folded(text)) is not None


def _spans(text: str, forms: _Forms) -> list[tuple[int, int]]:
    """Where the forms are in ``text``; a base64 one with its whole run, whose ends
    carry bits of the token too; and those other than base64 in other ASCII letter
    cases."""
    spans = []
    for match in forms.pattern.finditer(text):
        start, end = match.span()
        if match.group() in forms.base64:
            while start > 0 and text[start - 1] in _BASE64_RUN:
                start -= 1
            while end < len(text) and text[end] in _BASE64_RUN:
                end += 1
        spans.append((start, end))
    folded = _folded(text)
    matches = list(forms.folded.finditer(folded))
    if matches and not text.isascii():  # byte offsets to character offsets

        def chars(at: int) -> int:
            return len(folded[:at].decode("utf-8", "surrogatepass"))

        spans += [(chars(m.start()), chars(m.end())) for m in matches]
    else:
        spans += [m.span() for m in matches]
    return spans
