"""Stage 3: fine-tune the target model on the selected subset (or the full data, as the baseline).

``python src/main.py --config-name stage_3_finetune dataset.data_path=<selected_data.jsonl>``

* ``dataset.mode: subset`` reads ``dataset.data_path`` (Stage 2's ``selected_data.jsonl`` or any
  data-layer format); ``full`` reads the data layer's sources (``dataset.local`` / ``dataset.hf``).
* ``training.peft_mode: lora`` (seed LoraConfig: r=128, alpha=256 on q/k/v/o/gate/up/down_proj) or
  ``full``. Loss on assistant tokens only, through the target tokenizer's chat template.
* One process: plain training. Several (torchrun / accelerate): FSDP on CUDA, DDP with gloo on CPU
  (:func:`quality_gate.training.fsdp_training_kwargs`).
* Outputs in the run dir: ``checkpoint-<step>/`` (resumable: adapter or model, optimizer, scheduler,
  RNG state), ``checkpoint-final/`` (adapter_config.json + adapter_model.safetensors + tokenizer, or
  the full model), ``train_metrics.json``, ``config.yaml``, ``manifest.json``.
* Rerunning with ``output_dir=<run dir>`` resumes from the last checkpoint; a run whose
  ``checkpoint-final/`` exists is reported as finished and not retrained.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, TaskType, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.training_args import ParallelMode

from quality_gate.data import (
    SFTDataCollator,
    encode_records,
    ensure_chat_template,
    load_local_file,
    load_records,
    records_fingerprint,
    to_hf_dataset,
)
from quality_gate.io import atomic_write_json, atomic_write_jsonl
from quality_gate.models import load_target, sha256_of
from quality_gate.runs import init_run, is_main_process, run_dir_of, update_manifest, world_size
from quality_gate.training import (
    FSDP_CONFIG,  # the seed's place for the per-family FSDP table; it lives in training.py
    NonFiniteLossCallback,
    check_trains_some_steps,
    fsdp_training_kwargs,
    last_checkpoint,
    validate_batch_size_configuration,
)

log = logging.getLogger(__name__)

__all__ = ["FSDP_CONFIG", "finetune", "get_model_and_tokenizer", "get_peft_config", "run", "train"]

PEFT_MODES = ("lora", "full")
DATASET_MODES = ("subset", "full")
FINAL_DIR = "checkpoint-final"
METRICS_FILE = "train_metrics.json"
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"  # same name as the data layer's report in full mode
# The seed's targets: every attention and MLP projection of Qwen / Llama / Mistral decoder layers.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def get_model_and_tokenizer(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The plain target model (``training.model.*``) and its tokenizer, with a chat template."""
    spec = cfg.training.model
    model, tokenizer = load_target(
        str(spec.name),
        dtype=str(spec.get("dtype", "auto")),
        trust_remote_code=bool(spec.get("trust_remote_code", False)),
        attn_implementation=spec.get("attn_implementation"),
    )
    ensure_chat_template(tokenizer, cfg.dataset.get("chat_template"))
    return model, tokenizer


def get_peft_config(cfg: DictConfig) -> LoraConfig:
    """LoRA on the attention and MLP projections (seed: r=128, alpha=256)."""
    lora = cfg.training.get("lora") or {}
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(lora.get("r", 128)),
        lora_alpha=int(lora.get("alpha", 256)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(lora.get("target_modules") or LORA_TARGET_MODULES),
    )


def _subset_file(cfg: DictConfig) -> Path:
    """``dataset.data_path`` checked to be a non-empty file (subset mode)."""
    path = cfg.dataset.get("data_path")
    if not path:
        raise ValueError(
            "dataset.data_path is not set: pass the Stage 2 output, e.g. "
            "dataset.data_path=outputs/stage_2_selection/<date>/<time>/selected_data.jsonl "
            "(or dataset.mode=full to train on the dataset.local / dataset.hf sources)"
        )
    file = Path(str(path))
    if not file.is_file():
        raise FileNotFoundError(f"dataset.data_path={file} does not exist or is not a file")
    if file.stat().st_size == 0:
        raise ValueError(f"dataset.data_path={file} is empty: did Stage 2 select no records?")
    return file


