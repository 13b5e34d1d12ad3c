"""The build context BuildKit would send, from a .dockerignore file.

Follows the documented rules (and moby/patternmatcher): patterns are paths
relative to the context root, ``*`` and ``?`` stay within one path element,
``**`` spans any number of them, a pattern that matches a folder matches
everything in it, a leading ``!`` re-includes, and the last matching line wins.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Rule:
    pattern: str
    include: bool
    regex: re.Pattern[str]


def _compile(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))


class DockerIgnore:
    """The rules of one .dockerignore file."""

    def __init__(self, text: str) -> None:
        self.rules: list[_Rule] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
            self.rules.append(_Rule(pattern, include, _compile(pattern)))

    def excluded(self, path: str) -> bool:
        """Whether ``path`` (relative, with /) stays out of the build context."""
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for rule in self.rules:
            if any(rule.regex.fullmatch(prefix) for prefix in prefixes):
                excluded = not rule.include
        return excluded

    def _may_include_below(self, folder: str) -> bool:
        return any(
            rule.include and (rule.pattern == folder or rule.pattern.startswith(folder + "/"))
            for rule in self.rules
        )

    def context_files(self, root: Path) -> list[str]:
        """Every file under ``root`` that the build context would contain."""
        found: list[str] = []
        for here, folders, files in os.walk(root):
            rel = Path(here).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            folders[:] = sorted(
                name
                for name in folders
                if name != ".git"
                and (not self.excluded(prefix + name) or self._may_include_below(prefix + name))
            )
            found.extend(
                prefix + name for name in sorted(files) if not self.excluded(prefix + name)
            )
        return found
