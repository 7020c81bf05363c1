"""How well each selector separates clean from corrupted samples, when the records carry labels.

The one place this is computed: ``selection_summary.json`` (``corruption_audit``), the selection
report and the experiment runner all read it from here, so they cannot disagree.

Rules. A sample is labelled when its record has ``meta.corruption``
(:func:`quality_gate.data.records.corruption_of`: ``"none"`` = clean, anything else names the
corruption kind). Every labelled sample counts, also those Stage 2 marked invalid: a sample a selector
may not keep (invalid, or e.g. IFD > 1) ranks last, exactly as the selection treats it. AUROC is the
probability that a random clean sample ranks above a random corrupted one (ties count one half);
``kept`` is the selector's own ``ceil(k N)`` at the run's percentage, filled with the run's diversity
rule (so every selector is compared under the same rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quality_gate.selection.diversity import Diversity
from quality_gate.selection.metrics import auroc
from quality_gate.selection.scoring import SampleStats
from quality_gate.selection.selectors import SelectorScores, ranking_score, select


def corruption_audit(
    stats: SampleStats,
    scores: Mapping[str, SelectorScores],
    kinds: Sequence[str | None],
    percentage: float,
    per_dataset: bool,
    diversity: Diversity | None = None,
    known: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """Per selector: kept labelled samples, corrupted share among them, AUROC overall and per kind.

    ``kinds`` (N,): each sample's label (``"none"``, a corruption kind, or None when unlabelled);
    ``known``: selector -> kept (N,) bool already computed with the same settings.
    Returns None when no sample is labelled.
    """
    kind = np.asarray([k if k is not None else "" for k in kinds], dtype=object)
    labelled = kind != ""
    if not labelled.any():
        return None
    clean = labelled & (kind == "none")
    corrupted = labelled & ~clean
    families = sorted({str(k) for k in kind[corrupted]})
    out: dict[str, Any] = {
        "num_labelled": int(labelled.sum()),
        "num_corrupted": int(corrupted.sum()),
        "corrupted_share_of_pool": float(corrupted.sum() / labelled.sum()),
        "kinds": {f: int((kind == f).sum()) for f in families},
        "selectors": {},
    }
    for name in sorted(scores):
        rank_score = ranking_score(scores[name])  # (N,), -inf where the selector may not keep
        if known is not None and name in known:
            kept = known[name]  # the selection the run made (no second diversity walk)
        else:
            _, kept = select(scores[name], stats, percentage, per_dataset, diversity)
        kept_labelled = kept & labelled
        row: dict[str, Any] = {
            "kept_labelled": int(kept_labelled.sum()),
            "corrupted_share_of_kept": (
                float((kept & corrupted).sum() / kept_labelled.sum()) if kept_labelled.any() else None
            ),
            "auroc": _auroc(rank_score, clean, corrupted),
            "per_kind": {},
        }
        for f in families:
            members = kind == f
            row["per_kind"][f] = {
                "kept_share": float((kept & members).sum() / members.sum()),
                "auroc": _auroc(rank_score, clean, members),
            }
        row["clean_kept_share"] = float((kept & clean).sum() / clean.sum()) if clean.any() else None
        out["selectors"][name] = row
    return out


def _auroc(score: np.ndarray, clean: np.ndarray, corrupted: np.ndarray) -> float | None:
    """AUROC of ``score`` for clean (positive) vs corrupted; -inf ranks last, ties count one half."""
    both = clean | corrupted
    if not clean.any() or not corrupted.any():
        return None
    s = np.where(np.isfinite(score[both]), score[both], -np.inf)
    # rankdata handles -inf consistently (all tied at the bottom).
    return float(auroc(s, clean[both].astype(int)))
