"""The experiment runner: when does selection pay, at equal fine-tune compute?

One command runs the whole pipeline and compares selectors (``quality-gate experiment``, ``make demo``)::

    pool (synthetic, with labelled corruptions of both kinds, or your files)
      -> convert the selector -> Stage 1 warmup -> Stage 2 (+ IFD, embeddings) [-> Stage 2, unwarmed gates]
      -> selection per arm (quality_gate, perplexity, ifd, random) at k, plus selection-only ablations
         (quality_gate on unwarmed gates, quality_gate without perplexity weighting: alpha=0)
      -> Stage 3 per arm x fine-tune seed, every arm (full data included) at the same compute
      -> Stage 4 per arm x seed (+ the base model)
      -> summary.json / summary.md / summary.html

Statistics: every arm is fine-tuned with each seed of ``seeds``, paired with random's run of the same
seed. The difference of an arm to random (held-out loss, exact match) gets a bootstrap interval that
resamples seeds and held-out samples together (paired: the same resample for both arms); "better" or
"worse" is only claimed when the interval excludes 0.

Compute: ``compute.match=steps`` gives every fine-tuned arm the optimizer steps a k-selection needs
for ``compute.epochs`` epochs (the full-data arm too, so it sees each sample fewer times);
``tokens`` matches trained tokens instead; ``epochs`` is the old sample-count budget. The summary
states each arm's steps, trained tokens and estimated FLOPs, and the wall time and FLOPs of Stages
1-2 (the selection's own bill).

A sweep (``sweep.noise_rates``, ``sweep.budgets``; ``make sweep``) repeats this over a grid, runs
Stages 1-2 once per noise rate, and plots the held-out metrics against the noise rate per selector
with random's interval as a band.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from quality_gate.config import make_config, validate
from quality_gate.data.records import corruption_of
from quality_gate.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from quality_gate.runs import init_run

log = logging.getLogger(__name__)

METRICS: dict[str, tuple[str, bool]] = {
    "corrupted_kept_share": ("corrupted share of kept", False),
    "auroc": ("AUROC clean vs corrupted", True),
    "eval_loss": ("held-out loss", False),
    "exact_match": ("exact match", True),
}
"""metric -> (label, higher is better)"""


class Steps:
    """Numbered progress lines: ``[3/12] Stage 2 ... done in 4.2 s``; ``timings`` per title."""

    def __init__(self) -> None:
        self.done, self.timings = 0, {}

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        log.info("[%d] %s ...", self.done, title)
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[title] = round(dt, 2)
        log.info("[%d] %s done in %.1f s", self.done, title, dt)


# --------------------------------------------------------------------------------------------- #
# Running stages
# --------------------------------------------------------------------------------------------- #
def _overrides(cfg: DictConfig, stage: str) -> list[str]:
    return [str(x) for x in cfg.overrides[stage]]


def _run(cfg: DictConfig, stage: str, values: dict[str, Any]) -> Any:
    """Run ``stage`` with its typed config, ``values`` and ``overrides.<stage>``."""
    from quality_gate.cli import run_stage

    return run_stage(make_config(stage, values, _overrides(cfg, stage)))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _params(model_path: str) -> int:
    """Parameter count of a model dir from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for file in Path(model_path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                total += math.prod(f.get_slice(key).get_shape())
    return total


# --------------------------------------------------------------------------------------------- #
# Pool, Stages 1-2
# --------------------------------------------------------------------------------------------- #
PREPARED_FILE = "prepared.json"


def prepare(cfg: DictConfig, root: Path, steps: Steps, reuse: bool = False) -> dict[str, Any]:
    """The pool, the converted selector, Stage 1 and Stage 2 (warmed, and unwarmed when ablated).

    ``reuse``: when ``root/prepared.json`` says these steps finished with the same config (a sweep
    resuming), return their outputs without running anything (their timings are read back).
    """
    name = str(cfg.data.dataset_name)
    train_path = root / "data" / "train.jsonl" if cfg.data.generate else Path(str(cfg.data.train_path))
    common = {
        "seed": int(cfg.seed),
        "dataset.dataset_from": "local",
        "dataset.local.datasets": [{"path": str(train_path), "dataset_name": name}],
    }
    selector = str(root / "converted_selector") if cfg.convert_selector else str(cfg.selector_model)
    warm, stats = root / "warmup", root / "collect"
    out = {"train_path": train_path, "common": common, "selector": selector, "warmup": warm, "collect": stats}
    if "unwarmed" in cfg.ablations:
        out["collect_unwarmed"] = root / "collect_unwarmed"
    fingerprint = cell_fingerprint(cfg, -1.0)
    marker = root / PREPARED_FILE
    if reuse and marker.is_file():
        done = _read_json(marker)
        if done.get("config_fingerprint") == fingerprint:
            log.info("Stages 1-2 in %s finished before with this config: reused", root)
            steps.timings.update(done.get("timings_s") or {})
            return out

    with steps.step("data"):
        if cfg.data.generate:
            from quality_gate.synthetic import make_records

            families = list(cfg.data.families) or None
            records = make_records(
                int(cfg.data.num_samples), float(cfg.data.noise_rate), int(cfg.seed), name, families=families
            )
            atomic_write_jsonl(train_path, records)
    with steps.step("convert the selector"):
        if cfg.convert_selector:
            from quality_gate.convert import convert

            # The new gates' init is seeded: the run is reproducible per seed.
            convert(str(cfg.selector_model), Path(selector), seed=int(cfg.seed))
    with steps.step("Stage 1 warmup"):
        _run(cfg, "warmup", {**common, "selector_model.path": selector, "output_dir": str(warm)})
    collect = {
        **common,
        "selector_model.path": selector,
        "collect_ifd": any(str(a).partition("+")[0] in ("ifd", "combined") for a in cfg.selectors),
        "output_dir": str(stats),
    }
    with steps.step("Stage 2 statistics"):
        _run(cfg, "collect", {**collect, "model_checkpoint_path": str(warm)})
    if "collect_unwarmed" in out:
        with steps.step("Stage 2 statistics, unwarmed gates"):
            _run(
                cfg, "collect", {**collect, "collect_ifd": False, "output_dir": str(out["collect_unwarmed"])}
            )
    atomic_write_json(marker, {"config_fingerprint": fingerprint, "timings_s": dict(steps.timings)})
    return out


def selection_cost(prep: dict[str, Any], steps: Steps) -> dict[str, Any]:
    """Wall time and estimated FLOPs of Stages 1 and 2 (the selection's own bill).

    FLOPs: a forward is ~2 N T (N selector parameters, T tokens); Stage 1's backward through the frozen
    backbone computes activation gradients only, another ~2 N T; Stage 2 is forward only (IFD adds a
    forward over the responses).
    """
    warm = _read_json(prep["warmup"] / "warmup_metrics.json")
    stats = _read_json(prep["collect"] / "stage2_metrics.json")
    n = _params(prep["selector"])
    warm_tokens = int(warm.get("tokens_seen") or 0)
    stats_tokens = int(stats["tokens_scored_this_run"])
    return {
        "selector_params": n,
        "stage1_wall_s": steps.timings.get("Stage 1 warmup"),
        "stage1_tokens": warm_tokens,
        "stage1_flops": 4 * n * warm_tokens,
        "stage2_wall_s": steps.timings.get("Stage 2 statistics"),
        "stage2_tokens": stats_tokens,
        "stage2_flops": 2 * n * stats_tokens,
        "formula": "Stage 1: 4 N T (forward + activation gradients, frozen backbone); Stage 2: 2 N T",
    }


# --------------------------------------------------------------------------------------------- #
# Selections
# --------------------------------------------------------------------------------------------- #
def _select(
    cfg: DictConfig, root_dir: Path, out: Path, k: float, selector: str, seed: int, **extra: Any
) -> Any:
    from quality_gate.selection.pipeline import run_selection

    values = {
        "root_dir": str(root_dir),
        "selector": selector,
        "seed": int(seed),
        "output_dir": str(out),
        "selection_percentage": float(k),
        **extra,
    }
    return run_selection(make_config("select", values, _overrides(cfg, "select")))


def _audit_row(summary: dict[str, Any], selector: str) -> dict[str, Any]:
    """An arm's selection metrics from its ``selection_summary.json`` (quality_gate.selection.audit)."""
    audit = (summary.get("corruption_audit") or {}).get("selectors", {}).get(selector, {})
    return {
        "kept": summary["num_selected"],
        "corrupted_kept_share": audit.get("corrupted_share_of_kept"),
        "auroc": audit.get("auroc"),
        "per_kind": audit.get("per_kind", {}),
        "clean_kept_share": audit.get("clean_kept_share"),
    }


def run_selections(
    cfg: DictConfig, prep: dict[str, Any], root: Path, k: float, steps: Steps
) -> dict[str, Any]:
    """Every arm's selection (random once per seed), the ablation rows, and the audit of the pool."""
    rows: dict[str, Any] = {}
    files: dict[str, dict[int, Path]] = {}
    audit = None
    for name in cfg.selectors:
        selector, _, diversity = str(name).partition("+")
        extra = {"diversity": diversity} if diversity else {}
        seeds = list(cfg.seeds) if selector == "random" else [int(cfg.seed)]
        for seed in seeds:
            arm = f"{name}_seed{seed}" if selector == "random" else name
            with steps.step(f"select: {arm}"):
                res = _select(cfg, prep["collect"], root / "select" / arm, k, selector, seed, **extra)
            rows[arm] = _audit_row(res.summary, selector)
            audit = audit or res.summary.get("corruption_audit")
            files.setdefault(name, {})[seed] = root / "select" / arm / "selected_data.jsonl"
    if "alpha0" in cfg.ablations:
        with steps.step("select: quality_gate, alpha=0"):
            res = _select(
                cfg, prep["collect"], root / "select" / "quality_gate_alpha0", k, "quality_gate", 0, alpha=0.0
            )
        rows["quality_gate (alpha=0)"] = _audit_row(res.summary, "quality_gate")
    if "unwarmed" in cfg.ablations:
        with steps.step("select: quality_gate, unwarmed gates"):
            res = _select(
                cfg, prep["collect_unwarmed"], root / "select" / "quality_gate_unwarmed", k, "quality_gate", 0
            )
        rows["quality_gate (unwarmed gates)"] = _audit_row(res.summary, "quality_gate")
    return {"rows": rows, "files": files, "audit": audit}


# --------------------------------------------------------------------------------------------- #
# Fine-tuning at matched compute
# --------------------------------------------------------------------------------------------- #
def _mean_tokens(path: Path, tokenizer: Any) -> float:
    """Mean token count of a data file's records through the target's chat template."""
    records = _read_jsonl(path)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    return float(np.mean([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]))


def finetune_plan(cfg: DictConfig, k_samples: int, data: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per fine-tuned arm: the ``training.*`` overrides that give it the configured compute.

    ``data`` maps arm -> one of its data files (token lengths). Batch size from ``overrides.finetune``.
    """
    ft = make_config("finetune", {"dataset.mode": "full"}, _overrides(cfg, "finetune"))  # for the batch size
    batch = int(ft.training.batch_size)
    epochs = float(cfg.compute.epochs)
    budget_steps = math.ceil(epochs * k_samples / batch)
    match = str(cfg.compute.match)
    plan: dict[str, dict[str, Any]] = {}
    if match == "epochs":
        return {arm: {"training.epochs": epochs, "training.max_steps": -1} for arm in data}
    if match == "steps":
        return {arm: {"training.max_steps": budget_steps} for arm in data}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.target_model))
    lengths = {arm: _mean_tokens(path, tokenizer) for arm, path in data.items()}
    reference = lengths.get("random", float(np.mean(list(lengths.values()))))
    budget_tokens = budget_steps * batch * reference
    for arm, mean in lengths.items():
        plan[arm] = {"training.max_steps": max(1, round(budget_tokens / (batch * mean)))}
    return plan


def run_finetunes(
    cfg: DictConfig, prep: dict[str, Any], sel: dict[str, Any], root: Path, steps: Steps
) -> dict[str, dict[int, dict[str, Any]]]:
    """Fine-tune and evaluate every arm x seed; returns ``{arm: {seed: {eval dir, train metrics}}}``."""
    arms: dict[str, dict[int, Path]] = {}
    for selector, by_seed in sel["files"].items():
        arms[selector] = {s: by_seed.get(s, by_seed.get(int(cfg.seed))) for s in cfg.seeds}
    if cfg.include_full:
        arms["full"] = dict.fromkeys(cfg.seeds, prep["train_path"])
    k_samples = next(iter(sel["rows"].values()))["kept"]
    plan = finetune_plan(cfg, int(k_samples), {arm: next(iter(by.values())) for arm, by in arms.items()})
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for arm, by_seed in arms.items():
        for seed, data in by_seed.items():
            ft_dir, ev_dir = root / "finetune" / f"{arm}_seed{seed}", root / "evaluate" / f"{arm}_seed{seed}"
            source = (
                {"dataset.mode": "full", **prep["common"]}
                if arm == "full"
                else {"dataset.mode": "subset", "dataset.data_path": str(data)}
            )
            with steps.step(f"fine-tune: {arm}, seed {seed}"):
                values = {
                    **source,
                    **plan[arm],
                    "seed": int(seed),
                    "training.model.name": str(cfg.target_model),
                    "output_dir": str(ft_dir),
                }
                _run(cfg, "finetune", values)
            with steps.step(f"evaluate: {arm}, seed {seed}"):
                _evaluate(cfg, ft_dir / "checkpoint-final", ev_dir, seed)
            out.setdefault(arm, {})[seed] = {
                "eval": ev_dir,
                "train": _read_json(ft_dir / "train_metrics.json"),
            }
    if cfg.include_base:
        with steps.step("evaluate: base model (no fine-tune)"):
            _evaluate(cfg, None, root / "evaluate" / "base", int(cfg.seed))
        out["base (no fine-tune)"] = {int(cfg.seed): {"eval": root / "evaluate" / "base", "train": None}}
    return out


def _evaluate(cfg: DictConfig, adapter: Path | None, out_dir: Path, seed: int) -> None:
    values = {
        "model_path": str(cfg.target_model),
        "adapter_path": None if adapter is None else str(adapter),
        "eval.data_path": str(cfg.data.eval_path),
        "output_dir": str(out_dir),
        "seed": int(seed),
    }
    _run(cfg, "evaluate", values)


# --------------------------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------------------------- #
def per_sample(eval_dir: Path) -> dict[str, np.ndarray]:
    """An evaluation's per-sample arrays in id order: ``nll`` sums, ``tokens``, ``correct`` (NaN: not
    checkable)."""
    rows = sorted(_read_jsonl(eval_dir / "eval_per_sample.jsonl"), key=lambda r: r["id"])
    return {
        "nll": np.array([r["nll_sum"] for r in rows], dtype=np.float64),
        "tokens": np.array([r["tokens"] for r in rows], dtype=np.float64),
        "correct": np.array([np.nan if r["correct"] is None else float(r["correct"]) for r in rows]),
    }


def _loss(s: dict[str, np.ndarray], idx: np.ndarray) -> float:
    return float(s["nll"][idx].sum() / max(s["tokens"][idx].sum(), 1.0))


def _em(s: dict[str, np.ndarray], idx: np.ndarray) -> float:
    c = s["correct"][idx]
    c = c[np.isfinite(c)]
    return float(c.mean()) if len(c) else float("nan")


def paired_difference(
    arm: Sequence[dict[str, np.ndarray]],
    base: Sequence[dict[str, np.ndarray]],
    metric: str,
    resamples: int,
    confidence: float,
    seed: int = 0,
) -> dict[str, float]:
    """Mean over seeds of ``metric(arm) - metric(base)`` and its bootstrap interval.

    ``arm[s]`` and ``base[s]`` are the per-sample results of fine-tune seed ``s`` (paired). Each
    resample draws seeds with replacement and held-out samples with replacement, the same draw for both
    sides, so the interval carries the seed-to-seed and the sample-to-sample variation.
    """
    fn = _loss if metric == "eval_loss" else _em
    n_seeds, n = len(arm), len(arm[0]["nll"])
    all_idx = np.arange(n)
    point = float(np.mean([fn(a, all_idx) - fn(b, all_idx) for a, b in zip(arm, base, strict=True)]))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for r in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        idx = rng.integers(0, n, n)
        draws[r] = np.mean([fn(arm[s], idx) - fn(base[s], idx) for s in seeds])
    lo, hi = np.nanquantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"difference": point, "low": float(lo), "high": float(hi)}


def _verdict(metric: str, diff: dict[str, float]) -> str:
    higher = METRICS[metric][1]
    if diff["low"] <= 0 <= diff["high"] or not (math.isfinite(diff["low"]) and math.isfinite(diff["high"])):
        return "no clear difference"
    better = diff["low"] > 0 if higher else diff["high"] < 0
    return "better" if better else "WORSE"


def summarise_arms(
    cfg: DictConfig, sel: dict[str, Any], runs: dict[str, dict[int, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """One row per arm: selection metrics, mean held-out metrics over seeds, paired differences to random."""
    table: dict[str, dict[str, Any]] = {}
    samples = {arm: {s: per_sample(r["eval"]) for s, r in by.items()} for arm, by in runs.items()}
    random_rows = [v for k, v in sel["rows"].items() if k.startswith("random_seed")]
    for arm, by_seed in runs.items():
        row: dict[str, Any] = {}
        if arm in sel["rows"]:
            row.update(sel["rows"][arm])
        elif arm == "random" and random_rows:
            for key in ("kept", "corrupted_kept_share", "auroc", "clean_kept_share"):
                vals = [r[key] for r in random_rows if r.get(key) is not None]
                row[key] = float(np.mean(vals)) if vals else None
            row["per_kind"] = {
                f: {
                    m: float(np.mean([r["per_kind"][f][m] for r in random_rows]))
                    for m in ("auroc", "kept_share")
                }
                for f in random_rows[0].get("per_kind", {})
            }
        all_idx = np.arange(len(next(iter(samples[arm].values()))["nll"]))
        losses = [_loss(samples[arm][s], all_idx) for s in by_seed]
        ems = [_em(samples[arm][s], all_idx) for s in by_seed]
        row["eval_loss"], row["exact_match"] = float(np.mean(losses)), float(np.mean(ems))
        row["eval_loss_per_seed"], row["exact_match_per_seed"] = losses, ems
        trains = [r["train"] for r in by_seed.values() if r["train"]]
        if trains:
            row["finetune_steps"] = trains[0]["global_step"]
            row["finetune_tokens"] = trains[0].get("tokens_seen")
            row["finetune_flops"] = trains[0].get("flops_estimate")
        if "random" in runs and arm not in ("random", "base (no fine-tune)"):
            paired = [s for s in by_seed if s in runs["random"]]
            row["vs_random"] = {}
            for metric in ("eval_loss", "exact_match"):
                diff = paired_difference(
                    [samples[arm][s] for s in paired],
                    [samples["random"][s] for s in paired],
                    metric,
                    int(cfg.statistics.bootstrap),
                    float(cfg.statistics.confidence),
                )
                row["vs_random"][metric] = {**diff, "verdict": _verdict(metric, diff)}
        table[arm] = row
    for name in ("quality_gate (alpha=0)", "quality_gate (unwarmed gates)"):
        if name in sel["rows"]:
            table[name] = {**sel["rows"][name], "selection_only": True}
    return table


def verdicts(table: dict[str, dict[str, Any]], confidence: float) -> list[str]:
    """Plain sentences: each fine-tuned arm against random, claimed only outside the interval."""
    lines = []
    for arm, row in table.items():
        for metric, diff in (row.get("vs_random") or {}).items():
            label = METRICS[metric][0]
            word = "from" if diff["verdict"] == "no clear difference" else "than"
            lines.append(
                f"{arm} is {diff['verdict']} {word} "
                f"random on {label}: difference {diff['difference']:+.4f}, {confidence:.0%} interval "
                f"[{diff['low']:+.4f}, {diff['high']:+.4f}]"
            )
    return lines


# --------------------------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------------------------- #
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


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _arms_figure(summary: dict[str, Any]) -> str:
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
    return _png(fig)


def markdown_to_html(md: str) -> str:
    """The summaries' Markdown (headings, pipe tables, ``-`` lists, paragraphs, `code`) as HTML; every
    piece of text escaped."""

    def inline(text: str) -> str:
        parts = html.escape(text).split("`")
        return "".join(f"<code>{t}</code>" if i % 2 else t for i, t in enumerate(parts))

    out: list[str] = []
    table: list[list[str]] = []
    items: list[str] = []

    def flush() -> None:
        if table:
            head, *rows = [r for r in table if not all(set(c) <= set("-: ") for c in r)]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


def _page(title: str, figures: dict[str, str], md: str) -> str:
    """A self-contained page: the figures as embedded PNGs, then the Markdown summary as HTML."""
    imgs = "".join(
        f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{png}'>"
        for t, png in figures.items()
    )
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:0 auto;padding:16px}"
        "table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{imgs}{markdown_to_html(md)}</body></html>"
    )


def render_html(summary: dict[str, Any], figures: dict[str, str]) -> str:
    """The experiment's page: its figures and its Markdown summary."""
    return _page(f"Quality-Gate experiment: {summary['name']}", figures, render_markdown(summary))


# --------------------------------------------------------------------------------------------- #
# One regime, and the sweep
# --------------------------------------------------------------------------------------------- #
def _families_of(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from quality_gate.synthetic import CORRUPTION_FAMILIES

    counts: dict[str, int] = {}
    for r in records:
        label = corruption_of(r)
        if label not in (None, "none"):
            counts[label] = counts.get(label, 0) + 1
    return {
        f: {"n": n, "kind": CORRUPTION_FAMILIES[f].kind if f in CORRUPTION_FAMILIES else "unknown"}
        for f, n in sorted(counts.items())
    }


MAX_COMPOSITION_VALUES = 20


def composition(
    records: Sequence[dict[str, Any]], files: dict[str, dict[int, Path]], key: str
) -> dict[str, Any] | None:
    """Each selection's make-up by ``meta[key]`` against the pool's.

    Per arm and value: kept share / pool share (1 = as in the pool; 0 = none of that kind kept),
    averaged over the arm's selection files (random: one per seed), and ``distance``: the total
    variation distance between the kept shares and the pool's (0 = the pool's make-up, 1 = disjoint).
    Values beyond the ``MAX_COMPOSITION_VALUES`` largest are pooled as ``(other)``. None when no record
    carries the key.
    """
    if not key:
        return None

    def kind(record: dict[str, Any]) -> str | None:
        value = (record.get("meta") or {}).get(key)
        return None if value is None else str(value)

    kinds = {str(r["id"]): kind(r) for r in records}
    counts: dict[str, int] = {}
    for v in kinds.values():
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None
    top = sorted(counts, key=lambda v: (-counts[v], v))[:MAX_COMPOSITION_VALUES]
    values = sorted(top) + (["(other)"] if len(counts) > len(top) else [])

    def shares(ids: Sequence[str]) -> np.ndarray:
        vs = [kinds.get(str(i)) for i in ids]
        vs = [v if v in top else "(other)" for v in vs if v is not None]
        return np.array([vs.count(v) for v in values], dtype=float) / max(len(vs), 1)

    pool = shares(list(kinds))
    arms: dict[str, Any] = {}
    for arm, by_seed in files.items():
        kept = np.mean([shares([r["id"] for r in _read_jsonl(f)]) for f in by_seed.values()], axis=0)
        arms[arm] = {
            "ratio": {v: round(float(k / p), 3) for v, k, p in zip(values, kept, pool)},
            "distance": round(float(0.5 * np.abs(kept - pool).sum()), 4),
        }
    return {"key": key, "pool_share": dict(zip(values, pool.round(4).tolist())), "arms": arms}


def regime_summary(
    cfg: DictConfig, root: Path, prep: dict[str, Any], k: float, steps: Steps
) -> dict[str, Any]:
    """Selections, fine-tunes and evaluations at budget ``k`` over prepared Stages 1-2; the summary."""
    from quality_gate.synthetic import HELD_OUT_FAMILIES

    sel = run_selections(cfg, prep, root, k, steps)
    runs = run_finetunes(cfg, prep, sel, root, steps)
    arms = summarise_arms(cfg, sel, runs)
    records = _read_jsonl(prep["train_path"])
    labelled = [corruption_of(r) for r in records if corruption_of(r) is not None]
    if "full" in arms:  # the full arm keeps the whole pool
        arms["full"]["kept"] = len(records)
        arms["full"]["corrupted_kept_share"] = (
            sum(k != "none" for k in labelled) / len(labelled) if labelled else None
        )
    warm = _read_json(prep["warmup"] / "warmup_metrics.json")
    return {
        "name": str(cfg.name),
        "run_dir": str(root),
        "noise_rate": float(cfg.data.noise_rate),
        "selection_percentage": float(k),
        "num_candidates": len(records),
        "corrupted_candidates": sum(corruption_of(r) not in (None, "none") for r in records),
        "families": _families_of(records),
        "composition": composition(records, sel["files"], str(cfg.composition_key)),
        "held_out_families": list(HELD_OUT_FAMILIES),
        "seeds": list(cfg.seeds),
        "compute": OmegaConf.to_container(cfg.compute),
        "confidence": float(cfg.statistics.confidence),
        "arms": arms,
        "verdicts": verdicts(arms, float(cfg.statistics.confidence)),
        "selection_cost": selection_cost(prep, steps),
        "gate_movement": warm.get("gate_movement"),
        "report": str(root / "select" / "quality_gate" / "selection_report.html"),
        "timings_s": dict(steps.timings),
    }


def _write(run_dir: Path, summary: dict[str, Any], stem: str = "summary") -> None:
    atomic_write_json(run_dir / f"{stem}.json", summary)
    atomic_write_text(run_dir / f"{stem}.md", render_markdown(summary))
    atomic_write_text(
        run_dir / f"{stem}.html", render_html(summary, {"held-out metrics per arm": _arms_figure(summary)})
    )


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """One regime (or the sweep, when ``sweep.noise_rates`` / ``sweep.budgets`` are set); writes the
    summaries."""
    validate(cfg)
    run_dir = init_run(cfg, "experiment")
    if cfg.sweep.noise_rates or cfg.sweep.budgets:
        return run_sweep(cfg, run_dir)
    steps = Steps()
    prep = prepare(cfg, run_dir, steps)
    summary = regime_summary(cfg, run_dir, prep, float(cfg.selection_percentage), steps)
    _write(run_dir, summary)
    return summary


def cell_fingerprint(cfg: DictConfig, k: float) -> str:
    """What a sweep cell's results depend on: the resolved config (less ``output_dir``) and the budget."""
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    values.pop("output_dir", None)
    text = json.dumps([values, float(k)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finished_cell(cell_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The cell's summary when a previous run into this dir finished it with the same config."""
    path = cell_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = _read_json(path)
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s is unreadable (%s); the cell runs again", path, err)
        return None
    if summary.get("config_fingerprint") != fingerprint:
        log.warning("%s was made with another config; the cell runs again", path)
        return None
    return summary


def run_sweep(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Stages 1-2 once per noise rate, then every budget; ``sweep_summary.{json,md,html}`` with the plot.

    Resumable: rerun with ``output_dir=<this run dir>`` and the cells that finished with the same config
    (their ``summary.json`` carries its fingerprint) are read back instead of run again; a noise rate
    whose cells are all finished skips its Stages 1-2 too.
    """
    noise_rates = list(cfg.sweep.noise_rates) or [float(cfg.data.noise_rate)]
    budgets = list(cfg.sweep.budgets) or [float(cfg.selection_percentage)]
    cells, resumed = [], []
    started = time.perf_counter()
    for noise in noise_rates:
        sub = OmegaConf.merge(cfg, {"data": {"noise_rate": float(noise)}})
        noise_dir = run_dir / f"noise{noise:g}"
        todo = {}
        for k in budgets:
            fingerprint = cell_fingerprint(sub, k)
            done = _finished_cell(noise_dir / f"k{k:g}", fingerprint)
            todo[k] = (fingerprint, done)
        prep, steps = None, Steps()
        for k, (fingerprint, summary) in todo.items():
            cell_dir = noise_dir / f"k{k:g}"
            if summary is not None:
                log.info("sweep cell noise %g, k %g: finished before, read from %s", noise, k, cell_dir)
                resumed.append(str(cell_dir.relative_to(run_dir)))
            else:
                if prep is None:
                    prep = prepare(sub, noise_dir, steps, reuse=True)
                summary = regime_summary(sub, cell_dir, prep, float(k), steps)
                summary["config_fingerprint"] = fingerprint
                _write(cell_dir, summary)
            cells.append(summary)
    sweep = {
        "name": str(cfg.name),
        "run_dir": str(run_dir),
        "noise_rates": noise_rates,
        "budgets": budgets,
        "cells": cells,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "resumed_cells": resumed,
    }
    atomic_write_json(run_dir / "sweep_summary.json", sweep)
    atomic_write_text(run_dir / "sweep_summary.md", render_sweep_markdown(sweep))
    atomic_write_text(run_dir / "sweep_summary.html", render_sweep_html(sweep))
    return sweep


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
        figures[f"held-out metrics against noise rate, k = {k:g}"] = _png(fig)
    return _page(f"Quality-Gate sweep: {sweep['name']}", figures, render_sweep_markdown(sweep))


def run(cfg: DictConfig) -> dict[str, Any]:
    """The ``experiment`` stage: run every arm, log the summary table and where the files are."""
    summary = run_experiment(cfg)
    if "cells" in summary:
        log.info("\n%s", render_sweep_markdown(summary))
        log.info("sweep summary: %s", Path(summary["run_dir"]) / "sweep_summary.html")
    else:
        log.info("\n%s", render_markdown(summary))
        log.info("summary: %s", Path(summary["run_dir"]) / "summary.md")
        log.info("selection report: %s", summary["report"])
    return summary
