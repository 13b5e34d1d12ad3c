"""redaction: every form of a token is recognised, and nothing else."""

from __future__ import annotations

import base64
import logging
import tracemalloc
from urllib.parse import quote, quote_plus, urlencode

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import redaction
from bridge.redaction import LOGGED_LENGTH, MARKER, Redactor, percent_decoded, unquoted

PLUS = "plus+Secret2"
HEX = "0123456789abcdef" * 4
WIDE = "jätte-hemlig"
SECRETS = Redactor([PLUS, HEX, WIDE])


def basic(user: str, password: str, *, url_safe: bool = False) -> str:
    encode = base64.urlsafe_b64encode if url_safe else base64.b64encode
    return "Basic " + encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"/webhooks/geins/{HEX}", f"/webhooks/geins/{MARKER}"),
        (f"r4-{HEX}", f"r4-{MARKER}"),
        # percent-encoded, wholly or in part, either case, or twice
        ("/webhooks/geins?token=plus%2BSecret2", f"/webhooks/geins?token={MARKER}"),
        ("?token=plus%2bSecret2&x=1", f"?token={MARKER}&x=1"),
        ("?token=" + quote(PLUS, safe=""), f"?token={MARKER}"),
        ("?token=%70lus%2BSecret%32", f"?token={MARKER}"),
        ("?token=plus%252BSecret2", f"?token={MARKER}"),
        ("k-" + quote(WIDE), f"k-{MARKER}"),
        # '+' for a space, and a space for a '+', as the query's form encoding has them
        ("ref=plus Secret2", f"ref={MARKER}"),
        (urlencode({"ref": PLUS}), f"ref={MARKER}"),
        ("ref=plus%20Secret2", f"ref={MARKER}"),
        (quote_plus(f"a {PLUS} b"), f"a+{MARKER}+b"),
        # inside a Basic credential, whatever the user's length, either alphabet
        (basic("user", PLUS), f"Basic {MARKER}"),
        (basic("u", HEX), f"Basic {MARKER}"),
        (basic("us", HEX), f"Basic {MARKER}"),
        (basic("geins", WIDE, url_safe=True), f"Basic {MARKER}"),
        (quote(basic("user", PLUS), safe=""), MARKER),  # 'Basic%20' is part of the run
        (
            f'action "create?token={HEX}" is not a name',
            f'action "create?token={MARKER}" is not a name',
        ),
        (f"{HEX}{HEX}", f"{MARKER}{MARKER}"),
        # in other ASCII letter cases (a hex token upper-cased is the same secret),
        # percent-encoded too, and where the text is not ASCII
        ("PLUS+SECRET2", MARKER),
        (f"k-{HEX.upper()}-k", f"k-{MARKER}-k"),
        ("?token=PLUS%2bsecret2", f"?token={MARKER}"),
        (f"é/{HEX.upper()}/ä", f"é/{MARKER}/ä"),
        ("JäTTE-HEMLIG", MARKER),
    ],
)
def test_every_form_of_a_token_is_replaced(text: str, redacted: str) -> None:
    assert SECRETS.contains(text)
    assert SECRETS.redact(text) == redacted
    assert SECRETS.redact_bytes(text.encode()) == redacted.encode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/webhooks/geins/Order/create",
        "plus+Secret",  # a part is not the token
        "plus+secret",  # a part, in another case, is not the token
        "JÄTTE-HEMLIG",  # only ASCII letters are compared in either case
        HEX[:-1],
        basic("user", "another-secret"),
        "%E4%",
        "%zz plus%2",
    ],
)
def test_other_text_is_left_alone(text: str) -> None:
    assert not SECRETS.contains(text)
    assert SECRETS.redact(text) is text


def test_bytes_that_are_not_utf8_are_kept() -> None:
    value = b"\xff\xfe " + HEX.encode() + b" \xc3"
    assert SECRETS.redact_bytes(value) == b"\xff\xfe <token> \xc3"
    assert SECRETS.redact_bytes(b"\xff\xfe nothing") == b"\xff\xfe nothing"


