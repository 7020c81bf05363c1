"""The experiment's statistics: per-arm held-out metrics over seeds, paired bootstrap intervals against
random, the verdicts they allow, and what each selection kept of the pool (families, make-up).

Every arm is fine-tuned with each seed, paired with random's run of the same seed. The difference of
an arm to random (held-out loss, exact match) gets a bootstrap interval that resamples seeds and
held-out samples together (the same resample for both arms); "better" or "worse" is only claimed
when the interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from quality_gate.data.records import corruption_of
from quality_gate.io import read_jsonl

METRICS: dict[str, tuple[str, bool]] = {
    "corrupted_kept_share": ("corrupted share of kept", False),
    "auroc": ("AUROC clean vs corrupted", True),
    "eval_loss": ("held-out loss", False),
    "exact_match": ("exact match", True),
}
"""metric -> (label, higher is better)"""


def per_sample(eval_dir: Path) -> dict[str, np.ndarray]:
    """An evaluation's per-sample arrays in id order: ``nll`` sums, ``tokens``, ``correct`` (NaN: not
    checkable)."""
    rows = sorted(read_jsonl(eval_dir / "eval_per_sample.jsonl"), key=lambda r: r["id"])
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


def families_of(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
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
        kept = np.mean([shares([r["id"] for r in read_jsonl(f)]) for f in by_seed.values()], axis=0)
        arms[arm] = {
            "ratio": {v: round(float(k / p), 3) for v, k, p in zip(values, kept, pool)},
            "distance": round(float(0.5 * np.abs(kept - pool).sum()), 4),
        }
    return {"key": key, "pool_share": dict(zip(values, pool.round(4).tolist())), "arms": arms}
