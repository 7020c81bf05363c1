"""Selection: the quality score of method.md, baselines, the audit report and exports.

``run_selection(cfg)`` runs everything (see :mod:`quality_gate.selection.pipeline`); the ``select``
stage (:mod:`quality_gate.stages.select`) calls it.
"""

from quality_gate.errors import SelectionError
from quality_gate.selection.metrics import auroc, spearman
from quality_gate.selection.pipeline import SelectionResult, compute_selection, run_selection
from quality_gate.selection.scoring import (
    ScoreParams,
    collect_sample_stats,
    column_map,
    quality_scores,
    token_weights,
)
from quality_gate.selection.selectors import SELECTORS, select, selector_scores

__all__ = [
    "SELECTORS",
    "ScoreParams",
    "SelectionError",
    "SelectionResult",
    "auroc",
    "collect_sample_stats",
    "column_map",
    "compute_selection",
    "quality_scores",
    "run_selection",
    "select",
    "selector_scores",
    "spearman",
    "token_weights",
]
