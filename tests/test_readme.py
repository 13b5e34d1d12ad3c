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