def test_text_with_nothing_percent_encoded_is_not_decoded() -> None:
    """Lone '%' only: unquoted gives the text back as it is, before any pass over it (a
    review's path of 2,700 '%' cost 180 µs a view in the lone-'%' substitution)."""
    for text in ("%" * 2700, "/a/%zz/%4/%", "%g%"):
        assert unquoted(text) is text
    assert unquoted("%%41") == "%A"


def test_percent_decoding_says_where_each_character_came_from() -> None:
    assert percent_decoded("a%2Bb%C3%A4c%ZZ") == ("a+bäc%ZZ", [0, 1, 4, 5, 11, 12, 13, 14, 15])


def test_without_tokens_nothing_is_recognised() -> None:
    empty = Redactor()
    assert not empty
    assert not empty.contains("anything")
    assert empty.redact("anything") == "anything"
    assert not empty.in_topic("geins.order.create")


def test_rotated_out_tokens_are_remembered_within_a_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token rotated out is still recognised (another replica may accept it, a
    rollback brings it back); at most MAX_RETIRED of them, the oldest go first."""
    secrets = Redactor(["first-token"])
    secrets.use(["second-token"])
    assert secrets.tokens == ("second-token", "first-token")
    assert secrets.redact("first-token second-token") == f"{MARKER} {MARKER}"
    secrets.use(["first-token"])  # rolled back: in use again, the other retired
    assert secrets.tokens == ("first-token", "second-token")
    for n in range(redaction.MAX_RETIRED):
        secrets.use([f"token-number-{n:03}"])
    assert "first-token" in secrets.tokens
    assert "second-token" not in secrets.tokens  # the oldest retired went first
    assert len(secrets.tokens) == redaction.MAX_RETIRED + 1
    assert not secrets.contains("second-token")
    assert "no longer kept out of logs" in caplog.text


def test_cached_answers_follow_the_tokens() -> None:
    """contains_cached and in_topic are cached; a new token empties the caches."""
    secrets = Redactor(["old-secret"])
    assert not secrets.contains_cached("new-secret")
    assert not secrets.in_topic("geins.newsecret.create")
    secrets.use(["newsecret"])
    assert secrets.contains_cached("newsecret")
    assert secrets.in_topic("geins.newsecret.create")
    assert secrets.contains_cached("old-secret")


def test_only_short_text_is_cached() -> None:
    """contains_cached keeps the answers for short text (path segments, timestamps,
    accounts repeat), and checks a longer one each time: it kept the text too, so 60
    accepted deliveries with an account of 500 KB held 30 MB, 4096 of them gigabytes."""
    secrets = Redactor([HEX])
    assert secrets.contains_cached("x" * 200 + HEX)
    assert not secrets.contains_cached("short")
    tracemalloc.start()
    try:
        for n in range(40):
            assert not secrets.contains_cached(f"{n:03}" + "%61" * 50_000)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 100_000


@pytest.mark.parametrize(
    ("token", "topic"),
    [
        (HEX, f"geins.{HEX}.create"),
        ("AbCdEf0123456789", "geins.abcdef0123456789.create"),  # entity is lower-cased
        ("acme.Prod_Token", "geins.order.create.acme-prod-token"),  # account made topic-safe
        ("x" * 60, "geins.order.create." + "x" * 48),  # and cut to 48 characters
    ],
)
def test_a_token_is_recognised_in_a_topic_name(token: str, topic: str) -> None:
    assert Redactor([token]).in_topic(topic)
    assert not Redactor([token]).in_topic("geins.order.create")


def test_a_warning_names_no_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    secrets = Redactor(["t-0"])
    for n in range(1, redaction.MAX_RETIRED + 3):
        secrets.use([f"t-{n}"])
    assert caplog.records
    assert not any(secrets.contains(r.getMessage()) for r in caplog.records)


def encoded_deep(text: str) -> str:
    """``text`` percent-encoded twice, the hex digits of the first encoding encoded too
    (``%25%34%31`` for ``A``): the longest form a byte takes that is recognised."""
    return "".join(
        "%25" + "".join(f"%{ord(digit):02X}" for digit in f"{byte:02X}") for byte in text.encode()
    )


@pytest.mark.parametrize(
    "form",
    [
        HEX,
        quote(PLUS, safe=""),
        encoded_deep(HEX),
        base64.b64encode(f"u:{HEX}".encode()).decode(),
        encoded_deep(WIDE),
    ],
    ids=["plain", "encoded", "encoded twice", "base64", "wide, encoded twice"],
)
def test_a_logged_text_is_cut_and_no_token_across_the_cut_survives(form: str) -> None:
    """A text longer than the limit is cut there, and says so; a token that starts
    before the cut, in any form, is replaced whole, wherever it ends. Whatever is left
    of the text holds not a character of a token."""
    limit = 100
    assert SECRETS.logged(form, len(form)) == SECRETS.redact(form)  # not cut: as redact
    for offset in range(limit - len(form) - 2, limit + 3):
        text = "." * offset + form + "." * 3000
        logged = SECRETS.logged(text, limit)
        shown, mark, rest = logged.partition("…")
        assert mark + rest == f"…(cut: {len(text)} characters)"
        kept = shown.replace(MARKER, "")
        assert kept == "." * len(kept)
        assert (MARKER in shown) == (offset < limit)


def test_a_logged_text_costs_the_same_however_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first LOGGED_LENGTH characters, and as far past them as a token can
    reach, are looked at: a refusal's path of 8 KB or of 8 MB costs what one of 2 KB
    does (the whole path used to be decoded, once per level, in Python, and redacted
    again by the log's filter)."""
    seen: list[int] = []
    decode = redaction.percent_decoded

    def spied(text: str) -> tuple[str, list[int]]:
        seen.append(len(text))
        return decode(text)

    text = f"/webhooks/geins/{quote(quote(HEX))}/" + "%2541" * 200_000
    monkeypatch.setattr(redaction, "percent_decoded", spied)
    logged = SECRETS.logged(text)
    assert logged.startswith(f"/webhooks/geins/{MARKER}/%2541")
    assert seen  # the token was found in a decoded view
    assert max(seen) <= 3 * LOGGED_LENGTH


