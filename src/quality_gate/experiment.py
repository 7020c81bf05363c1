"""The experiment runner: does selection help, at the same budget?

One command runs the whole pipeline and compares selectors::

    synthetic data (or your files) -> convert selector -> Stage 1 warmup -> Stage 2 (+ IFD stats)
      -> selection per arm (quality_gate, perplexity, ifd, random x seeds) at the same percentage
      -> Stage 3 fine-tune per arm (+ the full data) -> Stage 4 evaluate per arm (+ the base model)
      -> summary.json / summary.md

Every stage runs in this process through its own ``run(cfg)``, with its own config file
(``configs/stage_*.yaml``) plus the overrides of ``configs/experiment.yaml``; each writes its usual
run dir under ``<experiment dir>/``, so every intermediate result can be inspected or reused.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from quality_gate.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from quality_gate.runs import init_run, register_resolvers

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# --------------------------------------------------------------------------------------------- #
# Stage configs
# --------------------------------------------------------------------------------------------- #
def load_stage_config(name: str, overrides: dict[str, Any] | None = None, dotlist: Sequence[str] = ()) -> DictConfig:
    """``configs/<name>.yaml`` without its ``hydra`` block, with ``overrides`` (dotted keys) applied.

    The stage configs are single files (no defaults lists), so plain OmegaConf composition gives the
    same config Hydra would, without nesting a second Hydra app inside this one.
    """
    register_resolvers()
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no stage config {path}")
    cfg = OmegaConf.load(path)
    cfg.pop("hydra", None)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    if dotlist:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(dotlist)))
    return cfg


def run_stage(module: str, cfg: DictConfig) -> None:
    """Call ``quality_gate.stages.<module>.run(cfg)`` (or another ``module:function``)."""
    mod_name, _, fn = module.partition(":")
    importlib.import_module(mod_name).__dict__[fn or "run"](cfg)


class Steps:
    """Numbered progress lines: ``[3/12] Stage 2 ... done in 4.2 s``."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.timings = total, 0, {}

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        log.info("[%d/%d] %s ...", self.done, self.total, title)
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[title] = round(dt, 2)
        log.info("[%d/%d] %s done in %.1f s", self.done, self.total, title, dt)


# --------------------------------------------------------------------------------------------- #
# Metrics of one arm, and the summary
# --------------------------------------------------------------------------------------------- #
#: metric -> (label in the table, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "kept": ("kept", True),
    "corrupted_kept_share": ("corrupted share of kept", False),
    "auroc_clean_vs_corrupted": ("AUROC clean vs corrupted", True),
    "eval_loss": ("held-out loss", False),
    "exact_match": ("exact match", True),
}


def selection_metrics(
    selected_ids: Sequence[str],
    corruption: dict[str, str],
    score: dict[str, float] | None,
) -> dict[str, float | int | None]:
    """Kept count, share of kept samples that are corrupted, AUROC of ``score`` for clean vs corrupted.

    ``corruption`` maps every candidate id to its label (``"none"`` = clean); ids without a label are
    left out of the shares. ``score`` (higher = more likely kept) covers the candidates it can score;
    AUROC is over those with a finite score (None when only one class is present).
    """
    from quality_gate.selection.metrics import auroc

    labelled = [i for i in selected_ids if i in corruption]
    share = sum(corruption[i] != "none" for i in labelled) / len(labelled) if labelled else None
    auc = None
    if score is not None:
        pairs = [(s, corruption[i] == "none") for i, s in score.items() if i in corruption and math.isfinite(s)]
        labels = [int(c) for _, c in pairs]
        if pairs and 0 < sum(labels) < len(labels):
            auc = float(auroc([s for s, _ in pairs], labels))
    return {"kept": len(selected_ids), "corrupted_kept_share": share, "auroc_clean_vs_corrupted": auc}


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (ddof=1) of every metric over several seeds of one arm."""
    out: dict[str, Any] = {"n_seeds": len(rows)}
    for key in METRICS:
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
            out[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        else:
            out[key] = None
    return out


def verdicts(arms: dict[str, dict[str, Any]], method: str = "quality_gate", baseline: str = "random") -> list[str]:
    """Plain sentences: does ``method`` beat ``baseline`` (mean over seeds) on each metric?

    A difference within two standard deviations of the baseline's seeds is called noise.
    """
    if method not in arms or baseline not in arms:
        return []
    m, b = arms[method], arms[baseline]
    lines = []
    for key, (label, higher) in METRICS.items():
        if key == "kept" or m.get(key) is None or b.get(key) is None:
            continue
        diff = m[key] - b[key]
        spread = b.get(f"{key}_std") or 0.0
        better = diff > 0 if higher else diff < 0
        if abs(diff) <= 2 * spread or diff == 0:
            word = "no clear difference from"
        else:
            word = "better than" if better else "WORSE than"
        lines.append(
            f"{method} is {word} {baseline} on {label}: {m[key]:.4f} vs {b[key]:.4f}"
            + (f" ± {spread:.4f} (std over {b.get('n_seeds')} seeds)" if b.get("n_seeds", 1) > 1 else "")
        )
    return lines


def _fmt(value: Any, std: Any = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) > 1):
        text = f"{value:.0f}"
    else:
        text = f"{value:.4f}"
    return text + (f" ± {std:.4f}" if std else "")


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary table (one row per arm) and the verdicts, as Markdown."""
    head = ["arm", *(label for label, _ in METRICS.values())]
    lines = [
        f"# Quality-Gate experiment: {summary['name']}",
        "",
        f"Selection budget: {summary['selection_percentage']:.0%} of {summary['num_candidates']} samples; "
        f"{summary['corrupted_candidates']} candidates corrupted.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for arm, row in summary["arms"].items():
        cells = [arm] + [_fmt(row.get(k), row.get(f"{k}_std")) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Did selection help?", ""]
    lines += [f"- {v}" for v in summary["verdicts"]] or ["- (no quality_gate and random arms to compare)"]
    lines += ["", f"Selection report: `{summary.get('report')}`", ""]
    return "\n".join(lines)
