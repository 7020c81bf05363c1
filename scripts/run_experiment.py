"""Does selection help? An alias of ``quality-gate experiment`` (``make demo``).

    python scripts/run_experiment.py [key=value ...]

Point it at your own data and models with ``data.generate=false data.train_path=...
data.eval_path=... selector_model=... target_model=...``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quality_gate.cli import hydra_app

if __name__ == "__main__":
    hydra_app("experiment")
