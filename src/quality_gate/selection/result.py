"""What a selection computed: :class:`SelectionResult`, the one object the pipeline hands to the
report and the explorer.

In its own module so that the pipeline (:mod:`.pipeline`, which makes it and writes the report) and
the pages that read it (:mod:`.report`, :mod:`.explorer`) depend on it and not on each other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from quality_gate.selection.diversity import Diversity
from quality_gate.selection.scoring import ColumnStats, SampleStats, ScoreParams
from quality_gate.selection.selectors import SelectorScores


@dataclasses.dataclass
class SelectionResult:
    """What a selection computed; ``order`` (n_kept,) are sample indices of the kept ones, best first."""

    stats: SampleStats
    q: np.ndarray
    columns: dict[str, ColumnStats]
    scores: dict[str, SelectorScores]
    selector: str
    params: ScoreParams
    percentage: float
    rank: np.ndarray
    selected: np.ndarray
    order: np.ndarray
    output_dir: Path
    summary: dict[str, Any] | None = None  # selection_summary.json, once run_selection wrote it
    diversity: Diversity = dataclasses.field(default_factory=Diversity)
    # (N,) bool: walked by diversity=threshold but dropped as a near-duplicate of a kept sample.
    skipped: np.ndarray | None = None
    diversity_report: dict[str, Any] | None = None  # per group: budget, kept, skipped / cluster counts
    per_dataset: bool = False
