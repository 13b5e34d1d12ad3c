"""auth: where tokens are read from, and what is refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge import auth
from bridge.app import create_app
from bridge.auth import UNAUTHENTICATED, TokenAuthenticator
from bridge.config import load_settings
from bridge.errors import TooManyCredentials, Unauthorized
from bridge.ingress import parse_query
from tests.fakes import FakePublisher
from tests.polling import eventually

AUTH = TokenAuthenticator(["old-token", "new-token"])


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([(b"authorization", b"Bearer new-token")], []),
        ([(b"authorization", b"bearer   old-token ")], []),
        ([(b"Authorization", basic("geins", "new-token"))], []),
        ([], [("token", "old-token")]),
        ([(b"authorization", b"Bearer wrong")], [("token", "new-token")]),
    ],
)
def test_accepted_credentials(
    headers: list[tuple[bytes, bytes]], query: list[tuple[str, str]]
) -> None:
    """Bearer, Basic password and ?token= all work, for every configured token."""
    AUTH.check(headers, query)


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([], []),
        ([(b"authorization", b"Bearer nope")], []),
        ([(b"authorization", b"Bearer ")], []),
        ([(b"authorization", b"Token new-token")], []),
        ([(b"authorization", basic("new-token", ""))], []),
        ([(b"authorization", b"Basic !!!notbase64")], []),
        ([], [("token", "")]),
        ([], [("token", "new-token-but-longer")]),
        ([(b"x-token", b"new-token")], []),
    ],
)
def test_refused_credentials(
    headers: list[tuple[bytes, bytes]], query: list[tuple[str, str]]
) -> None:
    """Anything but a configured token in a supported place is 401."""
    with pytest.raises(Unauthorized) as info:
        AUTH.check(headers, query)
    assert info.value.status == 401


def test_unauthenticated_only_when_asked() -> None:
    """No tokens means everything is refused, unless explicitly opened."""
    with pytest.raises(Unauthorized):
        TokenAuthenticator([]).check([], [])
    TokenAuthenticator([], allow_unauthenticated=True).check([], [])


def test_an_open_bridge_says_so_at_start_and_when_the_file_is_emptied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Running without a token is a WARNING when it begins: at start, and when the tokens
    file is emptied while serving (it was silent, where a 9-character token got one)."""
    with caplog.at_level(logging.WARNING, logger="bridge.auth"):
        TokenAuthenticator([], allow_unauthenticated=True)
        assert [r.getMessage() for r in caplog.records] == [UNAUTHENTICATED]
        caplog.clear()
        TokenAuthenticator(["a-long-enough-token"], allow_unauthenticated=True)
        tokens = tmp_path / "tokens"
        tokens.write_text("a-long-enough-file-token\n")
        authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
        assert caplog.records == []
        tokens.write_text("# tokens removed\n")
        authenticator.refresh()
        authenticator.refresh()  # used at the second reading that finds it so
        assert [r.getMessage() for r in caplog.records] == [UNAUTHENTICATED]


def test_every_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each presented credential is compared with every token through hmac.compare_digest,
    with no early exit on a match, so timing does not tell which token (or byte) was close."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # what bridge.auth calls
    AUTH.check([(b"authorization", b"Bearer old-token")], [("token", "nope")])
    assert len(calls) == 4  # 2 presented x 2 configured, although the first one matched
    assert {b for _, b in calls} == {b"old-token", b"new-token"}


