"""Stage 3 (finetune): fine-tune the target model on the selection (or the full data, the baseline).

``quality-gate finetune dataset.data_path=<selected_data.jsonl>`` (seed: ``python src/main.py
--config-name stage_3_finetune ...``; several GPUs: ``torchrun --nproc_per_node=N src/main.py
--config-name finetune ...``)

* ``dataset.mode: subset`` reads ``dataset.data_path`` (Stage 2's ``selected_data.jsonl`` or any
  data-layer format); ``full`` reads the data layer's sources (``dataset.local`` / ``dataset.hf``).
* ``training.peft_mode: lora`` (seed LoraConfig: r=128, alpha=256 on q/k/v/o/gate/up/down_proj) or
  ``full``. Loss on assistant tokens only, through the target tokenizer's chat template.
* One process: plain training. Several (torchrun / accelerate): FSDP on CUDA, DDP with gloo on CPU
  (:func:`quality_gate.training.process_layout_kwargs`).
* Outputs in the run dir: ``checkpoint-<step>/`` (resumable: adapter or model, optimizer, scheduler,
  RNG state), ``checkpoint-final/`` (adapter_config.json + adapter_model.safetensors + tokenizer, or
  the full model), ``train_metrics.json``, ``config.yaml``, ``manifest.json``.
* Rerunning with ``output_dir=<run dir>`` resumes from the last checkpoint; a run whose
  ``checkpoint-final/`` exists is reported as finished and not retrained. A resume whose settings
  change what the checkpoint holds (model, peft_mode, LoRA rank or target modules) is refused before
  anything is loaded; other changes are warnings. ``train_loss`` is the mean over every step of the
  run, also after a resume.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.training_args import ParallelMode

from quality_gate.data import ensure_chat_template, load_local_file, load_records, records_fingerprint
from quality_gate.data.encode import IGNORE_INDEX
from quality_gate.data.sources import SKIPPED_ROWS_FILE
from quality_gate.errors import ConfigError, DataError, MissingPathError
from quality_gate.io import atomic_dir, atomic_write_json, atomic_write_jsonl, normalize_modes, sha256_file
from quality_gate.model_sources import check_model_source
from quality_gate.models import load_options, load_target
from quality_gate.runs import (
    init_run,
    is_main_process,
    read_manifest,
    run_dir_of,
    update_manifest,
    world_size,
)
from quality_gate.training import (
    LMTrainer,
    build_sft_dataset,
    build_trainer,
    lora_config,
    resume_checkpoint,
    wrap_lora,
)

log = logging.getLogger(__name__)

FINAL_DIR = "checkpoint-final"
METRICS_FILE = "train_metrics.json"


def get_model_and_tokenizer(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The plain target model (``training.model.*``) and its tokenizer, with a chat template."""
    spec = cfg.training.model
    model, tokenizer = load_target(str(spec.name), **load_options(spec), key="training.model.name")
    ensure_chat_template(tokenizer, cfg.dataset.chat_template)
    return model, tokenizer


def get_peft_config(cfg: DictConfig) -> LoraConfig:
    """LoRA on the attention and MLP projections (seed: r=128, alpha=256)."""
    return lora_config(cfg.training.lora, list(cfg.training.lora.target_modules))


