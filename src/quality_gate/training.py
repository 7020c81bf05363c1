"""Pieces shared by the two training stages (Stage 1 warmup, Stage 3 fine-tune).

* :func:`build_sft_dataset`: records -> the ``datasets.Dataset`` the Trainer reads.
* :func:`build_trainer`: the one place a stage's Trainer is built (arguments, collator, callbacks);
  :func:`training_arguments` the one place ``TrainingArguments`` are built from a ``training`` config.
* :class:`LMTrainer`: the base of the stages' Trainers, with the LM loss that skips the full logits.
* :func:`lora_config` / :func:`wrap_lora`: LoRA on the modules a stage names.
* :func:`validate_batch_size_configuration`: gradient accumulation from the total batch size.
* :class:`NonFiniteLossCallback` / :func:`check_finite_loss`: stop on a NaN/inf loss with a clear error.
* :data:`FSDP_CONFIG` / :func:`process_layout_kwargs`: FSDP on several CUDA processes, DDP otherwise.
* :func:`report_to`: the configured loggers that are installed.
* :func:`last_checkpoint`: the newest ``checkpoint-<step>`` of a run dir; :func:`resume_checkpoint` the
  newest intact one (:func:`checkpoint_problem`), a damaged one moved aside with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from quality_gate.config import gradient_accumulation_steps as validate_batch_size_configuration
from quality_gate.data import SFTDataCollator, to_hf_dataset
from quality_gate.data.encode import encode_with_config
from quality_gate.errors import ConfigError, DataError, NonFiniteLossError
from quality_gate.nll import causal_lm_loss_in_chunks
from quality_gate.runs import is_main_process, world_size

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "FSDP_CONFIG",
    "LMTrainer",
    "NonFiniteLossCallback",
    "NonFiniteLossError",
    "build_sft_dataset",
    "build_trainer",
    "check_finite_loss",
    "checkpoint_problem",
    "fsdp_layer_classes",
    "last_checkpoint",
    "lora_config",
    "process_layout_kwargs",
    "report_to",
    "resume_checkpoint",
    "training_arguments",
    "validate_batch_size_configuration",
    "wrap_lora",
]

TrainerT = TypeVar("TrainerT", bound="LMTrainer")


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
        raise ConfigError(
            f"no FSDP wrap class known for model_type={model_type!r} and the model has no "
            "_no_split_modules; add its decoder layer class to quality_gate.training.FSDP_CONFIG."
        )
    return no_split


def process_layout_kwargs(model: nn.Module, world_size: int, device_type: str, shard: bool) -> dict[str, Any]:
    """Extra ``TrainingArguments`` kwargs for the process layout.

    * several processes on CUDA with ``shard``: FSDP2 (transformers 5.x default, ``fsdp=True`` +
      ``fsdp_config``), full sharding (``reshard_after_forward``), one unit per decoder layer, full
      state dict on save so checkpoints load in one process. FSDP2 shards per parameter (DTensor),
      so LoRA's mix of frozen and trainable parameters in one unit works without FSDP1's
      ``use_orig_params``.
    * several processes on CUDA without ``shard`` (Stage 1 trains only the gates): DDP over NCCL.
    * several processes on CPU: DDP with the gloo backend (NCCL needs CUDA), ``use_cpu`` set.
    * one process: nothing (the Trainer picks the device).
    """
    if world_size <= 1:
        return {}
    if device_type == "cuda" and not shard:
        return {"ddp_find_unused_parameters": False}
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


#: A trained weight larger than this in magnitude is taken for damage (no LM holds such a value; bytes
#: overwritten in place, as with 1e30, keep the file's size and its safetensors header intact).
MAX_ABS_WEIGHT = 1e6


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why the Trainer checkpoint dir ``checkpoint`` cannot be resumed from, or None when it can.

    Checked: ``trainer_state.json`` and ``adapter_config.json`` parse as JSON objects; every
    ``*.safetensors`` opens and holds finite values of magnitude <= :data:`MAX_ABS_WEIGHT` (a file
    truncated or overwritten in place); every ``*.pt`` / ``*.pth`` / ``*.bin`` the Trainer or peft loads
    (optimizer, scheduler, RNG state, weights; not ``training_args.bin``) is an intact zip (each member's
    CRC32, so flipped or missing bytes are caught) of plain tensors (a pickle of other objects is
    refused without unpickling it; the numpy arrays the Trainer allows in ``rng_state.pth`` pass). The
    cost is one read of the files.
    """
    import zipfile

    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    from quality_gate.errors import DataError
    from quality_gate.io import load_tensors

    root = Path(checkpoint)
    for name in ("trainer_state.json", "adapter_config.json"):
        path = root / name
        if name == "adapter_config.json" and not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            return f"{name} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
        if not isinstance(data, dict) or (name == "trainer_state.json" and "global_step" not in data):
            return f"{name} is not what the Trainer writes"
    for path in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and tensor.numel():
                        if not bool(torch.isfinite(tensor).all()):
                            return f"{path.name} holds non-finite values (tensor {key})"
                        peak = float(tensor.abs().max())
                        if peak > MAX_ABS_WEIGHT:
                            return f"{path.name} holds an absurd value {peak:.3g} (tensor {key})"
        # SafetensorError (truncated, garbled header), OSError, ...: the file cannot be read.
        except Exception as err:
            return f"{path.name} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    # training_args.bin is a pickle of TrainingArguments by design, written for the record and never read
    # back by a resume.
    tensors = [*root.glob("*.pt"), *root.glob("*.pth"), *root.glob("*.bin")]
    for path in sorted(p for p in tensors if p.name != "training_args.bin"):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
            return f"{path.name} is not an intact torch file ({type(err).__name__})"
        if bad is not None:
            return f"{path.name} is damaged (member {bad} fails its CRC check)"
        try:
            with safe_globals():  # the Trainer's own allowlist (numpy arrays in rng_state.pth)
                load_tensors(path, "", mmap=True)
        except DataError:
            return f"{path.name} is not a file of plain tensors (a pickle of other objects is never loaded)"
    return None


