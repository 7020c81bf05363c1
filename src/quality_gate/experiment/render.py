"""The experiment's summaries as Markdown and HTML pages, with their figures.

``summary.md`` / ``summary.html`` of one regime (the arms table, per-family AUROCs, the make-up of
each selection, the selection's cost, the verdicts) and ``sweep_summary.{md,html}`` of a sweep (the
held-out metrics against the pool's noise rate per selector, random's seed range as a band). The page
shell and the PNG embedding are :mod:`quality_gate.html_page`'s, shared with the selection report.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from quality_gate.experiment.statistics import METRICS
from quality_gate.html_page import markdown_to_html, page, png_base64, png_img

CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:0 auto;padding:16px}"
    "table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ccc;"
    "padding:2px 6px;text-align:left}img{max-width:100%}"
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 10):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ci(row: dict[str, Any], metric: str) -> str:
    diff = (row.get("vs_random") or {}).get(metric)
    if not diff:
        return "–"
    return f"{diff['difference']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"


def render_markdown(summary: dict[str, Any]) -> str:
    """The arms table, the per-family table, costs and verdicts, as Markdown."""
    conf = summary["confidence"]
    head = [
        "arm",
        "kept",
        "corrupted share of kept",
        "AUROC clean vs corrupted",
        "held-out loss",
        f"loss - random [{conf:.0%} CI]",
        "exact match",
        f"EM - random [{conf:.0%} CI]",
        "fine-tune steps",
        "fine-tune tokens",
    ]
    lines = [
        f"# Quality-Gate experiment: {summary['name']}",
        "",
        f"Pool: {summary['num_candidates']} samples, {summary['corrupted_candidates']} corrupted "
        f"({summary['noise_rate']:.0%}); budget k = {summary['selection_percentage']:.0%}; compute matched "
        f"by {summary['compute']['match']} ({summary['compute']['epochs']:g} epochs of a k-selection); "
        f"{len(summary['seeds'])} fine-tune seeds, paired.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for arm, row in summary["arms"].items():
        cells = [
            arm + (" (selection only)" if row.get("selection_only") else ""),
            _fmt(row.get("kept")),
            _fmt(row.get("corrupted_kept_share")),
            _fmt(row.get("auroc")),
            _fmt(row.get("eval_loss")),
            _ci(row, "eval_loss"),
            _fmt(row.get("exact_match")),
            _ci(row, "exact_match"),
            _fmt(row.get("finetune_steps")),
            _fmt(row.get("finetune_tokens")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    families = summary.get("families") or {}
    if families:
        held = set(summary.get("held_out_families") or [])
        names = list(families)
        lines += [
            "",
            "## Per corruption family: AUROC clean vs that family (kept share of the family)",
            "",
            "| selector | "
            + " | ".join(f"{f} ({families[f]['kind']}{', held out' if f in held else ''})" for f in names)
            + " |",
            "|---|" + "---|" * len(names),
        ]
        for arm, row in summary["arms"].items():
            per = row.get("per_kind") or {}
            if not per:
                continue
            cells = [
                f"{_fmt(per[f]['auroc'], 3)} ({_fmt(per[f]['kept_share'], 2)})" if f in per else "–"
                for f in names
            ]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    comp = summary.get("composition")
    if comp:
        values = list(comp["pool_share"])
        lines += [
            "",
            f"## Make-up of each selection by meta.{comp['key']}: kept share / pool share (1 = as in pool)",
            "",
            "| arm | distance to the pool's make-up | " + " | ".join(values) + " |",
            "|---|---|" + "---|" * len(values),
        ]
        for arm, row in comp["arms"].items():
            cells = [_fmt(row["ratio"][v], 2) for v in values]
            lines.append(f"| {arm} | {_fmt(row['distance'], 3)} | " + " | ".join(cells) + " |")
    cost = summary.get("selection_cost") or {}
    if cost:
        lines += [
            "",
            f"Selection's own cost: Stage 1 {_fmt(cost['stage1_wall_s'], 1)} s, "
            f"{cost['stage1_flops']:.3g} FLOPs; Stage 2 {_fmt(cost['stage2_wall_s'], 1)} s, "
            f"{cost['stage2_flops']:.3g} FLOPs ({cost['formula']}).",
        ]
    gate = summary.get("gate_movement")
    if gate:
        lines += ["", f"Gates after warmup: {gate['message']}"]
    lines += ["", "## Did selection help?", ""]
    lines += [f"- {v}" for v in summary["verdicts"]] or ["- (no random arm to compare with)"]
    lines += ["", f"Selection report: `{summary.get('report')}`", ""]
    return "\n".join(lines)


def arms_figure(summary: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [(a, r) for a, r in summary["arms"].items() if r.get("eval_loss") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, metric in zip(axes, ("eval_loss", "exact_match")):
        for i, (arm, row) in enumerate(arms):
            per_seed = row.get(f"{metric}_per_seed") or [row[metric]]
            ax.scatter([i] * len(per_seed), per_seed, color="#999", s=12, zorder=2)
            ax.bar(i, row[metric], color="#1f77b4" if arm != "random" else "#aaa", alpha=0.7)
        ax.set_xticks(range(len(arms)), [a for a, _ in arms], rotation=20, ha="right", fontsize=8)
        ax.set_title(METRICS[metric][0] + (" (lower is better)" if not METRICS[metric][1] else ""))
    return png_base64(fig)


def _page(title: str, figures: dict[str, str], md: str) -> str:
    """A self-contained page: the figures (title -> base64 PNG) embedded, then the Markdown as HTML."""
    imgs = "".join(f"<h2>{html.escape(t)}</h2>{png_img(png, t)}" for t, png in figures.items())
    return page(title, imgs + markdown_to_html(md), CSS)


def render_html(summary: dict[str, Any], figures: dict[str, str]) -> str:
    """The experiment's page: its figures and its Markdown summary."""
    return _page(f"Quality-Gate experiment: {summary['name']}", figures, render_markdown(summary))


