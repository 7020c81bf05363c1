"""Stage 1 (warmup): train the quality gates with the backbone frozen.

    quality-gate warmup [key=value ...]          # seed: python src/main.py --config-name stage_1_warmup
    torchrun --nproc_per_node=2 src/main.py --config-name warmup   # DDP (gloo on CPU)

Loss per micro-batch (docs/method.md)::

    L = CE_LM(assistant tokens) + training.quality_loss_weight * quality_loss(gates, attention_mask)

``training.peft_mode``: ``full_rank`` trains the gate weights themselves and writes
``full_rank_weights.pt = {"model_state_dict": <gate params>, "tokenizer_name": str}``; ``lora`` puts
LoRA (r=16, alpha=64) on ``quality_gate.gate`` and writes the adapter to ``checkpoint-final/``.
Both load with :func:`quality_gate.models.apply_stage1_weights`. ``warmup_metrics.json`` records the
losses, the gate statistics per layer before and after warmup, and the runtime.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from omegaconf import DictConfig
from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, set_seed

from quality_gate.data import IGNORE_INDEX, SFTDataCollator, ensure_chat_template, load_records
from quality_gate.gate import (
    GATE_PARAM_KEY,
    find_quality_gates,
    freeze_backbone,
    gate_scale,
    gate_state_dict,
    gates_bypassed,
    record_gates,
)
from quality_gate.io import atomic_dir, atomic_torch_save, atomic_write_json
from quality_gate.loss import quality_loss
from quality_gate.model_sources import FULL_RANK_WEIGHTS_FILE, check_model_source
from quality_gate.models import GATE_BASE_FILE, GATE_SCALE_KEY, load_options, load_selector
from quality_gate.runs import init_run, is_main_process, update_manifest, world_size
from quality_gate.training import LMTrainer, build_sft_dataset, build_trainer, lora_config, wrap_lora

log = logging.getLogger(__name__)


class QualityGateTrainer(LMTrainer):
    """``Trainer`` whose loss is LM cross-entropy + ``quality_loss_weight`` x the mean gate value.

    ``lm_loss``, ``quality_loss`` and ``gate_mean`` (mean gate over valid tokens and layers) are
    logged next to ``loss``, averaged over the micro-batches since the last log and over ranks.
    """

    # compute_loss returns a mean over one micro-batch; the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, quality_loss_weight: float, quality_loss_mode: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quality_loss_weight = float(quality_loss_weight)
        self.quality_loss_mode = quality_loss_mode
        self._window: dict[str, list[Tensor]] = defaultdict(list)

    def _lm_loss(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """The LM loss and the model's outputs: transformers' own loss, or the chunked one
        (``training.lm_loss_chunk_tokens``): the same value without ``(B, T, V)`` logits."""
        mask = inputs["attention_mask"]
        if self.lm_loss_chunk_tokens <= 0:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=mask, labels=inputs["labels"])
            return outputs.loss, outputs
        return self.chunked_lm_loss(model, inputs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        mask = inputs["attention_mask"]  # (B, T)
        with record_gates(model) as recorder:
            lm_loss, outputs = self._lm_loss(model, inputs)
            gate_probs = recorder.values()  # (B, L, T) float32: the applied gate values
        q_loss = quality_loss(gate_probs, mask, self.quality_loss_mode)
        loss = lm_loss + self.quality_loss_weight * q_loss
        if model.training:
            self._window["lm_loss"].append(lm_loss.detach().float())
            self._window["quality_loss"].append(q_loss.detach())
            self._window["gate_mean"].append(quality_loss(gate_probs.detach(), mask, "token"))
            # How much the gates tell tokens apart: std over valid tokens of the layer-mean gate.
            per_token = gate_probs.detach().mean(dim=1)[mask.bool()]  # (N_valid,)
            self._window["gate_spread"].append(
                per_token.std() if per_token.numel() > 1 else per_token.sum() * 0
            )
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every rank calls log() at the same steps with the same number of micro-batches, so the
        # collective reduce below is matched on all ranks.
        if self._window and "loss" in logs:
            for key, values in self._window.items():
                value = torch.stack(values).mean()
                logs[key] = self.accelerator.reduce(value, reduction="mean").item()
            self._window.clear()
        super().log(logs, start_time)


def get_model_and_tokenizer(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The gated selector (``selector_model.*``) with its backbone frozen, and its tokenizer."""
    sel = cfg.selector_model
    model, tokenizer = load_selector(
        str(sel.path),
        **load_options(sel),
        gate_init_mean=float(cfg.quality_gate.init_mean),
        gate_init_std=float(cfg.quality_gate.init_std),
        gate_scale=float(cfg.quality_gate.scale),
        key="selector_model.path",
    )
    ensure_chat_template(tokenizer, cfg.dataset.chat_template)
    freeze_backbone(model)
    return model, tokenizer


