"""Selection (select): score every sample of Stage 2's router data and keep the top k %.

    quality-gate select root_dir=<collect run dir> selection_percentage=0.05
    python scripts/batch_selection.py root_dir=<collect run dir> selection_percentage=0.05   # the seed's

A CPU step that only reads Stage 2's output, so it can be rerun with other ``selection_percentage``,
``selector``, ``alpha``, ``tau``, ``token_scope`` or ``pairing`` as often as needed. The score is
docs/method.md's (:mod:`quality_gate.selection.scoring`); the baselines are in
:mod:`quality_gate.selection.selectors`; :func:`quality_gate.selection.pipeline.run_selection` writes
``selected_data.jsonl``, ``scores.parquet``, ``selection_summary.json``, ``selection_report.html`` and
the exports for LLaMA-Factory and ``datasets``.
"""

from __future__ import annotations

from omegaconf import DictConfig


def run(cfg: DictConfig) -> None:
    """Select from ``cfg.root_dir`` (or ``cfg.router_data_dir``) and write the outputs."""
    from quality_gate.selection.pipeline import run_selection

    run_selection(cfg)