def resume_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-<step>`` of a run dir that can be resumed from (:func:`checkpoint_problem`).

    A damaged one is named in a warning and moved aside to ``damaged-checkpoint-<step>`` (rank 0), so that
    the run falls back to the one before and later saves never mix with it; one without
    ``trainer_state.json`` was interrupted while saving and is skipped, as by :func:`last_checkpoint`.
    When checkpoints exist but every one is damaged, a :class:`~quality_gate.errors.DataError` names them
    (delete them to train from the start).
    """
    from quality_gate.errors import DataError

    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), child)
        for child in root.iterdir()
        if (m := _CHECKPOINT_RE.match(child.name))
        and child.is_dir()
        and (child / "trainer_state.json").exists()
    )
    damaged = []
    for _, child in reversed(steps):
        problem = checkpoint_problem(child)
        if problem is None:
            if damaged:
                log.warning("resuming from %s, the newest checkpoint that is intact", child)
            return str(child)
        aside = root / f"damaged-{child.name}"
        if is_main_process():
            k = 1
            while aside.exists():
                k += 1
                aside = root / f"damaged-{child.name}-{k}"
            child.rename(aside)
        log.warning("%s cannot be resumed from: %s; moved it to %s", child, problem, aside.name)
        damaged.append(f"{child.name}: {problem}")
    if damaged:
        raise DataError(
            f"every checkpoint of {root} is damaged ({'; '.join(damaged)}); they are kept as damaged-*: "
            "delete them to train from the start, or start a new run"
        )
    return None


def report_to(wanted: Any) -> list[str]:
    """The loggers of ``training.report_to`` whose package is installed (others dropped, with a warning)."""
    wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    kept = []
    for name in wanted:
        if name in packages and importlib.util.find_spec(packages[name]) is None:
            log.warning("training.report_to includes %s but it is not installed; not logging to it", name)
            continue
        kept.append(str(name))
    return kept


def training_arguments(
    t: Any,
    run_dir: Path,
    *,
    seed: int,
    model: nn.Module,
    shard: bool,
    save_steps: int | None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    save_total_limit: int | None = None,
) -> TrainingArguments:
    """``TrainingArguments`` from a stage's ``training`` config ``t`` (Stages 1 and 3).

    ``shard``: FSDP on several CUDA processes (Stage 3) instead of DDP (Stage 1, gates only).
    ``save_steps=None`` saves no Trainer checkpoints (Stage 1 saves the gates itself).
    """
    accumulation = validate_batch_size_configuration(
        int(t.batch_size), int(t.per_device_batch_size), world_size()
    )
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    saving: dict[str, Any] = (
        {"save_strategy": "no"}
        if save_steps is None
        else {"save_strategy": "steps", "save_steps": int(save_steps), "save_total_limit": save_total_limit}
    )
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=int(t.per_device_batch_size),
        gradient_accumulation_steps=accumulation,
        num_train_epochs=float(t.epochs),
        max_steps=int(t.max_steps),
        learning_rate=float(t.learning_rate),
        lr_scheduler_type=str(t.lr_scheduler_type),
        warmup_steps=int(t.warmup_steps),
        weight_decay=float(weight_decay),
        max_grad_norm=float(max_grad_norm),
        logging_steps=int(t.logging_steps),
        logging_first_step=True,
        # The default replaces NaN/inf step losses by the running mean before logging, which would
        # hide exactly what NonFiniteLossCallback has to see.
        logging_nan_inf_filter=False,
        report_to=report_to(t.report_to),
        activation_checkpointing=bool(t.gradient_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        seed=int(seed),
        data_seed=int(seed),
        dataloader_num_workers=int(t.dataloader_num_workers),
        dataloader_pin_memory=device_type == "cuda",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not is_main_process(),
        **saving,
        **process_layout_kwargs(model, world_size(), device_type, shard),
    )


def lora_config(lora: Any, target_modules: list[str]) -> Any:
    """A causal-LM ``peft.LoraConfig`` from a ``training.lora`` group (``r``, ``alpha``, ``dropout``)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(lora.r),
        lora_alpha=int(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=target_modules,
    )