def test_more_than_a_few_credentials_are_refused_before_any_is_compared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request presenting more than MAX_CREDENTIALS Authorization headers and token
    parameters together is a 400 (too_many_credentials), with none of them compared:
    one request used to cost ~290 comparisons per token. A valid token among them
    does not help; MAX_CREDENTIALS of them still pass."""
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    bearer = (b"authorization", b"Bearer new-token")
    with pytest.raises(TooManyCredentials) as info:
        AUTH.check([bearer] * 98, [("token", "new-token")] * 200)
    assert (info.value.status, info.value.reason) == (400, "too_many_credentials")
    assert "298 credentials" in info.value.detail
    assert "new-token" not in info.value.detail
    with pytest.raises(TooManyCredentials):
        AUTH.check(
            [bearer, (b"Authorization", b"Basic !!"), bearer], [("TOKEN", ""), ("token", "x")]
        )
    assert calls == []
    AUTH.check([bearer, bearer], [("token", "a+b"), ("token", "new-token")])  # 4: read
    assert len(calls) == 4 * 2  # against 2 tokens


def test_the_redactor_knows_every_token_used_since_start(tmp_path: Path) -> None:
    """The authenticator's redactor learns the file's tokens as they are used (not one
    read only once: it may be half written), and keeps those rotated out since."""
    tokens = tmp_path / "tokens"
    tokens.write_text("file-token-1\n")
    authenticator = TokenAuthenticator(["env-token"], tokens_file=tokens)
    assert list(authenticator.redactor.tokens) == ["env-token", "file-token-1"]
    tokens.write_text("file-to")
    authenticator.refresh()  # seen once: not in use, not learnt
    assert list(authenticator.redactor.tokens) == ["env-token", "file-token-1"]
    tokens.write_text("file-token-2\n")
    authenticator.refresh()
    authenticator.refresh()
    assert authenticator.current_tokens() == (b"env-token", b"file-token-2")
    assert list(authenticator.redactor.tokens) == ["env-token", "file-token-2", "file-token-1"]


def test_an_open_bridge_requires_a_token_once_the_file_has_one(tmp_path: Path) -> None:
    """BRIDGE_ALLOW_UNAUTHENTICATED opens the bridge only while no token exists: a
    token written to the tokens file later is required from then on (from the reading
    after the one that saw the change)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# no token yet\n")
    authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
    authenticator.check([], [])
    tokens.write_text("file-token\n")
    authenticator.refresh()  # sees the change: used at the next reading
    authenticator.check([], [])
    authenticator.refresh()
    with pytest.raises(Unauthorized):
        authenticator.check([], [])
    with pytest.raises(Unauthorized):
        authenticator.check([(b"authorization", b"Bearer wrong")], [])
    authenticator.check([(b"authorization", b"Bearer file-token")], [])


def test_a_tokens_file_caught_mid_rewrite_is_never_used(tmp_path: Path) -> None:
    """A rewrite in place (truncate, then write, maybe in pieces) is used only once the
    file is found the same at two readings in a row: caught empty it does not open the
    bridge, caught half written it accepts no fragment of a token and still the old
    tokens. A change is seen even when it keeps the file's mtime (one clock tick)."""
    tokens = tmp_path / "tokens"

    def rewrite(text: str) -> None:
        tokens.write_text(text)
        os.utime(tokens, (1, 1))  # the same mtime throughout

    def accepts_after_reading(token: str | None) -> bool:
        authenticator.refresh()  # one reading for each moment of the rewrite
        headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
        try:
            authenticator.check(headers, [])
        except Unauthorized:
            return False
        return True

    rewrite("old-token\n")
    authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
    rewrite("")  # caught truncated
    assert not accepts_after_reading(None)  # not open
    rewrite("old-token\nnew-to")  # caught half written
    assert accepts_after_reading("old-token")  # the old tokens still
    rewrite("old-token\nnew-token\n")  # written: seen now, used at the next reading
    assert not accepts_after_reading("new-to")  # no fragment
    assert accepts_after_reading("new-token")
    assert accepts_after_reading("old-token")
    rewrite("old-token\nnew-tokex\n")  # the same size and mtime
    assert accepts_after_reading("new-token")  # seen now
    assert not accepts_after_reading("new-token")
    assert accepts_after_reading("new-tokex")
    tokens.write_text("# tokens removed\n")  # emptied on purpose: open from the next reading
    assert not accepts_after_reading(None)
    assert accepts_after_reading(None)


def test_a_change_seen_once_then_undone_is_not_used_when_it_comes_back(tmp_path: Path) -> None:
    """A change must be found the same at two readings in a row: seen once, then the
    old content again, then the change once more is a first sighting, not the second."""
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    authenticator = TokenAuthenticator([], tokens_file=tokens)
    for text in ("new-token\n", "old-token\n", "new-token\n"):
        tokens.write_text(text)
        authenticator.refresh()
    assert authenticator.current_tokens() == (b"old-token",)
    authenticator.refresh()
    assert authenticator.current_tokens() == (b"new-token",)


