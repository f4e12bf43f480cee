"""The one name-pattern language of the passes' include/exclude options: ``re:...`` is a regular
expression searched anywhere in the name; anything else is a glob on the whole name (case-sensitive).

One module, so that quantize's exclude_nodes, prune's include/exclude and the budget's back-off
patterns (``exact_name_pattern``) cannot drift apart.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

REGEX_PREFIX = "re:"


class NamePatterns:
    """Compiled patterns; check them with ``invalid_pattern`` first (a bad regex raises ``re.error``)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        self.regexes = [re.compile(p[len(REGEX_PREFIX) :]) for p in patterns if p.startswith(REGEX_PREFIX)]
        self.globs = [p for p in patterns if not p.startswith(REGEX_PREFIX)]

    def matches(self, *names: str) -> bool:
        """True when a pattern matches one of ``names``."""
        return any(
            any(regex.search(name) for regex in self.regexes) or any(fnmatch.fnmatchcase(name, g) for g in self.globs)
            for name in names
        )


def invalid_pattern(patterns: Iterable[str]) -> str | None:
    """The first pattern whose regex does not compile, as "'re:...': error", or None."""
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX) :])
            except re.error as error:
                return f"{pattern!r}: {error}"
    return None


def exact_name_pattern(name: str) -> str:
    """A pattern that matches exactly this name (and no other), whatever characters it holds."""
    return REGEX_PREFIX + "^" + re.escape(name) + "$"
