"""Cheap checks every request passes before any handler: the bridge faces the internet.

A pure ASGI middleware (no per-request objects), in the order a hostile
request meets them: URL length and header count/size (every path), then for
the webhook paths the client-address allow-list, the cap on requests in
progress and the per-address rate limit (last: a token is spent only by a
request that is served). Each refusal is an ordinary
:class:`~bridge.errors.BridgeError`, answered as problem+json like any other.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.errors import (
    BridgeError,
    ClientNotAllowed,
    HeadersTooLarge,
    Overloaded,
    RateLimited,
    UrlTooLong,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Writes the problem answer for a refused request (the ingress knows how); the
#: last argument is when the request reached the guard (time.perf_counter()).
RefuseFn = Callable[[Scope, Send, BridgeError, float], Awaitable[None]]
#: Most client addresses the rate limiter remembers (least recently seen go first).
MAX_TRACKED_CLIENTS = 10_000


def parse_address(text: str) -> Address:
    """An address a proxy names (ValueError if it is not one); one it writes IPv4-mapped
    (``::ffff:a.b.c.d``) is that IPv4 address, as IPv4 networks in the settings take it."""
    return plain(ipaddress.ip_address(text))


def parse_forwarded_hop(hop: str) -> Address:
    """One entry of X-Forwarded-For as an address (ValueError if it is not one). Some
    proxies (Azure Application Gateway) add the client's port, ``1.2.3.4:5555``, and an
    IPv6 address then comes in brackets, ``[2001:db8::9]:443`` (or ``[2001:db8::9]``).
    A bare IPv6 address has colons too, but never brackets nor a port: an entry with
    two colons or more and no bracket is taken whole."""
    host, port = hop, None
    if hop.startswith("["):
        host, bracket, rest = hop[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{hop!r} is not [address] or [address]:port")
        port = rest[1:] if rest else None
    elif hop.count(":") == 1:
        host, _, port = hop.partition(":")
    if port is not None and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"{hop!r}: the port is not a number from 0 to 65535")
    return parse_address(host)


def parse_network(text: str) -> Network:
    """A CIDR string (a bare address means a /32 or /128) as a network; ValueError if bad.

    An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) is the IPv4 network it stands
    for (``10.0.0.0/8``): a mapped client is matched as plain IPv4 (see in_networks),
    so as written it would never match. One wider than /96 spans more than the mapped
    range (other IPv6 addresses too) and has no IPv4 equivalent: refused.
    """
    network = ipaddress.ip_network(text, strict=False)
    written = ipaddress.ip_interface(text).ip  # before the mask: ::ffff:1.2.3.4/80 is ::/80
    if isinstance(written, ipaddress.IPv6Address) and written.ipv4_mapped is not None:
        if network.prefixlen < 96:
            raise ValueError(
                f"{text!r} is IPv4-mapped (::ffff:a.b.c.d) with a prefix under /96, so it "
                "spans more than the mapped range ::ffff:0:0/96; write the IPv4 network "
                "(a prefix of /96 + n is IPv4 /n)"
            )
        return ipaddress.IPv4Network((written.ipv4_mapped, network.prefixlen - 96), strict=False)
    return network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """CIDR strings as networks (see parse_network); ValueError if one is bad."""
    return tuple(parse_network(v.strip()) for v in values if v.strip())


def plain(address: Address) -> Address:
    """An IPv4-mapped address (``::ffff:a.b.c.d``: an IPv4 peer of a dual-stack
    listener) as the IPv4 address it is; any other as it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: Address, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` is in one of ``networks``. A peer that came IPv4-mapped is in
    an IPv4 network as its IPv4 address, and in an IPv6 one as itself: ``::/0`` matched
    no IPv4 client of a dual-stack listener, and BRIDGE_ALLOWED_NETWORKS=::/0 refused
    them all (a review's test). Only the peer comes so: an IPv4 address a proxy names
    in X-Forwarded-For is in no IPv6 network (``::/0`` trusted as proxies made every
    IPv4 hop one, and the client's own entry believed: a review's test)."""
    ip = plain(address)
    if any(ip in network for network in networks):
        return True
    return ip is not address and any(address in network for network in networks)


def url_too_long(url_bytes: int, limit: int, *, at_least: bool = False) -> UrlTooLong:
    """The 414 for a URL (path and query string) of ``url_bytes`` bytes, over
    ``limit``: the guard's, and the HTTP protocol's for a URL so long that the
    request head passed its cap first (``at_least``: only part of it was read)."""
    size = f"at least {url_bytes}" if at_least else str(url_bytes)
    return UrlTooLong(f"the URL has {size} bytes; at most {limit} (BRIDGE_MAX_URL_BYTES)")


class ClientAddress:
    """Who is really calling: the peer, or the client a trusted proxy says it forwards."""

    def __init__(self, trusted_proxies: tuple[Network, ...]) -> None:
        self._trusted = trusted_proxies

    def _is_trusted(self, address: Address) -> bool:
        return in_networks(address, self._trusted)

    def of(self, scope: Scope) -> Address | None:
        """The client's address: an IPv4 client of a dual-stack listener (the peer) as
        it came, IPv4-mapped (see in_networks and plain)."""
        client = scope.get("client")
        if not client:
            return None
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:  # a unix socket path, say
            return None
        if not self._trusted or not self._is_trusted(address):
            return address
        # Walk X-Forwarded-For from the right: the first hop that is not one of our
        # proxies is the client. Anything left of it could be forged by that client.
        hops: list[str] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                hops.extend(h.strip() for h in value.decode("latin-1").split(","))
        for hop in reversed(hops):
            try:
                address = parse_forwarded_hop(hop)
            except ValueError:
                return address  # garbage in the chain: trust no further than we got
            if not self._is_trusted(address):
                return address
        return address


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, ``burst`` at once.

    A client is an IPv4 address or an IPv6 /64: one host is usually given a whole /64,
    and could otherwise take a fresh address (and a full bucket) for every request.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(max(burst, 1))
        self._buckets: OrderedDict[Address | Network, tuple[float, float]] = OrderedDict()

    def check(self, address: Address) -> None:
        now = time.monotonic()
        client: Address | Network = address
        if isinstance(address, ipaddress.IPv6Address):
            client = ipaddress.IPv6Network((address, 64), strict=False)
        tokens, last = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            wait = math.ceil((1 - tokens) / self._rate)
            raise RateLimited(
                f"more than {self._rate:g} requests per second from {address}",
                retry_after=max(wait, 1),
            )
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)


def port_of(scope: Scope) -> int | None:
    """The port the request came to (None for a lifespan, or a Unix socket)."""
    server = scope.get("server")
    return None if server is None else server[1]


class Guard:
    """The middleware. ``refuse`` writes the problem answer (it lives in the ingress)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        refuse: RefuseFn,
        is_webhook: Callable[[str], bool],
        max_headers: int,
        max_header_bytes: int,
        max_url_bytes: int,
        max_concurrency: int,
        allowed_networks: tuple[Network, ...],
        client_address: ClientAddress,
        rate_limiter: RateLimiter | None,
        ops_port: int | None = None,
    ) -> None:
        self._app = app
        self._refuse = refuse
        self._is_webhook = is_webhook  # the router's own test of a path
        self._max_headers = max_headers
        self._max_header_bytes = max_header_bytes
        self._max_url_bytes = max_url_bytes
        self._max_concurrency = max_concurrency
        self._allowed = allowed_networks
        self._client_address = client_address
        self._rate_limiter = rate_limiter
        # A webhook path on BRIDGE_OPS_PORT is the app's 404 ("wrong port"), not the
        # webhook guards' 403 or 429 (which sent an operator after the allow-list), nor
        # a request counted against BRIDGE_MAX_CONCURRENCY.
        self._ops_port = ops_port
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        webhook = self._is_webhook(scope["path"]) and not self._to_ops_port(scope)
        try:
            self._check_size(scope)
            if webhook:
                self._check_client(scope)
        except BridgeError as error:
            await self._refuse(scope, send, error, started)
            return
        if not webhook:
            await self._app(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self.in_progress -= 1

    def _to_ops_port(self, scope: Scope) -> bool:
        return self._ops_port is not None and port_of(scope) == self._ops_port

    def _check_size(self, scope: Scope) -> None:
        url_bytes = len(scope.get("raw_path") or b"") + len(scope["query_string"])
        if url_bytes > self._max_url_bytes:
            raise url_too_long(url_bytes, self._max_url_bytes)
        headers = scope["headers"]
        if len(headers) > self._max_headers:
            raise HeadersTooLarge(f"{len(headers)} headers; at most {self._max_headers}")
        size = 0
        for name, value in headers:  # a plain loop: a generator costs twice as much here
            size += len(name) + len(value)
        if size > self._max_header_bytes:
            raise HeadersTooLarge(
                f"the headers have {size} bytes; at most {self._max_header_bytes}"
            )

    def _check_client(self, scope: Scope) -> None:
        """The allow-list, the cap on requests in progress, then the rate limit: a
        request refused as overloaded took a token of its client's bucket, and a client
        that had only 503s was then answered 429."""
        address = None
        if self._allowed or self._rate_limiter is not None:
            address = self._client_address.of(scope)
        if self._allowed and (address is None or not in_networks(address, self._allowed)):
            shown = address if address is None else plain(address)
            raise ClientNotAllowed(f"{shown} is not in BRIDGE_ALLOWED_NETWORKS")
        if self.in_progress >= self._max_concurrency:
            raise Overloaded(
                f"{self.in_progress} requests are in progress "
                f"(BRIDGE_MAX_CONCURRENCY={self._max_concurrency})",
                retry_after=1,
            )
        if self._rate_limiter is not None and address is not None:
            self._rate_limiter.check(plain(address))  # (an IPv4 client's own bucket)
