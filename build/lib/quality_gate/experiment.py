"""The experiment runner: does selection help, at the same budget?

One command runs the whole pipeline and compares selectors::

    synthetic data (or your files) -> convert selector -> Stage 1 warmup -> Stage 2 (+ IFD stats)
      -> selection per arm (quality_gate, perplexity, ifd, random x seeds) at the same percentage
      -> Stage 3 fine-tune per arm (+ the full data) -> Stage 4 evaluate per arm (+ the base model)
      -> summary.json / summary.md

Every stage runs in this process through its own ``run(cfg)``, with its own typed config
(:mod:`quality_gate.config`) plus the ``overrides.<stage>`` of the experiment config; each writes its
usual outputs under ``<experiment dir>/<stage>/``, so every intermediate result can be inspected or
reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from quality_gate.config import make_config, validate
from quality_gate.data.records import corruption_of
from quality_gate.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from quality_gate.runs import init_run

log = logging.getLogger(__name__)


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


def selection_row(summary: dict[str, Any], selector: str) -> dict[str, Any]:
    """An arm's selection metrics, read from its ``selection_summary.json`` (the audit of
    :mod:`quality_gate.selection.audit`, the same numbers as the selection report)."""
    audit = (summary.get("corruption_audit") or {}).get("selectors", {}).get(selector, {})
    return {
        "kept": summary["num_selected"],
        "corrupted_kept_share": audit.get("corrupted_share_of_kept"),
        "auroc_clean_vs_corrupted": audit.get("auroc"),
    }


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


def verdicts(
    arms: dict[str, dict[str, Any]], method: str = "quality_gate", baseline: str = "random"
) -> list[str]:
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


# --------------------------------------------------------------------------------------------- #
# The pipeline
# --------------------------------------------------------------------------------------------- #
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels_of(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """id -> corruption label (``"none"`` = clean), for records that carry ``meta.corruption``."""
    return {str(r["id"]): label for r in records if (label := corruption_of(r)) is not None}


def _stage_overrides(cfg: DictConfig, stage: str) -> list[str]:
    """``overrides.<stage>``: a list of ``key=value`` strings for that stage's config."""
    return [str(x) for x in cfg.overrides[stage]]


def _eval_row(eval_dir: Path) -> dict[str, Any]:
    results = json.loads((eval_dir / "eval_results.json").read_text())
    return {
        "eval_loss": (results.get("heldout") or {}).get("loss"),
        "exact_match": (results.get("exact_match") or {}).get("accuracy"),
    }


