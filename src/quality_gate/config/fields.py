"""The building blocks of the schemas: a field with its help and checks, and every allowed value once.

The library modules that check the same values (the data layer's truncation, the model loader's
dtypes, the score's token scope and pairing) import them from here.
"""

import copy
import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

DTYPES = ["auto", "bfloat16", "float16", "float32"]
TRUNCATION = ["right", "drop"]
SELECTORS = ["quality_gate", "perplexity", "ifd", "random", "length"]
# selector= of the select stage: the scores above, or a weighted mean of their ranks (combined_weights).
SELECT_SELECTORS = [*SELECTORS, "combined"]
DIVERSITY = ["none", "threshold", "cluster"]
#: Positions the score reads (``token_scope``) and which perplexity each gate value is paired with.
TOKEN_SCOPES = ["all", "assistant"]
PAIRINGS = ["same_token", "next_token"]

#: A seed must fit every generator it seeds: numpy's takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1
#: The seed of every pipeline stage (the seed's value); the experiment runner has its own (0).
DEFAULT_SEED = 42


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a default, its one-line ``help`` and optional checks for ``validate``.

    Checks: ``choices`` (allowed values), ``ge`` / ``gt`` / ``le`` / ``lt`` (numeric bounds; ``None`` values
    pass; a list is checked item by item), ``name=True`` (the value becomes a file or dir name: see
    :mod:`quality_gate.names`; ``name="dataset"`` also keeps off the names of Stage 2's own files).
    Every float must be finite (``nan`` and ``inf`` are refused: ``ge=0`` alone admits ``inf``).
    """
    metadata = {"help": help, **checks}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def seed_opt(default: int, help: str) -> Any:
    """A seed: an integer in 0 .. :data:`SEED_MAX`."""
    return opt(default, help, ge=0, le=SEED_MAX)


def asset(relative: str) -> str:
    """A default path inside the package's embedded tiny assets, resolved when the config is composed."""
    return "${qg_asset:" + relative + "}"