def get_peft_config(cfg: DictConfig) -> LoraConfig:
    """LoRA on the gate Linear only (seed: r=16, alpha=64, dropout 0)."""
    return lora_config(cfg.training.lora, [GATE_PARAM_KEY])


def build_train_dataset(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, run_dir: Path
) -> tuple[Dataset, dict[str, int]]:
    """Records (``dataset.*``) -> encoded samples (labels on assistant tokens) -> ``datasets.Dataset``,
    and the encode counts."""
    # Every rank reads the same records (seeded); only rank 0 writes the bad-row report.
    records = load_records(cfg.dataset, seed=int(cfg.seed), report_dir=run_dir if is_main_process() else None)
    dataset, stats = build_sft_dataset(
        records, tokenizer, cfg.dataset, "dataset.* (paths, subset_ratio, max_sequence_length, truncation)"
    )
    log.info("Stage 1 data: %d samples (%s)", len(dataset), stats)
    return dataset, stats


def _batch_lm_loss_sum(out: Any, labels: Tensor) -> tuple[float, int]:
    """``(sum of the token losses, number of scored tokens)`` of a forward with ``labels`` ``(B, T)``."""
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return float(out.loss) * count if count else 0.0, count


@torch.no_grad()
def released_lm_loss(
    model: nn.Module,
    dataset: Dataset,
    collator: Callable[[list[dict]], dict[str, Tensor]],
    batch_size: int,
    max_samples: int,
) -> float:
    """Mean LM loss per assistant token of the first ``max_samples`` samples with every gate bypassed,
    i.e. of the model as released (the reference the gates' cost is measured against)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    loader = DataLoader(
        dataset.select(range(min(max_samples, len(dataset)))), batch_size, collate_fn=collator
    )
    with gates_bypassed(model):
        for batch in loader:
            labels = batch["labels"].to(device)
            out = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                labels=labels,
            )
            part, n = _batch_lm_loss_sum(out, labels)
            total, count = total + part, count + n
    model.train(was_training)
    return round(total / max(count, 1), 6)


@torch.no_grad()
def gate_statistics(
    model: nn.Module,
    dataset: Dataset,
    collator: Callable[[list[dict]], dict[str, Tensor]],
    batch_size: int,
    max_samples: int,
) -> dict[str, Any]:
    """Per-layer mean and std of the applied gate value over the valid tokens of the first samples,
    and the model's LM loss with these gates.

    Returns ``{"mean_per_layer": [L], "std_per_layer": [L], "mean", "token_std", "num_tokens",
    "lm_loss"}``; ``token_std`` is the std over tokens of the layer-averaged gate, i.e. how much the
    gates distinguish tokens; ``lm_loss`` the mean loss per assistant token.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    subset = dataset.select(range(min(max_samples, len(dataset))))
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=collator)
    sums = sq_sums = None
    token_means: list[Tensor] = []
    count = 0
    loss_sum, loss_count = 0.0, 0
    for batch in loader:
        mask = batch["attention_mask"].to(device).bool()  # (B, T)
        labels = batch["labels"].to(device)  # (B, T)
        with record_gates(model) as recorder:
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long(), labels=labels)
            probs = recorder.values()  # (B, L, T)
        part, n = _batch_lm_loss_sum(out, labels)
        loss_sum, loss_count = loss_sum + part, loss_count + n
        valid = probs.permute(1, 0, 2)[:, mask]  # (L, N_valid)
        sums = valid.sum(1) if sums is None else sums + valid.sum(1)
        sq_sums = valid.pow(2).sum(1) if sq_sums is None else sq_sums + valid.pow(2).sum(1)
        token_means.append(valid.mean(0))
        count += valid.shape[1]
    model.train(was_training)
    mean = sums / count  # (L,)
    std = (sq_sums / count - mean.pow(2)).clamp_min(0).sqrt()  # (L,)
    per_token = torch.cat(token_means)  # (N_valid,)
    return {
        "mean_per_layer": [round(v, 6) for v in mean.tolist()],
        "std_per_layer": [round(v, 6) for v in std.tolist()],
        "mean": round(mean.mean().item(), 6),
        "token_std": round(per_token.std().item(), 6) if per_token.numel() > 1 else 0.0,
        "num_tokens": count,
        "lm_loss": round(loss_sum / max(loss_count, 1), 6),
    }


