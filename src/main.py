"""The seed's entry point: ``python src/main.py --config-name <config> key=value ...``.

Runs any config of ``quality_gate/configs/`` (the stage names ``warmup``, ``collect``, ``select``,
``finetune``, ``evaluate``, ``experiment`` and the seed's ``stage_1_warmup``, ``stage_2_selection``,
``stage_3_finetune``, ``stage_4_evaluate``); the same as ``quality-gate <config> key=value ...``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_gate.cli import hydra_app

if __name__ == "__main__":
    hydra_app("stage_1_warmup")