def test_a_secret_the_kubelet_updates_is_read_again(tmp_path: Path) -> None:
    """A Secret volume as the kubelet lays it out and updates it (deploy/kubernetes
    mounts the tokens so): the file is a link through ``..data`` to a folder of the
    day, and an update writes a new folder and swaps ``..data`` at once. The new
    tokens are used, as a rewrite in place is: found the same at two readings."""

    def publish(version: str, text: str) -> None:
        folder = tmp_path / f"..2026_11_30_{version}"
        folder.mkdir()
        (folder / "tokens").write_text(text)
        swap = tmp_path / "..data_tmp"
        swap.symlink_to(folder.name)
        swap.rename(tmp_path / "..data")  # rename(2) replaces the old link atomically

    publish("1", "old-token-1\n")
    (tmp_path / "tokens").symlink_to("..data/tokens")
    authenticator = TokenAuthenticator([], tokens_file=tmp_path / "tokens")
    assert authenticator.current_tokens() == (b"old-token-1",)
    publish("2", "new-token-2,old-token-1\n")
    authenticator.refresh()
    authenticator.refresh()
    assert authenticator.current_tokens() == (b"new-token-2", b"old-token-1")
    publish("3", "new-token-2\n")
    authenticator.refresh()
    authenticator.refresh()
    assert authenticator.current_tokens() == (b"new-token-2",)


@contextlib.asynccontextmanager
async def watched_tokens_file(
    tmp_path: Path,
) -> AsyncIterator[tuple[Path, TokenAuthenticator, asyncio.Task[None]]]:
    """A tokens file holding ``old-token``, its authenticator and the watch of it."""
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    authenticator = TokenAuthenticator([], tokens_file=tokens)
    watching = asyncio.create_task(authenticator.watch())
    try:
        yield tokens, authenticator, watching
    finally:
        watching.cancel()


async def test_a_rotation_is_used_on_a_bridge_no_request_reaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is read in the background: after a quiet spell, the first delivery
    with the new token is accepted and one with the old token refused (it used to be
    read only as requests arrived, so the first ones after a rotation were checked
    against the old tokens)."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    async with watched_tokens_file(tmp_path) as (tokens, authenticator, _):
        tokens.write_text("new-token\n")
        await eventually(lambda: authenticator.current_tokens() == (b"new-token",))
    authenticator.check([(b"authorization", b"Bearer new-token")], [])
    with pytest.raises(Unauthorized):
        authenticator.check([(b"authorization", b"Bearer old-token")], [])


async def test_an_unreadable_tokens_file_keeps_the_tokens_and_the_watch_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that cannot be read (or is not UTF-8) is logged and the tokens kept; the
    watch goes on and takes the next good version."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    async with watched_tokens_file(tmp_path) as (tokens, authenticator, watching):
        tokens.write_bytes(b"\xff\xfe not utf-8")
        await eventually(lambda: "cannot use the tokens file" in caplog.text)
        assert authenticator.current_tokens() == (b"old-token",)
        assert not watching.done()
        tokens.write_text("new-token\n")
        await eventually(lambda: authenticator.current_tokens() == (b"new-token",))


