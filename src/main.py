"""Hydra entry point: ``python src/main.py --config-name stage_N_... key=value``.

Looks up ``cfg.stage`` and calls that stage's ``run(cfg)``. Stage modules are imported lazily so
that ``--help`` and config errors come back fast.
"""

from __future__ import annotations

import importlib
import logging
import os
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

# Matched by name so that this entry point imports no torch before a stage runs.
USER_ERRORS = ("RouterDataError", "NonFiniteLossError", "SelectionError", "AdapterError")


def _is_user_error(e: Exception) -> bool:
    return isinstance(e, (ValueError, FileNotFoundError)) or type(e).__name__ in USER_ERRORS


@hydra.main(config_path="../configs", config_name="stage_1_warmup", version_base=None)
def main(cfg: DictConfig) -> None:
    stage = cfg.get("stage")
    if stage not in STAGES:
        raise SystemExit(f"config key `stage` is {stage!r}; expected one of {sorted(STAGES)}")
    try:
        importlib.import_module(STAGES[stage]).run(cfg)
    except Exception as e:
        # Errors about the input or the config say what to fix; a traceback would bury the message.
        # Anything else (a bug) keeps its traceback, and so does everything with QG_TRACEBACK=1.
        if os.environ.get("QG_TRACEBACK") or not _is_user_error(e):
            raise
        logging.getLogger("quality_gate").error("%s failed: %s", stage, e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
