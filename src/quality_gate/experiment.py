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
def load_stage_config(
    name: str, overrides: dict[str, Any] | None = None, dotlist: Sequence[str] = ()
) -> DictConfig:
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
    AUROC is over the scored candidates (``-inf``: the selector may not keep it, ranked last; NaN
    left out); None when only one class is present.
    """
    from quality_gate.selection.metrics import auroc

    labelled = [i for i in selected_ids if i in corruption]
    share = sum(corruption[i] != "none" for i in labelled) / len(labelled) if labelled else None
    auc = None
    if score is not None:
        pairs = [
            (s, corruption[i] == "none") for i, s in score.items() if i in corruption and not math.isnan(s)
        ]
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
    """id -> corruption label, for records that carry ``meta.corruption``."""
    out = {}
    for r in records:
        label = (r.get("meta") or {}).get("corruption")
        if label is not None:
            out[str(r["id"])] = str(label)
    return out


def _stage_overrides(cfg: DictConfig, stage: str) -> list[str]:
    """``overrides.<stage>``: a list of ``key=value`` strings for that stage's config."""
    extra = cfg.get("overrides", {}).get(stage) or []
    return [str(x) for x in extra]


def _eval_row(eval_dir: Path) -> dict[str, Any]:
    results = json.loads((eval_dir / "eval_results.json").read_text())
    return {
        "eval_loss": (results.get("heldout") or {}).get("loss"),
        "exact_match": (results.get("exact_match") or {}).get("accuracy"),
    }


def _run(cfg: DictConfig, stage: str, config_name: str, values: dict[str, Any]) -> None:
    """Run ``quality_gate.stages.<stage>`` with its config, ``values`` and ``overrides.<stage>``."""
    run_stage(
        f"quality_gate.stages.{stage}", load_stage_config(config_name, values, _stage_overrides(cfg, stage))
    )


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run every arm of the experiment and write ``summary.json`` / ``summary.md`` into the run dir."""
    from quality_gate.selection.pipeline import config_from_overrides, run_selection
    from quality_gate.selection.selectors import ranking_score

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
            import torch

            from quality_gate.models import load_selector, save_converted

            torch.manual_seed(int(cfg.seed))  # the new gates' init: the run is reproducible per seed
            model, tokenizer = load_selector(selector_path)
            selector_path = str(run_dir / "converted_selector")
            save_converted(model, tokenizer, selector_path)
            del model

    warm_dir, stats_dir = run_dir / "stage_1_warmup", run_dir / "stage_2_selection"
    with steps.step("Stage 1 warmup"):
        _run(
            cfg,
            "warmup",
            "stage_1_warmup",
            {**common, "selector_model.path": selector_path, "output_dir": str(warm_dir)},
        )
    with steps.step("Stage 2 statistics"):
        _run(
            cfg,
            "selection",
            "stage_2_selection",
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
            sel_dir = run_dir / "selection" / arm
            sel_cfg = config_from_overrides(
                root_dir=str(stats_dir),
                selector=selector,
                seed=seed,
                output_dir=str(sel_dir),
                selection_percentage=float(cfg.selection_percentage),
            )
            sel_cfg = OmegaConf.merge(sel_cfg, OmegaConf.from_dotlist(_stage_overrides(cfg, "selection")))
            res = run_selection(sel_cfg)
            ids = [str(i) for i in res.stats.ids]
            kept = [ids[i] for i in res.order]
            score = dict(zip(ids, ranking_score(res.scores[selector]).tolist()))
            rows[arm] = selection_metrics(kept, labels, score)
            selected_files[arm] = sel_dir / "selected_data.jsonl"
            if selector == "quality_gate":
                report = str(sel_dir / "selection_report.html")

    for arm in ft_arms:
        ft_dir, ev_dir = run_dir / "stage_3_finetune" / arm, run_dir / "stage_4_evaluate" / arm
        data = (
            {"dataset.mode": "full", **common}
            if arm == "full"
            else {"dataset.mode": "subset", "dataset.data_path": str(selected_files[arm])}
        )
        with steps.step(f"fine-tune: {arm}"):
            _run(
                cfg,
                "finetune",
                "stage_3_finetune",
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
            ev_dir = run_dir / "stage_4_evaluate" / "base"
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
    _run(cfg, "evaluate", "stage_4_evaluate", values)
