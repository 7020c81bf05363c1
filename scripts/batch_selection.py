"""Select the top k % of samples from Stage 2's router data (see configs/batch_selection.yaml).

python scripts/batch_selection.py root_dir=<stage 2 run dir> selection_percentage=0.05
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from quality_gate.runs import register_resolvers
from quality_gate.selection import run

register_resolvers()


@hydra.main(config_path="../configs", config_name="batch_selection", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