def _subset_file(cfg: DictConfig) -> Path:
    """``dataset.data_path`` checked to be a non-empty file (subset mode; the schema checks it is set)."""
    file = Path(str(cfg.dataset.data_path))
    if not file.is_file():
        raise MissingPathError(f"dataset.data_path={file} does not exist or is not a file")
    if file.stat().st_size == 0:
        raise DataError(f"dataset.data_path={file} is empty: did the selection keep no records?")
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
        records, skipped = load_local_file(file, str(ds.dataset_name), strict=bool(ds.strict))
        if is_main_process():
            atomic_write_jsonl(run_dir / SKIPPED_ROWS_FILE, [row.as_dict() for row in skipped])
        if not records:
            first = f"; first: {skipped[0]}" if skipped else ""
            raise DataError(
                f"no usable records in dataset.data_path={file}: {len(skipped)} rows skipped, none with "
                "`messages` (or ShareGPT `conversations`, Alpaca `instruction`/`output`, "
                f"`question`/`answer`) and an assistant turn{first}; see {run_dir / SKIPPED_ROWS_FILE}"
            )
        source = {
            "mode": "subset",
            "data_path": str(file),
            "sha256": sha256_file(file),
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
    dataset, encode_stats = build_sft_dataset(
        records,
        tokenizer,
        cfg.dataset,
        "dataset.max_sequence_length and dataset.truncation (drop skips every sample longer than the limit)",
    )
    info = {
        "source": source,
        "encode_stats": encode_stats,
        "num_samples": len(dataset),
        "num_tokens": sum(len(ids) for ids in dataset["input_ids"]),
        "num_target_tokens": sum(sum(1 for x in labels if x != IGNORE_INDEX) for labels in dataset["labels"]),
    }
    log.info("Stage 3 data: %d samples, %d tokens (%s)", info["num_samples"], info["num_tokens"], source)
    return dataset, info


def save_final(trainer: Trainer, run_dir: Path) -> Path:
    """Write ``checkpoint-final/`` (adapter or full model, plus tokenizer) through a temporary dir.

    Every rank calls this: under FSDP ``save_model`` gathers the full state dict collectively; only
    rank 0 writes and swaps its dir in (:func:`~quality_gate.io.atomic_dir`), so a crash never leaves a
    half-written final checkpoint.
    """
    final = run_dir / FINAL_DIR
    with atomic_dir(final, install=is_main_process()) as tmp:
        trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    return final


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


# Settings that decide the shapes or the kind of what a checkpoint holds: resuming with another value
# would fail inside torch (size mismatch) or silently train another model.
RESUME_INCOMPATIBLE = ("training.model.name", "training.peft_mode")
RESUME_INCOMPATIBLE_LORA = ("training.lora.r", "training.lora.target_modules")


def _same_setting(key: str, before: Any, now: Any) -> bool:
    """Equal as far as the checkpoint is concerned: one model dir given two ways, modules in any order."""
    if before == now:
        return True
    if key == "training.model.name" and isinstance(before, str) and isinstance(now, str):
        a, b = Path(before).expanduser(), Path(now).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    if key == "training.lora.target_modules" and isinstance(before, list) and isinstance(now, list):
        return sorted(map(str, before)) == sorted(map(str, now))
    return False


def check_resume_config(cfg: DictConfig, run_dir: Path, checkpoint: str) -> None:
    """Compare a resumed run's ``training`` / ``dataset`` settings with those it started with.

    Changes that make ``checkpoint`` unloadable or another model (:data:`RESUME_INCOMPATIBLE`, and the
    LoRA shape when both runs use LoRA) are a :class:`ConfigError` naming each key, old -> new; other
    changes are a warning. Runs before anything is loaded or written.
    """
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    try:
        saved = OmegaConf.load(saved_file)
        if not isinstance(saved, DictConfig):
            raise ValueError(f"a YAML {type(saved).__name__}, not a mapping")
    except Exception as err:  # yaml's ScannerError / ParserError, OmegaConf's errors, a list: damaged
        raise ConfigError(
            f"{saved_file} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:100]}); it holds the "
            f"settings {run_dir} was started with, which a resume from {Path(checkpoint).name} is checked "
            "against: restore it, or start a new run (drop output_dir / hydra.run.dir)"
        ) from None
    before = _flatten(OmegaConf.to_container(OmegaConf.masked_copy(saved, ["training", "dataset"])))
    now = _flatten(OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["training", "dataset"]), resolve=True))
    changed = sorted(k for k in before.keys() | now.keys() if not _same_setting(k, before.get(k), now.get(k)))
    lora_both = before.get("training.peft_mode") == now.get("training.peft_mode") == "lora"
    fatal = [k for k in changed if k in RESUME_INCOMPATIBLE or (lora_both and k in RESUME_INCOMPATIBLE_LORA)]
    if fatal:
        raise ConfigError(
            f"output_dir={run_dir} cannot be resumed from {Path(checkpoint).name} with these settings: "
            + "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in fatal)
            + ". The checkpoint was trained with the old values: rerun with them, or start a new run "
            "(drop output_dir / hydra.run.dir)."
        )
    if changed:
        log.warning(
            "resuming %s with settings that differ from its start: %s; the optimizer and scheduler state "
            "come from the checkpoint, so the run mixes both. Start a new run unless this is intended "
            "(e.g. a larger training.max_steps).",
            run_dir,
            ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed),
        )


