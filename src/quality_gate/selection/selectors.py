"""Selectors: a score per sample (higher is kept) and which samples may be kept at all.

* ``quality_gate``: q of method.md (higher kept).
* ``perplexity``: mean token NLL over the positions in scope; lower kept (score = -NLL).
* ``ifd``: Cherry_LLM's instruction-following difficulty ``ifd_loss_cond / ifd_loss_uncond``;
  samples with IFD > 1 or non-finite are dropped first (the response is easier *without* the
  instruction, so the pair is judged misaligned), then the highest IFD is kept.
* ``random``: a seeded uniform score.
* ``length``: the number of response (assistant) tokens; the longest kept (Zhao et al. 2024, "Long Is
  More for Alignment": a strong baseline, and the one a score must beat to show it measures more
  than length).
* ``combined``: a weighted mean of other selectors' rank-normalised scores (``combined_weights``):
  each selector's score becomes its rank in [0, 1] (1 = its best sample, average ranks for ties), so
  that scales do not matter; only samples every weighted selector may keep are eligible, and ranks are
  taken among them (within each dataset when ``per_dataset``).

The budget is ``ceil(k * N)`` of the valid samples, globally or per dataset; ties are broken by id.
How the budget is filled (the top by score, or with a diversity rule) is
:mod:`quality_gate.selection.diversity`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import rankdata

from quality_gate.config import SELECTORS
from quality_gate.errors import SelectionError
from quality_gate.selection.diversity import Diversity, cluster_select, threshold_filter
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
    if name == "length":
        score = stats.response_tokens.astype(np.float64)
        return SelectorScores(score, stats.valid.copy())
    raise SelectionError(f"selector={name!r}; expected one of {list(SELECTORS)}")


def rank_normalise(score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N,) the rank of ``score`` among the samples of ``mask`` (bool (N,)) scaled to [0, 1]:
    ``(rank - 1) / (n - 1)`` with average ranks for ties (1 = highest score; a lone sample gets 1),
    NaN outside ``mask``."""
    out = np.full(len(score), np.nan)
    n = int(mask.sum())
    if n == 1:
        out[mask] = 1.0
    elif n > 1:
        out[mask] = (rankdata(score[mask]) - 1.0) / (n - 1)
    return out


def combined_scores(
    scores: Mapping[str, SelectorScores],
    weights: Mapping[str, float],
    groups: Mapping[str, np.ndarray],
) -> SelectorScores:
    """``combined``: ``sum_s w_s r_s / sum_s w_s`` of the rank-normalised scores ``r_s``
    (:func:`rank_normalise`) of the selectors with ``w_s > 0``, ranked within each of ``groups``
    (name -> bool (N,)). Eligible: eligible for every weighted selector; NaN elsewhere."""
    used = {name: float(w) for name, w in weights.items() if float(w) > 0}
    if not used:
        raise SelectionError(f"combined_weights={dict(weights)} has no positive weight")
    n = len(next(iter(scores.values())).score)
    eligible = np.ones(n, dtype=bool)
    for name in used:
        eligible &= scores[name].eligible & np.isfinite(scores[name].score)
    total = np.zeros(n)
    for name, w in used.items():
        r = np.full(n, np.nan)
        for members in groups.values():
            m = eligible & members
            r[m] = rank_normalise(scores[name].score, m)[m]
        total += w * r
    combined = np.where(eligible, total / sum(used.values()), np.nan)
    return SelectorScores(combined, eligible)


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


def groups_of(stats: SampleStats, per_dataset: bool) -> dict[str, np.ndarray]:
    """The budget's groups: ``{"all": ...}`` or one bool (N,) mask per dataset."""
    if not per_dataset:
        return {"all": np.ones(len(stats), dtype=bool)}
    names = np.asarray(stats.datasets)
    return {d: names == d for d in stats.index_paths}


