"""The comparison report: typed rows, a summary, and its JSON and Markdown forms.

The JSON layout is a contract (``schema_version`` 1, see docs/report.md): tools read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import write_text
from ..errors import UserError, first_line
from ..models.model_io import METRIC_LABELS
from ..row import Row, amount
from ..runtime.runtimes import deployment_snippet
from .diagnosis import ACCURACY_THRESHOLD, diagnose, find_row, settled
from .html import (
    Page,
    accuracy_chart,
    load_chart,
    pruning_sensitivity_chart,
    render_html,
    sensitivity_chart,
    stage_bars,
)
from .load_table import load_lines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCHEMA_VERSION = 1


def summarize(rows: list[Row]) -> dict[str, Any]:
    """Compare the final row with the baseline rows (see docs/report.md for each field)."""
    base_torch = find_row(rows, "baseline", "torch")
    base_onnx = find_row(rows, "baseline", "onnxruntime")
    final = rows[-1] if rows else None
    if final is None or base_torch is None:
        return {}

    final_p50 = final.latency_ms.get("p50")
    return {
        "final": final.name,
        "speedup_vs_torch": _ratio(base_torch.latency_ms.get("p50"), final_p50),
        "speedup_vs_onnx": (
            _ratio(base_onnx.latency_ms.get("p50"), final_p50) if base_onnx else None
        ),
        "size_ratio": _ratio(
            (base_onnx or base_torch).size_bytes,
            final.size_bytes,
        ),
        "accuracy_drop": (
            round(base_torch.accuracy - final.accuracy, 6)
            if final.accuracy is not None and base_torch.accuracy is not None
            else None
        ),
        **_runtime_summary(rows, final, base_torch),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _runtime_summary(rows: list[Row], final: Row, base_torch: Row) -> dict[str, Any]:
    """The final file in every runtime that ran it, the fastest, and its speedup.

    ``runtimes`` maps each runtime that measured the final artifact to its p50 latency, its
    speedup over the same runtime's FP32 baseline, and its accuracy; ``fastest_runtime``
    is the one with the lowest p50, and ``speedup_vs_fastest_fp32`` that p50 against the
    fastest FP32 baseline row in any runtime (torch included).
    """
    same_file = [r for r in rows if r.name == final.name and r.runtime != "torch"]
    if final.runtime == "torch" or not same_file:
        return {}
    runtimes = {}
    for row in same_file:
        base = find_row(rows, "baseline", row.runtime)
        runtimes[row.runtime] = {
            "p50_ms": row.latency_ms.get("p50"),
            "speedup_vs_fp32": _ratio(base.latency_ms.get("p50"), row.latency_ms.get("p50"))
            if base
            else None,
            "accuracy": row.accuracy,
        }
    fastest = min(same_file, key=lambda r: r.latency_ms.get("p50") or float("inf"))
    baselines = [r for r in rows if r.name == "baseline"] or [base_torch]
    fastest_fp32 = min(baselines, key=lambda r: r.latency_ms.get("p50") or float("inf"))
    return {
        "runtimes": runtimes,
        "fastest_runtime": fastest.runtime,
        "fastest_fp32_runtime": fastest_fp32.runtime,
        "speedup_vs_fastest_fp32": _ratio(
            fastest_fp32.latency_ms.get("p50"), fastest.latency_ms.get("p50")
        ),
    }


@dataclass
class Report:
    """Rows per stage, the environment they were measured in, a summary and a diagnosis.

    ``str(report)`` is the Markdown table; `save` writes report.json, report.md and
    report.html.

    Attributes:
        rows: the baseline (torch and ONNX Runtime) first, then one row per stage.
        environment: versions, CPU, INT8 instructions and threads (see `measure.environment`).
        parity: the final ONNX file's outputs against the FP32 baseline file's, over the
            eval data (top-1 agreement, max and mean abs difference), when there is one.
        accuracy_threshold: the accuracy drop (a fraction) above which `diagnosis` warns.
        load_test: the load test of the baseline file and the final artifact under concurrent
            requests (`compressor.runtime.load.LoadTest.run`), when the run asked for one.
        budget: the accuracy budget (``max_accuracy_drop``) and whether the final artifact
            met it, when the run had one.
        model_io: the task, the output compared and distilled, and the metric the rows'
            ``accuracy`` holds (``top1``, ``miou`` or ``custom``; `compressor.models.model_io`).
        seconds: the run's wall time by phase (``training``, ``pruning``, ``quantization``,
            ``export``, ``measuring``, ``load_test``, ``other``) and its ``total``.
    """

    rows: list[Row]
    environment: dict[str, Any]
    parity: dict[str, Any] | None = None
    accuracy_threshold: float = ACCURACY_THRESHOLD
    load_test: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    model_io: dict[str, Any] | None = None
    seconds: dict[str, float] | None = None

    def row(self, name: str, runtime: str | None = None) -> Row:
        """The first row called ``name`` (measured in ``runtime``, when given).

        Raises:
            KeyError: no such row; the message lists the rows there are.
        """
        for r in self.rows:
            if r.name == name and runtime in (None, r.runtime):
                return r
        msg = f"no row {name!r}{f' in {runtime}' if runtime else ''}; rows: " + ", ".join(
            r.label for r in self.rows
        )
        raise KeyError(msg)

    @property
    def summary(self) -> dict[str, Any]:
        """Final artifact vs baseline: speedups, size ratio, accuracy drop."""
        return summarize(self.rows)

    @property
    def diagnosis(self) -> dict[str, Any]:
        """Problems of the final artifact and their causes (see `compressor.report.diagnosis`)."""
        return diagnose(self.rows, self.environment, accuracy_threshold=self.accuracy_threshold)

    def to_dict(self) -> dict[str, Any]:
        """The report.json document."""
        return {
            "schema_version": SCHEMA_VERSION,
            "environment": self.environment,
            "rows": [r.to_dict() for r in self.rows],
            "summary": self.summary,
            "parity": self.parity,
            "diagnosis": self.diagnosis,
            **({"load": self.load_test} if self.load_test else {}),
            **({"budget": self.budget} if self.budget else {}),
            **({"model_io": self.model_io} if self.model_io else {}),
            **({"seconds": self.seconds} if self.seconds else {}),
        }

    def to_json(self) -> str:
        """report.json's text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Read a report.json document (summary and diagnosis are recomputed)."""
        try:
            rows = [Row.from_dict(r) for r in data["rows"]]
            environment = dict(data.get("environment") or {})
        except (KeyError, TypeError, AttributeError) as exc:
            msg = f"not a compressor report: {first_line(exc)}"
            raise UserError(msg) from exc
        threshold = (data.get("diagnosis") or {}).get("accuracy_threshold", ACCURACY_THRESHOLD)
        load = data.get("load")
        budget = data.get("budget")
        return cls(
            rows,
            environment,
            parity=data.get("parity"),
            accuracy_threshold=threshold,
            load_test=load if isinstance(load, dict) and "files" in load else None,
            budget=budget if isinstance(budget, dict) and "met" in budget else None,
            model_io=data.get("model_io") if isinstance(data.get("model_io"), dict) else None,
            seconds=data.get("seconds") if isinstance(data.get("seconds"), dict) else None,
        )

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read report.json from ``path``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            msg = f"cannot read report {str(path)!r}: {exc.strerror or exc}"
            raise UserError(msg) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = f"{str(path)!r} is not JSON: {first_line(exc)}"
            raise UserError(msg) from exc
        if not isinstance(data, dict) or "rows" not in data:
            msg = f"{str(path)!r} is not a compressor report.json (no 'rows')"
            raise UserError(msg)
        return cls.from_dict(data)

    def throughput_batches(self) -> list[int]:
        """The batch sizes every row's throughput was measured at."""
        sizes: list[int] = []
        for row in self.rows:
            for entry in row.throughput_by_batch or [row.throughput]:
                if entry.get("batch_size") not in sizes:
                    sizes.append(entry["batch_size"])
        return sizes

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The comparison table as header cells and formatted row cells."""
        sizes = self.throughput_batches()
        latency_batch = self.rows[0].latency_ms.get("batch_size", 1) if self.rows else 1
        header = [
            "stage",
            "runtime",
            "precision",
            self.metric_label(),
            "params",
            "MACs",
            "size",
            f"p50 ms (bs {latency_batch})",
            f"p95 ms (bs {latency_batch})",
            *[f"samples/s (bs {b})" for b in sizes],
            "memory +MB",
        ]
        body = []
        for r in self.rows:
            by_batch = {e["batch_size"]: e["samples_per_s"] for e in r.throughput_by_batch}
            by_batch.setdefault(r.throughput.get("batch_size"), r.throughput.get("samples_per_s"))
            body.append(
                [
                    r.name,
                    r.runtime,
                    r.precision,
                    "n/a" if r.accuracy is None else f"{r.accuracy:.4f}",
                    _count(r.params),
                    _count(r.macs),
                    _size(r.size_bytes),
                    f"{r.latency_ms['p50']:.3f}{_UNSETTLED if not settled(r) else ''}",
                    f"{r.latency_ms['p95']:.3f}",
                    *[_number(by_batch.get(b), ".1f") for b in sizes],
                    _number((r.memory or {}).get("increase_bytes"), ".1f", scale=1e-6),
                ]
            )
        return header, body

    def metric_label(self) -> str:
        """What the rows' ``accuracy`` holds, for headers: accuracy, mIoU or metric."""
        metric = (self.model_io or {}).get("metric") or "top1"
        return METRIC_LABELS.get(metric, "metric")

    def summary_line(self) -> str | None:
        """One sentence comparing the final artifact with the baseline."""
        s = self.summary
        if not s:
            return None
        drop = s["accuracy_drop"]
        return (
            f"Final ({s['final']}) vs baseline: "
            f"{_x(s['speedup_vs_onnx'])} faster than ONNX Runtime FP32 (the fair baseline), "
            f"{_x(s['speedup_vs_torch'])} faster than eager torch FP32, "
            f"{_x(s['size_ratio'])} smaller, "
            + ("accuracy drop n/a." if drop is None else f"accuracy drop {drop * 100:+.2f} points.")
        )

    def budget_line(self) -> str | None:
        """Whether the final artifact met the accuracy budget, with the numbers."""
        b = self.budget
        if not b:
            return None
        drop, limit = b.get("accuracy_drop"), b["max_accuracy_drop"]
        lost = "an unknown amount" if drop is None else f"{drop * 100:.2f} points"
        if b["met"]:
            return f"Accuracy budget met: lost {lost}, budget {limit * 100:.2f} points."
        searched = any((r.details.get("pruning") or {}).get("search") for r in self.rows)
        search = "" if searched else " (or max_search_minutes to search it)"
        return (
            f"Accuracy budget NOT met: lost {lost}, budget {limit * 100:.2f} points; the "
            f"artifact is kept as {b.get('artifact') or 'n/a'}. To try: a lower pruning "
            f"ratio{search}, more distillation epochs, or a larger budget."
        )

    def target_line(self) -> str | None:
        """The pruning target, the ratio its search chose, and what the final file measured."""
        found = [r for r in self.rows if (r.details.get("pruning") or {}).get("target")]
        if not found:
            return None
        t = found[-1].details["pruning"]["target"]
        unit, option = t["unit"], t["option"]
        line = (
            f"Pruning target {option} {amount(t['value'])} {unit}: "
            f"{'met' if t['met'] else 'NOT met'} at ratio {t['ratio']:.3f} "
            f"({amount(t['reached'])} {unit} in the search, from {amount(t['model_value'])}"
        )
        final = self.rows[-1]
        if option == "target_latency_ms":
            runtime = t.get("runtime", "onnxruntime")
            rows = [r for r in self.rows if r.runtime == runtime and r.latency_ms]
            if rows and rows[-1].latency_ms.get("batch_size") == 1:
                line += f"; the final {rows[-1].label} measured {rows[-1].latency_ms['p50']:.3f} ms"
        elif option == "target_size_mb":
            line += f"; the final {final.label} is {final.size_bytes / 1e6:.3f} MB"
        tried = ", ".join(f"{c['ratio']:.2f}: {amount(c['value'])}" for c in t["trace"])
        return f"{line}). Ratios tried: {tried}."

    def search_line(self) -> str | None:
        """The pruning-ratio search under the accuracy budget: what it chose, its trace."""
        found = [r for r in self.rows if (r.details.get("pruning") or {}).get("search")]
        if not found:
            return None
        s = found[-1].details["pruning"]["search"]
        tried = ", ".join(
            f"{c['ratio']:.3f}: "
            + ("n/a" if c["accuracy_drop"] is None else f"{c['accuracy_drop'] * 100:+.2f}")
            + ("" if c["met"] else " over")
            + (f" (as {c['same_as']:.3f})" if "same_as" in c else "")
            for c in s["trace"]
        )
        return (
            f"Pruning-ratio search under the accuracy budget ({s['max_accuracy_drop'] * 100:.2f} "
            f"points, {s['seconds'] / 60:.1f} of {s['max_search_minutes']:g} min, stopped: "
            f"{s['stopped']}): chose ratio {s['ratio']:.3f}, "
            f"{'within' if s['met'] else 'NOT within'} the budget. Tried (ratio: points "
            f"lost, before or after INT8, whichever is more): {tried}."
        )

    def pruning_sensitivity(self) -> dict[str, Any] | None:
        """The last pruning row's per-group sensitivity, when it was measured."""
        for row in reversed(self.rows):
            found = (row.details.get("pruning") or {}).get("sensitivity")
            if found and found.get("groups"):
                return found
        return None

    def sensitivity_line(self) -> str | None:
        """The channel groups pruning hurts most, when their sensitivity was measured."""
        found = self.pruning_sensitivity()
        if not found:
            return None
        top = ", ".join(f"{g['group']} ({g['mean_drop'] * 100:.1f})" for g in found["groups"][:3])
        ratios = "/".join(f"{r:g}" for r in found["ratios"])
        return (
            f"Pruning sensitivity ({len(found['groups'])} channel groups, each pruned alone at "
            f"ratios {ratios}, {found['samples']} eval inputs, {found['seconds']:.1f} s): most "
            f"sensitive {top} (mean accuracy drop, points)."
        )

    def unsettled_line(self) -> str | None:
        """The footnote for rows whose batch-1 timing did not settle, when there are any."""
        rows = [r.label for r in self.rows if not settled(r)]
        if not rows:
            return None
        return (
            f"{_UNSETTLED} The timing of {', '.join(rows)} did not settle: its median still "
            "moved when the time limit ended it (a busy or throttling machine); compare those "
            "p50s with care."
        )

    def runtime_line(self) -> str | None:
        """Which runtime runs the final file fastest, when more than one measured it."""
        s = self.summary
        runtimes = s.get("runtimes") or {}
        if len(runtimes) < 2:
            return None
        each = ", ".join(
            f"{name} {r['p50_ms']:.3f} ms ({_x(r['speedup_vs_fp32'])} over its FP32)"
            for name, r in runtimes.items()
        )
        return (
            f"The final file in each runtime (p50, batch 1): {each}. Fastest: "
            f"{s['fastest_runtime']}, {_x(s['speedup_vs_fastest_fp32'])} faster than the "
            f"fastest FP32 row ({s['fastest_fp32_runtime']})."
        )

    def deployment(self) -> tuple[str, str] | None:
        """The recommended runtime for the final file and the lines that run it there."""
        s = self.summary
        runtime = s.get("fastest_runtime")
        row = find_row(self.rows, s.get("final", ""), runtime or "")
        file = row.details.get("file") if row else None
        if not runtime or not file:
            return None
        threads = int(self.environment.get("threads") or 1)
        inputs = (self.model_io or {}).get("inputs")
        snippet = deployment_snippet(runtime, file, threads, inputs)
        detection = (self.model_io or {}).get("detection")
        if detection:  # the file ends before box decoding and NMS
            snippet += (
                f"# outputs: (batch, {detection.get('anchors')} default boxes, 4 offsets + class "
                "scores); decode them in FP32 (docs/concepts.md, 'Object detection'):\n"
                "import torch\n"
                "from compressor.models.detection import DetectionHead\n"
                'head = DetectionHead.load("detection_head.json")  # beside the file\n'
                "boxes = head.detections(torch.from_numpy(outputs))\n"
            )
        return runtime, snippet

    def environment_line(self) -> str:
        """Where and with what the rows were measured, in one sentence."""
        env = self.environment
        return (
            f"Measured on {env.get('cpu')} (INT8 instructions: "
            f"{env.get('int8_instructions', ', '.join(env.get('cpu_features', [])) or 'n/a')}), "
            f"{env.get('threads')} threads; torch {env.get('torch')}, "
            f"onnxruntime {env.get('onnxruntime')}"
            + (f", openvino {env['openvino']}." if env.get("openvino") else ".")
        )

    def parity_line(self) -> str | None:
        """The final file's agreement with the FP32 baseline file, in one sentence."""
        p = self.parity
        if not p:
            return None
        return (
            f"Parity of {p.get('artifact')} with {p.get('reference')} over {p.get('samples')} "
            f"eval samples: top-1 agreement {p.get('top1_agreement')}, max abs diff "
            f"{p.get('max_abs_diff')}, mean abs diff {p.get('mean_abs_diff')}."
        )

    def time_line(self) -> str | None:
        """The run's wall time by phase, in one sentence."""
        found = dict(self.seconds or {})
        total = found.pop("total", None)
        if total is None:
            return None
        parts = ", ".join(
            f"{phase} {s:.1f} s" for phase, s in found.items() if s or phase == "other"
        )
        return f"Run time {total:.1f} s: {parts}."

    def notes(self) -> list[str]:
        """The notes stages attached to their rows."""
        return [n for r in self.rows for n in r.details.get("notes", [])]

    def to_markdown(self) -> str:
        """Diagnosis (if any), the comparison table, summary, parity, notes, environment."""
        lines: list[str] = []
        diagnosis = self.diagnosis
        if diagnosis["problems"]:
            lines += ["**Warning:**", ""]
            lines += [f"- {p}" for p in diagnosis["problems"]]
            lines += [f"- Cause: {c}" for c in diagnosis["causes"]]
            lines.append("")
        header, body = self.table()
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        lines.append("")
        footnote = self.unsettled_line()
        if footnote:
            lines += [footnote, ""]
        lines_after = (
            self.target_line(),
            self.search_line(),
            self.sensitivity_line(),
            self.budget_line(),
            self.summary_line(),
            self.runtime_line(),
        )
        for line in (*lines_after, self.parity_line(), self.time_line()):
            if line:
                lines += [line, ""]
        deployment = self.deployment()
        if deployment:
            runtime, code = deployment
            lines += [f"Deploy with {runtime} (the settings measured here):", ""]
            lines += ["```python", code.rstrip("\n"), "```", ""]
        if self.load_test:
            header, body, summary = load_lines(self.load_test)
            lines += ["Under concurrent load (closed loop, one row per request):", ""]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cells) + " |" for cells in body]
            lines += ["", summary, ""]
        lines += [f"Note: {n}\n" for n in self.notes()]
        lines.append(self.environment_line())
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """report.html: one self-contained page with the table and the charts."""
        lines = (
            self.target_line(),
            self.search_line(),
            self.sensitivity_line(),
            self.budget_line(),
            self.unsettled_line(),
            self.summary_line(),
            self.runtime_line(),
        )
        page = Page(
            diagnosis=self.diagnosis,
            table=self.table(),
            lines=[line for line in (*lines, self.parity_line()) if line],
            deployment=self.deployment(),
            rows=self.rows,
            load=self.load_test,
            notes=self.notes(),
            environment=self.environment,
            sensitivity=self.int8_budget(),
            pruning_sensitivity=self.pruning_sensitivity(),
        )
        return render_html(page)

    def int8_budget(self) -> dict[str, Any] | None:
        """The last INT8 row's accuracy-budget record, when nodes were ranked for it."""
        for row in reversed(self.rows):
            budget = (row.details.get("quantization") or {}).get("accuracy_budget")
            if budget and budget.get("sensitivity"):
                return budget
        return None

    def charts(self) -> dict[str, Figure]:
        """report.html's charts as matplotlib figures: ``accuracy_latency``, ``per_stage``,
        with a load test ``load``, with INT8 nodes ranked for a budget ``sensitivity``, and
        with pruning sensitivity measured ``pruning_sensitivity``.

        In a notebook, ``display(figure)`` (after ``%matplotlib inline``) shows one inline.
        """
        charts = {"accuracy_latency": accuracy_chart(self.rows), "per_stage": stage_bars(self.rows)}
        if self.load_test:
            charts["load"] = load_chart(self.load_test)
        if self.int8_budget():
            charts["sensitivity"] = sensitivity_chart(self.int8_budget())
        if self.pruning_sensitivity():
            charts["pruning_sensitivity"] = pruning_sensitivity_chart(self.pruning_sensitivity())
        return charts

    def __str__(self) -> str:
        return self.to_markdown()

    def save(self, directory: str | Path) -> None:
        """Write report.json, report.md and report.html into ``directory`` (atomically)."""
        directory = Path(directory)
        write_text(directory / "report.json", self.to_json())
        write_text(directory / "report.md", self.to_markdown())
        write_text(directory / "report.html", self.to_html())


_UNSETTLED = "†"


def _count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _number(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