def sweep_points(sweep: dict[str, Any], k: float, metric: str) -> dict[str, dict[str, list[float]]]:
    """Per arm at budget ``k``: noise rates, mean metric, and (random only) the band of its seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for cell in sweep["cells"]:
        if cell["selection_percentage"] != k:
            continue
        for arm, row in cell["arms"].items():
            if row.get(metric) is None:
                continue
            point = out.setdefault(arm, {"noise": [], "mean": [], "low": [], "high": []})
            per_seed = row.get(f"{metric}_per_seed") or [row[metric]]
            point["noise"].append(cell["noise_rate"])
            point["mean"].append(row[metric])
            point["low"].append(min(per_seed))
            point["high"].append(max(per_seed))
    return out


def render_sweep_markdown(sweep: dict[str, Any]) -> str:
    lines = [f"# Quality-Gate sweep: {sweep['name']} ({sweep['wall_time_s']:.0f} s)", ""]
    if sweep.get("resumed_cells"):
        lines += [f"Read back from an earlier run into this dir: {', '.join(sweep['resumed_cells'])}.", ""]
    head = [
        "noise",
        "k",
        "arm",
        "held-out loss",
        "loss - random [CI]",
        "exact match",
        "EM - random [CI]",
        "AUROC",
        "corrupted kept",
        "make-up distance to pool",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in sweep["cells"]:
        distances = {a: v["distance"] for a, v in ((cell.get("composition") or {}).get("arms") or {}).items()}
        for arm, row in cell["arms"].items():
            if row.get("selection_only"):
                continue
            cells = [
                f"{cell['noise_rate']:g}",
                f"{cell['selection_percentage']:g}",
                arm,
                _fmt(row.get("eval_loss")),
                _ci(row, "eval_loss"),
                _fmt(row.get("exact_match")),
                _ci(row, "exact_match"),
                _fmt(row.get("auroc"), 3),
                _fmt(row.get("corrupted_kept_share"), 3),
                _fmt(distances.get(arm), 3),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_sweep_html(sweep: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    base = "base (no fine-tune)"
    for k in sweep["budgets"]:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, metric in zip(axes, ("eval_loss", "exact_match")):
            points = sweep_points(sweep, k, metric)
            for arm, p in points.items():
                if arm == "random":
                    ax.fill_between(
                        p["noise"], p["low"], p["high"], color="#bbb", alpha=0.5, label="random (seed range)"
                    )
                    ax.plot(p["noise"], p["mean"], color="#777", ls="--")
                elif arm == base and metric == "eval_loss":
                    # Far above every fine-tuned arm: drawn, it would flatten them all; named instead.
                    ax.set_title(f"{base}: {np.mean(p['mean']):.2f}", fontsize=9)
                elif arm == base:
                    ax.plot(p["noise"], p["mean"], color="k", ls=":", label=base)
                else:
                    ax.plot(p["noise"], p["mean"], marker="o", label=arm)
            ax.set_xlabel("noise rate of the pool")
            ax.set_ylabel(METRICS[metric][0])
            ax.legend(fontsize=8)
        fig.suptitle(f"budget k = {k:g}")
        figures[f"held-out metrics against noise rate, k = {k:g}"] = png_base64(fig)
    return _page(f"Quality-Gate sweep: {sweep['name']}", figures, render_sweep_markdown(sweep))