def group_rank(scores: SelectorScores, stats: SampleStats, per_dataset: bool) -> np.ndarray:
    """(N,) int64 0-based rank by score among the eligible samples of each group (-1: not eligible)."""
    ids = np.asarray(stats.ids)
    rank = np.full(len(ids), -1, dtype=np.int64)
    for members in groups_of(stats, per_dataset).values():
        order = rank_order(scores.score, ids, scores.eligible & members)
        rank[order] = np.arange(len(order))
    return rank


@dataclasses.dataclass
class Selection:
    """``rank`` (N,) int64: 0-based rank by score among the eligible samples of the sample's group
    (-1 when not eligible); ``selected`` (N,) bool; ``skipped`` (N,) bool: walked but dropped as a
    near-duplicate (``diversity=threshold``, else all False); ``diversity``: what the rule did, per
    group (None for ``diversity=none``)."""

    rank: np.ndarray
    selected: np.ndarray
    skipped: np.ndarray
    diversity: dict[str, Any] | None = None


def select_detailed(
    scores: SelectorScores,
    stats: SampleStats,
    percentage: float,
    per_dataset: bool,
    diversity: Diversity | None = None,
) -> Selection:
    """Keep ``ceil(k * N_valid)`` samples (per dataset when ``per_dataset``): the best by score, or
    as the ``diversity`` rule fills the budget (see :mod:`quality_gate.selection.diversity`)."""
    if not 0 < percentage <= 1:
        raise SelectionError(f"selection_percentage={percentage!r} must be in (0, 1]")
    mode = "none" if diversity is None else diversity.mode
    ids = np.asarray(stats.ids)
    rank = np.full(len(ids), -1, dtype=np.int64)
    selected = np.zeros(len(ids), dtype=bool)
    skipped = np.zeros(len(ids), dtype=bool)
    report: dict[str, Any] = {}
    for group, members in groups_of(stats, per_dataset).items():
        budget = budget_of(percentage, int((stats.valid & members).sum()))
        order = rank_order(scores.score, ids, scores.eligible & members)
        if len(order) < budget:
            log.warning(
                "%s: only %d eligible samples for a budget of %d; keeping all", group, len(order), budget
            )
        rank[order] = np.arange(len(order))
        if mode == "none":
            selected[order[:budget]] = True
        elif mode == "threshold":
            assert diversity is not None and diversity.embeddings is not None
            out = threshold_filter(diversity.embeddings, order, budget, diversity.threshold)
            selected[out.kept] = True
            skipped[out.skipped] = True
            if out.exhausted:
                log.warning(
                    "%s: diversity=threshold (%s) ran out of candidates: %d of %d eligible samples pass, "
                    "budget %d; keeping those %d",
                    group,
                    diversity.threshold,
                    len(out.kept),
                    len(order),
                    budget,
                    len(out.kept),
                )
            report[group] = {
                "budget": budget,
                "candidates": len(order),
                "kept": len(out.kept),
                "examined": out.examined,
                "skipped_near_duplicates": len(out.skipped),
                "pool_exhausted": out.exhausted,
            }
        else:
            assert diversity is not None and diversity.labels is not None
            candidates = np.zeros(len(ids), dtype=bool)
            candidates[order[: math.ceil(diversity.pool * budget)] if diversity.pool else order] = True
            chosen, per_cluster = cluster_select(
                scores.score, ids, candidates, diversity.labels, diversity.num_clusters, budget
            )
            selected |= chosen
            report[group] = {"budget": budget, "candidates": int(candidates.sum()), "kept": int(chosen.sum())}
            report[group].update({f"cluster_{k}": v for k, v in per_cluster.items()})
    return Selection(rank, selected, skipped, report if mode != "none" else None)


def select(
    scores: SelectorScores,
    stats: SampleStats,
    percentage: float,
    per_dataset: bool,
    diversity: Diversity | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(rank, selected)`` of :func:`select_detailed`."""
    out = select_detailed(scores, stats, percentage, per_dataset, diversity)
    return out.rank, out.selected
