"""config: environment over TOML, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from bridge.backlog import MemoryBacklog
from bridge.config import load_settings, read_secret_file
from bridge.errors import ConfigError
from bridge.publisher import check_record_size
from bridge.routing import MAX_TOPIC_LENGTH, Destination

BASE = {"BRIDGE_TOKENS": "token-aaa,token-bbb"}


def test_defaults() -> None:
    """The documented defaults hold."""
    settings = load_settings(environ=BASE)
    assert settings.kafka_bootstrap == "localhost:9092"
    assert settings.port == 8080
    assert settings.topic_template == "geins.{entity}.{action}"
    assert settings.tokens == ("token-aaa", "token-bbb")
    assert settings.max_body_bytes == 960 * 1024


def test_environment_overrides_toml(tmp_path: Path) -> None:
    """The TOML file sets values; BRIDGE_* variables win over it."""
    file = tmp_path / "bridge.toml"
    file.write_text('port = 9000\nkafka_bootstrap = "k1:9092,k2:9092"\ntokens = ["token-xxx"]\n')
    settings = load_settings(file, environ={"BRIDGE_PORT": "9100"})
    assert settings.port == 9100
    assert settings.kafka_bootstrap == "k1:9092,k2:9092"
    assert settings.tokens == ("token-xxx",)
    assert load_settings(environ={"BRIDGE_CONFIG_FILE": str(file)}).port == 9000


def test_files_saved_with_a_byte_order_mark_are_read_as_written(tmp_path: Path) -> None:
    """A config file or a secret file saved by a Windows editor starts with a byte
    order mark: the TOML file was read in the locale's encoding (mojibake, or a
    refusal under LANG=C), and the mark became part of a SASL password."""
    file = tmp_path / "bridge.toml"
    file.write_bytes('\ufeffport = 9000\ntokens = ["jätte-token"]\n'.encode())
    settings = load_settings(file, environ={})
    assert (settings.port, settings.tokens) == (9000, ("jätte-token",))
    secret = tmp_path / "password"
    secret.write_bytes("\ufeffs3cret\n".encode())
    assert read_secret_file(secret) == "s3cret"
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'tokens = ["j\xe4tte-token"]\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(latin, environ={})


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"BRIDGE_PORT": "http"}, "BRIDGE_PORT"),
        ({"BRIDGE_PORT": "70000"}, "BRIDGE_PORT"),
        ({"BRIDGE_TOPIC_TEMPLATE": "geins/{entity}"}, "BRIDGE_TOPIC_TEMPLATE"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": "kafka"}, "BRIDGE_KAFKA_BOOTSTRAP"),
        ({"BRIDGE_ACK": "never"}, "BRIDGE_ACK"),
        ({"BRIDGE_TOKNES": "x"}, "BRIDGE_TOKNES: unknown setting"),
        ({"BRIDGE_DEFAULT_ACCOUNT": "My Shop"}, "BRIDGE_DEFAULT_ACCOUNT"),
        ({"BRIDGE_DEFAULT_ACCOUNT": "acme.prod"}, "BRIDGE_DEFAULT_ACCOUNT: .*digits and '-'"),
        ({"BRIDGE_DEFAULT_ENVIRONMENT": "prod_eu"}, "BRIDGE_DEFAULT_ENVIRONMENT"),
    ],
)
def test_bad_settings_are_named(environ: dict[str, str], named: str) -> None:
    """Startup stops with a message naming the bad setting."""
    with pytest.raises(ConfigError, match=named):
        load_settings(environ={**BASE, **environ})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"BRIDGE_DEFAULT_ACCOUNT": ""}, "BRIDGE_DEFAULT_ACCOUNT: .*at least 1 character"),
        ({"BRIDGE_DEFAULT_ENVIRONMENT": ""}, "BRIDGE_DEFAULT_ENVIRONMENT: .*at least 1 character"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": "host:99999"}, "'host:99999': the port must be .* 1 to 65535"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": "k1:9092,host:0"}, "'host:0': the port must be"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": "::1"}, r"'::1': write an IPv6 address in brackets"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": "::1:9092"}, r"in brackets with its port, as \[::1\]:9092"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": "[::1]"}, r"'\[::1\]' is not \[IPv6 address\]:port"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": "[kafka]:9092"}, "'kafka' in brackets is not an IPv6"),
        ({"BRIDGE_KAFKA_BOOTSTRAP": ":9092"}, "is not host:port"),
    ],
)
def test_settings_that_could_not_work_are_refused(environ: dict[str, str], message: str) -> None:
    """An empty default account or environment, a port outside 1-65535 and an IPv6
    address without brackets stop startup, naming the setting and what is wrong."""
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={**BASE, **environ})


def test_an_empty_token_in_toml_is_refused(tmp_path: Path) -> None:
    """tokens = [""] would make every delivery a 401: it stops startup instead."""
    file = tmp_path / "bridge.toml"
    file.write_text('tokens = ["good-token", ""]\n')
    with pytest.raises(ConfigError, match=r"tokens in .*: a token must not be empty"):
        load_settings(file, environ={})


@pytest.mark.parametrize("short", ["Q", "Zq9", "abc-def"])
def test_a_token_shorter_than_8_characters_is_refused(tmp_path: Path, short: str) -> None:
    """A short token is found by chance in what deliveries carry (a 3-character one in
    0.6 % of UUID keys, refused on every retry; "ins" in the default template's
    "geins", so every delivery got a 422), and guessed: startup stops, without
    printing it, whether it comes from BRIDGE_TOKENS or the tokens file."""
    with pytest.raises(ConfigError, match="at least 8 characters") as refused:
        load_settings(environ={"BRIDGE_TOKENS": f"long-enough-token,{short}"})
    assert short not in str(refused.value)
    file = tmp_path / "tokens"
    file.write_text(f"# rotated weekly\nlong-enough-token\n{short}, other-long-token\n")
    with pytest.raises(ConfigError, match="line 3: a token must be at least 8") as refused:
        load_settings(environ={"BRIDGE_TOKENS_FILE": str(file)})
    assert short not in str(refused.value)
    assert load_settings(environ={"BRIDGE_TOKENS": "12345678"}).tokens == ("12345678",)


@pytest.mark.parametrize(
    "placeholder", ["REPLACE-ME-placeholder-token", "change-me-to-a-long-random-token"]
)
def test_the_placeholder_tokens_of_deploy_are_refused(tmp_path: Path, placeholder: str) -> None:
    """deploy/'s Kubernetes Secret and Compose .env example hold placeholders; deployed
    as they are, the bridge accepted them (anyone who read the repository could deliver)."""
    with pytest.raises(ConfigError, match="BRIDGE_TOKENS: a token is an example's placeholder"):
        load_settings(environ={"BRIDGE_TOKENS": placeholder})
    file = tmp_path / "tokens"
    file.write_text(f"{placeholder}\n")
    with pytest.raises(ConfigError, match="line 1: a token is an example's placeholder"):
        load_settings(environ={"BRIDGE_TOKENS_FILE": str(file)})


def test_a_token_file_with_spaces_or_control_characters_is_refused(tmp_path: Path) -> None:
    """The file's tokens are checked as BRIDGE_TOKENS' are (they were taken as they
    came: `abc def` was one token with a space in it)."""
    file = tmp_path / "tokens"
    for text in ("long-token one-more-token\n", "long-token\x07bell\n"):
        file.write_text(text)
        with pytest.raises(ConfigError, match="line 1: a token must be printable"):
            load_settings(environ={"BRIDGE_TOKENS_FILE": str(file)})


@pytest.mark.parametrize(
    "setting",
    [
        "BRIDGE_TOKENS_FILE",
        "BRIDGE_KAFKA_SASL_PASSWORD_FILE",
        "BRIDGE_KAFKA_SSL_KEYFILE_PASSWORD_FILE",
    ],
)
def test_a_secret_given_for_a_secret_file_is_not_printed(setting: str) -> None:
    """A token or password set by mistake where the name of its file goes: the error
    names the setting and does not print the value (it did: `cannot read Sup3r...`)."""
    with pytest.raises(ConfigError, match=f"{setting}: cannot read the file it names") as refused:
        load_settings(environ={**BASE, setting: "Sup3rS3cretT0ken"})
    assert "Sup3rS3cretT0ken" not in str(refused.value)


def test_an_empty_tokens_file_without_tokens_refuses_to_serve(tmp_path: Path) -> None:
    """With no BRIDGE_TOKENS, a tokens file holding none (empty, comments only) made a
    bridge that answered 401 to every delivery while ready: startup stops instead,
    unless unauthenticated requests are allowed until the file holds a token."""
    file = tmp_path / "tokens"
    for text in ("", "# filled in by the secrets operator\n"):
        file.write_text(text)
        settings = load_settings(environ={"BRIDGE_TOKENS_FILE": str(file)})
        with pytest.raises(ConfigError, match="BRIDGE_TOKENS_FILE names holds no token"):
            settings.check_serving()
        load_settings(
            environ={"BRIDGE_TOKENS_FILE": str(file), "BRIDGE_ALLOW_UNAUTHENTICATED": "true"}
        ).check_serving()
        load_settings(
            environ={"BRIDGE_TOKENS_FILE": str(file), "BRIDGE_TOKENS": "test-token"}
        ).check_serving()
    file.write_text("file-token-1\n")
    load_settings(environ={"BRIDGE_TOKENS_FILE": str(file)}).check_serving()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"BRIDGE_TOPIC_TEMPLATE": "shop-7f3k9q2x.{entity}.{action}"}, "BRIDGE_TOPIC_TEMPLATE"),
        (
            {
                "BRIDGE_TOPIC_TEMPLATE": "{environment}.{entity}.{action}",
                "BRIDGE_DEFAULT_ENVIRONMENT": "7f3k9q2x",
            },
            "BRIDGE_DEFAULT_ENVIRONMENT",
        ),
        ({"BRIDGE_DEADLETTER_TOPIC": "dead.7F3K9Q2X"}, "BRIDGE_DEADLETTER_TOPIC"),
    ],
)
def test_a_token_in_the_names_of_the_topics_stops_startup(
    tmp_path: Path, environ: dict[str, str], named: str
) -> None:
    """A token inside the template's text or the default account or environment would
    refuse every delivery (no topic name may show one); one inside the dead-letter
    topic would show to whoever lists topics. Tokens from the file count too."""
    with pytest.raises(ConfigError, match=f"{named}.* holds a webhook token"):
        load_settings(environ={"BRIDGE_TOKENS": "7f3k9q2x", **environ})
    file = tmp_path / "tokens"
    file.write_text("7f3k9q2x\n")
    with pytest.raises(ConfigError, match=f"{named}.* holds a webhook token"):
        load_settings(environ={"BRIDGE_TOKENS_FILE": str(file), **environ})


def test_bracketed_ipv6_bootstrap_servers_are_accepted() -> None:
    """IPv6 brokers are written as aiokafka reads them: [address]:port."""
    servers = "[::1]:9092, [2001:db8::7]:9093,kafka:9094"
    assert load_settings(environ={"BRIDGE_KAFKA_BOOTSTRAP": servers}).kafka_bootstrap == servers


def test_ipv4_mapped_networks_are_taken_as_ipv4() -> None:
    """BRIDGE_TRUSTED_PROXIES and BRIDGE_ALLOWED_NETWORKS entries written IPv4-mapped
    become the IPv4 network they stand for (the guards match every client as IPv4);
    other entries stay as written."""
    settings = load_settings(
        environ={
            **BASE,
            "BRIDGE_TRUSTED_PROXIES": "::ffff:10.0.0.0/104, 10.1.2.3, 2001:db8::/32",
            "BRIDGE_ALLOWED_NETWORKS": "::ffff:1.2.3.4, ::ffff:0:0/96, ::/0",
        }
    )
    assert settings.trusted_proxies == ("10.0.0.0/8", "10.1.2.3", "2001:db8::/32")
    assert settings.allowed_networks == ("1.2.3.4/32", "0.0.0.0/0", "::/0")


@pytest.mark.parametrize("name", ["BRIDGE_TRUSTED_PROXIES", "BRIDGE_ALLOWED_NETWORKS"])
def test_an_ipv4_mapped_network_wider_than_96_is_refused(name: str) -> None:
    """A mapped network under /96 spans more than the mapped range: it has no IPv4
    equivalent, so startup stops and says why."""
    with pytest.raises(ConfigError, match=f"{name}: '::ffff:10.0.0.0/80' is IPv4-mapped"):
        load_settings(environ={**BASE, name: "::ffff:10.0.0.0/80"})


def test_tokens_required_to_serve_unless_opted_out() -> None:
    """No tokens and no explicit opt-out refuses to serve; operator commands need none."""
    settings = load_settings(environ={})
    with pytest.raises(ConfigError, match="BRIDGE_TOKENS"):
        settings.check_serving()
    load_settings(environ={"BRIDGE_ALLOW_UNAUTHENTICATED": "true"}).check_serving()
    load_settings(environ={"BRIDGE_TOKENS": "test-token"}).check_serving()


def test_unreadable_or_bad_toml(tmp_path: Path) -> None:
    """A missing or malformed config file is a clear error."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", environ=BASE)
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ=BASE)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match=r"prot in .*unknown setting"):
        load_settings(unknown, environ=BASE)