async def test_a_reading_that_hangs_is_said_and_holds_no_thread_the_exit_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reading that never returns (a network volume gone; a FIFO nobody writes to here)
    held a thread of asyncio's executor, which the process's exit waited for without end:
    the bridge never exited after SIGTERM (a review's test, with a real process). It
    reads in a daemon thread now, says a slow reading once, and keeps the tokens."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    monkeypatch.setattr(auth, "SLOW_READ_SECONDS", 0.05)
    async with watched_tokens_file(tmp_path) as (tokens, authenticator, watching):
        await eventually(lambda: authenticator.current_tokens() == (b"old-token",))
        fifo = tmp_path / "tokens.fifo"
        os.mkfifo(fifo)
        fifo.replace(tokens)  # the next reading blocks in open()
        await eventually(lambda: "reading the tokens file" in caplog.text)
        assert authenticator.current_tokens() == (b"old-token",)
        (reader,) = [t for t in threading.enumerate() if t.name == "tokens-file-read"]
        assert reader.daemon  # left behind at exit, not joined
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        # A writer opens the FIFO: the reader's open returns, and its thread ends.
        os.close(os.open(tokens, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        assert not reader.is_alive()


async def test_slow_readings_are_said_once_until_one_is_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A volume slow at every reading (but answering) said so at each, every few
    seconds, and never when it was quick again (a review's find): once, then INFO."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    monkeypatch.setattr(auth, "SLOW_READ_SECONDS", 0.02)
    caplog.set_level(logging.INFO, logger=auth.__name__)
    delay, readings = [0.1], [0]
    read = auth._read

    def slow(path: Path) -> tuple[str, ...] | str:
        readings[0] += 1
        time.sleep(delay[0])
        return read(path)

    monkeypatch.setattr(auth, "_read", slow)
    async with watched_tokens_file(tmp_path):
        await eventually(lambda: readings[0] >= 4)
        delay[0] = 0.0
        await eventually(lambda: "is read in time again" in caplog.text)
    said = [r.levelname for r in caplog.records if "has taken" in r.getMessage()]
    assert said == ["WARNING"]


async def test_an_unreadable_tokens_file_is_logged_once_not_at_every_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing file is one ERROR line with the reason, however many readings fail, and
    one INFO line when it can be read again; it used to be an ERROR every second."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    caplog.set_level(logging.INFO, logger=auth.__name__)
    readings = 0
    real_read = auth.read_tokens_file

    def counting(path: Path) -> tuple[str, ...]:
        nonlocal readings
        readings += 1
        return real_read(path)

    monkeypatch.setattr(auth, "read_tokens_file", counting)

    def lines(level: int) -> list[str]:
        return [
            r.getMessage() for r in caplog.records if r.name == auth.__name__ and r.levelno == level
        ]

    async with watched_tokens_file(tmp_path) as (tokens, authenticator, _):
        tokens.unlink()
        gone = readings
        await eventually(lambda: readings >= gone + 10, what="ten readings of the missing file")
        assert len(lines(logging.ERROR)) == 1
        assert "No such file or directory" in lines(logging.ERROR)[0]
        assert authenticator.current_tokens() == (b"old-token",)
        tokens.write_text("old-token\n")
        back = readings
        await eventually(lambda: readings >= back + 5, what="five readings of the file")
        assert [line for line in lines(logging.INFO) if "again" in line] == [
            f"the tokens file {tokens} can be read again"
        ]
        tokens.unlink()  # gone once more: a new change, logged again
        await eventually(lambda: len(lines(logging.ERROR)) == 2)
        # Still unreadable, for another reason: logged (it used to stay silent, so the
        # log said "No such file" while the file was there, and not UTF-8).
        tokens.write_bytes(b"\xff\xfe not text\n")
        await eventually(lambda: len(lines(logging.ERROR)) == 3)
        assert "can't decode" in lines(logging.ERROR)[2]
        settled = readings
        await eventually(lambda: readings >= settled + 5, what="five readings of it")
        assert len(lines(logging.ERROR)) == 3
    assert authenticator.current_tokens() == (b"old-token",)


def test_a_byte_order_mark_does_not_hide_the_first_comment(tmp_path: Path) -> None:
    """A tokens file saved with a UTF-8 byte order mark (a Windows editor): its first
    line is still a comment. The mark used to be kept, so the comment's comma-separated
    pieces became tokens and 'Bearer old one removed' was accepted."""
    tokens = tmp_path / "tokens"
    tokens.write_bytes("\ufeff# rotated 2024-05-01, old one removed\r\nsecret-one".encode())
    assert auth.read_tokens_file(tokens) == ("secret-one",)
    authenticator = TokenAuthenticator([], tokens_file=tokens)
    authenticator.check([(b"authorization", b"Bearer secret-one")], [])
    with pytest.raises(Unauthorized):
        authenticator.check([(b"authorization", b"Bearer old one removed")], [])


def test_a_token_with_a_plus_pasted_raw_into_the_url_is_accepted() -> None:
    """A base64 token in ?token= without URL-encoding: its '+' stays a '+' (the query
    is not form-decoded) and matches, as the encoded form does."""
    auth = TokenAuthenticator(("ab+cd/ef==",))
    auth.check([], parse_query(b"token=ab+cd/ef=="))  # what the ingress does
    auth.check([], parse_query(b"token=ab%2Bcd%2Fef%3D%3D"))  # encoded, as it should be
    with pytest.raises(Unauthorized):
        auth.check([], parse_query(b"token=ab%20cd/ef=="))


async def test_a_short_token_written_to_the_file_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The file's tokens are checked as at startup: one under 8 characters (guessable,
    and found by chance inside keys and topic names) makes the file unusable, logged
    by its line without the token, and the tokens in use are kept."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    async with watched_tokens_file(tmp_path) as (tokens, authenticator, _):
        tokens.write_text("new-token\nQz7\n")
        await eventually(lambda: "line 2: a token must be at least 8" in caplog.text)
        assert authenticator.current_tokens() == (b"old-token",)
        assert "Qz7" not in caplog.text


async def test_a_tokens_file_emptied_while_serving_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With no BRIDGE_TOKENS, a file that comes to hold no token refuses every delivery:
    an ERROR says so (it was an INFO line, `read 0 token(s)`)."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    async with watched_tokens_file(tmp_path) as (tokens, authenticator, _):
        tokens.write_text("# emptied\n")
        await eventually(lambda: authenticator.current_tokens() == ())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"the tokens file {tokens} holds no token, and BRIDGE_TOKENS none: every delivery "
        "is refused (401) until it holds one"
    ]


def test_a_short_token_of_the_file_is_warned_of_by_its_length(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens under 16 characters are accepted (the samples use `dev-token`) with a
    warning that names their length, never the token (BRIDGE_TOKENS': test_cli)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("dev-token-1\na-token-of-32-characters-or-more\n")
    TokenAuthenticator([], tokens_file=tokens)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("a token of the tokens file has 11 characters")
    assert "dev-token-1" not in warnings[0]


def test_a_file_token_inside_a_topic_name_is_not_used_while_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checked at start by the settings, and now of each new version of the file: a
    token inside the template's text would refuse every delivery (422), one inside
    the dead-letter topic would show to whoever lists topics. The file is unusable
    (the tokens in use are kept), said without the token."""
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    settings = load_settings(
        environ={
            "BRIDGE_TOKENS_FILE": str(tokens),
            "BRIDGE_TOPIC_TEMPLATE": "shop-7f3k9q2x.{entity}.{action}",
            "BRIDGE_DEADLETTER_TOPIC": "dead.A8M2W5R1",
        }
    )
    authenticator = create_app(settings, publisher=FakePublisher()).state.authenticator
    for token, names in (
        ("7F3K9Q2X", "BRIDGE_TOPIC_TEMPLATE"),
        ("a8m2w5r1", "BRIDGE_DEADLETTER_TOPIC"),
    ):
        caplog.clear()
        tokens.write_text(f"new-token\n{token}\n")
        authenticator.refresh()
        authenticator.refresh()  # used once read the same twice
        assert authenticator.current_tokens() == (b"old-token",)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert errors[0].startswith(f"cannot use the tokens file {tokens}: {names}")
        assert token.lower() not in errors[0].lower()
    tokens.write_text("new-token\n")
    authenticator.refresh()
    authenticator.refresh()
    assert authenticator.current_tokens() == (b"new-token",)


@pytest.mark.parametrize(
    "written",
    [
        "s3cr3t7\n",  # 7 characters: under the minimum
        "replace-me-with-a-long-random-token\n",  # deploy/'s placeholder, as it is
        "good-long-token-0123456789\nshort\n",  # one good token, one refused
    ],
)
def test_an_open_bridge_is_closed_once_its_file_holds_a_token_even_a_refused_one(
    tmp_path: Path, written: str
) -> None:
    """README: requests need no token only while none is configured. A token the file's
    checks refuse made the file unusable, and the tokens in use (none) were kept: the
    bridge stayed open to anyone (a review's test). It refuses every delivery until the
    file is usable, then goes by it (open again once it holds none)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# no token yet\n")
    authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
    authenticator.check([], [])  # open, as asked
    tokens.write_text(written)  # the operator closes the door
    authenticator.refresh()
    with pytest.raises(Unauthorized):
        authenticator.check([], [])
    tokens.write_text("fixed-long-token-0123456789\n")
    for _ in range(2):  # used once read alike twice; closed meanwhile
        with pytest.raises(Unauthorized):
            authenticator.check([], [])
        authenticator.refresh()
    authenticator.check([(b"authorization", b"Bearer fixed-long-token-0123456789")], [])
    with pytest.raises(Unauthorized):
        authenticator.check([], [])
    tokens.write_text(written)
    authenticator.refresh()  # tokens in use: kept, as for any unusable file
    authenticator.check([(b"authorization", b"Bearer fixed-long-token-0123456789")], [])
    tokens.write_text("")
    for _ in range(2):
        authenticator.refresh()
    authenticator.check([], [])  # none configured: open again, as asked