def wrap_lora(model: nn.Module, config: Any) -> nn.Module:
    """``model`` with the LoRA adapters of ``config`` (a ``peft.LoraConfig``), its trainable share logged."""
    from peft import get_peft_model

    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def build_sft_dataset(
    records: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, dataset_cfg: Any, advice: str
) -> tuple[Any, dict[str, int]]:
    """Records -> encoded samples (labels on the assistant tokens only) -> ``datasets.Dataset``.

    Encodes with ``dataset_cfg.max_sequence_length`` / ``truncation``; returns the dataset (columns
    ``input_ids``, ``labels``, ``id``; one row per kept sample, in record order) and the encode counts
    (``EncodeStats.as_dict``). Records dropped while encoding are logged; none kept is a
    :class:`DataError` that ends with ``check <advice>``.
    """
    samples, stats, skipped = encode_with_config(records, tokenizer, dataset_cfg)
    if skipped:
        log.warning("%d records dropped while encoding; first: %s", len(skipped), skipped[0])
    if not samples:
        raise DataError(f"no training samples left after encoding; check {advice}")
    return to_hf_dataset(samples), stats.as_dict()


class LMTrainer(Trainer):
    """Base of the stages' Trainers: ``lm_loss_chunk_tokens`` (``training.lm_loss_chunk_tokens``) > 0
    lets :meth:`chunked_lm_loss` compute the causal-LM loss without the full-vocabulary logits."""

    def __init__(self, *args: Any, lm_loss_chunk_tokens: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lm_loss_chunk_tokens = int(lm_loss_chunk_tokens)

    def chunked_lm_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], reduction: str = "mean"
    ) -> tuple[torch.Tensor, Any]:
        """(the LM loss over the labelled positions, ``mean`` or ``sum``; the model's outputs), without
        ``(B, T, V)`` logits: the whole model runs (its wrappers see a normal forward), its head on one
        position only (:func:`quality_gate.nll.causal_lm_loss_in_chunks`)."""
        inner = self.accelerator.unwrap_model(model)
        return causal_lm_loss_in_chunks(model, inner, inputs, self.lm_loss_chunk_tokens, reduction)


def build_trainer(
    trainer_class: type[TrainerT],
    cfg: Any,
    run_dir: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Any,
    *,
    arguments: Mapping[str, Any],
    callbacks: Sequence[TrainerCallback] = (),
    save_tokenizer: bool = False,
    **stage_kwargs: Any,
) -> TrainerT:
    """A stage's Trainer (``trainer_class``, the stage's own :class:`LMTrainer`) over ``train_dataset``.

    * Arguments: :func:`training_arguments` of ``cfg.training`` with ``seed=cfg.seed``, plus
      ``arguments`` (``shard``, ``save_steps`` and the stage's other keywords).
    * Collator: :class:`~quality_gate.data.SFTDataCollator` padding with the tokenizer's pad token.
    * Callbacks: :class:`NonFiniteLossCallback`, then ``callbacks``.
    * ``save_tokenizer``: the tokenizer is the Trainer's ``processing_class`` (saved with the model).
    * ``lm_loss_chunk_tokens`` from ``cfg.training`` and ``stage_kwargs`` go to ``trainer_class``.
    """
    return trainer_class(
        model=model,
        args=training_arguments(cfg.training, run_dir, seed=int(cfg.seed), model=model, **arguments),
        train_dataset=train_dataset,
        data_collator=SFTDataCollator(tokenizer.pad_token_id),
        processing_class=tokenizer if save_tokenizer else None,
        callbacks=[NonFiniteLossCallback(), *callbacks],
        lm_loss_chunk_tokens=int(cfg.training.lm_loss_chunk_tokens),
        **stage_kwargs,
    )