def lm_loss_report(released: float, at_init: float, after: float, margin: float) -> dict[str, Any]:
    """The LM loss per assistant token of the model as released, with the gates at init and after the
    warmup; ``warning`` when the warmed gates cost more than ``margin`` (nats per token)."""
    cost = after - released
    warning = None
    if cost > margin:
        warning = (
            f"the warmed gates cost the model {cost:.3f} nats per token of LM loss ({released:.3f} as "
            f"released, {after:.3f} with the gates; margin training.lm_loss_margin={margin}): the score is "
            "read from a model the gates have damaged; lower training.quality_loss_weight or use "
            "quality_gate.scale=2"
        )
    return {
        "released": released,
        "at_init": at_init,
        "after_warmup": after,
        "cost_after_warmup": round(cost, 6),
        "margin": margin,
        "warning": warning,
    }


#: The warmup "barely moved" the gates when the spread it added is below this share of the init's spread
#: (or below MIN_LEARNED_SPREAD when the gates started equal) ...
MIN_LEARNED_SHARE = 0.5
MIN_LEARNED_SPREAD = 1e-3
#: ... and the mean gate moved by less than this.
MIN_MEAN_SHIFT = 0.01
#: Not converged: more than this share of the spread's total change came in the last quarter of the steps
#: (a steady, linear drift gives 0.25; a settling one less).
MAX_LATE_SHARE = 0.35


