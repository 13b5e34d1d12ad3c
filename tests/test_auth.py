"""auth: where tokens are read from, and what is refused."""

from __future__ import annotations

import base64
import hmac
import os
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from bridge import auth
from bridge.auth import TokenAuthenticator
from bridge.errors import Unauthorized

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


def test_an_open_bridge_requires_a_token_once_the_file_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BRIDGE_ALLOW_UNAUTHENTICATED opens the bridge only while no token exists: a
    token written to the tokens file later is required from then on (from the check
    after the one that saw the change)."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.0)
    tokens = tmp_path / "tokens"
    tokens.write_text("# no token yet\n")
    authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
    authenticator.check([], [])
    tokens.write_text("file-token\n")
    authenticator.check([], [])  # sees the change: used at the next check
    with pytest.raises(Unauthorized):
        authenticator.check([], [])
    with pytest.raises(Unauthorized):
        authenticator.check([(b"authorization", b"Bearer wrong")], [])
    authenticator.check([(b"authorization", b"Bearer file-token")], [])


def test_a_tokens_file_caught_mid_rewrite_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite in place (truncate, then write, maybe in pieces) is used only once the
    file is found the same at two checks in a row: caught empty it does not open the
    bridge, caught half written it accepts no fragment of a token and still the old
    tokens. A change is seen even when it keeps the file's mtime (one clock tick)."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.0)
    tokens = tmp_path / "tokens"

    def rewrite(text: str) -> None:
        tokens.write_text(text)
        os.utime(tokens, (1, 1))  # the same mtime throughout

    def accepts(token: str | None) -> bool:
        headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
        try:
            authenticator.check(headers, [])
        except Unauthorized:
            return False
        return True

    rewrite("old-token\n")
    authenticator = TokenAuthenticator([], allow_unauthenticated=True, tokens_file=tokens)
    # One check for each moment of the rewrite, as a check every 2 s would see it.
    rewrite("")  # caught truncated
    assert not accepts(None)  # not open
    rewrite("old-token\nnew-to")  # caught half written
    assert accepts("old-token")  # the old tokens still
    rewrite("old-token\nnew-token\n")  # written: seen now, used at the next check
    assert not accepts("new-to")  # no fragment
    assert accepts("new-token")
    assert accepts("old-token")
    rewrite("old-token\nnew-tokex\n")  # the same size and mtime
    assert accepts("new-token")  # seen now
    assert not accepts("new-token")
    assert accepts("new-tokex")
    tokens.write_text("# tokens removed\n")  # emptied on purpose: open from the next check
    assert not accepts(None)
    assert accepts(None)


def test_a_token_with_a_plus_pasted_raw_into_the_url_is_accepted() -> None:
    """A base64 token in ?token= without URL-encoding: its '+' arrives as a space after
    query decoding (parse_qsl), and still matches; a token with a space (one line of a
    tokens file) still matches as it is."""
    auth = TokenAuthenticator(("ab+cd/ef==",))
    query = parse_qsl("token=ab+cd/ef==", keep_blank_values=True)  # what the ingress does
    auth.check([], query)
    auth.check([], parse_qsl("token=ab%2Bcd%2Fef%3D%3D"))  # encoded, as it should be
    TokenAuthenticator(("ab cd",)).check([], parse_qsl("token=ab+cd"))
