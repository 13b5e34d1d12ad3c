"""Who may deliver: shared tokens, since Geins has no signatures.

Geins can only authenticate itself with a secret the user puts in the URL or in
a header (see shared/geins-webhooks.md). A token is accepted from
``Authorization: Bearer``, from the password of ``Authorization: Basic``, or
from the ``token`` query parameter. Several tokens may be valid at once, so a
token can be rotated without downtime. A request may present at most
MAX_CREDENTIALS of them.

The authenticator's :class:`~bridge.redaction.Redactor` knows every token used since
the process started, for whoever must keep them out of what it writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from bridge.errors import ConfigError, TooManyCredentials, Unauthorized
from bridge.redaction import Redactor

log = logging.getLogger(__name__)

_AUTHORIZATION = b"authorization"
#: How often the tokens file is read; a change is used at the reading after the one
#: that saw it, so within two of these.
FILE_CHECK_SECONDS = 1.0
#: A reading of the tokens file that has taken this long is said (a volume that hangs).
SLOW_READ_SECONDS = 10.0
#: Most credentials (Authorization headers and ``token`` query parameters together) one
#: request may present; each is compared with every token, so a request with hundreds
#: would cost hundreds of comparisons each. Geins sends one.
MAX_CREDENTIALS = 4
#: Shortest token accepted. Besides being guessed, a short token is found by chance in
#: what deliveries carry, and every idempotency key, path, subject and topic name that
#: holds a token is refused or left out so that none publishes one: a 3-character token
#: is inside 0.6 % of random UUID keys (refused, on every retry), a 1-character one in
#: 89 %, and "ins" inside the default template's "geins" refused every delivery.
MIN_TOKEN_LENGTH = 8
#: Shorter than this is accepted with a warning (the samples' ``dev-token`` is 9).
ADVISED_TOKEN_LENGTH = 16
#: How the placeholders of deploy/ (the Kubernetes Secret, the Compose .env example)
#: begin: deployed as they are, anyone who reads the repository could deliver.
PLACEHOLDER_PREFIXES = ("replace-me", "change-me", "changeme")


def token_problem(token: str) -> str | None:
    """What is wrong with ``token`` as a webhook token, or None. Never quotes it."""
    if not token:  # tokens = [""] in TOML: every delivery would get 401
        return "a token must not be empty"
    if not token.isprintable() or " " in token:
        return "a token must be printable and contain no spaces"
    if token.lower().startswith(PLACEHOLDER_PREFIXES):
        return (
            "a token is an example's placeholder: put a random one in its place, e.g. "
            "`openssl rand -hex 32`"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        return (
            f"a token must be at least {MIN_TOKEN_LENGTH} characters long (one has "
            f"{len(token)}): use a long random one, e.g. `openssl rand -hex 32`"
        )
    return None


def read_tokens_file(path: Path) -> tuple[str, ...]:
    """Tokens from a file: one per line or comma-separated; blank lines and # comments
    skipped. ValueError for a token :func:`token_problem` refuses, naming its line."""
    tokens: list[str] = []
    # utf-8-sig: a file saved by a Windows editor starts with a byte order mark, which
    # would hide a first-line '#' and turn that comment's words into tokens.
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            for token in (t.strip() for t in line.split(",") if t.strip()):
                if problem := token_problem(token):
                    raise ValueError(f"line {number}: {problem}")
                tokens.append(token)
    return tuple(tokens)


def short_token_warnings(tokens: Sequence[str], where: str) -> list[str]:
    """A warning for each token shorter than ADVISED_TOKEN_LENGTH (by its length)."""
    return [
        f"a token of {where} has {len(token)} characters: one this short can be guessed; "
        f"use at least {ADVISED_TOKEN_LENGTH} random ones, e.g. `openssl rand -hex 32`"
        for token in tokens
        if len(token) < ADVISED_TOKEN_LENGTH
    ]


#: Said at start (and by check-config), and when the tokens file is emptied, while the
#: bridge accepts deliveries without a token: an open door worth a line in any log.
UNAUTHENTICATED = (
    "no webhook token is configured, and BRIDGE_ALLOW_UNAUTHENTICATED=true: anyone who "
    "can reach the bridge can publish to Kafka"
)


def warn_if_short(tokens: Sequence[str], where: str) -> None:
    for warning in short_token_warnings(tokens, where):
        log.warning("%s", warning)


def tokens_redactor(tokens: Sequence[str], tokens_file: Path | None) -> Redactor:
    """A Redactor of the tokens the settings give now, BRIDGE_TOKENS and
    BRIDGE_TOKENS_FILE as the authenticator reads it, for a command that serves no
    request (``bridge deadletter replay``). ConfigError when the file cannot be read:
    its tokens would go unrecognised."""
    from_file: tuple[str, ...] = ()
    if tokens_file is not None:
        try:
            from_file = read_tokens_file(tokens_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the tokens file {tokens_file}: {exc}") from None
    return Redactor([*tokens, *from_file])


def unreadable_because(exc: OSError | ValueError) -> str:
    """Why a file could not be read or used, without its name (which OSError's text
    holds, and which may be a secret set in the wrong setting)."""
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


class _Unusable(str):
    """Why a tokens file that was read cannot be used: it holds something, but no token
    the bridge takes (one too short, a placeholder, not UTF-8, one inside the topic
    names). Unlike a file that cannot be read, it says the operator wants tokens."""

    __slots__ = ()


def _read(path: Path) -> tuple[str, ...] | str:
    """The file's tokens, or why it cannot be read now: a rotation in progress, say, or
    not UTF-8 (an _Unusable). The watch must live on through either."""
    try:
        return read_tokens_file(path)
    except OSError as exc:
        return unreadable_because(exc)
    except ValueError as exc:
        return _Unusable(unreadable_because(exc))


def _read_aside(path: Path) -> asyncio.Future[tuple[str, ...] | str]:
    """_read in a daemon thread of its own, its outcome as a future of the running loop.
    Not in asyncio's executor (to_thread): a read that never returns (a network volume
    gone) held a thread of it, which the stop then waited for without end (Python 3.11's
    shutdown_default_executor has no time limit, and the interpreter joins the executor's
    threads at exit): the bridge never exited after SIGTERM (a review's test). A daemon
    thread is left behind at exit."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[tuple[str, ...] | str] = loop.create_future()

    def settle(result: tuple[str, ...] | str | BaseException) -> None:
        if outcome.done():  # cancelled: the watch stopped meanwhile
            return
        if isinstance(result, BaseException):
            outcome.set_exception(result)
        else:
            outcome.set_result(result)

    def read() -> None:
        result: tuple[str, ...] | str | BaseException
        try:
            result = _read(path)
        except BaseException as exc:  # (a bug: the watch's task reports it)
            result = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for it
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=read, name="tokens-file-read", daemon=True).start()
    return outcome


