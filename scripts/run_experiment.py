"""Does selection help? Run the whole pipeline for several selectors at the same budget.

    python scripts/run_experiment.py --config-name experiment [key=value ...]   # make demo

Prints the summary table and writes ``summary.json`` / ``summary.md`` into the run dir
(``outputs/demo/<date>/<time>/`` by default). Point it at your own data and models with
``data.generate=false data.train_path=... data.eval_path=... selector_model=... target_model=...``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hydra
from omegaconf import DictConfig

from quality_gate.experiment import render_markdown, run_experiment
from quality_gate.runs import register_resolvers

register_resolvers()


@hydra.main(config_path="../configs", config_name="experiment", version_base=None)
def main(cfg: DictConfig) -> None:
    summary = run_experiment(cfg)
    print()
    print(render_markdown(summary))
    print(f"summary: {Path(summary['run_dir']) / 'summary.md'}")
    print(f"selection report: {summary['report']}")


if __name__ == "__main__":
    logging.getLogger("httpx").setLevel(logging.WARNING)
    main()
