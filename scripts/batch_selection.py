"""The seed's selection command, an alias of ``quality-gate select`` (config: batch_selection.yaml).

python scripts/batch_selection.py root_dir=<stage 2 run dir> selection_percentage=0.05
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quality_gate.cli import hydra_app

if __name__ == "__main__":
    hydra_app("batch_selection")
