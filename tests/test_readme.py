"""The README stays true: every setting and every metric is documented there."""

from __future__ import annotations

import re

from bridge.config import Settings
from bridge.metrics import Metrics
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    """Each field of Settings has a row `BRIDGE_<NAME>` in the README, and no row is stale."""
    documented = set(re.findall(r"^\| `(BRIDGE_[A-Z0-9_]+)` \|", README, flags=re.MULTILINE))
    expected = {f"BRIDGE_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from the README"
    assert documented - expected == set(), "README rows for settings that do not exist"


def test_every_metric_is_in_the_metrics_table() -> None:
    """Each metric family the bridge exposes is named in the README's metrics table."""
    names = {metric.name for metric in Metrics().registry.collect()}
    missing = {
        name for name in names if f"`{name}`" not in README and f"`{name}_total`" not in README
    }
    assert missing == set()


def test_the_request_duration_help_says_where_the_time_starts() -> None:
    """bridge_request_duration_seconds is timed from the request head having been read,
    as its README row says; its help text said "from the first byte of the request"."""
    exposition = Metrics().exposition().decode()
    [help_line] = [
        line
        for line in exposition.splitlines()
        if line.startswith("# HELP bridge_request_duration_seconds ")
    ]
    assert "first byte" not in help_line
    assert "from when the request head was read to the answer" in help_line
    assert "from when the bridge's app took it (its head read)" in README
