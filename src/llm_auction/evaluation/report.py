"""Figures and a one-file HTML report for the closed loop and offline comparisons.

Metrics arrive as `Estimate.to_dict()` dicts (`{"mean": x, "ci": [lo, hi]}`, None where undefined).
Figures use `matplotlib.figure.Figure` directly, never pyplot, so no global state leaks between calls
or threads and no display backend is needed. The HTML page embeds its images as base64 so the single
file is a complete artifact (MLflow shows it as-is, with no sibling files to upload).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DEFAULT_EPOCH_METRICS = ("revenue", "social_welfare", "itctr", "ad_load")
DEFAULT_COMPARISON_METRICS = ("reward", "revenue", "itctr", "ad_load", "format_error_rate")
DPI = 120

Table = tuple[list[str], list[list[str]]]


def _num(x: Any) -> float:
    """A float, or NaN for None / non-numbers, so matplotlib draws a gap instead of failing."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        value = float(x)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _estimate(metrics: Mapping[str, Any] | None, name: str) -> tuple[float, float, float]:
    """(mean, lo, hi) of one metric; NaN for whatever is missing or undefined."""
    est = (metrics or {}).get(name)
    if not isinstance(est, Mapping):
        return math.nan, math.nan, math.nan
    ci = est.get("ci") or [None, None]
    lo, hi = (ci[0], ci[1]) if len(ci) >= 2 else (None, None)
    return _num(est.get("mean")), _num(lo), _num(hi)


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for n subplots: 2 columns once there is more than one panel."""
    cols = 1 if n <= 1 else 2
    return math.ceil(n / cols), cols


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def plot_epoch_curves(
    epochs: list[dict],
    path: Path,
    metrics: Sequence[str] = DEFAULT_EPOCH_METRICS,
) -> Path:
    """Policy metrics per IRPO epoch with CI bands, against the baselines as dashed reference lines.

    Each baseline is drawn at its mean in the last epoch entry that reports it (with a defined mean):
    baselines do not train, so the latest evaluation is the best reference, and an epoch that skipped
    one leaves no gap.
    """
    metrics = list(metrics)
    rows, cols = _grid(max(len(metrics), 1))
    fig = Figure(figsize=(5.5 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()

    xs = [int(e.get("epoch", i)) for i, e in enumerate(epochs)]
    baseline_names: list[str] = []
    for entry in epochs:
        for name in entry.get("baselines") or {}:
            if name not in baseline_names:
                baseline_names.append(name)

    for ax, metric in zip(axes, metrics):
        triples = [_estimate(e.get("policy"), metric) for e in epochs]
        means = [t[0] for t in triples]
        los = [t[1] for t in triples]
        his = [t[2] for t in triples]
        line = ax.plot(xs, means, marker="o", label="policy")[0]
        ax.fill_between(xs, los, his, color=line.get_color(), alpha=0.2, linewidth=0)

        for i, name in enumerate(baseline_names):
            level = math.nan
            for entry in reversed(epochs):
                baseline = (entry.get("baselines") or {}).get(name)
                level = _estimate(baseline, metric)[0]
                if not math.isnan(level):
                    break
            if not math.isnan(level):
                # Upper references (priced with the truth) dotted, deployable baselines dashed.
                style = ":" if "oracle" in name else "--"
                ax.axhline(level, linestyle=style, linewidth=1.2, color=f"C{(i + 1) % 10}", label=name)

        ax.set_title(metric)
        ax.set_xlabel("IRPO epoch")
        if xs:  # every epoch on the axis, even where the metric is undefined at either end
            pad = max(0.3, 0.05 * (max(xs) - min(xs)))
            ax.set_xlim(min(xs) - pad, max(xs) + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_comparison(
    rows: dict[str, dict[str, dict]],
    path: Path,
    metrics: Sequence[str] = DEFAULT_COMPARISON_METRICS,
) -> Path:
    """Bars per policy and metric with asymmetric CI error bars, to compare candidates side by side.

    A metric no row reports is left out rather than drawn as an empty panel.
    """
    labels = list(rows)
    present = [m for m in metrics if any(m in (rows[label] or {}) for label in labels)]
    n_rows, n_cols = _grid(max(len(present), 1))
    fig = Figure(figsize=(max(5.5, 1.2 * len(labels) + 2) * n_cols, 3.8 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()

    for ax, metric in zip(axes, present):
        positions, heights, err_lo, err_hi, colors = [], [], [], [], []
        for i, label in enumerate(labels):
            mean, lo, hi = _estimate(rows[label], metric)
            if math.isnan(mean):
                continue
            positions.append(i)
            heights.append(mean)
            # A missing CI end gets zero error rather than hiding the bar.
            err_lo.append(0.0 if math.isnan(lo) else max(mean - lo, 0.0))
            err_hi.append(0.0 if math.isnan(hi) else max(hi - mean, 0.0))
            colors.append(f"C{i % 10}")
        if positions:
            ax.bar(positions, heights, color=colors, yerr=[err_lo, err_hi], capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize="small")
        ax.set_xlim(-0.6, len(labels) - 0.4)  # a slot per policy even where its bar is missing
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    if not present:
        axes[0].text(0.5, 0.5, "no metrics", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax in axes[max(len(present), 1) :]:
        ax.set_visible(False)
    return _save(fig, path)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.6rem; }
table { border-collapse: collapse; margin: 1rem 0 1.5rem; font-size: 0.9rem; }
caption { text-align: left; font-weight: 600; padding: 0.3rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
td.pass { background: #d9f2d9; color: #1a6b1a; font-weight: 600; }
td.fail { background: #f8d7d7; color: #9b1c1c; font-weight: 600; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #555; }
"""