class TokenAuthenticator:
    """Checks a delivery's credentials against the configured tokens.

    Tokens from ``tokens_file`` are read at start, then again every
    FILE_CHECK_SECONDS by :meth:`watch` (a background task of the app), so a mounted
    Kubernetes Secret can rotate them without a restart. A change is used once it is
    found the same at the next reading, whether requests arrive or not.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        allow_unauthenticated: bool = False,
        tokens_file: Path | None = None,
        refuse_file: Callable[[Sequence[str]], str | None] = lambda _: None,
    ) -> None:
        self._static = tuple(t.encode() for t in tokens)
        self.tokens_file = tokens_file
        # Why the file's tokens cannot be used with the other settings, or None
        # (Settings.token_in_names: one inside the topic names); checked at start by
        # the settings, so a file that changes while serving is checked the same.
        self._refuse_file = refuse_file
        self._from_file: tuple[str, ...] | None = None  # in use; None before the first read
        self._changed: tuple[str, ...] | None = None  # read once, used when read again
        self._tokens = self._static
        #: Every token used since start, for keeping them out of logs and dead letters.
        self.redactor = Redactor(tokens)
        # Without tokens everything is refused, unless the operator opted out
        # explicitly (the settings refuse to start otherwise). Decided per request,
        # after the tokens file is looked at: once the file holds a token, it is
        # required.
        self._allow_unauthenticated = allow_unauthenticated
        # Why the file could not be read, as logged, until it is logged as readable
        # again: a file gone for an hour is one ERROR line, not one per reading (it
        # used to be one a second); a new reason (gone, then unreadable) is one more.
        self._unreadable: str | None = None
        # An open bridge (no token, BRIDGE_ALLOW_UNAUTHENTICATED) whose file came to hold
        # something it cannot use: closed, every delivery refused, until the file is
        # usable again (_reopening: as read once; used when read the same again). The
        # tokens in use were kept, and there were none: an operator who wrote a token
        # to close the door, and had it refused (a placeholder, say), left it open.
        self._closed_by_file = False
        self._reopening: tuple[str, ...] | None = None
        self.refresh()
        if not self._tokens and allow_unauthenticated:
            log.warning("%s", UNAUTHENTICATED)

    def refresh(self) -> None:
        """Read the tokens file now (if there is one) and apply what :meth:`_take` says."""
        if self.tokens_file is not None:
            self._take(self._logged(_read(self.tokens_file)))

    def _logged(self, read: tuple[str, ...] | str) -> tuple[str, ...] | None:
        """The tokens read, or None if the file could not be read or its tokens not
        used; logs only the changes between the two, with the reason when it becomes
        unusable."""
        # Only tokens not in use yet: those in use passed this check when taken (or
        # the settings' at start), and it builds a Redactor and renders the template,
        # about a millisecond on the event loop at every reading, once a second.
        if (
            isinstance(read, tuple)
            and read != self._from_file
            and (refused := self._refuse_file(read))
        ):
            read = _Unusable(refused)
        if isinstance(read, _Unusable) and not self._tokens and self._allow_unauthenticated:
            self._reopening = None
            if not self._closed_by_file:
                self._closed_by_file = True
                log.error(
                    "the tokens file %s holds something but no token the bridge can use "
                    "(%s): the bridge, open without tokens until now, refuses every "
                    "delivery (401) until the file holds a usable token, or none",
                    self.tokens_file,
                    read,
                )
        if isinstance(read, str):
            if read != self._unreadable:
                log.error(
                    "cannot use the tokens file %s: %s (the tokens in use are kept; this is "
                    "logged again only when the reason changes or after the file was read)",
                    self.tokens_file,
                    read,
                )
                self._unreadable = read
            return None
        if self._unreadable is not None:
            log.info("the tokens file %s can be read again", self.tokens_file)
            self._unreadable = None
        return read

    async def watch(self) -> None:
        """Read the tokens file every FILE_CHECK_SECONDS until cancelled.

        In the background rather than on the way of a request: a rotation is then
        used within two readings of the file even on a bridge no request reaches
        (it used to be read only as requests arrived, so the first deliveries after
        a quiet spell were checked against the old tokens, and refused). Read, not
        stat()ed: a rewrite within one tick of the file system's clock keeps the
        mtime (and the size, for a token of the same length), and would never be
        seen. Read in a thread: a slow volume does not stall the event loop, and a
        reading that hangs is said, once, and waited for (the tokens in use are kept).
        """
        path = self.tokens_file
        if path is None:
            return
        slow_said = False  # a slow reading was said, and none quick since
        while True:
            await asyncio.sleep(FILE_CHECK_SECONDS)
            reading = _read_aside(path)
            try:
                quick = bool((await asyncio.wait({reading}, timeout=SLOW_READ_SECONDS))[0])
                if not quick and not slow_said:  # once while readings stay slow
                    slow_said = True
                    log.warning(
                        "reading the tokens file %s has taken %g s, and goes on (its "
                        "volume hangs?): the tokens in use are kept meanwhile",
                        path,
                        SLOW_READ_SECONDS,
                    )
                self._take(self._logged(await reading))
                if quick and slow_said:
                    slow_said = False
                    log.info("the tokens file %s is read in time again", path)
            finally:
                reading.cancel()  # (done already, but when the watch is cancelled)

    def _take(self, from_file: tuple[str, ...] | None) -> None:
        if from_file is None:  # unreadable now: keep the tokens in use
            return
        if self._closed_by_file:
            if from_file != self._reopening:  # as for a change: the same at two readings
                self._reopening = from_file
                return
            self._closed_by_file, self._reopening = False, None
            if from_file == self._from_file:  # none still: open again, as asked
                log.warning("%s", UNAUTHENTICATED)
            else:  # read alike twice already: used now (not open for one more reading)
                self._changed = from_file
        if from_file == self._from_file:
            self._changed = None  # changed and changed back: nothing pending
            return
        if self._from_file is not None and from_file != self._changed:
            # Changed: used once it is found the same at the next reading. A file
            # caught in the middle of a rewrite in place (truncated, or half
            # written) has changed again by then, so it is never used: it would
            # open the bridge to requests without a token, accept a fragment of a
            # token, or refuse a token the file holds before and after.
            self._changed = from_file
            return
        started = self._from_file is not None  # not the first reading, at start
        self._from_file, self._changed = from_file, None
        self._tokens = self._static + tuple(t.encode() for t in from_file)
        self.redactor.use(t.decode() for t in self._tokens)  # the old ones are kept too
        if self._tokens or self._allow_unauthenticated:
            log.info("read %d token(s) from %s", len(from_file), self.tokens_file)
            warn_if_short(from_file, "the tokens file")
            if not self._tokens and started:  # emptied: open to anyone from now on
                log.warning("%s", UNAUTHENTICATED)
        else:  # the settings refuse to start so; a file emptied since is worth an ERROR
            log.error(
                "the tokens file %s holds no token, and BRIDGE_TOKENS none: every delivery "
                "is refused (401) until it holds one",
                self.tokens_file,
            )

    def current_tokens(self) -> tuple[bytes, ...]:
        """Every token accepted now: BRIDGE_TOKENS and the tokens file as last read."""
        return self._tokens

    def check(
        self, headers: Sequence[tuple[bytes, bytes]], query: Sequence[tuple[str, str]]
    ) -> None:
        """Return if a presented token matches; raise :class:`Unauthorized` otherwise."""
        if not self._tokens and self._allow_unauthenticated and not self._closed_by_file:
            return
        presented, count = self._from_headers(headers)
        if query:
            from_query, in_query = self._from_query(query)
            presented += from_query
            count += in_query
        if count > MAX_CREDENTIALS:
            raise TooManyCredentials(
                f"the request presents {count} credentials (Authorization headers and token "
                f"query parameters together); at most {MAX_CREDENTIALS} are read: send one token"
            )
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
    def _from_headers(headers: Sequence[tuple[bytes, bytes]]) -> tuple[list[bytes], int]:
        """The candidate tokens of the Authorization headers, and how many there are."""
        found = []
        count = 0
        for name, value in headers:
            if name.lower() != _AUTHORIZATION:
                continue
            count += 1
            if count > MAX_CREDENTIALS:
                continue  # refused anyway: only counted
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
        return found, count

    @staticmethod
    def _from_query(query: Sequence[tuple[str, str]]) -> tuple[list[bytes], int]:
        """The candidate tokens of the ``token`` parameters, and how many there are."""
        presented: list[bytes] = []
        count = 0
        for name, value in query:
            if name.lower() != "token":
                continue
            count += 1
            if value and count <= MAX_CREDENTIALS:
                # A '+' pasted as it is stays one: the query is not form-decoded.
                presented.append(value.encode())
        return presented, count
