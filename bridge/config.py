"""Settings: ``BRIDGE_*`` environment variables over an optional TOML file.

Everything is validated once, at startup; a bad setting stops the bridge with
a message that names it (``BRIDGE_PORT: ...``). The TOML file uses the same
names in lower case without the prefix (``port = 8080``). Unknown names in
either place are errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bridge.errors import ConfigError
from bridge.routing import TOPIC_NAME, TopicTemplate, topic_safe

ENV_PREFIX = "BRIDGE_"
#: Names the environment variable that points at the TOML file (not a setting itself).
CONFIG_FILE_ENV = "BRIDGE_CONFIG_FILE"

Seconds = Annotated[float, Field(gt=0, le=3600)]


class Settings(BaseModel):
    """Every setting, with its default. The README's table mirrors this class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- HTTP ----------------------------------------------------------------------
    host: str = "0.0.0.0"  # noqa: S104  # a sidecar or service must listen beyond loopback
    port: int = Field(8080, ge=1, le=65535)
    tokens: tuple[str, ...] = Field((), repr=False)
    allow_unauthenticated: bool = False
    max_body_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024)
    strict_types: bool = False
    retry_after: int = Field(5, ge=1, le=3600)
    shutdown_delay: float = Field(0.0, ge=0, le=300)
    shutdown_timeout: Seconds = 15.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- Delivery ------------------------------------------------------------------
    ack: Literal["durable", "broker", "memory"] = "durable"
    publish_timeout: Seconds = 5.0
    spool_dir: Path = Path("spool")
    spool_max_bytes: int = Field(1024**3, ge=1024 * 1024)
    memory_max_bytes: int = Field(64 * 1024**2, ge=1024 * 1024)
    dedup_window: float = Field(7200.0, ge=0, le=7 * 86400)
    dedup_max_keys: int = Field(100_000, ge=1)
    deadletter_topic: str = "geins.deadletter"

    # --- Kafka ---------------------------------------------------------------------
    kafka_bootstrap: str = "localhost:9092"
    kafka_client_id: str = "geins-bridge"
    kafka_linger_ms: int = Field(2, ge=0, le=1000)
    kafka_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"
    kafka_connect_timeout: Seconds = 10.0

    # --- Topics and message format ---------------------------------------------------
    topic_template: str = "geins.{entity}.{action}"
    default_account: str = "default"
    default_environment: str = "default"
    create_topics: bool = False
    topic_partitions: int = Field(3, ge=1, le=10000)
    topic_replication_factor: int | None = Field(None, ge=1, le=32)
    ce_source: str = Field("urn:geins", min_length=1)

    @field_validator("tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("tokens")
    @classmethod
    def _tokens_are_printable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for token in value:
            if not token.isprintable() or " " in token:
                raise ValueError("a token must be printable and contain no spaces")
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
            raise ValueError("use lower-case letters, digits, '.', '_' or '-' (at most 48)")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{server.strip()!r} is not host:port")
        return value

    def check_serving(self) -> None:
        """What only matters when serving webhooks (operator commands need no tokens)."""
        if not self.tokens and not self.allow_unauthenticated:
            raise ConfigError(
                "BRIDGE_TOKENS is empty: set at least one token (comma-separated), "
                "or BRIDGE_ALLOW_UNAUTHENTICATED=true to accept anyone"
            )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict, safe to print: tokens are replaced by their count."""
        shown = self.model_dump(mode="json")
        shown["tokens"] = f"<{len(self.tokens)} token(s)>"
        return shown


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
    origin: dict[str, str] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(config_file.read_text()))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        origin.update({name: f"{name} in {config_file}" for name in values})
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != CONFIG_FILE_ENV:
            field = name[len(ENV_PREFIX) :].lower()
            values[field] = value
            origin[field] = name
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origin)) from None


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