def _cell(text: Any, tag: str = "td") -> str:
    """One escaped cell; exact "pass"/"fail" get a colour class so gate verdicts stand out."""
    value = "" if text is None else str(text)
    cls = f' class="{value}"' if tag == "td" and value in ("pass", "fail") else ""
    return f"<{tag}{cls}>{html.escape(value)}</{tag}>"


def _table(caption: str | None, header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    parts = ["<table>"]
    if caption is not None:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    if header:
        parts.append("<thead><tr>" + "".join(_cell(h, "th") for h in header) + "</tr></thead>")
    parts.append("<tbody>")
    parts.extend("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    parts.append("</tbody></table>")
    return "\n".join(parts)


def html_report(
    title: str,
    summary: Mapping[str, str],
    tables: Mapping[str, Table],
    images: Sequence[Path],
    notes: Sequence[str] = (),
) -> str:
    """A self-contained HTML page (inline CSS, base64 images) so one file is the whole report."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        body.append(_table("Summary", [], [[key, value] for key, value in summary.items()]))
    for caption, (header, rows) in tables.items():
        body.append(_table(caption, header, rows))
    for image in images:
        image = Path(image)
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        name = html.escape(image.name)
        body.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
            f"<figcaption>{name}</figcaption></figure>"
        )
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(
    directory: Path,
    title: str,
    summary: Mapping[str, str],
    tables: Mapping[str, Table],
    images: Sequence[Path],
    notes: Sequence[str] = (),
) -> Path:
    """Write `directory / "report.html"` (creating the directory) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "report.html"
    out.write_text(html_report(title, summary, tables, images, notes), encoding="utf-8")
    return out


def plot_canary(trajectory: Any, path: Path, title: str) -> Path:
    """The canary over its window: each arm's realised revenue per request as traffic accrued, and
    the difference with its confidence sequence (the verdict is taken where the band leaves 0).
    """
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    n = trajectory["requests"]
    for arm, color in (("champion", "C0"), ("challenger", "C1")):
        left.plot(n, trajectory[f"{arm}_revenue"], color=color, label=arm)
    left.set_title("realised revenue per request, per arm")
    left.legend()
    finite = trajectory[["lo", "hi"]].replace([math.inf, -math.inf], math.nan)
    right.fill_between(n, finite["lo"], finite["hi"], color="C1", alpha=0.25, label="confidence sequence")
    right.plot(n, trajectory["difference"], color="C1", label="challenger - champion")
    right.axhline(0, color="black", lw=0.8)
    right.set_title("revenue difference (always-valid band)")
    right.legend()
    for ax in (left, right):
        ax.set_xlabel("requests in the canary")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
