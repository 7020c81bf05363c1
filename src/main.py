"""Hydra entry point: ``python src/main.py --config-name stage_N_... key=value``.

Looks up ``cfg.stage`` and calls that stage's ``run(cfg)``. Stage modules are imported lazily so
that ``--help`` and config errors come back fast.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from quality_gate.runs import register_resolvers

STAGES = {
    "warmup": "quality_gate.stages.warmup",
    "selection": "quality_gate.stages.selection",
    "finetune": "quality_gate.stages.finetune",
    "evaluate": "quality_gate.stages.evaluate",
}

register_resolvers()


@hydra.main(config_path="../configs", config_name="stage_1_warmup", version_base=None)
def main(cfg: DictConfig) -> None:
    stage = cfg.get("stage")
    if stage not in STAGES:
        raise SystemExit(f"config key `stage` is {stage!r}; expected one of {sorted(STAGES)}")
    importlib.import_module(STAGES[stage]).run(cfg)


if __name__ == "__main__":
    main()
