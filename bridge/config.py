"""Settings: ``BRIDGE_*`` environment variables over an optional TOML file.

Everything is validated once, at startup; a bad setting stops the bridge with
a message that names it (``BRIDGE_PORT: ...``). The TOML file uses the same
names in lower case without the prefix (``port = 8080``). Unknown names in
either place are errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import re
import resource
import socket
import ssl
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from aiokafka import codec as kafka_codecs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.auth import MIN_TOKEN_LENGTH, read_tokens_file, token_problem, unreadable_because
from bridge.errors import ConfigError
from bridge.guards import parse_network
from bridge.redaction import Redactor
from bridge.routing import TOPIC_NAME, TopicTemplate, template_can_make, topic_safe

ENV_PREFIX = "BRIDGE_"
#: Names the environment variable that points at the TOML file (not a setting itself).
CONFIG_FILE_ENV = "BRIDGE_CONFIG_FILE"

Seconds = Annotated[float, Field(gt=0, le=3600)]
#: Room for a record's headers and Kafka's framing on top of the largest accepted body.
RECORD_OVERHEAD_BYTES = 64 * 1024
#: The highest BRIDGE_MAX_BODY_BYTES.
MAX_BODY_BYTES_CEILING = 64 * 1024 * 1024
#: The Kafka producer's own limit on a record: what the highest BRIDGE_MAX_BODY_BYTES
#: lets in, not what this run's does. The spool keeps events across restarts: one
#: accepted under a larger setting was refused by the producer itself after a restart
#: with a smaller one, then again as a dead letter, and dropped. Kafka's limit (the
#: topic's max.message.bytes) decides whether a record is too large.
PRODUCER_MAX_REQUEST_BYTES = MAX_BODY_BYTES_CEILING + RECORD_OVERHEAD_BYTES
#: Kept free in every accepted record for the headers that make it a dead letter
#: (reason, detail, original topic), should Kafka refuse it for good.
DEAD_LETTER_ROOM = 1024
#: Kept free too when the batches are compressed, as a fraction of the producer's limit:
#: a codec makes data it cannot compress a little larger (lz4 +0.013 %, snappy +0.028 %
#: on a 983 KB body of random letters), and Kafka counts the compressed batch.
CODEC_ROOM = 0.001
#: Least room a record keeps for its headers over the largest body once the codec's is
#: taken (the CloudEvents and Geins headers take a few hundred bytes). The codec's room
#: grows with the body: past MAX_COMPRESSED_BODY_BYTES it would leave less, and a body
#: within BRIDGE_MAX_BODY_BYTES was answered 413 (a review's test, at 64 MiB with lz4).
MIN_HEADER_ROOM = 4 * 1024
#: The highest BRIDGE_MAX_BODY_BYTES with a codec: its record keeps MIN_HEADER_ROOM
#: (60350464, as the README says).
MAX_COMPRESSED_BODY_BYTES = (
    math.floor((RECORD_OVERHEAD_BYTES - DEAD_LETTER_ROOM - MIN_HEADER_ROOM) / CODEC_ROOM)
    - RECORD_OVERHEAD_BYTES
)
#: Most bytes or keys a cap may be: finite (an unbounded number passed validation
#: and crashed the server, a float overflowing), and as large as a float (a
#: Prometheus gauge, say) holds exactly, 8 PiB: far beyond any real spool or memory.
MAX_COUNT = 2**53
#: Most requests in progress, or per second and at once from one client: a million
#: is beyond what one process serves, and keeps the limiter's arithmetic in range.
MAX_REQUESTS = 1_000_000
#: About what one de-duplication key takes in the spool's file (deploy/README.md).
SPOOL_KEY_BYTES = 115
#: The slowest rate limit other than 0 (off): one request per 1000 s. Below it the
#: limiter's wait overflowed (1e-320: a 500) or grew absurd (1e-300: a Retry-After of
#: some 300 digits); at it a limited client waits at most 1000 s.
MIN_RATE = 0.001
#: File descriptors kept out of BRIDGE_MAX_CONNECTIONS' default: Kafka's connections
#: (one per broker the producer and the drainer talk to), the spool's files, the
#: listening sockets, the event loop's own. The bridge holds some 20 with one broker.
FILE_RESERVE = 128
#: BRIDGE_MAX_CONNECTIONS' default where the file limit allows more: an idle
#: connection holds some 7 KB, one with a head under way up to its head cap (about
#: 25 KB by default), so 4,096 connections stay within some 100 MB at worst.
DEFAULT_MAX_CONNECTIONS = 4096
#: Connections the operations port (BRIDGE_OPS_PORT) keeps open at most, apart from
#: BRIDGE_MAX_CONNECTIONS: Prometheus and the probes need a few, and a flood of
#: webhook connections must not refuse them (a failed liveness probe restarts the pod).
OPS_MAX_CONNECTIONS = 64
#: Whether aiokafka can use each codec of BRIDGE_KAFKA_COMPRESSION (its producer checks
#: the same when it is made).
_CODEC_CHECKS = {
    "gzip": kafka_codecs.has_gzip,
    "lz4": kafka_codecs.has_lz4,
    "zstd": kafka_codecs.has_zstd,
    "snappy": kafka_codecs.has_snappy,
}


def read_secret_file(path: Path, setting: str) -> str:
    """A secret kept in a file (a mounted Kubernetes Secret, say), without its final line
    break. Read when a Kafka client is made, never kept with the settings. A byte order
    mark (a Windows editor's) is no part of the secret.

    Raises ValueError naming ``setting`` for a file that holds no secret: not UTF-8 (its
    bytes are not quoted: they are the secret's) or empty, as a file being rewritten may
    be for a moment (an empty password was sent, and Kafka's refusal blamed the user).
    """
    try:
        return _secret_in(path)
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from None


def _secret_in(path: Path) -> str:
    """What :func:`read_secret_file` reads, its ValueError naming no setting."""
    return _secret_of(path.read_bytes(), path)


def _secret_of(data: bytes, path: Path) -> str:
    """The secret in ``data``, read from ``path`` (named in a ValueError, if any)."""
    try:
        secret = data.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{_named(path)} is not UTF-8 text") from None
    if not secret.strip():
        raise ValueError(f"{_named(path)} is empty")
    return secret


#: What socket.getaddrinfo gives: family, type, protocol, canonical name, address.
AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


#: The settings that make the webhook port's address, as error messages name them.
WEBHOOK_ADDRESS = "BRIDGE_HOST, BRIDGE_PORT"


def listen_addresses(host: str, port: int, names: str = WEBHOOK_ADDRESS) -> list[AddressInfo]:
    """The addresses ``host``:``port`` stands for, resolved as asyncio's create_server
    (which uvicorn calls) does: what ``bridge serve`` listens on, and what
    ``check-config`` resolves without listening. A ConfigError naming the settings
    ``names`` if it does not resolve."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        return list(found)
    except OSError as exc:
        raise cannot_listen(host, port, exc, names) from None


def cannot_listen(host: str, port: int, exc: OSError, names: str = WEBHOOK_ADDRESS) -> ConfigError:
    """The error for an address the bridge cannot listen on, naming its settings."""
    if exc.errno == errno.EADDRINUSE:
        reason = "the address is already in use (another bridge running?)"
    else:
        reason = exc.strerror or str(exc)
    return ConfigError(f"cannot listen on {host}:{port} ({names}): {reason}")


def _scalar_kind(annotation: Any) -> type | tuple[str, ...] | None:
    """``int``, ``float`` or ``bool`` for a setting of that type, the choices of a
    ``Literal`` one (either may also be None); None for any other setting."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else None
    if get_origin(annotation) is Literal:
        return tuple(str(choice) for choice in get_args(annotation))
    return annotation if annotation in (int, float, bool) else None


def _is_host_like(host: str) -> bool:
    """Whether ``host`` could be a host name or an address: no space, no control
    character (what it resolves to is the resolver's business)."""
    return host.isprintable() and not any(c.isspace() for c in host)


def _refuse_url_parts(bootstrap: str) -> None:
    """Raise ValueError for a URL's credentials or scheme in the bootstrap servers
    (``user:password@host:9092``, ``SASL_SSL://host:9093``, as other tools take them),
    before the list is split at its commas: the credentials are never quoted, whatever
    they hold (a comma, "://")."""
    if "@" in bootstrap:
        host = bootstrap.rpartition("@")[2].split(",")[0]
        raise ValueError(
            f"'…@{host}': give host:port alone, without a user or password; those are "
            "BRIDGE_KAFKA_SASL_USERNAME and BRIDGE_KAFKA_SASL_PASSWORD(_FILE)"
        )
    if "://" in bootstrap:
        scheme = bootstrap.partition("://")[0].rpartition(",")[2].strip()
        named = f"{scheme}://" if re.fullmatch(r"[A-Za-z][A-Za-z0-9_+.-]*", scheme) else "://"
        raise ValueError(
            f"{named!r}: give host:port alone; the protocol is BRIDGE_KAFKA_SECURITY_PROTOCOL"
        )


def _check_host_port(server: str) -> None:
    """Raise ValueError unless ``server`` is ``host:port`` or ``[IPv6 address]:port``
    with a port from 1 to 65535 (as aiokafka reads it: an IPv6 address without
    brackets would be taken for a host and a port, ``::1`` for ``::`` port 1)."""
    if server.startswith("["):
        host, bracket, rest = server[1:].partition("]")
        port = rest.removeprefix(":")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{server!r}: {host!r} in brackets is not an IPv6 address") from None
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{server!r} is not [IPv6 address]:port")
    else:
        host, colon, port = server.rpartition(":")
        if ":" in host:
            raise ValueError(
                f"{server!r}: write an IPv6 address in brackets with its port, as [::1]:9092"
            )
        if not colon or not host:
            raise ValueError(f"{server!r} is not host:port")
        if not _is_host_like(host):  # "a b:1" was taken, and failed only when connecting
            raise ValueError(f"{server!r}: a host has no spaces or control characters")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{server!r}: the port must be a number from 1 to 65535")


#: The validation context's key for how each given setting was given (load_settings).
GIVEN = "given"


class _Names:
    """How a message weighing several settings names each: as it was given, the
    variable (``BRIDGE_ACK``) or the key in the file (``ack in bridge.toml``), and one
    not given as the variable that would set it. A field's own errors are named so by
    :func:`_explain`; these messages are made inside the model, hence the context."""

    def __init__(self, info: ValidationInfo | None = None) -> None:
        context = info.context if info is not None else None
        self._given: Mapping[str, tuple[str, str]] = (context or {}).get(GIVEN, {})

    def __call__(self, field: str, value: object = None) -> str:
        name, where = self._given.get(field, (ENV_PREFIX + field.upper(), ""))
        return (name if value is None else f"{name}={value}") + where


def _named(path: Path) -> str:
    """``path`` as an error quotes a file holding secrets: not at all when it names
    nothing, as it may then be the secret itself, set in the wrong setting."""
    return _printable_path(path) if os.path.lexists(path) else "the file it names"


def _file_named(path: Path, info: ValidationInfo) -> str:
    """A Kafka file setting's path as its error quotes it: a password file's as a
    secret's (see _named); a certificate's or key's as it is, unless it is a PEM
    pasted in place of its path (librdkafka's ssl.key.pem takes the key itself), which
    was printed whole."""
    if info.field_name in PASSWORD_FILES:
        return _named(path)
    text = _printable_path(path)
    return "the file it names" if "-----" in text or "\n" in text else text


def _printable_path(path: Path) -> str:
    """``path`` as text an error can hold: a byte that is not UTF-8 (a surrogate, as
    the environment gives it) as \\udcff. Quoted as it was, it made pydantic fail to
    build the error, and the command end in a traceback."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


#: The settings that name a file holding a password (see _file_readable).
PASSWORD_FILES = frozenset({"kafka_sasl_password_file", "kafka_ssl_keyfile_password_file"})


#: The longest URL (path and query, as the guard counts them) the HTTP parser takes.
MAX_URL_BYTES_CEILING = 65534


#: Fewer connections than this left by the open-file limit, by default: warned of.
FEW_CONNECTIONS = 64


class Settings(BaseModel):
    """Every setting, with its default. The README's table mirrors this class."""

    # allow_inf_nan: "nan" was refused as "should be less than or equal to 3600"
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # --- HTTP ----------------------------------------------------------------------
    host: str = "0.0.0.0"  # noqa: S104  # a sidecar or service must listen beyond loopback
    port: int = Field(8080, ge=1, le=65535)
    # None: the operations endpoints share `port` with the webhooks (bridge.app)
    ops_port: int | None = Field(None, ge=1, le=65535)
    ops_host: str | None = None  # None: `host`; see ops_address()
    tokens: tuple[str, ...] = Field((), repr=False)
    tokens_file: Path | None = None
    allow_unauthenticated: bool = False
    # 960 KiB: with the 64 KiB of room for a record's headers, the largest
    # record is 1 MiB, within Kafka's default max.message.bytes (1048588), so an
    # accepted event fits a default topic.
    max_body_bytes: int = Field(960 * 1024, ge=1, le=MAX_BODY_BYTES_CEILING)
    strict_types: bool = False
    retry_after: int = Field(5, ge=1, le=3600)
    read_timeout: Seconds = 10.0
    # Up to an AWS ALB's longest idle timeout: a proxy's pool outlives it (see README).
    keep_alive_timeout: int = Field(5, ge=1, le=4000)
    max_headers: int = Field(100, ge=8, le=10_000)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    # The HTTP parser takes a URL of 65535 bytes at most ('?' included, which the
    # guard does not count): a larger limit promised URLs it answered 400.
    max_url_bytes: int = Field(8 * 1024, ge=256, le=MAX_URL_BYTES_CEILING)
    max_concurrency: int = Field(1000, ge=1, le=MAX_REQUESTS)
    # 32 MiB: bodies as large as BRIDGE_MAX_BODY_BYTES from every request in progress
    # would be ~940 MB at the defaults, well over the manifests' memory limits.
    max_bodies_bytes: int = Field(32 * 1024**2, ge=1024 * 1024, le=MAX_COUNT)
    max_connections: int | None = Field(None, ge=1, le=MAX_REQUESTS)  # connection_limit()
    rate_limit: float = Field(0.0, ge=0, le=MAX_REQUESTS)
    rate_burst: int = Field(20, ge=1, le=MAX_REQUESTS)
    allowed_networks: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    shutdown_delay: float = Field(0.0, ge=0, le=300)
    shutdown_timeout: Seconds = 15.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = False

    # --- Delivery ------------------------------------------------------------------
    ack: Literal["durable", "broker", "memory"] = "durable"
    publish_timeout: Seconds = 5.0
    spool_dir: Path = Path("spool")
    spool_max_bytes: int = Field(1024**3, ge=1024 * 1024, le=MAX_COUNT)
    # About 115 bytes of disk each: 5 million keys are 2 hours of 700 events/s.
    spool_max_keys: int = Field(5_000_000, ge=1000, le=MAX_COUNT)
    memory_max_bytes: int = Field(64 * 1024**2, ge=1024 * 1024, le=MAX_COUNT)
    dedup_window: float = Field(7200.0, ge=0, le=7 * 86400)
    dedup_max_keys: int = Field(100_000, ge=1, le=MAX_COUNT)
    deadletter_topic: str = "geins.deadletter"

    # --- Kafka ---------------------------------------------------------------------
    kafka_bootstrap: str = "localhost:9092"
    kafka_client_id: str = "geins-bridge"
    # 0: a record goes out at once; records of concurrent requests still share a
    # batch while the previous request to the broker is in flight.
    kafka_linger_ms: int = Field(0, ge=0, le=1000)
    kafka_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"
    kafka_connect_timeout: Seconds = 10.0
    # aiokafka's 40 s: a broker that hangs (stopped, not down) held the partitions it
    # led that long after Kafka had moved them to other brokers (see README).
    kafka_request_timeout: Seconds = 10.0
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = Field(None, repr=False)
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_keyfile_password_file: Path | None = None
    kafka_ssl_check_hostname: bool = True

    # --- Topics and message format ---------------------------------------------------
    topic_template: str = "geins.{entity}.{action}"
    # Empty would not stop the bridge, but the router would use "default" instead.
    default_account: str = Field("default", min_length=1)
    default_environment: str = Field("default", min_length=1)
    create_topics: bool = False
    topic_partitions: int = Field(3, ge=1, le=10000)
    topic_replication_factor: int | None = Field(None, ge=1, le=32)
    ce_source: str = Field("urn:geins", min_length=1)

    @field_validator("tokens", "allowed_networks", "trusted_proxies", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("tokens")
    @classmethod
    def _tokens_are_usable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for token in value:
            if problem := token_problem(token):
                raise ValueError(problem)
        return value

    @field_validator("rate_limit", "shutdown_delay", "dedup_window")
    @classmethod
    def _zero_has_no_sign(cls, value: float) -> float:
        return value + 0.0  # "-0" is 0, not shown back as -0.0

    @field_validator("rate_limit")
    @classmethod
    def _rate_off_or_at_least_the_slowest(cls, value: float) -> float:
        if 0 < value < MIN_RATE:
            raise ValueError(
                f"0 (no limit) or at least {MIN_RATE:g} requests per second (one per "
                f"{1 / MIN_RATE:g} s) is expected"
            )
        return value

    @field_validator("allowed_networks", "trusted_proxies")
    @classmethod
    def _networks_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        networks = []
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
            network = parse_network(item)  # ValueError: IPv4-mapped and wider than /96
            # An IPv4-mapped entry is kept as the IPv4 network the guards match it as,
            # so that check-config shows what is in effect.
            networks.append(str(network) if ":" in item and network.version == 4 else item)
        return tuple(networks)

    @field_validator("tokens_file")
    @classmethod
    def _tokens_file_readable(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        named = _named(value)  # a token set here by mistake for BRIDGE_TOKENS is not shown
        try:
            read_tokens_file(value)
        except OSError as exc:
            raise ValueError(
                f"cannot read {named}: {exc.strerror} (it names a file of tokens; the "
                "tokens themselves go in BRIDGE_TOKENS)"
            ) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{named} is not UTF-8 text ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{named}, {exc}") from None
        return value

    @field_validator("host", "ops_host")
    @classmethod
    def _host_is_one(cls, value: str | None) -> str | None:
        # " 127.0.0.1" passed validation and failed only when serve resolved it.
        if value is not None and not _is_host_like(value):
            raise ValueError("a host name or IP address has no spaces or control characters")
        return value

    @field_validator("spool_dir", mode="before")
    @classmethod
    def _folder_without_stray_spaces(cls, value: Any) -> Any:
        # The one path the bridge makes rather than reads: "/data/spool " became a
        # sibling folder (" /data/spool" one under the working folder), off the volume
        # meant for it, and the events in it did not outlive the container.
        if isinstance(value, str) and value != value.strip():
            raise ValueError(
                "a folder path with a space or line break at its start or end: remove it "
                "(the folder would be another one than meant)"
            )
        return value

    @field_validator("ce_source", "kafka_client_id", "kafka_sasl_username")
    @classmethod
    def _text_is_printable(cls, value: str | None) -> str | None:
        # Sent as they are, in every record's headers or to the broker: blank means
        # nothing there, and a line break or other control character is no part of a
        # source, a client id or a user name (a line break was a second header line).
        if value is not None:
            if not value.strip():
                raise ValueError("must not be blank")
            if not value.isprintable():
                raise ValueError(
                    "printable characters only (no line break, tab or other control character)"
                )
        return value

    @field_validator("topic_template")
    @classmethod
    def _template_is_valid(cls, value: str) -> str:
        TopicTemplate(value)  # raises ValueError naming the problem
        return value

    @field_validator("deadletter_topic")
    @classmethod
    def _deadletter_is_a_topic(cls, value: str) -> str:
        if value and not TOPIC_NAME.fullmatch(value):
            raise ValueError("not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)")
        return value

    @field_validator("default_account", "default_environment")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if topic_safe(value, "") != value:
            raise ValueError(
                "use lower-case letters, digits and '-' (not at either end; at most 48)"
            )
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        if not value.strip():
            # Not "unset" as an empty BRIDGE_HOST is: localhost:9092 would be a guess
            raise ValueError("empty: give host:port of one Kafka broker or more, comma-separated")
        _refuse_url_parts(value)
        for server in (s.strip() for s in value.split(",")):
            if not server:
                raise ValueError(f"{value!r} has an empty entry between its commas")
            _check_host_port(server)
        return value

    @field_validator(
        "host",
        "ops_port",
        "ops_host",
        "spool_dir",
        "tokens_file",
        "max_connections",
        "topic_replication_factor",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_sasl_password_file",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_ssl_keyfile_password_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        # An empty variable, as Kubernetes may give for an optional one, means "not set":
        # the default. Taken as it is, an empty BRIDGE_SPOOL_DIR was the current folder
        # and an empty BRIDGE_HOST every interface of both IP versions.
        if value == "" and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _scalars_read_alike(cls, value: Any, info: ValidationInfo) -> Any:
        # Numbers, booleans and choices are read one way, from the environment or the
        # file: pydantic took spaces around a number but not around a boolean or a
        # choice, a bool for a number (TOML's port = true was port 1), and '_' in a
        # number as Python does (8_080 was 8080; more likely a typo).
        if info.field_name is None:
            return value
        kind = _scalar_kind(cls.model_fields[info.field_name].annotation)
        if kind is None:
            return value
        if isinstance(value, str):
            value = value.strip()
        if kind in (int, float):
            if isinstance(value, bool):
                raise ValueError("a number is expected, not true or false")
            if isinstance(value, str) and "_" in value:
                raise ValueError("a number is expected, written with digits only (no '_')")
            if kind is int and (
                isinstance(value, float)
                or (isinstance(value, str) and any(c in value for c in ".eE"))
            ):
                # pydantic took 8080.0 (TOML's float, or BRIDGE_PORT=8080.0) as 8080
                raise ValueError(
                    "a whole number is expected, written with digits only "
                    "(no decimal point or exponent)"
                )
        elif kind is bool and isinstance(value, int | float) and not isinstance(value, bool):
            # TOML's access_log = 1 was true: a number where TOML has true and false is
            # more likely a setting mistaken for another (BRIDGE_ACCESS_LOG=1 stays true).
            raise ValueError("true or false is expected, not a number")
        elif isinstance(kind, tuple) and isinstance(value, str):
            # Any case, kept as documented (the choices themselves): BRIDGE_ACK=Durable
            # is durable. What matches none is left for the type's own message.
            return next((c for c in kind if c.casefold() == value.casefold()), value)
        return value

    @field_validator(
        "kafka_sasl_password_file",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_ssl_keyfile_password_file",
    )
    @classmethod
    def _file_readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:
            try:
                text = value.read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"cannot read {_file_named(value, info)}: {exc.strerror}"
                ) from None
            if info.field_name in PASSWORD_FILES:
                _secret_of(text, value)  # as read when connecting, which would refuse it then
            elif not text.strip():
                raise ValueError(f"{_printable_path(value)} is empty")
        return value

    @model_validator(mode="after")
    def _kafka_security_consistent(self, info: ValidationInfo) -> Self:
        named = _Names(info)
        protocol = self.kafka_security_protocol
        given = named("kafka_security_protocol", protocol)
        sasl = {
            "kafka_sasl_mechanism": self.kafka_sasl_mechanism,
            "kafka_sasl_username": self.kafka_sasl_username,
            "kafka_sasl_password": self.kafka_sasl_password,
            "kafka_sasl_password_file": self.kafka_sasl_password_file,
        }
        tls = {
            "kafka_ssl_cafile": self.kafka_ssl_cafile,
            "kafka_ssl_certfile": self.kafka_ssl_certfile,
            "kafka_ssl_keyfile": self.kafka_ssl_keyfile,
            "kafka_ssl_keyfile_password_file": self.kafka_ssl_keyfile_password_file,
        }
        # Settings the protocol does not use would be silently ignored: refuse them.
        # Turning hostname checks off counts as set; its default changes nothing.
        unchecked = {"kafka_ssl_check_hostname": None if self.kafka_ssl_check_hostname else False}
        unused: list[tuple[Mapping[str, object], str]] = []
        if not protocol.startswith("SASL_"):
            unused.append((sasl, "SASL (SASL_PLAINTEXT or SASL_SSL)"))
        if not protocol.endswith("SSL"):
            unused.append(({**tls, **unchecked}, "TLS (SSL or SASL_SSL)"))
        problems: list[str] = []
        for group, kind in unused:  # one message per kind: each has its own protocols
            if names := [named(field) for field, value in group.items() if value is not None]:
                subject = "it" if problems else given
                problems.append(f"{', '.join(names)} set, but {subject} uses no {kind}")
        if problems:
            raise ValueError("; ".join(problems))
        if protocol.startswith("SASL_"):
            if missing := [named(field) for field in list(sasl)[:2] if sasl[field] is None]:
                raise ValueError(f"{given} needs {' and '.join(missing)}")
            if (self.kafka_sasl_password is None) == (self.kafka_sasl_password_file is None):
                raise ValueError(
                    f"{given} needs exactly one of {named('kafka_sasl_password')} and "
                    f"{named('kafka_sasl_password_file')}"
                )
        if not protocol.endswith("SSL"):
            return self
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError(
                f"{named('kafka_ssl_certfile')} and {named('kafka_ssl_keyfile')} go together "
                "(the client certificate and its private key)"
            )
        if self.kafka_ssl_keyfile is None and self.kafka_ssl_keyfile_password_file is not None:
            raise ValueError(
                f"{named('kafka_ssl_keyfile_password_file')} needs {named('kafka_ssl_keyfile')}"
            )
        self.kafka_ssl_context(named)  # the files must hold what they should
        return self

    @model_validator(mode="after")
    def _ports_differ(self, info: ValidationInfo) -> Self:
        named = _Names(info)
        if self.ops_host is not None and self.ops_port is None:
            raise ValueError(
                f"{named('ops_host', self.ops_host)} needs {named('ops_port')}: the "
                "operations endpoints have no port of their own without it"
            )
        # Even on another host: requests are told apart by the port they came to.
        if self.ops_port == self.port:
            raise ValueError(
                f"{named('ops_port', self.ops_port)} is {named('port')}: leave it unset "
                "to serve the operations endpoints on that port, or choose another one"
            )
        return self

    @model_validator(mode="after")
    def _linger_within_the_publish_timeout(self, info: ValidationInfo) -> Self:
        # The Kafka client holds a batch for the whole linger from its first record: a
        # lone record was not even sent before its publish timed out (broker mode: 503
        # with the record landing just after; the others: a timeout counted, the topic
        # held back, event after event).
        if self.kafka_linger_ms / 1000 > self.publish_timeout / 2:
            named = _Names(info)
            raise ValueError(
                f"{named('kafka_linger_ms', self.kafka_linger_ms)} is more than half of "
                f"{named('publish_timeout', f'{self.publish_timeout:g}')}: a record waits "
                "that long before it is even sent, and its publish would time out"
            )
        return self

    @model_validator(mode="after")
    def _no_token_in_names(self) -> Self:
        # Before the other checks of these names: their messages quote them.
        try:
            tokens = [*self.tokens, *self.file_tokens()]
        except (OSError, ValueError):
            return self  # the tokens file's validator has said why
        if problem := self.token_in_names(tokens):
            raise ValueError(problem)
        return self

    def token_in_names(self, tokens: Sequence[str]) -> str | None:
        """Why ``tokens`` cannot be used with these settings, or None: every delivery
        whose topic name would hold a webhook token is refused (422), so a token inside
        the template's own text or the default account or environment would refuse them
        all; the dead-letter topic would show one to whoever lists topics, the
        CloudEvents source to whoever reads them, the client id to Kafka's logs. Asked
        at start, and of the tokens file each time it changes."""
        secrets = Redactor(tokens)
        if not secrets:
            return None
        events = TopicTemplate(self.topic_template).render(
            "", "", self.default_account, self.default_environment
        )
        checks = [
            (
                secrets.in_topic(events),
                "BRIDGE_TOPIC_TEMPLATE, BRIDGE_DEFAULT_ACCOUNT or BRIDGE_DEFAULT_ENVIRONMENT "
                "holds a webhook token: every delivery would be refused (422), since no "
                "topic name may show one",
            ),
            # Also where the template leaves them out: check-config prints them.
            *(
                (
                    secrets.in_topic(value),
                    f"{name} holds a webhook token: check-config would show it",
                )
                for name, value in (
                    ("BRIDGE_DEFAULT_ACCOUNT", self.default_account),
                    ("BRIDGE_DEFAULT_ENVIRONMENT", self.default_environment),
                )
            ),
            (
                bool(self.deadletter_topic) and secrets.in_topic(self.deadletter_topic),
                "BRIDGE_DEADLETTER_TOPIC holds a webhook token: whoever lists the topics "
                "would see it",
            ),
            (
                secrets.contains(self.ce_source),  # the webhook URL with ?token=, say
                "BRIDGE_CE_SOURCE holds a webhook token: every record's ce_source header "
                "would show it to whoever reads the topics",
            ),
            (
                secrets.contains(self.kafka_client_id),
                "BRIDGE_KAFKA_CLIENT_ID holds a webhook token: Kafka's logs, metrics and "
                "quotas would show it",
            ),
        ]
        return next((why for holds, why in checks if holds), None)

    @model_validator(mode="after")
    def _deadletter_is_no_event_topic(self, info: ValidationInfo) -> Self:
        # Checked after the fields: a bad template or topic has been named already.
        named = _Names(info)
        topic, template = self.deadletter_topic, self.topic_template
        if topic and template_can_make(template, topic):
            raise ValueError(
                f"{named('deadletter_topic', topic)} is a topic "
                f"{named('topic_template', template)} can make for events (or one Kafka "
                "takes for the same: it treats '.' and '_' alike): dead letters would be "
                "mixed with events; choose a dead-letter topic the template cannot produce"
            )
        return self

    @model_validator(mode="after")
    def _codec_leaves_room_for_headers(self, info: ValidationInfo) -> Self:
        if self.kafka_compression != "none" and self.max_body_bytes > MAX_COMPRESSED_BODY_BYTES:
            named = _Names(info)
            raise ValueError(
                f"{named('max_body_bytes', self.max_body_bytes)} is too large with "
                f"{named('kafka_compression', self.kafka_compression)}: the room a record "
                f"keeps for the codec ({CODEC_ROOM:.1%} of it) would leave less than "
                f"{MIN_HEADER_ROOM} bytes for its headers, and bodies within the cap would "
                f"be refused; at most {MAX_COMPRESSED_BODY_BYTES} with compression"
            )
        return self

    @model_validator(mode="after")
    def _codec_installed(self, info: ValidationInfo) -> Self:
        # cramjam, a dependency, holds the lz4, zstd and snappy codecs: an install
        # without it (a hand-made image) failed at start with the producer's
        # RuntimeError and a traceback, and passed `bridge check-config`
        codec = self.kafka_compression
        if codec != "none" and not _CODEC_CHECKS[codec]():
            raise ValueError(
                f"{_Names(info)('kafka_compression', codec)}: the {codec} codec's library "
                "(cramjam) is not installed; install the bridge with its dependencies"
            )
        return self

    @model_validator(mode="after")
    def _cap_holds_the_largest_event(self, info: ValidationInfo) -> Self:
        # A cap below the largest record an accepted event can make would answer that
        # event 503 forever (Geins retries it in vain). What a backlog counts for a
        # record (backlog.record_size: value, key, topic, headers) stays below
        # kafka_max_request_size(): a record is at most max_event_record_bytes() as
        # Kafka counts it, and the topic name (at most 249) is less than the room kept.
        named = _Names(info)
        caps = {
            "durable": ("spool_max_bytes", self.spool_max_bytes),
            "memory": ("memory_max_bytes", self.memory_max_bytes),
        }
        if self.ack not in caps:
            return self
        field, cap = caps[self.ack]
        largest = self.kafka_max_request_size()
        if cap < largest:
            raise ValueError(
                f"{named(field, cap)} is below the largest event "
                f"{named('max_body_bytes', self.max_body_bytes)} lets in ({largest} bytes "
                f"with its headers): such an event would be answered 503 forever "
                f"({named('ack', self.ack)}); raise {named(field)} to at least {largest} or "
                f"lower {named('max_body_bytes')}"
            )
        return self

    def kafka_max_request_size(self) -> int:
        """The largest record an accepted event makes, headers and framing included: what
        the topics must take."""
        return self.max_body_bytes + RECORD_OVERHEAD_BYTES

    def max_event_record_bytes(self) -> int:
        """The largest Kafka record an accepted event may make, headers included."""
        largest = self.kafka_max_request_size()
        codec_room = 0 if self.kafka_compression == "none" else math.ceil(largest * CODEC_ROOM)
        return largest - DEAD_LETTER_ROOM - codec_room

    def kafka_secret_files(self) -> list[Path]:
        """The files the Kafka connection's secrets are read from (re-read to rotate them)."""
        files = (
            self.kafka_sasl_password_file,
            self.kafka_ssl_cafile,
            self.kafka_ssl_certfile,
            self.kafka_ssl_keyfile,
            self.kafka_ssl_keyfile_password_file,
        )
        return [f for f in files if f is not None]

    def kafka_sasl_secret(self, named: _Names | None = None) -> str | None:
        """The SASL password, from the setting or (read now) from its file (ValueError
        naming the setting, as ``named`` does, when the file holds none)."""
        if self.kafka_sasl_password_file is not None:
            setting = (named or _Names())("kafka_sasl_password_file")
            return read_secret_file(self.kafka_sasl_password_file, setting)
        return self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None

    def kafka_ssl_context(self, named: _Names | None = None) -> ssl.SSLContext:
        """A new TLS client context from the ``kafka_ssl_*`` settings (files read now).

        Raises ValueError naming the setting whose file does not hold what it should
        (``named``: as validation names it, as given; else as a variable).
        """
        named = named or _Names()
        cafile = self.kafka_ssl_cafile
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"{named('kafka_ssl_cafile')}: {cafile} holds no PEM CA certificate ({exc})"
            ) from None
        context.check_hostname = self.kafka_ssl_check_hostname
        certfile, keyfile = self.kafka_ssl_certfile, self.kafka_ssl_keyfile
        if certfile is None or keyfile is None:
            return context
        password_file = self.kafka_ssl_keyfile_password_file
        try:
            # "" rather than None: OpenSSL would otherwise prompt on the terminal
            setting = named("kafka_ssl_keyfile_password_file")
            password = read_secret_file(password_file, setting) if password_file else ""
            encrypted = b"ENCRYPTED" in keyfile.read_bytes()
            context.load_cert_chain(certfile, keyfile, password)
        except ssl.SSLError as exc:  # before OSError, of which it is a kind
            if encrypted and password_file is None:
                problem = f"the key is encrypted: set {named('kafka_ssl_keyfile_password_file')}"
            elif exc.reason == "KEY_VALUES_MISMATCH":
                problem = "the key does not belong to the certificate"
            elif encrypted:
                problem = "not PEM, or the key password is wrong"
            else:
                problem = "not PEM"
            raise ValueError(
                f"{named('kafka_ssl_certfile')}/{named('kafka_ssl_keyfile')}: cannot load "
                f"the client certificate {certfile} with the key {keyfile}: {problem} ({exc})"
            ) from None
        except OSError as exc:
            raise ValueError(f"cannot read a TLS file: {exc}") from None
        return context

    def ops_address(self) -> tuple[str, int, str] | None:
        """Where the operations port listens, and the settings that say so (for error
        messages); None without BRIDGE_OPS_PORT."""
        if self.ops_port is None:
            return None
        if self.ops_host is None:
            return self.host, self.ops_port, "BRIDGE_HOST, BRIDGE_OPS_PORT"
        return self.ops_host, self.ops_port, "BRIDGE_OPS_HOST, BRIDGE_OPS_PORT"

    def file_tokens(self) -> tuple[str, ...]:
        """The tokens BRIDGE_TOKENS_FILE holds now (none without one); OSError or
        ValueError if it cannot be read any more."""
        return () if self.tokens_file is None else read_tokens_file(self.tokens_file)

    def head_cap(self) -> int:
        """Bytes a request head may take on the wire: the URL and the headers as the
        guard counts them (names and values), with each header line's ': ' and CRLF
        (4 bytes; 1 KiB of room covered them for some 250 headers only, and
        BRIDGE_MAX_HEADERS may be 10000) and room for the request line's rest."""
        return self.max_url_bytes + self.max_header_bytes + 4 * self.max_headers + 1024

    def connection_limit(self) -> tuple[int, str | None]:
        """The connections the server keeps open at most, and a warning when
        BRIDGE_MAX_CONNECTIONS is more than the process's open-file limit leaves.

        By default as many as that limit (``ulimit -n``) leaves after FILE_RESERVE, at
        most DEFAULT_MAX_CONNECTIONS: at the file limit itself new connections failed
        to open unanswered, and so could Kafka's connections and the spool's files.
        With BRIDGE_OPS_PORT, the operations port's OPS_MAX_CONNECTIONS are kept out too
        (that port has its own limit)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        unlimited = soft == resource.RLIM_INFINITY
        reserve = FILE_RESERVE + (0 if self.ops_port is None else OPS_MAX_CONNECTIONS)
        room = DEFAULT_MAX_CONNECTIONS if unlimited else max(1, soft - reserve)
        kept_for = (
            "Kafka and the spool"
            if self.ops_port is None
            else "Kafka, the spool and BRIDGE_OPS_PORT's connections"
        )
        if self.max_connections is None:
            if room < FEW_CONNECTIONS:  # silently 1 at `ulimit -n` 128, say
                return room, (
                    f"the open-file limit ({soft}, `ulimit -n`) leaves {room} connection(s) "
                    f"after the {reserve} kept for {kept_for}: past them deliveries are "
                    "refused (503); raise the limit"
                )
            return min(room, DEFAULT_MAX_CONNECTIONS), None
        if self.max_connections <= room:
            return self.max_connections, None
        return self.max_connections, (
            f"BRIDGE_MAX_CONNECTIONS={self.max_connections} is more than the open-file "
            f"limit ({soft}, `ulimit -n`) leaves for connections ({room}, keeping "
            f"{reserve} for {kept_for}): past it new connections fail "
            "unanswered, and so may Kafka's; raise the limit or lower the setting"
        )

    def file_size_warning(self) -> str | None:
        """A warning when the process's file size limit (`ulimit -f`, systemd's
        LimitFSIZE) is below what a durable spool's file may grow to: at the limit the
        spool refused events (503) and could not even delete what Kafka took, so
        nothing drained until the limit was lifted (a review's find)."""
        if self.ack != "durable":
            return None
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        needed = 2 * self.spool_max_bytes + SPOOL_KEY_BYTES * self.spool_max_keys
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return None
        return (
            f"the file size limit (`ulimit -f`, systemd's LimitFSIZE) is {soft} bytes, less "
            f"than the spool's file may need ({needed}: twice BRIDGE_SPOOL_MAX_BYTES and "
            f"{SPOOL_KEY_BYTES} bytes for each of BRIDGE_SPOOL_MAX_KEYS): at the limit the "
            "spool refuses events and cannot be emptied until it is lifted; lift it"
        )

    def check_serving(self) -> None:
        """What only matters when serving webhooks (operator commands need no tokens)."""
        if self.allow_unauthenticated or self.tokens:
            return
        if self.tokens_file is None:
            raise ConfigError(
                "BRIDGE_TOKENS is empty: set at least one token (comma-separated), "
                "or BRIDGE_ALLOW_UNAUTHENTICATED=true to accept anyone"
            )
        try:
            from_file = self.file_tokens()
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"BRIDGE_TOKENS_FILE: cannot read the file it names: {unreadable_because(exc)}"
            ) from None
        if not from_file:  # every delivery would get a 401, and readiness say all is well
            raise ConfigError(
                "BRIDGE_TOKENS is empty and the file BRIDGE_TOKENS_FILE names holds no "
                "token: put at least one in either, or set BRIDGE_ALLOW_UNAUTHENTICATED=true "
                "to accept anyone until the file holds one"
            )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict, safe to print: tokens are replaced by their count."""
        shown = self.model_dump(mode="json")
        shown["tokens"] = f"<{len(self.tokens)} token(s)>"
        if self.tokens_file is not None:
            try:
                counted = f"<{len(self.file_tokens())} token(s)>"
            except (OSError, ValueError) as exc:
                counted = f"<cannot be read: {unreadable_because(exc)}>"
            shown["tokens_in_file"] = counted
        shown["max_connections_in_effect"] = self.connection_limit()[0]
        return shown


#: Settings read as UTF-8 whatever the locale: the secrets, compared and sent as bytes.
_SECRET_TEXT = ("tokens", "kafka_sasl_password", "kafka_sasl_username")


def _as_utf8(name: str, value: str) -> str:
    """A variable's value as the UTF-8 its bytes are, whatever the locale: under LC_ALL=C
    (without Python's UTF-8 mode) os.environ gives non-ASCII bytes as surrogate escapes,
    and a byte that is not UTF-8 (an env file saved as latin-1) came as one in any
    locale: the refusal's redaction of the secrets raised TypeError, a traceback and
    exit 1 rather than a settings error's 2, which systemd's RestartPreventExitStatus=2
    stops (a review). Under a latin-1 locale each byte came as a letter: a UTF-8 token
    read as mojibake, every client's 401 (a second review)."""
    try:  # the bytes as the locale's encoding read them (latin-1: every byte a letter)
        return os.fsencode(value).decode("utf-8")
    except UnicodeError:
        raise ConfigError(
            f"invalid settings:\n  {name}: not UTF-8 text (save the file that sets it as UTF-8)"
        ) from None


def load_settings(
    config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the TOML file (if any), overlay ``BRIDGE_*`` variables, validate.

    Raises :class:`ConfigError` with a message naming each bad setting.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_FILE_ENV):
        config_file = Path(environ[CONFIG_FILE_ENV])
    values: dict[str, Any] = {}
    given: dict[str, tuple[str, str]] = {}  # each setting given: its name, and where
    if config_file is not None:
        try:
            # TOML is UTF-8 whatever the locale; a byte order mark is dropped
            values.update(tomllib.loads(config_file.read_text(encoding="utf-8-sig")))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        given.update({name: (name, f" in {config_file}") for name in values})
    variables: dict[str, list[str]] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != CONFIG_FILE_ENV:
            field = name[len(ENV_PREFIX) :].lower()
            variables.setdefault(field, []).append(name)
            values[field] = _as_utf8(name, value) if field in _SECRET_TEXT else value
            given[field] = (name, "")
    # Names differing only in case (BRIDGE_Tokens beside BRIDGE_TOKENS) are one setting:
    # whichever came last would silently win. Named, never their values.
    try:
        if twice := [sorted(names) for names in variables.values() if len(names) > 1]:
            raise ConfigError(
                "invalid settings:\n  "
                + "\n  ".join(
                    f"{' and '.join(names)} both set {names[0].upper()}: keep one"
                    for names in twice
                )
            )
        try:
            # The model's own checks name settings as given too (see _Names).
            return Settings.model_validate(values, context={GIVEN: given})
        except ValidationError as exc:
            origin = {field: name + where for field, (name, where) in given.items()}
            raise ConfigError(_secrets_given(values).redact(_explain(exc, origin))) from None
        except UnicodeError:  # a message quoting a value that is not UTF-8: not ours to show
            raise ConfigError(
                "invalid settings: a value holds bytes that are not UTF-8 text, and the "
                "error about it could not be shown; check the settings' paths and names"
            ) from None
    except ConfigError as exc:
        exc.log_format = values.get("log_format")  # a file's too, where one was read
        raise


def _secrets_given(values: Mapping[str, Any]) -> Redactor:
    """The webhook tokens and the SASL password among the settings given, as they were
    given: an error quoting a setting's value (a token pasted into BRIDGE_KAFKA_BOOTSTRAP
    or inside an invalid BRIDGE_TOPIC_TEMPLATE, a URL with its ?token=) shows <token>
    in its place. None shorter than a token may be (it would blot out other words)."""
    given: list[str] = []
    tokens = values.get("tokens")
    if isinstance(tokens, str):
        given += tokens.split(",")
    elif isinstance(tokens, list):
        given += [t for t in tokens if isinstance(t, str)]
    tokens_file = values.get("tokens_file")
    if isinstance(tokens_file, str) and tokens_file.strip():
        with contextlib.suppress(OSError, ValueError):
            given += read_tokens_file(Path(tokens_file))
    password = values.get("kafka_sasl_password")
    if isinstance(password, str):
        given.append(password)
    password_file = values.get("kafka_sasl_password_file")
    if isinstance(password_file, str) and password_file.strip():
        with contextlib.suppress(OSError, ValueError):
            given.append(_secret_in(Path(password_file)))  # as read for Kafka: a BOM off
    secrets = [s for s in (g.strip() for g in given) if len(s) >= MIN_TOKEN_LENGTH]
    # and as an error's repr() quotes them: a backslash doubled, say
    return Redactor(secrets + [repr(s)[1:-1] for s in secrets])


def _explain(exc: ValidationError, origin: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            where = origin.get(field, field)
            lines.append(f"{where}: unknown setting")
        elif field:
            lines.append(f"{origin.get(field, ENV_PREFIX + field.upper())}: {message}")
        else:
            lines.append(message)
    return "invalid settings:\n  " + "\n  ".join(lines)
