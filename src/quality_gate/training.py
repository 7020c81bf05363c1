"""Pieces shared by the two training stages (Stage 1 warmup, Stage 3 fine-tune).

* :func:`validate_batch_size_configuration`: gradient accumulation from the total batch size.
* :class:`NonFiniteLossCallback` / :func:`check_finite_loss`: stop on a NaN/inf loss with a clear error.
* :data:`FSDP_CONFIG` / :func:`fsdp_training_kwargs`: FSDP on several CUDA processes, DDP otherwise.
* :func:`last_checkpoint`: the newest ``checkpoint-<step>`` of a run dir, for resuming.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def check_trains_some_steps(training: Any) -> None:
    """Refuse a config that would train zero steps (``training.epochs`` and ``training.max_steps``)."""
    epochs, max_steps = float(training.epochs), int(training.get("max_steps", -1))
    if epochs <= 0 and max_steps <= 0:
        raise ValueError(
            f"training.epochs={training.epochs} and training.max_steps={max_steps} would train zero "
            "steps; set training.epochs > 0 or training.max_steps > 0"
        )


def validate_batch_size_configuration(
    total_batch_size: int, per_device_batch_size: int, world_size: int
) -> int:
    """Return the gradient accumulation steps for ``total = per_device x world_size x accumulation``.

    Raises ``ValueError`` naming the three numbers when ``total`` is not a multiple of
    ``per_device x world_size``.
    """
    for name, value in (
        ("training.batch_size", total_batch_size),
        ("training.per_device_batch_size", per_device_batch_size),
        ("world size", world_size),
    ):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    effective = per_device_batch_size * world_size
    if total_batch_size % effective != 0:
        raise ValueError(
            f"training.batch_size={total_batch_size} is not a multiple of "
            f"training.per_device_batch_size={per_device_batch_size} x world size {world_size} "
            f"= {effective}. Choose a total batch size that is a multiple of {effective}, or change "
            "the per-device batch size."
        )
    return total_batch_size // effective


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def _non_finite_message(step: int, value: float) -> str:
    return (
        f"non-finite training loss {value} at step {step}. Try a lower training.learning_rate, a wider "
        "model dtype (float32, or bfloat16 instead of float16), gradient clipping (training.max_grad_norm), "
        "and check the data for empty or broken records."
    )


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when ``loss`` (a scalar tensor) is NaN or infinite.

    Reading the value forces a device sync, so callers on GPU should call this at logging steps only
    (the Trainer subclasses do); on CPU it costs nothing measurable.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(_non_finite_message(step, value))


class NonFiniteLossCallback(TrainerCallback):
    """Stop training with :class:`NonFiniteLossError` as soon as a logged loss is NaN or infinite.

    The Trainer logs the mean loss since the last log, so one non-finite step poisons that mean and is
    caught at the next logging step (``logging_steps``) without a per-step device sync.
    """

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        for key in ("loss", "train_loss", "quality_loss"):
            value = logs.get(key)
            if value is not None and not math.isfinite(float(value)):
                raise NonFiniteLossError(_non_finite_message(state.global_step, float(value)))


# Decoder layer class to wrap as one FSDP unit, per ``config.model_type``. Models not listed fall back
# to their ``_no_split_modules`` (which transformers sets to the decoder layer for these families).
FSDP_CONFIG: dict[str, dict[str, Any]] = {
    "qwen2": {"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]},
    "qwen3": {"transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"]},
    "llama": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    "mistral": {"transformer_layer_cls_to_wrap": ["MistralDecoderLayer"]},
}


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (``PeftModel.get_base_model``), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def fsdp_layer_classes(model: nn.Module) -> list[str]:
    """Names of the decoder layer classes to wrap: from :data:`FSDP_CONFIG`, else ``_no_split_modules``."""
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type in FSDP_CONFIG:
        return list(FSDP_CONFIG[model_type]["transformer_layer_cls_to_wrap"])
    no_split = list(getattr(base, "_no_split_modules", None) or [])
    if not no_split:
        raise ValueError(
            f"no FSDP wrap class known for model_type={model_type!r} and the model has no "
            "_no_split_modules; add its decoder layer class to quality_gate.training.FSDP_CONFIG."
        )
    return no_split


def fsdp_training_kwargs(model: nn.Module, world_size: int, device_type: str) -> dict[str, Any]:
    """Extra ``TrainingArguments`` kwargs for the process layout.

    * several processes on CUDA: FSDP2 (transformers 5.x default, ``fsdp=True`` + ``fsdp_config``),
      full sharding (``reshard_after_forward``), one unit per decoder layer, full state dict on save so
      checkpoints load in one process. FSDP2 shards per parameter (DTensor), so LoRA's mix of frozen
      and trainable parameters in one unit works without FSDP1's ``use_orig_params``.
    * several processes on CPU: DDP with the gloo backend (NCCL needs CUDA), ``use_cpu`` set.
    * one process: nothing.
    """
    if world_size <= 1:
        return {}
    if device_type == "cuda":
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": fsdp_layer_classes(model),
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
        }
    # accelerate only builds a MULTI_CPU (DDP) state when told the run is CPU-only; without use_cpu the
    # ranks train independently on their shards and never sync gradients. Every LoRA/gate parameter is
    # used in each step, so find_unused_parameters stays off.
    return {"use_cpu": True, "ddp_backend": "gloo", "ddp_find_unused_parameters": False}


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(output_dir: str | Path) -> str | None:
    """Path of the ``checkpoint-<step>`` dir with the highest step that holds ``trainer_state.json``.

    ``checkpoint-final`` (the exported model) is not a resumable checkpoint and is ignored; a
    checkpoint without ``trainer_state.json`` was interrupted while saving and is skipped.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return str(best[1]) if best else None
