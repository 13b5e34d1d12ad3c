"""A systemd unit file as its sections' settings, and an EnvironmentFile's variables."""

from __future__ import annotations

from pathlib import Path


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each section's ``Key=value`` lines in order (a key may repeat, as Environment=
    does); comments and blank lines dropped. Unit files here use no continuations."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        assert not line.endswith("\\"), f"{path}: continuation lines are not parsed here"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    """Every value of ``key`` in the section, in order."""
    return [value for k, value in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    """The single value of ``key``: fails if it is absent or repeated."""
    found = values(section, key)
    assert len(found) == 1, (key, found)
    return found[0]


def environment_file(path: Path) -> dict[str, str]:
    """NAME=value lines as systemd's EnvironmentFile= reads these: comments and blank
    lines skipped, no quotes or expansion used (the files here have none)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r}"
        assert name.isidentifier(), f"{path}: {line!r}"
        assert not value.startswith(("'", '"')), f"{path}: quoting is not parsed here"
        env[name] = value
    return env