def _run(cfg: DictConfig, stage: str, values: dict[str, Any]) -> Any:
    """Run ``stage`` with its config, ``values`` and ``overrides.<stage>``; returns what its run returns."""
    from quality_gate.cli import run_stage

    return run_stage(make_config(stage, values, _stage_overrides(cfg, stage)))


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run every arm of the experiment and write ``summary.json`` / ``summary.md`` into the run dir."""
    validate(cfg)
    from quality_gate.selection.pipeline import run_selection

    run_dir = init_run(cfg, "experiment")
    selectors = list(cfg.selectors)
    seeds = list(cfg.random_seeds) if "random" in selectors else []
    arms = [s for s in selectors if s != "random"] + [f"random_seed{s}" for s in seeds]
    ft_arms = arms + (["full"] if cfg.include_full else [])
    steps = Steps(5 + len(arms) + 2 * len(ft_arms) + (1 if cfg.include_base else 0))
    train_name = str(cfg.data.dataset_name)

    with steps.step("data"):
        if cfg.data.generate:
            from quality_gate.synthetic import make_records

            train_path = run_dir / "data" / "train.jsonl"
            records = make_records(
                int(cfg.data.num_samples), float(cfg.data.noise_rate), int(cfg.seed), train_name
            )
            atomic_write_jsonl(train_path, records)
        else:
            train_path = Path(cfg.data.train_path)
        common = {
            "seed": cfg.seed,
            "dataset.dataset_from": "local",
            "dataset.local.datasets": [{"path": str(train_path), "dataset_name": train_name}],
        }

    with steps.step("convert the selector"):
        selector_path = str(cfg.selector_model)
        if cfg.convert_selector:
            from quality_gate.convert import convert

            # The new gates' init is seeded: the run is reproducible per seed.
            selector_path = str(convert(selector_path, run_dir / "converted_selector", seed=int(cfg.seed)))

    warm_dir, stats_dir = run_dir / "warmup", run_dir / "collect"
    with steps.step("Stage 1 warmup"):
        _run(cfg, "warmup", {**common, "selector_model.path": selector_path, "output_dir": str(warm_dir)})
    with steps.step("Stage 2 statistics"):
        _run(
            cfg,
            "collect",
            {
                **common,
                "selector_model.path": selector_path,
                "model_checkpoint_path": str(warm_dir),
                "collect_ifd": "ifd" in selectors,
                "output_dir": str(stats_dir),
            },
        )

    labels = _labels_of(_read_jsonl(train_path))
    rows: dict[str, dict[str, Any]] = {}
    selected_files: dict[str, Path] = {}
    report = None
    for arm in arms:
        selector, seed = (
            ("random", int(arm[len("random_seed") :])) if arm.startswith("random_seed") else (arm, cfg.seed)
        )
        with steps.step(f"select: {arm}"):
            sel_dir = run_dir / "select" / arm
            sel_cfg = make_config(
                "select",
                {
                    "root_dir": str(stats_dir),
                    "selector": selector,
                    "seed": seed,
                    "output_dir": str(sel_dir),
                    "selection_percentage": float(cfg.selection_percentage),
                },
                _stage_overrides(cfg, "select"),
            )
            res = run_selection(sel_cfg)
            rows[arm] = selection_row(res.summary, selector)
            selected_files[arm] = sel_dir / "selected_data.jsonl"
            if selector == "quality_gate":
                report = str(sel_dir / "selection_report.html")

    for arm in ft_arms:
        ft_dir, ev_dir = run_dir / "finetune" / arm, run_dir / "evaluate" / arm
        data = (
            {"dataset.mode": "full", **common}
            if arm == "full"
            else {"dataset.mode": "subset", "dataset.data_path": str(selected_files[arm])}
        )
        with steps.step(f"fine-tune: {arm}"):
            _run(
                cfg,
                "finetune",
                {
                    **data,
                    "seed": cfg.seed,
                    "training.model.name": str(cfg.target_model),
                    "output_dir": str(ft_dir),
                },
            )
        with steps.step(f"evaluate: {arm}"):
            _evaluate(cfg, ft_dir / "checkpoint-final", ev_dir)
        if arm == "full":
            share = sum(v != "none" for v in labels.values()) / len(labels) if labels else None
            rows["full"] = {"kept": len(labels) or None, "corrupted_kept_share": share}
        rows[arm].update(_eval_row(ev_dir))

    if cfg.include_base:
        with steps.step("evaluate: base model (no fine-tune)"):
            ev_dir = run_dir / "evaluate" / "base"
            _evaluate(cfg, None, ev_dir)
            rows["base (no fine-tune)"] = {"kept": 0, **_eval_row(ev_dir)}

    with steps.step("summary"):
        table = {arm: rows[arm] for arm in arms if not arm.startswith("random_seed")}
        if seeds:
            table["random"] = aggregate([rows[f"random_seed{s}"] for s in seeds])
        table.update({k: rows[k] for k in ("full", "base (no fine-tune)") if k in rows})
        summary = {
            "name": cfg.name,
            "run_dir": str(run_dir),
            "selection_percentage": float(cfg.selection_percentage),
            "num_candidates": len(labels) if labels else None,
            "corrupted_candidates": sum(v != "none" for v in labels.values()) if labels else None,
            "arms": table,
            "per_seed": {a: rows[a] for a in arms if a.startswith("random_seed")},
            "verdicts": verdicts(table),
            "report": report,
            "timings_s": steps.timings,
        }
        atomic_write_json(run_dir / "summary.json", summary)
        atomic_write_text(run_dir / "summary.md", render_markdown(summary))
    return summary


def _evaluate(cfg: DictConfig, adapter: Path | None, out_dir: Path) -> None:
    values = {
        "model_path": str(cfg.target_model),
        "adapter_path": None if adapter is None else str(adapter),
        "eval.data_path": str(cfg.data.eval_path),
        "output_dir": str(out_dir),
        "seed": cfg.seed,
    }
    _run(cfg, "evaluate", values)


def run(cfg: DictConfig) -> dict[str, Any]:
    """The ``experiment`` stage: run every arm, log the summary table and where the files are."""
    summary = run_experiment(cfg)
    log.info("\n%s", render_markdown(summary))
    log.info("summary: %s", Path(summary["run_dir"]) / "summary.md")
    log.info("selection report: %s", summary["report"])
    return summary
