"""report.html: the report as one self-contained page, with charts drawn by matplotlib.

The charts are inline SVG (text drawn as paths), so the file needs no network, fonts or
scripts, and opens the same in any browser or when mailed around.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .load_table import load_lines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..row import Row

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #1d232a; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.55rem; text-align: right; }
th { background: #f3f5f7; } td:nth-child(-n+3) { text-align: left; }
tr.final td { font-weight: 600; background: #eef7ee; }
.warning { border-left: 4px solid #d1242f; background: #fff4f4; padding: 0.6rem 1rem; }
.ok { border-left: 4px solid #1a7f37; background: #f1faf3; padding: 0.6rem 1rem; }
.chart svg { max-width: 100%; height: auto; }
.env td { text-align: left; }
pre { background: #f6f8fa; padding: 0.6rem 1rem; overflow-x: auto; }
"""

_COLORS = {"torch": "#4c72b0", "onnxruntime": "#dd8452", "openvino": "#8172b3"}


@dataclass(frozen=True)
class Page:
    """What report.html shows, as `compressor.report.report.Report` prepares it: this module draws
    and lays out, the report decides what is said."""

    diagnosis: dict[str, Any]
    table: tuple[list[str], list[list[str]]]
    lines: list[str]
    deployment: tuple[str, str] | None
    rows: list[Row]
    load: dict[str, Any] | None
    notes: list[str]
    environment: dict[str, Any]
    sensitivity: dict[str, Any] | None = None
    pruning_sensitivity: dict[str, Any] | None = None


def render_html(page: Page) -> str:
    """The whole page: diagnosis, table, summary, charts, notes and environment."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>compressor report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>compressor report</h1>",
        _diagnosis_html(page),
        "<h2>Comparison</h2>",
        _table_html(page),
    ]
    parts += [f"<p>{e(line)}</p>" for line in page.lines]
    deployment = page.deployment
    if deployment:
        runtime, code = deployment
        parts += [
            f"<h2>Deploy with {e(runtime)}</h2>",
            "<p>The settings measured here:</p>",
            f'<pre id="deploy"><code>{e(code)}</code></pre>',
        ]
    if page.rows:
        parts += [
            "<h2>Accuracy vs latency</h2>",
            f'<figure class="chart" id="accuracy-latency">{_svg(accuracy_chart(page.rows))}'
            "</figure>",
            "<h2>Size, MACs and latency per stage</h2>",
            f'<figure class="chart" id="per-stage">{_svg(stage_bars(page.rows))}</figure>',
        ]
    if page.load:
        header, body, summary = load_lines(page.load)
        parts += ["<h2>Under concurrent load</h2>", '<table id="load">', "<thead><tr>"]
        parts += [f"<th>{e(h)}</th>" for h in header]
        parts.append("</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in body]
        parts += ["</tbody></table>", f"<p>{e(summary)}</p>"]
        parts.append(
            f'<figure class="chart" id="load-chart">{_svg(load_chart(page.load))}</figure>'
        )
    if page.sensitivity:
        parts += [
            "<h2>INT8 sensitivity</h2>",
            "<p>The share of the INT8 file's output error each node removes when it alone "
            "runs in FP32; the nodes kept in FP32 for the accuracy budget are darker.</p>",
            f'<figure class="chart" id="sensitivity">{_svg(sensitivity_chart(page.sensitivity))}'
            "</figure>",
        ]
    if page.pruning_sensitivity:
        found = page.pruning_sensitivity
        parts += [
            "<h2>Pruning sensitivity</h2>",
            f"<p>Accuracy lost (points, on {found['samples']} eval inputs, before BatchNorm "
            "recalibration and distillation) when one channel group alone loses a share of "
            "its channels; the most sensitive groups first.</p>",
            '<figure class="chart" id="pruning-sensitivity">'
            f"{_svg(pruning_sensitivity_chart(found))}</figure>",
        ]
    notes = page.notes
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{e(n)}</li>" for n in notes]
        parts.append("</ul>")
    parts += ["<h2>Environment</h2>", '<table class="env">']
    for key, value in page.environment.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        parts.append(f"<tr><th>{e(str(key))}</th><td>{e(str(shown))}</td></tr>")
    parts += ["</table>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _diagnosis_html(page: Page) -> str:
    diagnosis = page.diagnosis
    if not diagnosis["problems"]:
        return '<div class="ok" id="diagnosis">No problems found.</div>'
    items = [f"<li>{html.escape(p)}</li>" for p in diagnosis["problems"]]
    causes = [f"<li>{html.escape(c)}</li>" for c in diagnosis["causes"]]
    return (
        '<div class="warning" id="diagnosis"><strong>Warning</strong><ul>'
        + "".join(items)
        + "</ul>"
        + (f"<strong>Causes found</strong><ul>{''.join(causes)}</ul>" if causes else "")
        + "</div>"
    )


def _table_html(page: Page) -> str:
    header, body = page.table
    rows = ['<table id="comparison"><thead><tr>']
    rows += [f"<th>{html.escape(h)}</th>" for h in header]
    rows.append("</tr></thead><tbody>")
    for index, cells in enumerate(body):
        final = ' class="final"' if index == len(body) - 1 and index > 1 else ""
        rows.append(f"<tr{final}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells))
        rows.append("</tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(figure: Figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "compressor"}):
        figure.savefig(
            buffer, format="svg", metadata=dict.fromkeys(("Date", "Creator", "Format", "Type"))
        )
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def accuracy_chart(rows: list[Row]) -> Figure:
    """Accuracy against batch-1 p50 latency, one point per row (baseline and final marked)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = _figure(8.5, 4.2)
    ax = figure.add_subplot()
    measured = False
    for index, row in enumerate(rows):
        if row.accuracy is None:
            continue
        measured = True
        is_base, is_final = row.name == "baseline", index == len(rows) - 1
        tag = " [baseline]" if is_base else (" [final]" if is_final else "")
        ax.scatter(
            row.latency_ms["p50"],
            row.accuracy,
            s=150 if is_base or is_final else 60,
            marker="s" if is_base else ("*" if is_final else "o"),
            color=_COLORS.get(row.runtime, "#55a868"),
            edgecolors="black" if is_base or is_final else "none",
            zorder=3,
            label=f"{index + 1}. {row.label}{tag}",
        )
        # Numbers, not names, beside the points: names of close points would overlap.
        ax.annotate(
            str(index + 1),
            (row.latency_ms["p50"], row.accuracy),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=9,
        )
    if not measured:
        ax.text(0.5, 0.5, "no accuracy measured", ha="center", transform=ax.transAxes)
    else:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("p50 latency at batch 1, ms (log scale; left is faster)")
    ax.set_ylabel("accuracy")
    ax.grid(True, which="both", alpha=0.3)
    return figure


