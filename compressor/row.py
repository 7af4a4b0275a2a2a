"""One measured model: the record every report row, measurement and diagnosis shares, and
how its counts read in text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    """One measured model: the baseline in one runtime, or the result of one stage."""

    name: str
    runtime: str
    precision: str
    accuracy: float | None
    params: int | None
    macs: int | None
    size_bytes: int
    latency_ms: dict[str, Any]
    throughput: dict[str, float]
    throughput_by_batch: list[dict[str, float]] = field(default_factory=list)
    memory: dict[str, int] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name (runtime precision)``, as tables and charts name the row."""
        return f"{self.name} ({self.runtime} {self.precision})"

    def to_dict(self) -> dict[str, Any]:
        """The row as report.json holds it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """Inverse of `to_dict`; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def amount(value: float) -> str:
    """A count or measure in three significant digits: ``1.23G``, ``45.6K``, ``2.05``."""
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"
