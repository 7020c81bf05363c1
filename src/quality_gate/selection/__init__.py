"""Selection: the quality score of method.md, baselines, the audit report and exports.

``run_selection(cfg)`` runs everything (see :mod:`quality_gate.selection.pipeline`); the ``select``
stage (:mod:`quality_gate.stages.select`) calls it.
"""

from quality_gate.errors import SelectionError
from quality_gate.selection.diversity import Diversity, cluster_quotas, threshold_filter
from quality_gate.selection.metrics import auroc, spearman
from quality_gate.selection.pipeline import compute_selection, run_selection
from quality_gate.selection.result import SelectionResult
from quality_gate.selection.scoring import (
    ScoreParams,
    collect_sample_stats,
    column_map,
    quality_scores,
    token_weights,
)
from quality_gate.selection.selectors import (
    SELECTORS,
    combined_scores,
    select,
    select_detailed,
    selector_scores,
)

__all__ = [
    "SELECTORS",
    "Diversity",
    "ScoreParams",
    "SelectionError",
    "SelectionResult",
    "auroc",
    "cluster_quotas",
    "collect_sample_stats",
    "column_map",
    "combined_scores",
    "compute_selection",
    "quality_scores",
    "run_selection",
    "select",
    "select_detailed",
    "selector_scores",
    "spearman",
    "threshold_filter",
    "token_weights",
]
