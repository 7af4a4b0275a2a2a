"""The comparison report: typed rows, a summary, and its JSON and Markdown forms.

The JSON layout is a contract (``schema_version`` 1, see docs/report.md): tools read it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import write_text

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Row:
    """One measured model: the baseline in one runtime, or the result of one stage."""

    name: str
    runtime: str
    precision: str
    accuracy: float
    params: int
    macs: int
    size_bytes: int
    latency_ms: dict[str, float]
    throughput: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row as report.json holds it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """Inverse of `to_dict`; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def summarize(rows: list[Row]) -> dict[str, float | str | None]:
    """Compare the final row with the baseline rows (see docs/report.md for each field)."""
    base_torch = next((r for r in rows if r.name == "baseline" and r.runtime == "torch"), None)
    base_onnx = next((r for r in rows if r.name == "baseline" and r.runtime == "onnxruntime"), None)
    final = rows[-1] if rows else None
    if final is None or base_torch is None:
        return {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    final_p50 = final.latency_ms.get("p50")
    return {
        "final": final.name,
        "speedup_vs_torch": ratio(base_torch.latency_ms.get("p50"), final_p50),
        "speedup_vs_onnx": ratio(base_onnx.latency_ms.get("p50"), final_p50) if base_onnx else None,
        "size_ratio": ratio(
            (base_onnx or base_torch).size_bytes,
            final.size_bytes,
        ),
        "accuracy_drop": round(base_torch.accuracy - final.accuracy, 6),
    }


@dataclass
class Report:
    """Rows per stage plus the environment they were measured in, and a summary.

    ``str(report)`` is the Markdown table; `save` writes report.json and report.md.
    """

    rows: list[Row]
    environment: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        """Final artifact vs baseline: speedups, size ratio, accuracy drop."""
        return summarize(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The report.json document."""
        return {
            "schema_version": SCHEMA_VERSION,
            "environment": self.environment,
            "rows": [r.to_dict() for r in self.rows],
            "summary": self.summary,
        }

    def to_json(self) -> str:
        """report.json's text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Read a report.json document."""
        return cls(rows=[Row.from_dict(r) for r in data["rows"]], environment=data["environment"])

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read report.json from ``path``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_markdown(self) -> str:
        """The comparison table, with the summary and environment under it."""
        head = (
            "| stage | runtime | precision | top-1 | params | MACs | size | "
            "p50 ms (bs 1) | p95 ms (bs 1) | samples/s (bs {tb}) |"
        )
        tb = self.rows[0].throughput.get("batch_size", "") if self.rows else ""
        lines = [head.format(tb=tb), "|" + "---|" * 10]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.runtime} | {r.precision} | {r.accuracy:.4f} | "
                f"{_count(r.params)} | {_count(r.macs)} | {_size(r.size_bytes)} | "
                f"{r.latency_ms['p50']:.3f} | {r.latency_ms['p95']:.3f} | "
                f"{r.throughput['samples_per_s']:.1f} |"
            )
        s = self.summary
        if s:
            lines += [
                "",
                f"Final ({s['final']}) vs baseline: "
                f"{_x(s['speedup_vs_torch'])} faster than torch FP32, "
                f"{_x(s['speedup_vs_onnx'])} faster than ONNX Runtime FP32, "
                f"{_x(s['size_ratio'])} smaller, "
                f"top-1 drop {s['accuracy_drop'] * 100:+.2f} points.",
            ]
        notes = [n for r in self.rows for n in r.details.get("notes", [])]
        lines += [f"\nNote: {n}" for n in notes]
        env = self.environment
        features = ", ".join(env.get("cpu_features", [])) or "no INT8 features found"
        lines += [
            "",
            f"Measured on {env.get('cpu')} ({features}), {env.get('threads')} threads; "
            f"torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}.",
        ]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def save(self, directory: str | Path) -> None:
        """Write report.json and report.md into ``directory`` (atomically)."""
        directory = Path(directory)
        write_text(directory / "report.json", self.to_json())
        write_text(directory / "report.md", self.to_markdown())


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