def stage_bars(rows: list[Row]) -> Figure:
    """Size, MACs and batch-1 p50 latency of every row, as three bar panels."""
    figure = _figure(10, 3.6)
    labels = [f"{r.name}\n{r.runtime} {r.precision}" for r in rows]
    colors = [_COLORS.get(r.runtime, "#55a868") for r in rows]
    panels = (
        ("size, MB", [r.size_bytes / 1e6 for r in rows]),
        ("MACs, millions", [(r.macs or 0) / 1e6 for r in rows]),
        ("p50 latency at batch 1, ms", [r.latency_ms["p50"] for r in rows]),
    )
    for index, (title, values) in enumerate(panels):
        ax = figure.add_subplot(1, 3, index + 1)
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), labels if index == 0 else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    return figure


def load_chart(section: dict[str, Any]) -> Figure:
    """Throughput against p99 latency across concurrency levels, one line per file and
    setting (report.json's ``load`` section); the p99 bound as a dashed line."""
    from matplotlib.ticker import FuncFormatter

    figure = _figure(8.5, 4.2)
    ax = figure.add_subplot()
    styles = {"baseline": "--", "final": "-"}
    for role, result in section["files"].items():
        for index, entry in enumerate(result["settings"]):
            levels = [lv for lv in entry["levels"] if "throughput" in lv]
            if not levels:
                continue
            ax.plot(
                [lv["latency_ms"]["p99"] for lv in levels],
                [lv["throughput"] for lv in levels],
                styles.get(role, ":"),
                marker="o",
                markersize=4,
                color=f"C{index}",
                label=f"{result['file']}: {entry['label']}",
            )
    ax.axvline(section["p99_ms"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("p99 latency, ms (log scale); each point one concurrency level")
    ax.set_ylabel("requests per second")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    return figure


def sensitivity_chart(budget: dict[str, Any]) -> Figure:
    """Per node, the share of the INT8 error reverting it alone removes (an INT8 row's
    ``details.quantization.accuracy_budget``); the nodes kept in FP32 darker."""
    nodes = budget["sensitivity"]["nodes"]
    kept = set(budget.get("fp32_nodes", []))
    figure = _figure(8.5, max(2.0, 0.28 * len(nodes) + 1))
    ax = figure.add_subplot()
    ax.barh(
        range(len(nodes)),
        [n["gain"] for n in nodes],
        color=["#c44e52" if n["node"] in kept else "#e8a5a7" for n in nodes],
    )
    ax.set_yticks(range(len(nodes)), [f"{n['node']} ({n['op_type']})" for n in nodes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the INT8 output error removed with this node in FP32")
    ax.grid(True, axis="x", alpha=0.3)
    return figure


def pruning_sensitivity_chart(found: dict[str, Any], most: int = 30) -> Figure:
    """Per channel group (the ``most`` most sensitive), the accuracy drop in points at each
    ratio it was pruned alone (``details.pruning.sensitivity``)."""
    groups = found["groups"][:most]
    ratios = found["ratios"]
    figure = _figure(8.5, max(2.0, 0.32 * len(groups) + 1.2))
    ax = figure.add_subplot()
    height = 0.8 / len(ratios)
    shades = ["#f2b5a0", "#dd8452", "#a3451c", "#5e220b"]
    for k, ratio in enumerate(ratios):
        drops = [
            next((r["drop"] * 100 for r in g["ratios"] if r["ratio"] == ratio), 0.0) for g in groups
        ]
        positions = [i - 0.4 + (k + 0.5) * height for i in range(len(groups))]
        ax.barh(
            positions,
            drops,
            height=height,
            color=shades[k % len(shades)],
            label=f"{ratio:.0%} of its channels",
        )
    ax.set_yticks(range(len(groups)), [g["group"] for g in groups], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="#1d232a", linewidth=0.6)
    ax.set_xlabel("accuracy drop (points) with this group alone pruned")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    return figure
