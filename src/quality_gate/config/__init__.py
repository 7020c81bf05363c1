"""The typed config of every stage: each key's type, default, help text and allowed values, in one place.

Every stage has one dataclass (:class:`WarmupConfig`, :class:`CollectConfig`, :class:`SelectConfig`,
:class:`FinetuneConfig`, :class:`EvaluateConfig` in :mod:`~quality_gate.config.stages`, and
:class:`ExperimentConfig` for the experiment runner in :mod:`~quality_gate.config.experiment`),
registered with Hydra's ConfigStore as ``schema_<stage>``. The YAML files in ``quality_gate/configs/``
only compose a schema with Hydra's run-dir settings, so::

    quality-gate warmup training.epochs=1          # == python src/main.py --config-name warmup ...

is checked by OmegaConf against these types (``training.epochs=abc`` names the key), then by
:func:`validate` against the allowed values in each field's metadata (``choices``, ``ge``, ``gt``,
``le``, ``name``) and the cross-field rules of each group's ``check_group`` and the stage's ``check``.

The package's modules:

* :mod:`~quality_gate.config.fields`: ``opt`` (a field with its help and checks), the allowed
  values (:data:`DTYPES`, :data:`TRUNCATION`, :data:`SELECTORS`, ...) and :data:`DEFAULT_SEED`;
* :mod:`~quality_gate.config.groups`: the groups several stages share, written once
  (:class:`SelectorModelConfig`, :class:`GateInitConfig`, :class:`DatasetConfig`,
  :class:`TrainingConfig`, :class:`LoraConfig`, ...), and :func:`gradient_accumulation_steps`;
* :mod:`~quality_gate.config.stages` / :mod:`~quality_gate.config.experiment`: the stage schemas and
  :data:`SCHEMAS`;
* :mod:`~quality_gate.config.validate`: :func:`validate`, :func:`make_config`, :func:`help_rows` (the
  config reference, docs/configuration.md, is generated from the ``help`` metadata by
  ``scripts/gen_config_docs.py``);
* :mod:`~quality_gate.config.resolvers`: the ``qg_*`` resolvers and :func:`register_configs`.

The package imports no torch, so ``--help`` and config errors answer at once.
"""

from quality_gate.config.experiment import ExperimentConfig
from quality_gate.config.fields import (
    ASSETS_DIR,
    DEFAULT_SEED,
    DIVERSITY,
    DTYPES,
    PAIRINGS,
    SEED_MAX,
    SELECT_SELECTORS,
    SELECTORS,
    TOKEN_SCOPES,
    TRUNCATION,
)
from quality_gate.config.groups import (
    DatasetConfig,
    GateInitConfig,
    HfDataset,
    HfSources,
    LocalDataset,
    LocalSources,
    LoraConfig,
    ModelOptions,
    SelectorModelConfig,
    TargetModelConfig,
    TrainingConfig,
    gradient_accumulation_steps,
)
from quality_gate.config.resolvers import register_configs, register_resolvers
from quality_gate.config.stages import (
    SCHEMAS,
    CollectConfig,
    EvaluateConfig,
    FinetuneConfig,
    SelectConfig,
    WarmupConfig,
)
from quality_gate.config.validate import ASSETS_NOTE, help_rows, make_config, stage_of, validate

__all__ = [
    "ASSETS_DIR",
    "ASSETS_NOTE",
    "DEFAULT_SEED",
    "DIVERSITY",
    "DTYPES",
    "PAIRINGS",
    "SCHEMAS",
    "SEED_MAX",
    "SELECTORS",
    "SELECT_SELECTORS",
    "TOKEN_SCOPES",
    "TRUNCATION",
    "CollectConfig",
    "DatasetConfig",
    "EvaluateConfig",
    "ExperimentConfig",
    "FinetuneConfig",
    "GateInitConfig",
    "HfDataset",
    "HfSources",
    "LocalDataset",
    "LocalSources",
    "LoraConfig",
    "ModelOptions",
    "SelectConfig",
    "SelectorModelConfig",
    "TargetModelConfig",
    "TrainingConfig",
    "WarmupConfig",
    "gradient_accumulation_steps",
    "help_rows",
    "make_config",
    "register_configs",
    "register_resolvers",
    "stage_of",
    "validate",
]