def test_redacted_hides_tokens() -> None:
    """What check-config prints never contains a token."""
    shown = str(load_settings(environ={"BRIDGE_TOKENS": "s3cr3t-token"}).redacted())
    assert "s3cr3t-token" not in shown
    assert "s3cr3t-token" not in repr(load_settings(environ={"BRIDGE_TOKENS": "s3cr3t-token"}))


def test_redacted_counts_the_tokens_of_the_file(tmp_path: Path) -> None:
    """check-config showed `<0 token(s)>` for a bridge whose tokens file held two."""
    file = tmp_path / "tokens"
    file.write_text("file-token-1, file-token-2\n")
    shown = load_settings(environ={"BRIDGE_TOKENS_FILE": str(file)}).redacted()
    assert (shown["tokens"], shown["tokens_in_file"]) == ("<0 token(s)>", "<2 token(s)>")
    assert "file-token" not in str(shown)


@pytest.mark.parametrize(
    ("ack", "cap"),
    [("memory", "BRIDGE_MEMORY_MAX_BYTES"), ("durable", "BRIDGE_SPOOL_MAX_BYTES")],
)
def test_a_cap_below_the_largest_event_is_refused(ack: str, cap: str) -> None:
    """A spool or memory cap that the largest accepted event cannot fit stops startup,
    naming both settings; the cap of a mode not in use is not held against it."""
    big_bodies = {**BASE, "BRIDGE_MAX_BODY_BYTES": str(2 * 1024 * 1024), "BRIDGE_ACK": ack}
    with pytest.raises(ConfigError, match=rf"{cap}=1048576 .*BRIDGE_MAX_BODY_BYTES=2097152"):
        load_settings(environ={**big_bodies, cap: str(1024 * 1024)})
    other = "BRIDGE_SPOOL_MAX_BYTES" if ack == "memory" else "BRIDGE_MEMORY_MAX_BYTES"
    load_settings(environ={**big_bodies, other: str(1024 * 1024)})
    load_settings(environ={**big_bodies, "BRIDGE_ACK": "broker", cap: str(1024 * 1024)})


