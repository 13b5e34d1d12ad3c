"""The README stays true: every setting and every metric is documented there."""

from __future__ import annotations

import re

import pytest
from annotated_types import Ge, Gt, Le

from bridge.cli import _parser
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


SETTING_ROWS = {
    name: meaning
    for name, _default, meaning in re.findall(
        r"^\| `(BRIDGE_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$", README, flags=re.MULTILINE
    )
}


def _forms(number: float) -> set[str]:
    """Ways the README writes a bound."""
    n = int(number) if float(number).is_integer() else number
    forms = {str(n), f"{n:,}"}
    for power, unit in ((1024**2, "MiB"), (1024, "KiB")):
        if isinstance(n, int) and n >= power and n % power == 0:
            forms.add(f"{n // power} {unit}")
    if n == 2**53:
        forms.add("2^53")
    if n == 7 * 86400:
        forms |= {"7 days", "a week"}
    if n == 3600:
        forms.add("an hour")
    return forms


def _states(meaning: str, number: float) -> bool:
    """Whether ``meaning`` writes ``number`` as a number of its own: "100" inside
    "10000" is not it (a review's mutant of BRIDGE_MAX_HEADERS's bound survived so)."""
    return any(
        re.search(rf"(?<![\w.,]){re.escape(form)}(?!\w|[.,]\d)", meaning) is not None
        for form in _forms(number)
    )


def _bounds(field: str) -> tuple[float | None, float | None]:
    """The (lowest, highest) value a setting's field takes, where it has them."""
    low: float | None = None
    high: float | None = None
    for item in Settings.model_fields[field].metadata:
        if isinstance(item, Ge):
            low = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, Gt):
            low = float(item.gt)  # type: ignore[arg-type]
        elif isinstance(item, Le):
            high = float(item.le)  # type: ignore[arg-type]
    return low, high


#: BRIDGE_PORT's 65535 is TCP's own.
BOUNDED = [f for f in Settings.model_fields if _bounds(f)[1] is not None and f != "port"]


@pytest.mark.parametrize("field", BOUNDED)
def test_each_bounded_setting_states_its_upper_bound_in_the_readme(field: str) -> None:
    """A value over the bound stops the bridge at startup: the table must say so
    (BRIDGE_DEDUP_WINDOW=864000, 10 days, or BRIDGE_TOPIC_PARTITIONS=20000 were refused
    with nothing in the README announcing a limit: a review's test)."""
    _, high = _bounds(field)
    meaning = SETTING_ROWS["BRIDGE_" + field.upper()]
    assert high is not None
    assert _states(meaning, high), (
        f"BRIDGE_{field.upper()}: the code refuses values over {high:g}; the README row "
        f"does not say so"
    )


@pytest.mark.parametrize("field", ["max_headers", "max_header_bytes", "max_url_bytes"])
def test_lower_bounds_above_the_obvious_are_stated(field: str) -> None:
    """BRIDGE_MAX_URL_BYTES=200 or BRIDGE_MAX_HEADERS=4 (tightening a public endpoint)
    stop the bridge: minimums of 256, 8 and 1024 nobody can guess."""
    low, _ = _bounds(field)
    meaning = SETTING_ROWS["BRIDGE_" + field.upper()]
    assert low is not None
    assert _states(meaning, low), (field, low)


def test_topics_create_help_names_the_dead_letter_topic(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`bridge topics create` with no names creates the dead-letter topic too
    (kafkaadmin.default_topics; the README says so); its help named only the event
    types (a review's test)."""
    with pytest.raises(SystemExit):
        _parser().parse_args(["topics", "--help"])
    assert "and the dead-letter topic" in " ".join(capsys.readouterr().out.split())
