"""How well a score separates better from worse samples, with length taken out.

Every score is "higher = keep". Ties count one half everywhere (a constant score is at chance).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

from quality_gate.selection.metrics import auroc

#: Pairs count as length-matched when their response lengths differ by at most this share.
LENGTH_MATCH = 0.2


def pair_accuracy(better: np.ndarray, worse: np.ndarray) -> float:
    """Share of pairs where the better sample scores higher (ties: one half). ``better``, ``worse``: (P,)."""
    if len(better) == 0:
        return float("nan")
    return float(np.mean((better > worse) + 0.5 * (better == worse)))


def length_residual(score: np.ndarray, length: np.ndarray) -> np.ndarray:
    """(N,) the score's rank minus its least-squares fit on the rank of ``length``: what the score says
    beyond length. Any score that only grows (or only falls) with length has nothing left (all 0).
    Scores of -inf (never kept) rank lowest."""
    if len(score) < 3:
        return np.zeros(len(score))
    r_score, r_len = rankdata(score), rankdata(length)
    design = np.stack([np.ones_like(r_len), r_len], axis=1)
    coef, *_ = np.linalg.lstsq(design, r_score, rcond=None)
    return r_score - design @ coef


def precision_at(score: np.ndarray, labels: np.ndarray, share: float) -> float:
    """Share of positives among the top ``ceil(share * N)`` by score (ties broken by position)."""
    k = max(int(np.ceil(share * len(score))), 1)
    top = np.argsort(-score, kind="stable")[:k]
    return float(labels[top].mean())


def bootstrap_interval(
    stat: Callable[[np.ndarray], float], n: int, seed: int = 0, resamples: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``resamples`` draws of ``n`` indices with replacement."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def labelled_metrics(score: np.ndarray, labels: np.ndarray, length: np.ndarray, seed: int = 0) -> dict:
    """AUROC (with a 95 % bootstrap interval), the same after regressing out log length, and precision of
    the top 10 % against the base rate. ``score``, ``labels`` (0/1), ``length`` (response tokens): (N,)."""
    finite_score = np.where(np.isfinite(score), score, -1e300)
    resid = length_residual(finite_score, length)
    lo, hi = bootstrap_interval(lambda i: auroc(finite_score[i], labels[i]), len(score), seed)
    return {
        "n": len(score),
        "positives": int(labels.sum()),
        "auroc": auroc(finite_score, labels),
        "auroc_ci": [lo, hi],
        "auroc_length_residual": auroc(np.round(resid, 9), labels),
        "precision_top10": precision_at(finite_score, labels, 0.1),
        "base_rate": float(labels.mean()) if len(labels) else float("nan"),
    }


def paired_metrics(
    score: np.ndarray, labels: np.ndarray, length: np.ndarray, pair: np.ndarray, seed: int = 0
) -> dict:
    """For pools of (worse, better) pairs: the share of pairs ranked right (95 % bootstrap interval over
    pairs), the same on length-matched pairs, plus :func:`labelled_metrics` over the pooled samples."""
    finite_score = np.where(np.isfinite(score), score, -1e300)
    ids = np.unique(pair)
    better = np.array([finite_score[(pair == p) & (labels == 1)][0] for p in ids])
    worse = np.array([finite_score[(pair == p) & (labels == 0)][0] for p in ids])
    len_b = np.array([length[(pair == p) & (labels == 1)][0] for p in ids], dtype=np.float64)
    len_w = np.array([length[(pair == p) & (labels == 0)][0] for p in ids], dtype=np.float64)
    matched = np.abs(len_b - len_w) <= LENGTH_MATCH * np.maximum(np.maximum(len_b, len_w), 1)
    lo, hi = bootstrap_interval(lambda i: pair_accuracy(better[i], worse[i]), len(ids), seed)
    return {
        **labelled_metrics(score, labels, length, seed),
        "pairs": len(ids),
        "pair_accuracy": pair_accuracy(better, worse),
        "pair_accuracy_ci": [lo, hi],
        "matched_pairs": int(matched.sum()),
        "pair_accuracy_length_matched": pair_accuracy(better[matched], worse[matched]),
    }
