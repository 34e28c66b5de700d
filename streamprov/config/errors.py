"""Errors for the topic-level configuration: every problem, where it is, and what to write instead."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from streamprov.errors import StreamprovError


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration.

    `location` is the dotted path inside the file (`topics.fahrenheit.checks.rederivation.sample_rate`,
    list items as `sources[1]`); `source` says where the value came from: the file's path (with `line`,
    1-based, when known) or the environment variable that set it. `hint` says what to write instead.
    Messages never contain a secret's value.
    """

    location: str
    message: str
    hint: str | None = None
    source: str | None = None
    line: int | None = None

    def where(self) -> str:
        """`FILE:LINE`, `FILE`, `environment variable NAME` or '' - the prefix of `__str__`."""
        if self.source is None:
            return ""
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return self.source

    def __str__(self) -> str:
        where = self.where()
        head = f"{where}: " if where else ""
        loc = self.location or "(top level)"
        text = f"{head}{loc}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class ConfigError(StreamprovError):
    """A configuration could not be loaded; `problems` lists every problem found, in file order."""

    def __init__(self, problems: Iterable[ConfigProblem], source: str | None = None) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        where = f" in {self.source}" if self.source else ""
        lines = [f"{count} {noun}{where}:"]
        lines.extend(f"  {problem}".replace("\n", "\n  ") for problem in self.problems)
        return "\n".join(lines)
