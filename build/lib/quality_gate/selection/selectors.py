"""Selectors: a score per sample (higher is kept) and which samples may be kept at all.

* ``quality_gate``: q of method.md (higher kept).
* ``perplexity``: mean token NLL over the positions in scope; lower kept (score = -NLL).
* ``ifd``: Cherry_LLM's instruction-following difficulty ``ifd_loss_cond / ifd_loss_uncond``;
  samples with IFD > 1 or non-finite are dropped first (the response is easier *without* the
  instruction, so the pair is judged misaligned), then the highest IFD is kept.
* ``random``: a seeded uniform score.

The budget is ``ceil(k * N)`` of the valid samples, globally or per dataset; ties are broken by id.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from quality_gate.config import SELECTORS
from quality_gate.errors import SelectionError
from quality_gate.selection.scoring import SampleStats

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SelectorScores:
    """``score`` (N,) higher is better, NaN where not computable; ``eligible`` (N,) may be kept."""

    score: np.ndarray
    eligible: np.ndarray


def selector_scores(name: str, stats: SampleStats, q: np.ndarray, seed: int) -> SelectorScores:
    """The scores of selector ``name`` for every sample of ``stats``."""
    if name == "quality_gate":
        return SelectorScores(q, stats.valid & np.isfinite(q))
    if name == "perplexity":
        score = -stats.mean_nll
        return SelectorScores(score, stats.valid & np.isfinite(score))
    if name == "ifd":
        missing = [d for d, ok in stats.has_ifd.items() if not ok]
        if missing:
            raise SelectionError(
                f"selector=ifd needs IFD statistics, but the router data of {missing} has none: "
                "rerun Stage 2 with collect_ifd=true"
            )
        ifd = stats.ifd
        return SelectorScores(ifd, stats.valid & np.isfinite(ifd) & (ifd <= 1.0))
    if name == "random":
        score = np.random.default_rng(seed).random(len(stats))
        return SelectorScores(score, stats.valid.copy())
    raise SelectionError(f"selector={name!r}; expected one of {list(SELECTORS)}")


def ranking_score(scores: SelectorScores) -> np.ndarray:
    """(N,) the score as the selection ranks it: samples that may not be kept rank last (-inf)."""
    return np.where(scores.eligible & np.isfinite(scores.score), scores.score, -np.inf)


def available_selectors(stats: SampleStats) -> list[str]:
    """The selectors whose scores these statistics allow (``ifd`` needs Stage 2's ``collect_ifd``)."""
    return [s for s in SELECTORS if s != "ifd" or all(stats.has_ifd.values())]


def budget_of(percentage: float, n: int) -> int:
    """``ceil(k * N)``, with the product rounded first so that 0.07 * 400 = 28.000000000000004 keeps 28."""
    return math.ceil(round(percentage * n, 9))


def rank_order(score: np.ndarray, ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Indices of ``candidates`` (bool (N,)) by decreasing score, ties by increasing id."""
    idx = np.flatnonzero(candidates)
    order = np.lexsort((ids[idx], -score[idx]))  # last key is primary
    return idx[order]


def select(
    scores: SelectorScores,
    stats: SampleStats,
    percentage: float,
    per_dataset: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep ``ceil(k * N_valid)`` samples (per dataset when ``per_dataset``).

    Returns ``rank`` (N,) int64: 0-based rank among the eligible samples of the sample's group
    (-1 when not eligible), and ``selected`` (N,) bool.
    """
    if not 0 < percentage <= 1:
        raise SelectionError(f"selection_percentage={percentage!r} must be in (0, 1]")
    ids = np.asarray(stats.ids)
    names = np.asarray(stats.datasets)
    groups = (
        {"all": np.ones(len(ids), bool)} if not per_dataset else {d: names == d for d in stats.index_paths}
    )
    rank = np.full(len(ids), -1, dtype=np.int64)
    selected = np.zeros(len(ids), dtype=bool)
    for group, members in groups.items():
        budget = budget_of(percentage, int((stats.valid & members).sum()))
        order = rank_order(scores.score, ids, scores.eligible & members)
        if len(order) < budget:
            log.warning(
                "%s: only %d eligible samples for a budget of %d; keeping all", group, len(order), budget
            )
        rank[order] = np.arange(len(order))
        selected[order[:budget]] = True
    return rank, selected