def load_training_records(cfg: DictConfig, run_dir: Path) -> tuple[list[dict], dict[str, Any]]:
    """Records for ``dataset.mode`` and a description of their source (path and sha256 for subset).

    Rows that cannot be read as a conversation are skipped and listed in ``skipped_rows.jsonl``
    (``dataset.strict=true``: the first one is an error); no usable row at all is an error.
    """
    ds = cfg.dataset
    if ds.mode == "full":
        records = load_records(ds, seed=int(cfg.seed), report_dir=run_dir)
        source: dict[str, Any] = {"mode": "full", "dataset_from": str(ds.dataset_from)}
    else:
        file = _subset_file(cfg)
        records, skipped = load_local_file(
            file, str(ds.get("dataset_name") or "selected"), strict=bool(ds.strict)
        )
        if is_main_process():
            atomic_write_jsonl(run_dir / SKIPPED_ROWS_FILE, [row.as_dict() for row in skipped])
        if not records:
            first = f"; first: {skipped[0]}" if skipped else ""
            raise ValueError(
                f"no usable records in dataset.data_path={file}: {len(skipped)} rows skipped, none with "
                "`messages` (or ShareGPT `conversations`, Alpaca `instruction`/`output`, "
                f"`question`/`answer`) and an assistant turn{first}; see {run_dir / SKIPPED_ROWS_FILE}"
            )
        source = {
            "mode": "subset",
            "data_path": str(file),
            "sha256": sha256_of(file),
            "skipped_rows": len(skipped),
        }
    source["num_records"] = len(records)
    source["records_fingerprint"] = records_fingerprint(records)
    return records, source


def build_train_dataset(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, run_dir: Path
) -> tuple[Dataset, dict[str, Any]]:
    """Records -> encoded samples (labels on assistant tokens only) -> ``datasets.Dataset``.

    Returns the dataset and ``{"source", "encode_stats", "num_samples", "num_tokens",
    "num_target_tokens"}``.
    """
    records, source = load_training_records(cfg, run_dir)
    samples, stats, _skipped = encode_records(
        records, tokenizer, int(cfg.dataset.max_sequence_length), str(cfg.dataset.truncation)
    )
    if not samples:
        raise ValueError(
            "no training samples left after encoding; check dataset.max_sequence_length and "
            "dataset.truncation (drop skips every sample longer than the limit)"
        )
    dataset = to_hf_dataset(samples)
    info = {
        "source": source,
        "encode_stats": stats.as_dict(),
        "num_samples": len(dataset),
        "num_tokens": sum(len(ids) for ids in dataset["input_ids"]),
        "num_target_tokens": sum(sum(1 for x in labels if x != -100) for labels in dataset["labels"]),
    }
    log.info("Stage 3 data: %d samples, %d tokens (%s)", info["num_samples"], info["num_tokens"], source)
    return dataset, info


def _report_to(cfg: DictConfig) -> list[str]:
    """``training.report_to`` with loggers whose package is missing dropped (with a warning)."""
    wanted = cfg.training.get("report_to") or []
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    kept = []
    for name in wanted:
        if name in packages and importlib.util.find_spec(packages[name]) is None:
            log.warning("training.report_to includes %s but it is not installed; not logging to it", name)
            continue
        kept.append(str(name))
    return kept


def training_arguments(cfg: DictConfig, run_dir: Path, model: torch.nn.Module) -> TrainingArguments:
    t = cfg.training
    accumulation = validate_batch_size_configuration(
        int(t.batch_size), int(t.per_device_batch_size), world_size()
    )
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=int(t.per_device_batch_size),
        gradient_accumulation_steps=accumulation,
        num_train_epochs=float(t.epochs),
        max_steps=int(t.max_steps),
        learning_rate=float(t.learning_rate),
        lr_scheduler_type=str(t.lr_scheduler_type),
        warmup_steps=int(t.warmup_steps),
        weight_decay=float(t.weight_decay),
        max_grad_norm=float(t.max_grad_norm),
        logging_steps=int(t.logging_steps),
        logging_first_step=True,
        # The default replaces NaN/inf step losses by the running mean before logging, which would
        # hide exactly what NonFiniteLossCallback has to see.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=int(t.save_steps),
        save_total_limit=t.get("save_total_limit"),
        report_to=_report_to(cfg),
        activation_checkpointing=bool(t.gradient_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        dataloader_num_workers=int(t.get("dataloader_num_workers", 0)),
        disable_tqdm=not is_main_process(),
        **fsdp_training_kwargs(model, world_size(), device_type),
    )


