"""config: environment over TOML, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import load_settings
from bridge.errors import ConfigError

BASE = {"BRIDGE_TOKENS": "a,b"}


def test_defaults() -> None:
    """The documented defaults hold."""
    settings = load_settings(environ=BASE)
    assert settings.kafka_bootstrap == "localhost:9092"
    assert settings.port == 8080
    assert settings.topic_template == "geins.{entity}.{action}"
    assert settings.tokens == ("a", "b")
    assert settings.max_body_bytes == 960 * 1024


def test_environment_overrides_toml(tmp_path: Path) -> None:
    """The TOML file sets values; BRIDGE_* variables win over it."""
    file = tmp_path / "bridge.toml"
    file.write_text('port = 9000\nkafka_bootstrap = "k1:9092,k2:9092"\ntokens = ["x"]\n')
    settings = load_settings(file, environ={"BRIDGE_PORT": "9100"})
    assert settings.port == 9100
    assert settings.kafka_bootstrap == "k1:9092,k2:9092"
    assert settings.tokens == ("x",)
    assert load_settings(environ={"BRIDGE_CONFIG_FILE": str(file)}).port == 9000


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
    ],
)
def test_bad_settings_are_named(environ: dict[str, str], named: str) -> None:
    """Startup stops with a message naming the bad setting."""
    with pytest.raises(ConfigError, match=named):
        load_settings(environ={**BASE, **environ})


def test_tokens_required_to_serve_unless_opted_out() -> None:
    """No tokens and no explicit opt-out refuses to serve; operator commands need none."""
    settings = load_settings(environ={})
    with pytest.raises(ConfigError, match="BRIDGE_TOKENS"):
        settings.check_serving()
    load_settings(environ={"BRIDGE_ALLOW_UNAUTHENTICATED": "true"}).check_serving()
    load_settings(environ={"BRIDGE_TOKENS": "t"}).check_serving()


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
    shown = str(load_settings(environ={"BRIDGE_TOKENS": "s3cr3t"}).redacted())
    assert "s3cr3t" not in shown
    assert "s3cr3t" not in repr(load_settings(environ={"BRIDGE_TOKENS": "s3cr3t"}))
