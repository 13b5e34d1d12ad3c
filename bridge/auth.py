"""Who may deliver: shared tokens, since Geins has no signatures.

Geins can only authenticate itself with a secret the user puts in the URL or in
a header (see shared/geins-webhooks.md). A token is accepted from
``Authorization: Bearer``, from the password of ``Authorization: Basic``, or
from the ``token`` query parameter. Several tokens may be valid at once, so a
token can be rotated without downtime.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence

from bridge.errors import Unauthorized

_AUTHORIZATION = b"authorization"


class TokenAuthenticator:
    """Checks a delivery's credentials against the configured tokens."""

    def __init__(self, tokens: Sequence[str], *, allow_unauthenticated: bool = False) -> None:
        self._tokens = tuple(t.encode() for t in tokens)
        # Without tokens everything is refused, unless the operator opted out
        # explicitly (the settings refuse to start otherwise).
        self.open = not self._tokens and allow_unauthenticated

    def check(
        self, headers: Sequence[tuple[bytes, bytes]], query: Sequence[tuple[str, str]]
    ) -> None:
        """Return if a presented token matches; raise :class:`Unauthorized` otherwise."""
        if self.open:
            return
        presented = [*self._from_headers(headers), *self._from_query(query)]
        if not presented:
            raise Unauthorized(
                "no token: send 'Authorization: Bearer <token>' or add '?token=<token>' to the URL"
            )
        # Compare every presented candidate with every token, without stopping
        # early, so the time taken does not tell which token or byte was close.
        matched = False
        for candidate in presented:
            for token in self._tokens:
                matched |= hmac.compare_digest(candidate, token)
        if not matched:
            raise Unauthorized("the token is not valid")

    @staticmethod
    def _from_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        found = []
        for name, value in headers:
            if name.lower() != _AUTHORIZATION:
                continue
            scheme, _, credentials = value.strip().partition(b" ")
            scheme = scheme.lower()
            credentials = credentials.strip()
            if scheme == b"bearer" and credentials:
                found.append(credentials)
            elif scheme == b"basic":
                try:
                    decoded = base64.b64decode(credentials, validate=True)
                except (binascii.Error, ValueError):
                    continue
                _, sep, password = decoded.partition(b":")
                if sep and password:
                    found.append(password)
        return found

    @staticmethod
    def _from_query(query: Sequence[tuple[str, str]]) -> list[bytes]:
        return [value.encode() for name, value in query if name.lower() == "token" and value]
