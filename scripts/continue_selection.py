"""The seed's selection command, an alias of ``quality-gate select`` (config: continue_selection.yaml).

python scripts/continue_selection.py router_data_dir=<dir with *_router_data.pt> selection_percentage=0.05
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quality_gate.cli import hydra_app

if __name__ == "__main__":
    hydra_app("continue_selection")