def gate_movement(
    before: dict[str, Any], after: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """How far the warmup moved the gates, and whether they were still moving at the end.

    * ``learned_spread``: the token-level spread of the gates (std over tokens of the layer-mean gate,
      what the score is built from) that the warmup added: ``sqrt(after^2 - before^2)``, the init's
      own random spread removed; ``spread_before`` / ``spread_after`` as measured.
    * ``mean_shift``: change of the mean gate value.
    * ``late_share``: share of the logged spread's total change that came in the last quarter of the
      logged steps (``None`` with fewer than 4 logs); a settled warmup has little left.

    ``warning`` is set (and says what to do) when the gates barely moved or had not settled.
    """
    b, a = float(before["token_std"]), float(after["token_std"])
    learned = max(a * a - b * b, 0.0) ** 0.5
    shift = after["mean"] - before["mean"]
    spreads = [h["gate_spread"] for h in history if "gate_spread" in h]
    late = None
    if len(spreads) >= 4:
        total = abs(spreads[-1] - spreads[0])
        late = abs(spreads[-1] - spreads[int(0.75 * (len(spreads) - 1))]) / total if total > 0 else 0.0
    problems = []
    if learned < max(MIN_LEARNED_SHARE * b, MIN_LEARNED_SPREAD) and abs(shift) < MIN_MEAN_SHIFT:
        problems.append(
            f"the gates barely moved (learned token spread {learned:.4f} against {b:.4f} from the init, mean "
            f"{shift:+.4f}): the score will be close "
            "to their random init; train longer (training.epochs / max_steps) or on more data "
            "(dataset.subset_ratio)"
        )
    if late is not None and late > MAX_LATE_SHARE:
        problems.append(
            f"the gates were still moving at the end ({late:.0%} of their spread's change in the last "
            "quarter of the steps): a longer warmup would change the score; train longer or decay the "
            "learning rate (training.lr_scheduler_type=cosine)"
        )
    message = (
        f"gate mean {before['mean']:.3f} -> {after['mean']:.3f}, token spread {b:.4f} -> {a:.4f} "
        f"(learned {learned:.4f})"
        + (f", {late:.0%} of the change in the last quarter" if late is not None else "")
    )
    return {
        "spread_before": b,
        "spread_after": a,
        "learned_spread": learned,
        "spread_after_per_layer": list(after["std_per_layer"]),
        "mean_shift": shift,
        "late_share": late,
        "warning": "; ".join(problems) or None,
        "message": message + ("; WARNING: " + "; ".join(problems) if problems else ""),
    }


def save_gate_base(model: nn.Module, adapter_dir: Path) -> None:
    """Write the (pre-LoRA) gate weights as ``quality_gate_base.safetensors``, keyed by layer index."""
    tensors = {
        f"layers.{m.layer_idx}.weight": m.quality_gate.gate.weight.detach().cpu().contiguous()
        for m in find_quality_gates(model)
    }
    metadata = {GATE_SCALE_KEY: str(gate_scale(model))}
    save_file(tensors, str(Path(adapter_dir) / GATE_BASE_FILE), metadata=metadata)


def save_stage1_weights(model: nn.Module, cfg: DictConfig, run_dir: Path) -> Path:
    """Rank 0 writes ``full_rank_weights.pt`` or the LoRA adapter ``checkpoint-final/``."""
    if cfg.training.peft_mode == "full_rank":
        path = run_dir / FULL_RANK_WEIGHTS_FILE
        payload = {
            "model_state_dict": gate_state_dict(model),
            "tokenizer_name": str(cfg.selector_model.path),
            GATE_SCALE_KEY: gate_scale(model),
        }
        atomic_torch_save(payload, path)
    else:
        path = run_dir / "checkpoint-final"
        # Written beside and swapped in, so that a crash never leaves a half-written adapter dir.
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            # The adapter holds only lora_A/lora_B; the gate weights it was trained on go beside it, so
            # that Stage 2 rebuilds exactly these gates whatever its seed or init settings.
            save_gate_base(model, tmp)
    log.info("saved Stage 1 %s weights to %s", cfg.training.peft_mode, path)
    return path


def gate_probe(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The keywords :func:`gate_statistics` and :func:`released_lm_loss` read the first
    ``training.gate_stats_samples`` samples with, in batches of ``training.per_device_batch_size``."""
    return {
        "collator": SFTDataCollator(tokenizer.pad_token_id),
        "batch_size": int(cfg.training.per_device_batch_size),
        "max_samples": int(cfg.training.gate_stats_samples),
    }


def measure_before_training(
    model: nn.Module, dataset: Dataset, probe: dict[str, Any]
) -> tuple[dict[str, Any] | None, float | None]:
    """Rank 0: the gate statistics at init and the LM loss of the model as released (other ranks: None)."""
    if not is_main_process():
        return None, None
    gates_before = gate_statistics(model, dataset, **probe)
    loss_released = released_lm_loss(model, dataset, **probe)
    log.info(
        "LM loss per assistant token: %.4f as released, %.4f with the gates at init",
        loss_released,
        gates_before["lm_loss"],
    )
    return gates_before, loss_released


def warmup_metrics(
    cfg: DictConfig,
    trainer: Trainer,
    result: Any,
    encode_stats: dict[str, int],
    gates: tuple[dict[str, Any], dict[str, Any]],
    loss_released: float,
    started: float,
) -> dict[str, Any]:
    """``warmup_metrics.json``: settings, data, losses, ``gates`` (before, after), their movement, times."""
    gates_before, gates_after = gates
    history = [entry for entry in trainer.state.log_history if "lm_loss" in entry]
    t = cfg.training
    return {
        "peft_mode": str(t.peft_mode),
        "quality_loss_mode": str(t.quality_loss_mode),
        "quality_loss_weight": float(t.quality_loss_weight),
        "num_train_samples": len(trainer.train_dataset),
        "encode_stats": encode_stats,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final": history[-1] if history else None,
        "history": history,
        "gates_before": gates_before,
        "gates_after": gates_after,
        "gate_movement": gate_movement(gates_before, gates_after, history),
        "gate_scale": gate_scale(trainer.model),
        "lm_loss": lm_loss_report(
            loss_released, gates_before["lm_loss"], gates_after["lm_loss"], float(t.lm_loss_margin)
        ),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "world_size": world_size(),
    }


def log_summary(metrics: dict[str, Any]) -> None:
    """How the gates moved and what they cost the LM loss; a warning when either is a problem."""
    movement, lm_loss = metrics["gate_movement"], metrics["lm_loss"]
    (log.warning if movement["warning"] else log.info)(
        "Stage 1 done in %.1fs: %s", metrics["wall_time_s"], movement["message"]
    )
    (log.warning if lm_loss["warning"] else log.info)(
        "LM loss per assistant token: %.4f as released, %.4f at init, %.4f after the warmup%s",
        lm_loss["released"],
        lm_loss["at_init"],
        lm_loss["after_warmup"],
        f"; WARNING: {lm_loss['warning']}" if lm_loss["warning"] else "",
    )


def run(cfg: DictConfig) -> None:
    """Stage 1: load the selector, train its gates (backbone frozen), save the gate weights."""
    check_model_source(str(cfg.selector_model.path), "selector_model.path")  # before the run dir is made
    run_dir = init_run(cfg, "warmup", selector_model=str(cfg.selector_model.path))
    started = time.perf_counter()
    set_seed(int(cfg.seed))
    model, tokenizer = get_model_and_tokenizer(cfg)
    if cfg.training.peft_mode == "lora":
        model = wrap_lora(model, get_peft_config(cfg))
    train_dataset, encode_stats = build_train_dataset(cfg, tokenizer, run_dir)
    probe = gate_probe(cfg, tokenizer)
    gates_before, loss_released = measure_before_training(model, train_dataset, probe)

    trainer = build_trainer(
        QualityGateTrainer,
        cfg,
        run_dir,
        model,
        tokenizer,
        train_dataset,
        # No weight decay: it would pull the gates towards 0.5, against the quality loss.
        arguments={"shard": False, "save_steps": None},
        quality_loss_weight=float(cfg.training.quality_loss_weight),
        quality_loss_mode=str(cfg.training.quality_loss_mode),
    )
    result = trainer.train()
    if not is_main_process():
        return

    gates_after = gate_statistics(model, train_dataset, **probe)
    weights_path = save_stage1_weights(model, cfg, run_dir)
    metrics = warmup_metrics(
        cfg, trainer, result, encode_stats, (gates_before, gates_after), loss_released, started
    )
    atomic_write_json(run_dir / "warmup_metrics.json", metrics)
    update_manifest(run_dir, stage1_weights=str(weights_path), warmup_metrics="warmup_metrics.json")
    log_summary(metrics)