def test_the_smallest_cap_allowed_holds_the_largest_accepted_event() -> None:
    """At the smallest cap validation allows, the largest record the size check lets
    through (longest topic included) still fits an empty backlog."""
    settings = load_settings(
        environ={**BASE, "BRIDGE_ACK": "memory", "BRIDGE_MAX_BODY_BYTES": str(2 * 1024 * 1024)}
    )
    smallest = settings.kafka_max_request_size()
    load_settings(
        environ={
            **BASE,
            "BRIDGE_ACK": "memory",
            "BRIDGE_MEMORY_MAX_BYTES": str(smallest),
            "BRIDGE_MAX_BODY_BYTES": str(2 * 1024 * 1024),
        }
    )
    headers = [("ce_id", b"k" * 200), ("ce_subject", b"1" * 5000)]
    limit = settings.max_event_record_bytes()
    length = limit - DefaultRecordBatchBuilder.estimate_size_in_bytes(b"k", b"", headers)
    while DefaultRecordBatchBuilder.estimate_size_in_bytes(b"k", b"x" * length, headers) > limit:
        length -= 1  # the value's length prefix grows with it
    value = b"x" * length
    destination = Destination(topic="t" * MAX_TOPIC_LENGTH, key=b"k", value=value, headers=headers)
    check_record_size(destination, limit)  # accepted by the size check...
    backlog = MemoryBacklog(smallest)
    backlog.append(destination)  # ...and held, not refused as a full queue
    assert backlog.depth == 1