def check_resume_data(run_dir: Path, checkpoint: str, source: dict[str, Any]) -> None:
    """A resume must train on the data the checkpoint was trained on: ``source`` (``sha256`` of the
    subset file, else the ``records_fingerprint``) against the ``dataset_source`` the run's manifest
    recorded when it started. Another file, or the same path rewritten (a new ``select``), is a
    :class:`ConfigError` naming both; a manifest without a record (older runs) is not checked."""
    before = read_manifest(run_dir).get("dataset_source")
    if not isinstance(before, dict):
        return
    key = "sha256" if source.get("mode") == "subset" and before.get("sha256") else "records_fingerprint"
    if before.get(key) is None or source.get(key) is None or before.get(key) == source.get(key):
        return  # nothing recorded, or not read yet (the records are compared once they are)
    what = (
        f"dataset.data_path={source.get('data_path')} has sha256 {source.get('sha256')}"
        if key == "sha256"
        else f"the {source.get('mode')} data has records fingerprint {source.get('records_fingerprint')}"
    )
    was = f"{before.get('data_path')} with sha256" if key == "sha256" else "records fingerprint"
    raise ConfigError(
        f"output_dir={run_dir} cannot be resumed from {Path(checkpoint).name} on other data: {what}, but the "
        f"run started on {was} {before.get(key)} (manifest.json dataset_source). The checkpoint was trained "
        "on that data: restore it to resume, or start a new run on the new data (drop output_dir / "
        "hydra.run.dir)."
    )


def _subset_source(cfg: DictConfig) -> dict[str, Any]:
    """What :func:`check_resume_data` compares for ``dataset.mode=subset``, before anything is read."""
    file = _subset_file(cfg)
    return {"mode": "subset", "data_path": str(file), "sha256": sha256_file(file)}


class CheckpointCallback(TrainerCallback):
    """What each ``checkpoint-<step>/`` needs beyond the Trainer's own saving.

    * A log entry at its step: the Trainer logs the mean loss every ``logging_steps`` only, so a
      checkpoint between two logs would carry a log history without its last steps, and the
      whole-run loss of a run resumed from it (:func:`whole_run_loss`) would miss them.
    * Normal file modes (:func:`quality_gate.io.normalize_modes`): safetensors writes the weights 0600.
    """

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            control.should_log = True

    on_epoch_end = on_step_end

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            normalize_modes(checkpoint)


def whole_run_loss(
    history: list[dict[str, Any]], loss_this_call: float, start_step: int, end_step: int
) -> float:
    """Mean training loss per optimizer step over steps ``1 .. end_step``, also after a resume.

    ``Trainer.train`` returns the mean over the steps of its own call (``start_step + 1 .. end_step``);
    the steps before the checkpoint it resumed from are read from the log history, where each ``loss``
    is the mean over the steps since the previous entry. :class:`CheckpointCallback` logs at every
    save, so the history of a checkpoint covers every step up to it.
    """
    if start_step <= 0:
        return loss_this_call
    total, last = 0.0, 0
    for entry in history:
        step = entry.get("step")
        if "loss" in entry and step is not None and last < step <= start_step:
            total += float(entry["loss"]) * (step - last)
            last = step
    if last != start_step:
        log.warning(
            "the log history of the resumed checkpoint ends at step %d, not %d (a checkpoint written "
            "by an older version); train_loss leaves out steps %d..%d",
            last,
            start_step,
            last + 1,
            start_step,
        )
    steps = last + (end_step - start_step)
    return (total + loss_this_call * (end_step - start_step)) / max(steps, 1)


class Stage3Trainer(LMTrainer):
    """``Trainer`` whose causal-LM loss can skip the full-vocabulary logits
    (``training.lm_loss_chunk_tokens``); with 0 it is the plain Trainer.

    The chunked loss follows the Trainer's own reduction: a sum divided by ``num_items_in_batch`` (the
    labelled positions of the whole accumulated batch, times the processes when tokens are averaged
    across devices), else the mean of the micro-batch.
    """

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.lm_loss_chunk_tokens <= 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            total, outputs = self.chunked_lm_loss(model, inputs, "sum")
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss, outputs = self.chunked_lm_loss(model, inputs)
        return (loss, outputs) if return_outputs else loss


def _checkpoint_step(checkpoint: str | None) -> int:
    if not checkpoint:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["global_step"])


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


