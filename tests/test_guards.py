"""guards: limits on URL, headers, concurrency, rate and client address; token files."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bridge import auth
from bridge.app import create_app
from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.routing import Destination
from tests.fakes import TOKEN, AsgiResponse, FakePublisher, call_asgi
from tests.polling import wait_until

AUTH = (b"authorization", b"Bearer " + TOKEN.encode())
ORDER = [b'{"entity":"Order","action":"create"}']


def app_with(**env: str) -> tuple[Any, FakePublisher]:
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_ACK": "broker", **env})
    publisher = FakePublisher()
    return create_app(settings, publisher=publisher), publisher


def post(app: Any, *, headers: list[tuple[bytes, bytes]] | None = None, query: bytes = b"",
         client: str = "127.0.0.1") -> AsgiResponse:  # fmt: skip
    return asyncio.run(
        call_asgi(
            app, "POST", "/webhooks/geins", query=query, headers=[AUTH, *(headers or [])],
            body_chunks=ORDER, client=client,
        )
    )  # fmt: skip


def test_url_too_long_is_414() -> None:
    """A URL beyond BRIDGE_MAX_URL_BYTES is refused before anything else."""
    app, publisher = app_with(BRIDGE_MAX_URL_BYTES="300")
    response = post(app, query=b"x=" + b"a" * 400)
    assert response.status == 414
    assert response.json()["reason"] == "url_too_long"
    assert publisher.records == []


def test_header_count_and_size_are_431() -> None:
    """Too many headers, or too many header bytes, are 431."""
    app, publisher = app_with(BRIDGE_MAX_HEADERS="10", BRIDGE_MAX_HEADER_BYTES="2048")
    many = [(f"x-h{i}".encode(), b"v") for i in range(11)]
    assert post(app, headers=many).status == 431
    big = [(b"x-big", b"v" * 3000)]
    assert post(app, headers=big).status == 431
    assert post(app, headers=many[:5]).status == 202
    assert len(publisher.records) == 1


def test_concurrency_cap_is_503_with_retry_after() -> None:
    """Beyond BRIDGE_MAX_CONCURRENCY requests in progress, more get 503 at once."""
    app, publisher = app_with(BRIDGE_MAX_CONCURRENCY="1")
    release = asyncio.Event()

    async def slow_publish(destination: Destination) -> None:
        await release.wait()
        publisher.records.append(destination)

    publisher.publish = slow_publish  # type: ignore[method-assign]  # a stalled Kafka

    async def scenario() -> tuple[AsgiResponse, AsgiResponse]:
        first = asyncio.create_task(
            call_asgi(app, "POST", "/webhooks/geins", headers=[AUTH], body_chunks=ORDER)
        )
        await asyncio.sleep(0.05)
        second = await call_asgi(app, "POST", "/webhooks/geins", headers=[AUTH], body_chunks=ORDER)
        release.set()
        return await first, second

    first, second = asyncio.run(scenario())
    assert (first.status, second.status) == (202, 503)
    assert second.json()["reason"] == "overloaded"
    assert second.headers["retry-after"] == "1"
    assert len(publisher.records) == 1


def test_a_request_refused_as_overloaded_costs_its_client_no_token() -> None:
    """The rate limit came before the concurrency cap: a request refused 503 (overloaded)
    took a token all the same, and a client that had nothing served was answered 429."""
    app, publisher = app_with(
        BRIDGE_MAX_CONCURRENCY="1", BRIDGE_RATE_LIMIT="0.001", BRIDGE_RATE_BURST="2"
    )
    release = asyncio.Event()

    async def slow_publish(destination: Destination) -> None:
        await release.wait()
        publisher.records.append(destination)

    publisher.publish = slow_publish  # type: ignore[method-assign]  # a stalled Kafka

    def from_(client: str) -> Any:
        return call_asgi(
            app, "POST", "/webhooks/geins", headers=[AUTH], body_chunks=ORDER, client=client
        )

    async def scenario() -> list[int]:
        busy = asyncio.create_task(from_("192.0.2.99"))  # takes the only place
        await asyncio.sleep(0.05)
        refused = await from_("192.0.2.1")
        release.set()
        await busy
        return [refused.status] + [(await from_("192.0.2.1")).status for _ in range(3)]

    assert asyncio.run(scenario()) == [503, 202, 202, 429]  # its burst of 2 was whole


def test_rate_limit_per_address_is_429() -> None:
    """Past the burst an address gets 429 with Retry-After; other addresses are not slowed."""
    app, _ = app_with(BRIDGE_RATE_LIMIT="0.5", BRIDGE_RATE_BURST="2")
    statuses = [post(app, client="192.0.2.1").status for _ in range(3)]
    assert statuses == [202, 202, 429]
    limited = post(app, client="192.0.2.1")
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["reason"] == "rate_limited"
    assert post(app, client="192.0.2.2").status == 202


def test_a_429_is_counted_as_rate_limited_not_unavailable() -> None:
    """A rate-limited request has its own outcome: the server-error alert, which watches
    outcome=~"unavailable|error", must not page because one client sends too fast."""
    app, publisher = app_with(BRIDGE_RATE_LIMIT="0.5", BRIDGE_RATE_BURST="1")
    assert [post(app).status for _ in range(3)] == [202, 429, 429]
    text = app.state.metrics.exposition().decode()
    assert 'bridge_requests_total{action="none",entity="none",outcome="rate_limited"} 2.0' in text
    counted = [line for line in text.splitlines() if line.startswith("bridge_requests_total{")]
    assert not [line for line in counted if 'outcome="unavailable"' in line and "} 0.0" not in line]
    assert 'bridge_request_duration_seconds_count{outcome="rate_limited"} 2.0' in text
    assert 'bridge_rejections_total{reason="rate_limited"} 2.0' in text
    assert len(publisher.records) == 1


def test_allow_list_and_trusted_proxies() -> None:
    """Only allowed networks get in; X-Forwarded-For counts only from a trusted proxy."""
    app, _ = app_with(BRIDGE_ALLOWED_NETWORKS="10.0.0.0/8", BRIDGE_TRUSTED_PROXIES="127.0.0.1")
    assert post(app, client="192.0.2.7").status == 403
    via_proxy = [(b"x-forwarded-for", b"10.1.2.3")]
    assert post(app, client="127.0.0.1", headers=via_proxy).status == 202
    assert post(app, client="192.0.2.7", headers=via_proxy).status == 403  # untrusted peer
    forged = [(b"x-forwarded-for", b"10.0.0.1, 198.51.100.9")]  # left part set by the client
    assert post(app, client="127.0.0.1", headers=forged).status == 403
    assert post(app, client="127.0.0.1").status == 403  # the proxy itself is not allowed


def test_ipv4_peers_of_an_ipv6_listener_match_ipv4_networks() -> None:
    """With BRIDGE_HOST=:: an IPv4 peer arrives as ::ffff:a.b.c.d; IPv4 entries in the
    allow-list and the trusted proxies still match it."""
    app, _ = app_with(BRIDGE_ALLOWED_NETWORKS="10.0.0.0/8", BRIDGE_TRUSTED_PROXIES="127.0.0.1")
    assert post(app, client="::ffff:10.1.2.3").status == 202
    assert post(app, client="::ffff:192.0.2.7").status == 403
    via_proxy = [(b"x-forwarded-for", b"::ffff:10.1.2.3")]
    assert post(app, client="::ffff:127.0.0.1", headers=via_proxy).status == 202


@pytest.mark.parametrize(
    ("forwarded", "allowed"),
    [
        (b"1.2.3.4:5555", "1.2.3.0/24"),  # Azure Application Gateway adds the port
        (b"[2001:db8::9]:443", "2001:db8::/64"),
        (b"[2001:db8::9]", "2001:db8::/64"),
        (b"2001:db8::9", "2001:db8::/64"),  # bare IPv6: its colons are no port
        (b"[::ffff:1.2.3.4]:80", "1.2.3.0/24"),
        (b"1.2.3.4:5555, 127.0.0.2:80", "1.2.3.0/24"),  # a trusted hop with a port too
    ],
)
def test_forwarded_entries_with_a_port_or_brackets_name_the_client(
    forwarded: bytes, allowed: str
) -> None:
    """An X-Forwarded-For entry with a port or in brackets is the client's address; it
    used to be taken for garbage, so the proxy itself was checked (403 127.0.0.1)."""
    app, _ = app_with(BRIDGE_ALLOWED_NETWORKS=allowed, BRIDGE_TRUSTED_PROXIES="127.0.0.0/8")
    assert post(app, headers=[(b"x-forwarded-for", forwarded)]).status == 202


@pytest.mark.parametrize(
    "forwarded",
    [b"1.2.3.4:http", b"1.2.3.4:", b"[2001:db8::9", b"[2001:db8::9]x", b"[1.2.3.4]:99999"],
)
def test_unreadable_forwarded_entries_are_still_not_believed(forwarded: bytes) -> None:
    """What is neither an address nor one with a port stops the walk as before: the last
    address read (the proxy's) is the client."""
    app, _ = app_with(BRIDGE_ALLOWED_NETWORKS="1.2.3.0/24", BRIDGE_TRUSTED_PROXIES="127.0.0.1")
    response = post(app, headers=[(b"x-forwarded-for", forwarded)])
    assert (response.status, response.json()["detail"]) == (
        403,
        "127.0.0.1 is not in BRIDGE_ALLOWED_NETWORKS",
    )


def test_ipv4_mapped_networks_in_the_settings_match() -> None:
    """A network written IPv4-mapped (::ffff:10.0.0.0/104) matches the clients it names.
    Clients are turned into plain IPv4, so such a network used to match none: the
    trusted proxy's X-Forwarded-For was ignored and the allowed client refused."""
    app, _ = app_with(
        BRIDGE_ALLOWED_NETWORKS="::ffff:1.2.3.0/120", BRIDGE_TRUSTED_PROXIES="::ffff:10.0.0.0/104"
    )
    assert post(app, client="::ffff:1.2.3.4").status == 202
    assert post(app, client="1.2.3.4").status == 202
    assert post(app, client="1.2.4.4").status == 403
    via_proxy = [(b"x-forwarded-for", b"1.2.3.4")]
    assert post(app, client="::ffff:10.0.0.7", headers=via_proxy).status == 202
    assert post(app, client="192.0.2.7", headers=via_proxy).status == 403  # untrusted peer


@pytest.mark.parametrize("networks", ["::/0", "::/64", "::ffff:0:0/96"])
def test_ipv6_networks_holding_the_mapped_range_match_ipv4_clients(networks: str) -> None:
    """An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d and is made
    plain IPv4; ::ffff:0:0/96 (0.0.0.0/0) matched it, but ::/0 and ::/64, which hold
    that range, did not: BRIDGE_ALLOWED_NETWORKS=::/0 refused every IPv4 client,
    silently (a review's test). Trusted proxies alike."""
    app, _ = app_with(BRIDGE_ALLOWED_NETWORKS=networks)
    assert post(app, client="::ffff:192.0.2.7").status == 202
    proxied, _ = app_with(BRIDGE_ALLOWED_NETWORKS="203.0.113.0/24", BRIDGE_TRUSTED_PROXIES=networks)
    via_proxy = [(b"x-forwarded-for", b"203.0.113.9")]
    assert post(proxied, client="::ffff:192.0.2.7", headers=via_proxy).status == 202
    narrow, _ = app_with(BRIDGE_ALLOWED_NETWORKS="2001:db8::/32")
    assert post(narrow, client="::ffff:192.0.2.7").status == 403  # holds no mapped address


def test_ipv6_trusted_proxies_do_not_trust_the_ipv4_clients_they_forward() -> None:
    """An IPv6 proxy tier trusted as ::/0 forwards an IPv4 client, appending its real
    address (203.0.113.9) to what it sent (198.51.100.7, forged): the client is the
    rightmost untrusted hop. Matching ::/0 as IPv4 too made every IPv4 hop a proxy,
    and the forged entry the client (a review's test)."""
    app, publisher = app_with(
        BRIDGE_TRUSTED_PROXIES="::/0", BRIDGE_ALLOWED_NETWORKS="198.51.100.0/24"
    )
    forged = [(b"x-forwarded-for", b"198.51.100.7, 203.0.113.9")]
    assert post(app, client="2001:db8::1", headers=forged).status == 403
    assert post(app, client="::ffff:192.0.2.7", headers=forged).status == 403
    assert publisher.records == []


def test_an_ipv4_client_of_a_dual_stack_listener_has_a_bucket_of_its_own() -> None:
    """Kept IPv4-mapped for the networks, its rate limit is still its IPv4 address's,
    not the /64 every mapped address shares."""
    app, _ = app_with(BRIDGE_RATE_LIMIT="0.5", BRIDGE_RATE_BURST="1")
    assert post(app, client="::ffff:192.0.2.7").status == 202
    assert post(app, client="::ffff:192.0.2.8").status == 202


def test_ipv6_clients_are_rate_limited_per_64() -> None:
    """A host owns a whole IPv6 /64: a fresh address per request is the same client."""
    app, _ = app_with(BRIDGE_RATE_LIMIT="0.5", BRIDGE_RATE_BURST="2")
    statuses = [post(app, client=f"2001:db8:0:1::{n}").status for n in range(1, 4)]
    assert statuses == [202, 202, 429]
    assert post(app, client="2001:db8:0:2::1").status == 202  # another /64


def test_operations_endpoints_are_not_rate_limited() -> None:
    """/metrics and /readyz stay reachable for monitoring whatever the webhook limits."""
    app, _ = app_with(BRIDGE_ALLOWED_NETWORKS="10.0.0.0/8")
    response = asyncio.run(call_asgi(app, "GET", "/healthz", client="192.0.2.7"))
    assert response.status == 200


def test_tokens_file_is_read_and_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens come from BRIDGE_TOKENS_FILE and a changed file takes effect without
    restart, read by the app's own background task while no request arrives."""
    monkeypatch.setattr(auth, "FILE_CHECK_SECONDS", 0.01)
    tokens = tmp_path / "tokens"
    tokens.write_text("# current and next\nold-secret\nnew-secret\n")
    settings = load_settings(environ={"BRIDGE_TOKENS_FILE": str(tokens), "BRIDGE_ACK": "broker"})
    settings.check_serving()
    app = create_app(settings, publisher=FakePublisher())

    def status(client: TestClient, token: str) -> int:
        headers = {"authorization": f"Bearer {token}"}
        return client.post("/webhooks/geins", content=ORDER, headers=headers).status_code

    with TestClient(app) as client:  # the lifespan: the file is watched
        assert (status(client, "old-secret"), status(client, "new-secret")) == (202, 202)
        tokens.write_text("new-secret\n")
        current = wait_until(
            app.state.authenticator.current_tokens,
            lambda tokens: tokens == (b"new-secret",),
            within=10,
            every=0.01,
        )
        assert current == (b"new-secret",), "the rotation is used with no request arriving"
        assert (status(client, "old-secret"), status(client, "new-secret")) == (401, 202)


def test_tokens_from_the_file_never_reach_dead_letters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token of the tokens file, copied into any header or query value of a delivery
    that becomes a dead letter, is scrubbed like one of BRIDGE_TOKENS (a header holding
    one is left out, a query value's token is replaced by a marker); also one written to
    the file after startup."""
    tokens = tmp_path / "tokens"
    tokens.write_text("file-secret-1\n")
    app, publisher = app_with(BRIDGE_TOKENS_FILE=str(tokens))

    def refused(token: str, key: str) -> int:
        return asyncio.run(
            call_asgi(
                app,
                "POST",
                "/webhooks/geins",
                query=f"copy={token}&note=kept".encode(),
                headers=[
                    (b"authorization", f"Bearer {token}".encode()),
                    (b"x-token-copy", f"is {token}.".encode()),
                    (b"x-idempotency-key", key.encode()),
                ],
                body_chunks=[b"{not json"],
            )
        ).status

    assert refused("file-secret-1", "k1") == 400
    tokens.write_text("file-secret-2\n")
    app.state.authenticator.refresh()  # seen now, used from the next reading
    assert refused("file-secret-2", "k-early") == 401
    app.state.authenticator.refresh()
    assert refused("file-secret-2", "k2") == 400
    assert refused("file-secret-2", "key-file-secret-2") == 400  # a new key instead
    assert [r.key for r in publisher.records][:2] == [b"k1", b"k2"]
    for record in publisher.records:
        headers = dict(record.headers)
        assert headers["x-bridge-query"] == b"copy=%3Ctoken%3E&note=kept"
        everything = b"".join(v for _, v in record.headers) + record.value + record.key
        assert b"file-secret" not in everything


def test_unreadable_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    """A tokens file that cannot be read stops startup, naming the setting."""
    with pytest.raises(ConfigError, match="BRIDGE_TOKENS_FILE"):
        load_settings(environ={"BRIDGE_TOKENS_FILE": str(tmp_path / "missing")})
    # not UTF-8: the path is named too (it used to be the codec's message alone)
    binary = tmp_path / "tokens.bin"
    binary.write_bytes(b"\xff\xfe secret\n")
    with pytest.raises(ConfigError, match=f"BRIDGE_TOKENS_FILE.*{binary}.*not UTF-8"):
        load_settings(environ={"BRIDGE_TOKENS_FILE": str(binary)})


def test_guard_refusals_are_timed_not_recorded_as_zero() -> None:
    """A request the guards refuse goes into bridge_request_duration_seconds with the
    time it took to refuse it, not 0.0 (which filled the first bucket with fakes)."""
    app, publisher = app_with(BRIDGE_MAX_URL_BYTES="300")
    assert post(app, query=b"x=" + b"a" * 400).status == 414
    text = app.state.metrics.exposition().decode()
    [line] = [
        line
        for line in text.splitlines()
        if line.startswith('bridge_request_duration_seconds_sum{outcome="rejected"}')
    ]
    assert float(line.split()[-1]) > 0
    assert 'bridge_request_duration_seconds_count{outcome="rejected"} 1.0' in text
    assert publisher.records == []


def test_a_path_that_only_starts_like_the_webhook_path_is_not_guarded_as_one() -> None:
    """/webhooks/geinsfoo is no webhook path (the router does not serve it): it gets
    the 404 of any unknown path. The guard took it for one by its first characters,
    so it got the allow-list's 403 (counted as a refused delivery), the rate limit and
    the concurrency cap."""
    app, publisher = app_with(BRIDGE_ALLOWED_NETWORKS="10.0.0.0/8")
    answer = asyncio.run(
        call_asgi(app, "POST", "/webhooks/geinsfoo", headers=[AUTH], body_chunks=ORDER)
    )
    assert answer.status == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert publisher.records == []
    assert 'bridge_rejections_total{reason="client_not_allowed"} 0.0' in (
        app.state.metrics.exposition().decode()
    )


def test_a_webhook_path_on_the_ops_port_is_its_404_whatever_the_webhook_guards_say() -> None:
    """README: a webhook path on BRIDGE_OPS_PORT is a 404 (logged and counted as
    not_found). The allow-list ran first: a prober outside BRIDGE_ALLOWED_NETWORKS got a
    403 there, which sent its operator after the allow-list, and a rate limit took a
    token of the webhook port's bucket (a review's test)."""
    app, publisher = app_with(
        BRIDGE_PORT="8080",
        BRIDGE_OPS_PORT="9090",
        BRIDGE_ALLOWED_NETWORKS="10.0.0.0/8",
        BRIDGE_RATE_LIMIT="1",
        BRIDGE_RATE_BURST="1",
    )
    client = ("192.0.2.7", 50000)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url="http://testserver:9090", client=client) as ops:
        for _ in range(3):  # a rate limit of 1 with a burst of 1 would say 429 at the 2nd
            answer = ops.post("/webhooks/geins/Order/create", content=ORDER[0], headers=headers)
            assert answer.status_code == 404, answer.json()
            assert "BRIDGE_OPS_PORT" in answer.json()["detail"]
    with TestClient(app, base_url="http://testserver:8080", client=client) as webhooks:
        refused = webhooks.post("/webhooks/geins/Order/create", content=ORDER[0], headers=headers)
        assert refused.status_code == 403  # the webhook port's guards as before
    assert publisher.records == []


def test_a_refusal_cut_off_at_a_stop_ends_quietly_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn cancels, as BRIDGE_SHUTDOWN_TIMEOUT runs out at a stop, a request whose
    answer waits for a client that reads none. A guard's refusal raised the
    cancellation on: uvicorn logged it as an error in the application, with a
    traceback, and wrote a text/plain 500 after it. It ends there now, logged and
    counted as the refusal it was."""
    caplog.set_level(logging.INFO)
    app, _ = app_with(BRIDGE_RATE_LIMIT="0.5", BRIDGE_RATE_BURST="1")
    assert post(app).status == 202

    async def scenario() -> None:
        writing = asyncio.Event()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:  # the client reads nothing
            writing.set()
            await asyncio.Event().wait()

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/webhooks/geins",
            "raw_path": b"/webhooks/geins", "query_string": b"", "root_path": "",
            "headers": [AUTH], "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
        }  # fmt: skip
        task = asyncio.create_task(app(scope, receive, send))
        await writing.wait()
        task.cancel()
        await task  # no CancelledError out of it

    asyncio.run(scenario())
    text = app.state.metrics.exposition().decode()
    assert 'bridge_rejections_total{reason="rate_limited"} 1.0' in text
    assert [r.getMessage() for r in caplog.records] == ["delivery refused: rate_limited"]


def test_an_unreadable_forwarded_entry_stops_the_walk() -> None:
    """Past a hop it cannot read, the walk stops there (the address before it is not
    believed): with one hop only, skipping it looked the same (a review's mutant)."""
    app, _ = app_with(BRIDGE_ALLOWED_NETWORKS="1.2.3.0/24", BRIDGE_TRUSTED_PROXIES="127.0.0.1")
    response = post(app, headers=[(b"x-forwarded-for", b"1.2.3.4, 1.2.3.4:http")])
    assert response.status == 403


def test_retry_after_follows_the_rate() -> None:
    """A 429's Retry-After is the wait for the next token: 10 s at 0.1 a second (the
    test above asserted only >= 1, which a constant 1 passed: a review's mutant)."""
    app, _ = app_with(BRIDGE_RATE_LIMIT="0.1", BRIDGE_RATE_BURST="1")
    assert post(app).status == 202
    assert int(post(app).headers["retry-after"]) == 10