def test_only_a_view_that_holds_a_token_is_decoded_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """contains decodes cheaply (unquoted), and redact works out where a token is in a
    decoded view (percent_decoded, a Python loop per character) only when the cheap
    view holds one: an accepted delivery's id of 960 KB, percent-encoded, cost 87 ms."""

    def refused(text: str) -> tuple[str, list[int]]:
        raise AssertionError("decoded in Python")

    monkeypatch.setattr(redaction, "percent_decoded", refused)
    text = "%41" * 10_000 + "%2541" * 10_000 + "%zz"
    assert not SECRETS.contains(text)
    assert SECRETS.redact(text) is text
    assert SECRETS.contains(text + quote(quote(HEX)))
    monkeypatch.undo()
    assert SECRETS.redact(text + quote(quote(HEX))) == text + MARKER


_PIECES = st.sampled_from(
    [
        *"%25AaFf09zZ\\xä+ /\n\"'\x00€",
        *("%C3", "%A4", "%E2%82", "%AC", "%2", "%25", "%%", "%5C", "%F0%9F", "%98%80", "%3"),
        *("\\x41", "\\u0041", "\\N{DASH}", "%ff", "%00", "%hh", "%.h", "h", ".", HEX[:9]),
    ]
)


@given(st.lists(_PIECES, max_size=40).map("".join))
def test_the_cheap_decoding_is_the_decoding(text: str) -> None:
    """unquoted (C speed) makes the view percent_decoded (positions, in Python) makes,
    backslashes and broken escapes included; decoding again, where the first decoding
    left bytes that are not UTF-8, it may only find more of a token, never less."""
    once = unquoted(text)
    assert once == percent_decoded(text)[0]
    exact = percent_decoded(once)[0]
    assert HEX[:9] not in exact or HEX[:9] in unquoted(once)


@pytest.mark.parametrize("token", ['dev"token-very-long-123456', "back\\slash-token-1234567"])
def test_a_token_json_escaped_is_redacted(token: str) -> None:
    """A refusal's detail shows an entity that is not a string as JSON (bridge.geins):
    a token with a '"' or a '\\' (legal) inside it came out escaped, and no form matched
    it, in the 422's detail and its log line (a review's find)."""
    redactor = Redactor([token])
    escaped = orjson.dumps([token]).decode()
    assert token not in escaped
    assert redactor.redact(escaped) == f'["{MARKER}"]'
    assert redactor.contains(escaped)
