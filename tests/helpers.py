"""Helpers shared by the test modules (import with ``from helpers import ...``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "quality_gate" / "assets"
SELECTOR = ASSETS / "models" / "tiny-qwen3-selector"
TARGET = ASSETS / "models" / "tiny-qwen2-target"
TRAIN = ASSETS / "data" / "synthetic_train.jsonl"
EVAL = ASSETS / "data" / "synthetic_eval.jsonl"
#: torchrun with two local processes, no rendezvous server; append the script and its arguments.
TORCHRUN_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``quality-gate <config_name> <overrides>`` runs: Hydra's composition of the packaged
    YAML and its schema (without the ``hydra`` node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from quality_gate.config import register_configs

    register_configs()
    with initialize_config_module("quality_gate.configs", version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def select_config(**values) -> DictConfig:
    """A ``select`` config: the schema's defaults with ``values`` (validated like the command line)."""
    from quality_gate.config import make_config

    return make_config("select", values)