@pytest.mark.parametrize(
    ("template", "deadletter"),
    [
        ("geins.{entity}", "geins.deadletter"),
        ("events", "events"),
        ("geins.{entity}.{action}", "geins.dead.letter"),
        ("{account}.{entity}", "geins.deadletter"),
        ("geins.{entity}", "geins_deadletter"),  # Kafka refuses one of the two
    ],
)
def test_a_deadletter_topic_the_template_can_make_is_refused(
    template: str, deadletter: str
) -> None:
    """Dead letters never share a topic with events: a dead-letter topic that the
    template can produce (for /webhooks/geins/deadletter/..., say) stops startup."""
    with pytest.raises(ConfigError, match=r"BRIDGE_DEADLETTER_TOPIC.*BRIDGE_TOPIC_TEMPLATE"):
        load_settings(
            environ={
                **BASE,
                "BRIDGE_TOPIC_TEMPLATE": template,
                "BRIDGE_DEADLETTER_TOPIC": deadletter,
            }
        )


@pytest.mark.parametrize(
    ("template", "deadletter"),
    [
        ("geins.{entity}.{action}", "geins.deadletter"),
        ("geins.{entity}", "deadletters"),
        ("events", ""),
        ("geins.{entity}", "geins.Dead-Letter"),
    ],
)
def test_a_deadletter_topic_apart_from_the_events_is_accepted(
    template: str, deadletter: str
) -> None:
    """A dead-letter topic no event can be routed to passes (or none at all)."""
    environ = {**BASE, "BRIDGE_TOPIC_TEMPLATE": template, "BRIDGE_DEADLETTER_TOPIC": deadletter}
    assert load_settings(environ=environ).deadletter_topic == deadletter
