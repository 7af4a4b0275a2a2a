"""The load section of a report (report.json's ``load``, written by
`compressor.runtime.load.LoadTest.run`) as a table and a sentence, for report.md and report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_lines(section: dict[str, Any]) -> tuple[list[str], list[list[str]], str]:
    """The report's load section as a table (per file and setting: the best level within
    the p99 bound, and the level at one client) and one summary sentence."""
    header = [
        "file",
        "setting",
        f"best req/s (p99 <= {section['p99_ms']:g} ms)",
        "at clients",
        "p99 ms",
        "req/s at 1 client",
        "p50 ms at 1 client",
    ]
    body = []
    for result in section["files"].values():  # written by compressor.runtime.load.LoadTest.run
        for entry in result["settings"]:
            best = entry.get("best")
            one = next((lv for lv in entry["levels"] if lv["concurrency"] == 1), None)
            body.append(
                [
                    Path(result["file"]).name,
                    entry["label"],
                    _cell(best and best["throughput"], ".1f"),
                    str(best["concurrency"]) if best else "-",
                    _cell(best and best["p99_ms"], ".2f"),
                    _cell(one and one.get("throughput"), ".1f"),
                    _cell(one and (one.get("latency_ms") or {}).get("p50"), ".2f"),
                ]
            )
    return header, body, _load_summary(section)


def _load_summary(section: dict[str, Any]) -> str:
    """One sentence: the final artifact's best throughput within the p99 bound against the
    baseline file's."""
    files = section["files"]
    parts = []
    for role in files:
        best = files[role].get("best")
        name = Path(files[role]["file"]).name
        parts.append(
            f"{name} {best['throughput']:.1f} requests/s ({best['label']}, "
            f"{best['concurrency']} clients, p99 {best['p99_ms']:.2f} ms)"
            if best
            else f"{name}: no setting within the bound"
        )
    text = f"Under load, best within p99 {section['p99_ms']:g} ms: " + "; ".join(parts) + "."
    base, final = (files.get(k, {}).get("best") for k in ("baseline", "final"))
    if base and final:
        text += (
            f" The artifact serves {final['throughput'] / base['throughput']:.2f}x the baseline."
        )
    return text


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