def _validate(cfg: DictConfig) -> None:
    if cfg.training.peft_mode not in PEFT_MODES:
        raise ValueError(
            f"training.peft_mode={cfg.training.peft_mode!r} is not supported; use one of {list(PEFT_MODES)}"
        )
    if cfg.dataset.mode not in DATASET_MODES:
        raise ValueError(
            f"dataset.mode={cfg.dataset.mode!r} is not supported; use one of {list(DATASET_MODES)}"
        )
    check_trains_some_steps(cfg.training)
    if cfg.dataset.mode == "subset":
        _subset_file(cfg)


def save_final(trainer: Trainer, run_dir: Path) -> Path:
    """Write ``checkpoint-final/`` (adapter or full model, plus tokenizer) through a temporary dir.

    Every rank calls this: under FSDP ``save_model`` gathers the full state dict collectively; only
    rank 0 writes and then renames, so a crash never leaves a half-written final checkpoint.
    """
    final = run_dir / FINAL_DIR
    tmp = run_dir / f".{FINAL_DIR}.tmp"
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _warn_on_changed_config(cfg: DictConfig, run_dir: Path) -> None:
    """Warn when a resumed run's training / dataset settings differ from the ones it started with."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.load(saved_file)
    before = _flatten(OmegaConf.to_container(OmegaConf.masked_copy(saved, ["training", "dataset"])))
    now = _flatten(OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["training", "dataset"]), resolve=True))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        log.warning(
            "resuming %s with settings that differ from its start: %s; the optimizer and scheduler state "
            "come from the checkpoint, so the run mixes both. Start a new run unless this is intended "
            "(e.g. a larger training.max_steps).",
            run_dir,
            ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed),
        )


def _distributed_kind(args: TrainingArguments) -> str:
    """What the Trainer really set up (not what was asked for): fsdp, ddp or none."""
    if args.fsdp:
        return "fsdp"
    return "ddp" if args.parallel_mode == ParallelMode.DISTRIBUTED else "none"


def _loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    curve = [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e and "step" in e]
    if not curve:
        return {"curve": []}
    losses = [point["loss"] for point in curve]
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "curve": curve}


def fine_tune(cfg: DictConfig) -> Trainer | None:
    """Stage 3 body; returns the Trainer (its model is the trained one), or None for a finished run."""
    run_dir = run_dir_of(cfg)
    if (run_dir / FINAL_DIR).is_dir():
        log.info(
            "Stage 3 run %s is already finished (%s/ exists); nothing to train. To train again start "
            "a new run: drop output_dir / hydra.run.dir so that a fresh run dir is made.",
            run_dir,
            FINAL_DIR,
        )
        return None
    _validate(cfg)
    resume_from = last_checkpoint(run_dir)
    if resume_from:
        _warn_on_changed_config(cfg, run_dir)
    run_dir = init_run(cfg, "finetune", target_model=str(cfg.training.model.name), resumed_from=resume_from)
    started = time.perf_counter()
    set_seed(int(cfg.seed))
    model, tokenizer = get_model_and_tokenizer(cfg)
    train_dataset, data_info = build_train_dataset(cfg, tokenizer, run_dir)
    update_manifest(run_dir, dataset_source=data_info["source"])
    if cfg.training.peft_mode == "lora":
        model = get_peft_model(model, get_peft_config(cfg))
        trainable, total = model.get_nb_trainable_parameters()
        log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)

    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, run_dir, model),
        train_dataset=train_dataset,
        data_collator=SFTDataCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[NonFiniteLossCallback()],
    )
    if resume_from:
        log.info("resuming Stage 3 from %s (optimizer, scheduler and RNG state)", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    final = save_final(trainer, run_dir)
    if not is_main_process():
        return trainer

    metrics = {
        "peft_mode": str(cfg.training.peft_mode),
        "target_model": str(cfg.training.model.name),
        **data_info,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": result.training_loss,
        "loss": _loss_summary(trainer.state.log_history),
        "resumed_from": resume_from,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "world_size": world_size(),
        "distributed": _distributed_kind(trainer.args),
    }
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    update_manifest(run_dir, final_checkpoint=str(final), train_metrics=METRICS_FILE)
    log.info(
        "Stage 3 done in %.1fs: %d steps, loss %s -> %s; final checkpoint %s",
        metrics["wall_time_s"],
        metrics["global_step"],
        metrics["loss"].get("first"),
        metrics["loss"].get("last"),
        final,
    )
    return trainer


def run(cfg: DictConfig) -> None:
    """Stage 3: fine-tune ``training.model.name`` on the selected (or full) data; resumable."""
    fine_tune(cfg)


train = run
finetune = run
