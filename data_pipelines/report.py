"""Counted, reported drops: nothing is lost silently. Each reason keeps its count and examples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """Input that cannot be used; the message names the file, line and field."""


@dataclass
class DropLog:
    strict: bool = False
    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, reason: str, where: str, detail: str, n: int = 1) -> None:
        """Count `n` dropped rows; in strict mode raise instead, naming `where` (file:line)."""
        if self.strict:
            raise DataError(f"{where}: {detail} ({reason})")
        self.counts[reason] += n
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{where}: {detail}")

    def note(self, reason: str, n: int, example: str = "") -> None:
        """Count rows removed by design (duplicates, k-core); never an error, even when strict."""
        if n <= 0:
            return
        self.counts[reason] += n
        if example:
            shown = self.examples.setdefault(reason, [])
            if len(shown) < self.max_examples:
                shown.append(example)

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}