def flops_estimate(model: nn.Module, tokens: int, peft_mode: str) -> int:
    """Training FLOPs ~ 2 N T forward + 2 N T activation gradients (+ 2 N T weight gradients in full mode),
    N the parameters of the (base) model, T the trained tokens; LoRA's own weights are negligible."""
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return (6 if peft_mode == "full" else 4) * n * tokens


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has its ``checkpoint-final/`` (then it is reported, not retrained)."""
    if not (run_dir / FINAL_DIR).is_dir():
        return False
    log.info(
        "Stage 3 run %s is already finished (%s/ exists); nothing to train. To train again start "
        "a new run: drop output_dir / hydra.run.dir so that a fresh run dir is made.",
        run_dir,
        FINAL_DIR,
    )
    return True


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint a rerun resumes from (None: train from the start), after every check that can run
    before anything is loaded or written: the subset file, the model source, the resume's settings and,
    in subset mode, its data."""
    if cfg.dataset.mode == "subset":
        _subset_file(cfg)
    check_model_source(str(cfg.training.model.name), "training.model.name")
    # The newest intact checkpoint: a damaged one (truncated, non-finite or absurd weights, garbled
    # JSON) is named, moved aside, and the run falls back to the one before.
    resume_from = resume_checkpoint(run_dir)
    if resume_from:
        check_resume_config(cfg, run_dir, resume_from)
        if cfg.dataset.mode == "subset":
            check_resume_data(run_dir, resume_from, _subset_source(cfg))  # before anything is loaded
    return resume_from


def build_stage3_trainer(
    cfg: DictConfig, run_dir: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset
) -> Stage3Trainer:
    """The Stage 3 Trainer: resumable ``checkpoint-<step>/`` every ``training.save_steps``, FSDP on
    several CUDA processes, the tokenizer saved with the model."""
    t = cfg.training
    trainer = build_trainer(
        Stage3Trainer,
        cfg,
        run_dir,
        model,
        tokenizer,
        dataset,
        arguments={
            "shard": True,
            "save_steps": int(t.save_steps),
            "weight_decay": float(t.weight_decay),
            "max_grad_norm": float(t.max_grad_norm),
            "save_total_limit": t.save_total_limit,
        },
        callbacks=[CheckpointCallback()],
        save_tokenizer=True,
    )
    if trainer.lm_loss_chunk_tokens and _distributed_kind(trainer.args) == "fsdp":
        raise ConfigError(
            "training.lm_loss_chunk_tokens is not supported under FSDP (Stage 3 shards with FSDP on "
            "several CUDA processes; the LM head is whole only inside the model's forward): set it to 0, "
            "or lower training.per_device_batch_size"
        )
    return trainer


def train_metrics(
    cfg: DictConfig,
    trainer: Trainer,
    result: Any,
    data_info: dict[str, Any],
    resume: tuple[str | None, int],
    started: float,
) -> dict[str, Any]:
    """``train_metrics.json``. ``resume``: the checkpoint the run resumed from (or None) and its step."""
    resume_from, start_step = resume
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    return {
        "peft_mode": str(cfg.training.peft_mode),
        "target_model": str(cfg.training.model.name),
        **data_info,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_loss": whole_run_loss(state.log_history, result.training_loss, start_step, state.global_step),
        "tokens_seen": tokens,
        "flops_estimate": flops_estimate(trainer.model, tokens, str(cfg.training.peft_mode)),
        "loss": _loss_summary(state.log_history),
        "resumed_from": resume_from,
        **({"train_loss_since_resume": result.training_loss} if resume_from else {}),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "world_size": world_size(),
        "distributed": _distributed_kind(trainer.args),
    }


def fine_tune(cfg: DictConfig) -> Trainer | None:
    """Stage 3 body; returns the Trainer (its model is the trained one), or None for a finished run."""
    run_dir = run_dir_of(cfg)
    if is_finished(run_dir):
        return None
    resume_from = checkpoint_to_resume(cfg, run_dir)
    run_dir = init_run(cfg, "finetune", target_model=str(cfg.training.model.name), resumed_from=resume_from)
    started = time.perf_counter()
    set_seed(int(cfg.seed))
    model, tokenizer = get_model_and_tokenizer(cfg)
    train_dataset, data_info = build_train_dataset(cfg, tokenizer, run_dir)
    if resume_from:
        check_resume_data(run_dir, resume_from, data_info["source"])  # full mode: the records read
    update_manifest(run_dir, dataset_source=data_info["source"])
    if cfg.training.peft_mode == "lora":
        model = wrap_lora(model, get_peft_config(cfg))

    trainer = build_stage3_trainer(cfg, run_dir, model, tokenizer, train_dataset)
    if resume_from:
        log.info("resuming Stage 3 from %s (optimizer, scheduler and RNG state)", resume_from)
    start_step = _checkpoint_step(resume_from)  # before training: the rotation may delete it
    result = trainer.train(resume_from_checkpoint=resume_from)
    final = save_final(trainer, run_dir)
    if not is_main_process():
        return trainer

    metrics = train_metrics(cfg, trainer, result, data_info, (resume_from, start_step), started)
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
