"""The seed's names, gathered in one place: thin aliases of the current ones.

The original stages document (``stages_module_doc.zh.md``) names its configs, scripts, ``stage:``
values and functions differently from the stage names used everywhere else here (warmup, collect,
select, finetune, evaluate). Everything the seed's users type or import keeps working through this
module; only the command line (:mod:`quality_gate.cli`, the edge) reads it: it maps the seed's names
to the current ones before the config is validated, so the rest of the package knows the current
names alone.

=====================================  ===============================================
seed                                    here
=====================================  ===============================================
``--config-name stage_1_warmup``        ``quality-gate warmup`` (run dirs: ``outputs/stage_1_warmup/``)
``--config-name stage_2_selection``     ``quality-gate collect`` (run dirs: ``outputs/stage_2_selection/``)
``scripts/batch_selection.py``          ``quality-gate select root_dir=...``
``scripts/continue_selection.py``       ``quality-gate select router_data_dir=...``
``--config-name stage_3_finetune``      ``quality-gate finetune`` (run dirs: ``outputs/stage_3_finetune/``)
``--config-name stage_4_evaluate``      ``quality-gate evaluate`` (run dirs: ``outputs/stage_4_evaluate/``)
``stage: selection`` (in a config)      ``stage: collect``
``training.lora.lora_alpha=...``        ``training.lora.alpha=...`` (a command-line override)
``warmup(cfg)``                         :func:`quality_gate.stages.warmup.run`
``selection.select(cfg)`` (Stage 2)     :func:`quality_gate.stages.collect.run`
``finetune.train(cfg)`` / ``finetune``  :func:`quality_gate.stages.finetune.run`
``evaluate(cfg)``                       :func:`quality_gate.stages.evaluate.run`
``load_router_data``                    :func:`quality_gate.stats.store.load_router_data`
``get_sample_router_info``              :func:`quality_gate.stats.store.get_sample_router_info`
``compute_token_perplexity``            :func:`quality_gate.stats.collect.compute_token_perplexity`
``FSDP_CONFIG``                         :data:`quality_gate.training.FSDP_CONFIG`
``validate_batch_size_configuration``   :func:`quality_gate.config.gradient_accumulation_steps`
=====================================  ===============================================

The function aliases are imported on first use (PEP 562), so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: ``stage:`` values of the seed's configs -> the stage they mean.
STAGE_ALIASES: dict[str, str] = {"selection": "collect"}

#: Per stage, a key as the seed (or an earlier version) wrote it -> the key here. The seed's
#: stage_3_finetune.yaml writes ``lora_alpha`` under ``training.lora`` (warmup's LoRA group is the same
#: group); Stage 4 named its base model ``model_path`` before the target model became one config group
#: (``model.name`` here, ``training.model.name`` in Stage 3).
KEY_ALIASES: dict[str, dict[str, str]] = {
    "warmup": {"training.lora.lora_alpha": "training.lora.alpha"},
    "finetune": {"training.lora.lora_alpha": "training.lora.alpha"},
    "evaluate": {"model_path": "model.name"},
}

#: config name (``--config-name`` or ``quality-gate <name>``) -> the stage it runs.
CONFIG_STAGES: dict[str, str] = {
    "warmup": "warmup",
    "collect": "collect",
    "select": "select",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "experiment": "experiment",
    "experiment_sweep": "experiment",
    # The seed's config and script names:
    "stage_1_warmup": "warmup",
    "stage_2_selection": "collect",
    "batch_selection": "select",
    "continue_selection": "select",
    "stage_3_finetune": "finetune",
    "stage_4_evaluate": "evaluate",
}

_FUNCTIONS: dict[str, tuple[str, str]] = {
    "warmup": ("quality_gate.stages.warmup", "run"),
    "select": ("quality_gate.stages.collect", "run"),  # the seed's Stage 2 entry: selection.select(cfg)
    "train": ("quality_gate.stages.finetune", "run"),
    "finetune": ("quality_gate.stages.finetune", "run"),
    "evaluate": ("quality_gate.stages.evaluate", "run"),
    "load_router_data": ("quality_gate.stats.store", "load_router_data"),
    "get_sample_router_info": ("quality_gate.stats.store", "get_sample_router_info"),
    "compute_token_perplexity": ("quality_gate.stats.collect", "compute_token_perplexity"),
    "FSDP_CONFIG": ("quality_gate.training", "FSDP_CONFIG"),
    "validate_batch_size_configuration": ("quality_gate.config", "gradient_accumulation_steps"),
}

__all__ = ["CONFIG_STAGES", "KEY_ALIASES", "STAGE_ALIASES", *_FUNCTIONS]


def current_stage_name(cfg: object) -> None:
    """Rename the seed's ``stage:`` value of ``cfg`` (``selection``) to the stage's name here, in place."""
    stage = getattr(cfg, "get", lambda *_: None)("stage")
    if stage in STAGE_ALIASES:
        cfg.stage = STAGE_ALIASES[stage]  # type: ignore[attr-defined]


def current_keys(args: Sequence[str], config_name: str | None) -> list[str]:
    """``args`` with each override of a former key of the config's stage (:data:`KEY_ALIASES`) written
    with the current key, e.g. ``training.lora.lora_alpha=256`` -> ``training.lora.alpha=256`` (logged)."""
    aliases = KEY_ALIASES.get(CONFIG_STAGES.get(config_name or "", ""), {})
    out = []
    for arg in args:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, eq, value = arg[len(prefix) :].partition("=")
        if not arg.startswith("-") and key in aliases:
            log.warning("%s is a former key of this config: read as %s", key, aliases[key])
            arg = f"{prefix}{aliases[key]}{eq}{value}"
        out.append(arg)
    return out


def _validated(run: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    """The seed's stage function ``name``: its config is read as the command line reads it (the seed's
    ``stage:`` value renamed), validated, then passed to the stage's ``run``."""

    def stage_entry(cfg: Any) -> Any:
        from quality_gate.config import validate

        current_stage_name(cfg)
        validate(cfg)
        return run(cfg)

    stage_entry.__name__ = stage_entry.__qualname__ = name
    stage_entry.__doc__ = f"The seed's ``{name}(cfg)``: validates ``cfg``, then runs {run.__module__}.run."
    return stage_entry


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        module, attr = _FUNCTIONS[name]
        target = getattr(importlib.import_module(module), attr)
        return _validated(target, name) if module.startswith("quality_gate.stages.") else target
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
