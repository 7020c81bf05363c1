"""The typed config of every stage: each key's type, default, help text and allowed values, in one place.

Every stage has one dataclass here (:class:`WarmupConfig`, :class:`CollectConfig`,
:class:`SelectConfig`, :class:`FinetuneConfig`, :class:`EvaluateConfig`, and
:class:`ExperimentConfig` for the experiment runner), registered with Hydra's ConfigStore as
``schema_<stage>``. The YAML files in ``quality_gate/configs/`` only compose a schema with Hydra's
run-dir settings, so::

    quality-gate warmup training.epochs=1          # == python src/main.py --config-name warmup ...

is checked by OmegaConf against these types (``training.epochs=abc`` names the key), then by
:func:`validate` against the allowed values in each field's metadata (``choices``, ``ge``, ``gt``,
``le``, ``name``) and the cross-field rules of the stage's ``check``. Shared groups
(:class:`SelectorModelConfig`, :class:`GateInitConfig`, :class:`DatasetConfig`) are written once and
composed into the stages that use them. The README's config reference is generated from the ``help``
metadata (``scripts/gen_config_docs.py``).

This module imports no torch, so ``--help`` and config errors answer at once.
"""

import copy
import dataclasses
import datetime as dt
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from quality_gate.errors import ConfigError
from quality_gate.names import check_name, dataset_names

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DTYPES = ["auto", "bfloat16", "float16", "float32"]
TRUNCATION = ["right", "drop"]
SELECTORS = ["quality_gate", "perplexity", "ifd", "random", "length"]
# selector= of the select stage: the scores above, or a weighted mean of their ranks (combined_weights).
SELECT_SELECTORS = [*SELECTORS, "combined"]
DIVERSITY = ["none", "threshold", "cluster"]


#: A seed must fit every generator it seeds: numpy's takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a default, its one-line ``help`` and optional checks for :func:`validate`.

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


# --------------------------------------------------------------------------------------------- #
# Shared groups
# --------------------------------------------------------------------------------------------- #
@dataclass
class ModelOptions:
    """How a model is loaded (shared by the selector, the target and Stage 4's base model)."""

    dtype: str = opt(
        "auto", "auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32", choices=DTYPES
    )
    trust_remote_code: bool = opt(False, "run the model repo's own code; only for models that need it")
    attn_implementation: str | None = opt(
        None, "null: transformers' default (sdpa); or eager | sdpa | flash_attention_2"
    )


@dataclass
class SelectorModelConfig(ModelOptions):
    """The model that gets the quality gates (Stages 1 and 2)."""

    path: str = opt(
        asset("models/tiny-qwen3-selector"),
        "converted gated selector dir (quality-gate convert), a plain base model dir or an HF id (gates "
        "attached on load); default: the embedded tiny Qwen3",
    )


@dataclass
class GateInitConfig:
    """How new gates start when they are attached to a plain base model."""

    scale: float = opt(
        1.0,
        "the gate's form g = scale * sigmoid(w . x): 1 (default) is method.md's gate, 0.5 at init, which "
        "halves every FFN of a pretrained model; 2 starts as the identity, the model as released "
        "(docs/method.md: neither wins on both real-label pools)",
        choices=[1.0, 2.0],
    )
    init_mean: float = opt(
        0.0, "mean of the gate weight init when gates are attached on load (plain base model)"
    )
    init_std: float = opt(
        0.0,
        "std of that init; 0 (default) starts every gate at exactly scale * sigmoid(0), so the score does "
        "not depend on a random init; method.md's 0.02 does (docs/method.md)",
        ge=0.0,
    )


@dataclass
class LocalDataset:
    path: str = opt(MISSING, "a .jsonl / .json / .parquet file")
    dataset_name: str | None = opt(
        None, "name in reports and file names; null: the file's stem", name="dataset"
    )


@dataclass
class HfDataset:
    name: str = opt(MISSING, "a Hub dataset id (or a local data file / folder for datasets.load_dataset)")
    dataset_name: str | None = opt(
        None, "name in reports and file names; null: the id's last part", name="dataset"
    )
    split: str = opt("train", "split to read")


@dataclass
class LocalSources:
    datasets: list[LocalDataset] = opt(
        [LocalDataset(path=asset("data/synthetic_train.jsonl"), dataset_name="synthetic")],
        "local files (jsonl / json / parquet): path and the dataset_name used in reports and file names",
    )


@dataclass
class HfSources:
    datasets: list[HfDataset] = opt(
        [HfDataset(name="teknium/OpenHermes-2.5", dataset_name="openhermes", split="train")],
        "Hugging Face datasets: name, dataset_name, split",
    )


@dataclass
class DatasetConfig:
    """Where records come from and how they become token ids (every stage that reads a pool)."""

    dataset_from: str = opt("local", "local | hf", choices=["local", "hf"])
    local: LocalSources = opt(LocalSources(), "dataset_from=local: the files to read")
    hf: HfSources = opt(HfSources(), "dataset_from=hf: the Hub datasets to read")
    subset_ratio: float = opt(
        1.0, "fraction of each dataset used (seeded sample, source order kept)", gt=0.0, le=1.0
    )
    shuffle: bool = opt(False, "shuffle the records after subsetting")
    sort_by_length: bool = opt(True, "sort records by length before batching (less padding; same statistics)")
    max_sequence_length: int = opt(512, "tokens per sample after the chat template", ge=1)
    truncation: str = opt(
        "right",
        "right: cut to max_sequence_length (counted) | drop: skip the sample (counted)",
        choices=TRUNCATION,
    )
    strict: bool = opt(False, "true: the first bad row is an error instead of a reported skip")
    chat_template: str | None = opt(
        None, "Jinja chat template for a tokenizer that has none; null: the tokenizer's own"
    )

    @staticmethod
    def check_group(node: Any, key: str) -> None:
        """The datasets to read: each has a path / a usable Hub id and a name no other one has."""
        if node.get("mode") == "subset":  # Stage 3 on a selection reads dataset.data_path only
            return
        dataset_names(node)


@dataclass
class TargetModelConfig(ModelOptions):
    """A plain causal LM (no gates): the model Stage 3 fine-tunes and Stage 4 evaluates."""

    name: str = opt(
        asset("models/tiny-qwen2-target"),
        "target model: HF id (e.g. Qwen/Qwen2.5-1.5B) or local path; default: the embedded tiny Qwen2",
    )


def _training_steps_check(t: Any, prefix: str) -> None:
    if float(t.epochs) <= 0 and int(t.max_steps) <= 0:
        raise ConfigError(
            f"{prefix}.epochs={t.epochs} and {prefix}.max_steps={t.max_steps} would train zero steps; "
            f"set {prefix}.epochs > 0 or {prefix}.max_steps > 0"
        )
    if int(t.batch_size) % int(t.per_device_batch_size):
        raise ConfigError(
            f"{prefix}.batch_size={t.batch_size} is not a multiple of "
            f"{prefix}.per_device_batch_size={t.per_device_batch_size}"
        )


# --------------------------------------------------------------------------------------------- #
# Stage 1: warmup
# --------------------------------------------------------------------------------------------- #
LM_LOSS_CHUNK_HELP = (
    "0: the LM loss on transformers' full-vocabulary float32 logits; N: the same loss N labelled "
    "positions at a time, each chunk recomputed in backward (peak ~N x vocab x 4 bytes instead of "
    "batch x length x vocab x 4, several times over; one more LM-head forward per step)"
)


@dataclass
class WarmupLora:
    r: int = opt(16, "LoRA rank (peft_mode=lora only; the seed's 16)", ge=1)
    alpha: int = opt(64, "LoRA alpha (peft_mode=lora only; the seed's 64)", ge=1)
    dropout: float = opt(0.0, "LoRA dropout (peft_mode=lora only)", ge=0.0, le=1.0)


@dataclass
class WarmupTraining:
    peft_mode: str = opt(
        "full_rank",
        "full_rank: train the gate weights | lora: LoRA on quality_gate.gate (training.lora)",
        choices=["full_rank", "lora"],
    )
    lora: WarmupLora = opt(WarmupLora(), "LoRA settings of peft_mode=lora")
    learning_rate: float = opt(3e-4, "peak learning rate of the gates (the seed's value)", gt=0.0)
    lr_scheduler_type: str = opt("constant", "transformers scheduler name: constant | linear | cosine | ...")
    warmup_steps: int = opt(0, "learning-rate warmup steps", ge=0)
    batch_size: int = opt(
        16, "total samples per optimizer step = per_device_batch_size x world size x accumulation", ge=1
    )
    per_device_batch_size: int = opt(8, "samples per forward on each process", ge=1)
    epochs: float = opt(2.0, "passes over the data", ge=0.0)
    max_steps: int = opt(-1, "stop after this many optimizer steps; -1: run all epochs")
    quality_loss_weight: float = opt(
        1.0, "weight of the quality loss (mean gate value) next to the LM loss", ge=0.0
    )
    quality_loss_mode: str = opt(
        "sample",
        "sample: mean within each sample, then over samples | token: mean over all tokens",
        choices=["sample", "token"],
    )
    gradient_checkpointing: bool = opt(
        False, "recompute activations in backward (non-reentrant): less memory, ~30% slower"
    )
    lm_loss_chunk_tokens: int = opt(0, LM_LOSS_CHUNK_HELP, ge=0)
    logging_steps: int = opt(5, "log loss, lm_loss, quality_loss and gate_mean every N optimizer steps", ge=1)
    report_to: list[str] = opt([], "extra loggers, e.g. [tensorboard]")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes", ge=0)
    lm_loss_margin: float = opt(
        0.1,
        "warn when the warmed gates raise the LM loss per assistant token above the model as released by "
        "more than this (nats; warmup_metrics.json lm_loss)",
        ge=0.0,
    )
    gate_stats_samples: int = opt(
        128, "samples used for the per-layer gate statistics before/after warmup in warmup_metrics.json", ge=1
    )


@dataclass
class WarmupConfig:
    """Stage 1: train only the quality gates (backbone frozen) with LM loss + weight x mean gate value."""

    stage: str = opt("warmup", "which stage runs (quality-gate <stage> sets it)")
    run_name: str = opt("warmup", "folder under outputs/ for this stage's run dirs", name=True)
    selector_model: SelectorModelConfig = opt(SelectorModelConfig(), "the model that gets the gates")
    quality_gate: GateInitConfig = opt(GateInitConfig(), "init of gates attached on load")
    dataset: DatasetConfig = opt(
        DatasetConfig(subset_ratio=0.5), "the warmup data (the seed used subset_ratio=0.025 of OpenHermes)"
    )
    training: WarmupTraining = opt(WarmupTraining(), "optimisation of the gates")
    seed: int = seed_opt(42, "seeds gate init, subset_ratio sampling, shuffling and the Trainer")
    output_dir: str | None = opt(None, "run dir; null: outputs/<run_name>/<date>/<time>-<overrides>")

    @staticmethod
    def check(cfg: Any) -> None:
        _training_steps_check(cfg.training, "training")


# --------------------------------------------------------------------------------------------- #
# Stage 2: collect
# --------------------------------------------------------------------------------------------- #
@dataclass
class DataProcess:
    batch_size: int = opt(32, "upper bound on samples per forward", ge=1)
    max_tokens_per_batch: int = opt(
        16384, "token budget per forward (padded batch size x longest sample)", ge=1
    )
    shard_size: int = opt(
        4096, "samples per output shard: the unit of resume and of data-parallel work", ge=1
    )
    nll_chunk_tokens: int = opt(
        1024, "positions per LM-head call; peak logits memory ~ nll_chunk_tokens x vocab x 4 bytes", ge=1
    )
    embedding_dim: int = opt(
        256,
        "store one embedding per sample (last hidden state, mean over embedding_tokens, random projection "
        "to this many dims, float16) for diversity selection; 0: none",
        ge=0,
    )
    embedding_tokens: str = opt(
        "prompt",
        "tokens the embedding averages: prompt (before the first assistant token: what the sample asks, "
        "blind to the answer) | response | all",
        choices=["prompt", "response", "all"],
    )
    prefetch: bool = opt(True, "encode the next shard in a background thread while the current one is scored")
    num_parts: int = opt(
        1,
        "split the shards into this many parts, scored by independent jobs (a Slurm array, any scheduler) "
        "with part_index; no rendezvous between them",
        ge=1,
    )
    part_index: int | None = opt(
        None,
        "which part this job scores (0 .. num_parts-1); null: all of them (one job, or torchrun ranks)",
        ge=0,
    )
    finalize_only: bool = opt(
        False,
        "score nothing: check that every part finished with the same fingerprint, then write the indexes "
        "(the finishing step of a job array); an error lists what is missing",
    )


@dataclass
class CollectConfig:
    """Stage 2: one forward pass over every sample; stores gate values and per-token perplexities."""

    stage: str = opt("collect", "which stage runs (quality-gate <stage> sets it)")
    run_name: str = opt("collect", "folder under outputs/ for this stage's run dirs", name=True)
    selector_model: SelectorModelConfig = opt(SelectorModelConfig(), "the gated selector")
    quality_gate: GateInitConfig = opt(
        GateInitConfig(), "init of gates attached on load (no Stage 1 weights)"
    )
    model_checkpoint_path: str | None = opt(
        None,
        "Stage 1 run dir, its full_rank_weights.pt or LoRA checkpoint dir; null scores with the "
        "unwarmed gates "
        "(warning)",
    )
    dataset: DatasetConfig = opt(DatasetConfig(), "the pool to score (the seed scores all of it)")
    data_process: DataProcess = opt(DataProcess(), "batching and sharding")
    collect_ifd: bool = opt(
        False, "also store each sample's response loss with and without the instruction (IFD baseline)"
    )
    seed: int = seed_opt(42, "seeds subset_ratio sampling, shuffling and the init of gates attached on load")
    output_dir: str | None = opt(
        None, "run dir; null: outputs/<run_name>/<date>/<time>-<overrides>; an existing one resumes"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        dp = cfg.data_process
        if dp.part_index is not None and dp.part_index >= dp.num_parts:
            raise ConfigError(
                f"data_process.part_index={dp.part_index} must be < data_process.num_parts={dp.num_parts}"
            )
        if (dp.num_parts > 1 or dp.part_index is not None) and not cfg.output_dir:
            raise ConfigError(
                "data_process.num_parts / part_index: set output_dir to the run dir all parts share "
                "(each job would otherwise make its own run dir)"
            )


# --------------------------------------------------------------------------------------------- #
# Selection
# --------------------------------------------------------------------------------------------- #
@dataclass
class SelectConfig:
    """Selection (CPU): the score of docs/method.md or a baseline over Stage 2's router data; top k %."""

    stage: str = opt("select", "which stage runs (quality-gate <stage> sets it)")
    root_dir: str | None = opt(
        None, "Stage 2 run dir; every */<dataset>_router_data.pt under it is selected together"
    )
    router_data_dir: str | None = opt(
        None, "instead of root_dir: one directory holding <dataset>_router_data.pt files (not searched)"
    )
    selection_percentage: float = opt(
        0.05, "k: keep ceil(k * N) of the N valid samples, in (0, 1]", gt=0.0, le=1.0
    )
    selector: str = opt(
        "quality_gate",
        "quality_gate | perplexity | ifd | random | length (longest response) (ifd needs Stage 2 "
        "collect_ifd=true) | combined "
        "(weighted mean of the selectors' ranks, combined_weights)",
        choices=SELECT_SELECTORS,
    )
    combined_weights: dict[str, float] = opt(
        {"quality_gate": 1.0, "perplexity": 1.0, "ifd": 0.0, "random": 0.0},
        "selector=combined: weight of each selector's rank (scaled to [0, 1]); 0 leaves it out; e.g. "
        "combined_weights.ifd=0.5",
    )
    diversity: str = opt(
        "none",
        "none: the top by score | threshold: skip samples with cosine > diversity_threshold to one already "
        "kept (Deita) | cluster: budget split over k-means clusters by size (needs Stage 2 embeddings)",
        choices=DIVERSITY,
    )
    diversity_threshold: float = opt(
        0.9,
        "diversity=threshold: keep a sample only if its max cosine to the kept ones is <= this",
        ge=-1.0,
        le=1.0,
    )
    diversity_clusters: int = opt(100, "diversity=cluster: number of k-means clusters", ge=1)
    diversity_pool: float = opt(
        0.0,
        "diversity=cluster: 0 splits the budget over the clusters by all their valid samples; P >= 1 by "
        "their share of the top P x budget samples by score, and keeps only those (1: no diversity)",
        ge=0.0,
    )
    alpha: float = opt(1.0, "token weight exponent: w = ppl^alpha / (sum ppl^alpha + eps)")
    eps: float = opt(1e-8, "eps of the token weights and of the column denominators", ge=0.0)
    tau: float = opt(0.0, "0: denominator factor max(mu_l, eps); > 0: (mu_l + tau)", ge=0.0)
    token_scope: str = opt(
        "all",
        "all: every stored position (the seed) | assistant: positions predicting assistant tokens",
        choices=["all", "assistant"],
    )
    pairing: str = opt(
        "same_token",
        "same_token: gate at token t with the perplexity of token t | next_token: of token t+1 "
        "(docs/method.md)",
        choices=["same_token", "next_token"],
    )
    per_dataset: bool = opt(False, "true: the percentage and the column statistics within each dataset")
    seed: int = seed_opt(42, "seed of the random selector and of diversity=cluster's k-means")
    report: bool = opt(True, "write selection_report.html")
    report_top_k: int = opt(10, "highest / lowest samples shown in the report", ge=0)
    output_dir: str | None = opt(
        None,
        "default: the input dir (quality_gate, the seed's <root_dir>/selected_data.jsonl) or "
        "<input dir>/selection_<selector> (other selectors); with diversity: "
        "<input dir>/selection_<selector>_<diversity>",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if bool(cfg.root_dir) == bool(cfg.router_data_dir):
            raise ConfigError(
                "set exactly one of root_dir=<Stage 2 run dir> or router_data_dir=<dir with *_router_data.pt>"
            )
        weights = dict(cfg.combined_weights)
        unknown = sorted(set(weights) - set(SELECTORS))
        if unknown:
            raise ConfigError(f"combined_weights: unknown selectors {unknown}; use keys from {SELECTORS}")
        if any(not (w >= 0 and w < float("inf")) for w in weights.values()) or not any(
            w > 0 for w in weights.values()
        ):
            raise ConfigError(f"combined_weights={weights}: weights must be finite, >= 0, and one > 0")
        if 0 < float(cfg.diversity_pool) < 1 or float(cfg.diversity_pool) == float("inf"):
            raise ConfigError(
                f"diversity_pool={cfg.diversity_pool}: 0 (all valid samples) or a factor >= 1 of the budget"
            )


# --------------------------------------------------------------------------------------------- #
# Stage 3: finetune
# --------------------------------------------------------------------------------------------- #
@dataclass
class FinetuneDataset(DatasetConfig):
    """The fine-tune data: the selection (``mode=subset``) or the whole pool (``mode=full``)."""

    mode: str = opt(
        "subset",
        "subset: train on dataset.data_path | full: train on the dataset.local / dataset.hf sources "
        "(baseline)",
        choices=["subset", "full"],
    )
    data_path: str | None = opt(
        None,
        "subset mode: the selection's selected_data.jsonl (or any jsonl / json / parquet in messages, "
        "ShareGPT "
        "or Alpaca form)",
    )
    dataset_name: str = opt(
        "selected", "name given to the subset records (ids of rows without their own id)", name=True
    )


@dataclass
class FinetuneLora:
    r: int = opt(128, "LoRA rank (seed value)", ge=1)
    alpha: int = opt(256, "LoRA alpha (seed value)", ge=1)
    dropout: float = opt(0.05, "LoRA dropout", ge=0.0, le=1.0)
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "modules that get LoRA"
    )


@dataclass
class FinetuneTraining:
    model: TargetModelConfig = opt(TargetModelConfig(), "the target model")
    peft_mode: str = opt(
        "lora",
        "lora: train a LoRA adapter (training.lora) | full: train every parameter",
        choices=["lora", "full"],
    )
    lora: FinetuneLora = opt(FinetuneLora(), "LoRA settings of peft_mode=lora")
    learning_rate: float = opt(2e-4, "peak learning rate", gt=0.0)
    lr_scheduler_type: str = opt("cosine", "transformers scheduler name: constant | linear | cosine | ...")
    warmup_steps: int = opt(0, "learning-rate warmup steps", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", ge=0.0)
    batch_size: int = opt(
        64, "total samples per optimizer step = per_device_batch_size x world size x accumulation", ge=1
    )
    per_device_batch_size: int = opt(8, "samples per forward on each process", ge=1)
    epochs: float = opt(3.0, "passes over the data", ge=0.0)
    max_steps: int = opt(-1, "stop after this many optimizer steps; -1: run all epochs")
    gradient_checkpointing: bool = opt(
        False, "recompute activations in backward (non-reentrant): less memory, ~30% slower"
    )
    lm_loss_chunk_tokens: int = opt(0, LM_LOSS_CHUNK_HELP + "; not under FSDP", ge=0)
    logging_steps: int = opt(
        5, "log the loss every N optimizer steps (the non-finite loss check runs then too)", ge=1
    )
    save_steps: int = opt(50, "write a resumable checkpoint-<step>/ every N optimizer steps", ge=1)
    save_total_limit: int | None = opt(
        3, "keep at most this many checkpoint-<step>/ dirs; null keeps all", ge=1
    )
    report_to: list[str] = opt(
        ["tensorboard"], "loggers (skipped with a warning when not installed); [] for none"
    )
    dataloader_num_workers: int = opt(0, "DataLoader worker processes", ge=0)


@dataclass
class FinetuneConfig:
    """Stage 3: fine-tune the target model on the selection (or on the full data, the baseline)."""

    stage: str = opt("finetune", "which stage runs (quality-gate <stage> sets it)")
    run_name: str = opt("finetune", "folder under outputs/ for this stage's run dirs", name=True)
    dataset: FinetuneDataset = opt(FinetuneDataset(sort_by_length=False), "the training data")
    training: FinetuneTraining = opt(FinetuneTraining(), "the target model and its optimisation")
    seed: int = seed_opt(42, "seeds LoRA init, subset_ratio sampling, shuffling and the Trainer")
    output_dir: str | None = opt(
        None, "run dir; null: outputs/<run_name>/<date>/<time>-<overrides>; an existing one resumes"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        _training_steps_check(cfg.training, "training")
        if cfg.dataset.mode == "subset" and not cfg.dataset.data_path:
            raise ConfigError(
                "dataset.data_path is not set: pass the selection's output, e.g. "
                "dataset.data_path=outputs/collect/<date>/<time>/selected_data.jsonl "
                "(or dataset.mode=full to train on the dataset.local / dataset.hf sources)"
            )


# --------------------------------------------------------------------------------------------- #
# Stage 4: evaluate
# --------------------------------------------------------------------------------------------- #
@dataclass
class EvalOptions:
    data_path: str = opt(
        asset("data/synthetic_eval.jsonl"),
        "held-out records (jsonl / json / parquet; messages, ShareGPT or Alpaca form); default: the embedded "
        "synthetic held-out set",
    )
    dataset_name: str = opt(
        "eval", "name given to the held-out records (ids of rows without their own id)", name=True
    )
    strict: bool = opt(
        False, "true: the first bad row of eval.data_path is an error instead of a reported skip"
    )
    max_samples: int | None = opt(None, "evaluate only the first N records; null: all", ge=1)
    max_sequence_length: int = opt(
        1024, "tokens per sample for the loss; also the cap on prompt length for generation", ge=1
    )
    truncation: str = opt(
        "right",
        "right: cut to max_sequence_length (counted) | drop: skip the sample (counted)",
        choices=TRUNCATION,
    )
    batch_size: int = opt(8, "samples per forward / generate call", ge=1)
    nll_chunk_tokens: int = opt(
        1024,
        "positions per LM-head call of the held-out loss; peak logits memory ~ chunk x vocab x 4 bytes",
        ge=1,
    )
    max_new_tokens: int = opt(32, "greedy generation length for exact match (GSM8K needs ~256)", ge=1)
    num_examples: int = opt(10, "predictions kept in eval_results.json for inspection", ge=0)
    adapter_check_samples: int = opt(
        4, "eval samples on which adapter-on vs adapter-off logits are compared", ge=1
    )
    adapter_check_atol: float = opt(
        0.0,
        "the adapter must move some logit by more than this, else 'adapter does not change the outputs'",
        ge=0.0,
    )
    lm_eval_tasks: list[str] = opt([], "lm-eval task names (e.g. [arc_easy, hellaswag]); [] skips lm-eval")
    lm_eval_include_path: str | None = opt(
        None, "dir of local lm-eval task YAMLs (with local data files) for offline tasks"
    )
    lm_eval_include_defaults: bool = opt(
        True, "also index lm-eval's built-in tasks (false is faster with local tasks only)"
    )
    lm_eval_num_fewshot: int | None = opt(
        None, "few-shot examples per lm-eval task; null: the task's default", ge=0
    )
    lm_eval_limit: float | None = opt(
        None, "lm-eval examples per task (>= 1) or fraction (< 1); null: all", gt=0.0
    )


@dataclass
class EvaluateConfig:
    """Stage 4: held-out loss / perplexity, exact match on checkable answers, optional lm-eval tasks."""

    stage: str = opt("evaluate", "which stage runs (quality-gate <stage> sets it)")
    run_name: str = opt("evaluate", "folder under outputs/ for this stage's run dirs", name=True)
    model_path: str = opt(
        asset("models/tiny-qwen2-target"),
        "base model: HF id or local path (the one the adapter was trained on)",
    )
    adapter_path: str | None = opt(
        None,
        "Stage 3 checkpoint-final/ (or checkpoint-<step>/) with adapter_config.json; null: base model only",
    )
    model: ModelOptions = opt(ModelOptions(), "how the base model is loaded")
    chat_template: str | None = opt(None, "Jinja chat template used when the tokenizer has none")
    eval: EvalOptions = opt(EvalOptions(), "the held-out data and the metrics")
    seed: int = seed_opt(42, "seeds generation-independent randomness and lm-eval's few-shot sampling")
    output_dir: str | None = opt(None, "run dir; null: outputs/<run_name>/<date>/<time>-<overrides>")


# --------------------------------------------------------------------------------------------- #
# The experiment runner
# --------------------------------------------------------------------------------------------- #
@dataclass
class ExperimentData:
    generate: bool = opt(
        True, "true: generate a synthetic pool with planted corruptions into the run dir; false: train_path"
    )
    num_samples: int = opt(2000, "synthetic records to generate", ge=1)
    noise_rate: float = opt(
        0.3, "fraction of generated records that are corrupted (labelled in meta.corruption)", ge=0.0, le=1.0
    )
    families: list[str] = opt(
        [],
        "corruption families planted in the pool, sharing the corrupted records evenly; [] = all "
        "(surprising: garbage, wrong_answer, truncated, other_task, repetition; predictable: generic, "
        "refusal, echo)",
    )
    train_path: str = opt(
        asset("data/synthetic_train.jsonl"), "candidate pool when generate=false (any data-layer format)"
    )
    dataset_name: str = opt("synthetic", "dataset name of the candidate pool", name="dataset")
    eval_path: str = opt(
        asset("data/synthetic_eval.jsonl"),
        "held-out records for Stage 4 (checkable answers give exact match)",
    )


@dataclass
class StageOverrides:
    warmup: list[str] = opt([], "key=value overrides of the warmup config")
    collect: list[str] = opt([], "key=value overrides of the collect config")
    select: list[str] = opt([], "key=value overrides of the select config")
    finetune: list[str] = opt(
        [
            "training.lora.r=16",
            "training.lora.alpha=32",
            "training.learning_rate=5e-3",
            "training.lr_scheduler_type=constant",
            "training.batch_size=32",
            "training.per_device_batch_size=32",
            "training.save_steps=100000",
            "training.report_to=[]",
        ],
        "key=value overrides of the finetune config; these suit the tiny target in minutes on a CPU (the "
        "stage's seed values, LoRA r=128 / lr 2e-4, are for real models); the number of steps comes from "
        "`compute`",
    )
    evaluate: list[str] = opt([], "key=value overrides of the evaluate config")


@dataclass
class ComputeBudget:
    match: str = opt(
        "steps",
        "steps: every fine-tuned arm (full data included) gets the optimizer steps a k-selection needs for "
        "`epochs` epochs | tokens: the same trained tokens (steps per arm from its mean sample length) | "
        "epochs: `epochs` passes over each arm's own data (the full arm gets more compute)",
        choices=["steps", "tokens", "epochs"],
    )
    epochs: float = opt(
        3.0,
        "epochs of a k-selection that define the budget (3 keeps make demo under 10 min on 2 cores)",
        gt=0.0,
    )


@dataclass
class Statistics:
    bootstrap: int = opt(
        2000, "bootstrap resamples (over fine-tune seeds and held-out samples, paired)", ge=100
    )
    confidence: float = opt(
        0.95, "confidence of the interval of each arm's difference to random", gt=0.5, lt=1.0
    )


@dataclass
class Sweep:
    noise_rates: list[float] = opt([], "noise rates of the sweep; [] runs one regime (data.noise_rate)")
    budgets: list[float] = opt([], "selection percentages of the sweep; [] uses selection_percentage")


@dataclass
class ExperimentConfig:
    """Runs the whole pipeline once per selector at the same compute: does selection help?"""

    stage: str = opt("experiment", "which stage runs (quality-gate <stage> sets it)")
    name: str = opt("demo", "a label for the summary and the folder under outputs/", name=True)
    seed: int = seed_opt(0, "seeds data generation, the gate init and warmup (fine-tunes use `seeds`)")
    output_dir: str | None = opt(None, "run dir; null: outputs/<name>/<date>/<time>")
    data: ExperimentData = opt(ExperimentData(), "the candidate pool and the held-out data")
    selector_model: str = opt(asset("models/tiny-qwen3-selector"), "base model that gets the quality gates")
    convert_selector: bool = opt(True, "convert it into a gated checkpoint first (seeded gate init)")
    target_model: str = opt(asset("models/tiny-qwen2-target"), "model fine-tuned on each selection")
    selection_percentage: float = opt(0.3, "budget k: every arm keeps ceil(k * N) samples", gt=0.0, le=1.0)
    selectors: list[str] = opt(
        ["quality_gate", "quality_gate+cluster", "perplexity", "ifd", "random"],
        "arms fine-tuned and compared at the same compute: a selector, or <selector>+cluster / +threshold "
        "for that selector with a diversity rule (the select overrides apply to every arm)",
    )
    ablations: list[str] = opt(
        ["unwarmed", "alpha0"],
        "selection-only rows that show the gates' share: unwarmed (quality_gate on gates never warmed up, "
        "a second Stage 2) | alpha0 (quality_gate without perplexity weighting)",
    )
    seeds: list[int] = opt(
        [0, 1, 2],
        "fine-tune seeds; every arm runs with each (paired), random selects with each",
        ge=0,
        le=SEED_MAX,
    )
    compute: ComputeBudget = opt(ComputeBudget(), "how the arms' fine-tune compute is matched")
    statistics: Statistics = opt(Statistics(), "intervals of the differences to random")
    include_full: bool = opt(True, "also fine-tune on all candidates (no selection), at the same compute")
    include_base: bool = opt(True, "also evaluate the target without fine-tuning")
    composition_key: str = opt(
        "task",
        "meta key that splits the pool into kinds (task, category, source): the summary compares each "
        "selection's make-up with the pool's; '' = off",
    )
    sweep: Sweep = opt(Sweep(), "a grid over noise rate and budget (make sweep)")
    overrides: StageOverrides = opt(StageOverrides(), "extra key=value overrides per stage")

    @staticmethod
    def check(cfg: Any) -> None:
        arms = [str(a).partition("+") for a in cfg.selectors]
        unknown = sorted({s for s, _, _ in arms} - set(SELECT_SELECTORS)) + sorted(
            {d for _, plus, d in arms if plus and d not in DIVERSITY[1:]}
        )
        if unknown:
            raise ConfigError(
                f"selectors={list(cfg.selectors)}: unknown {unknown}; an arm is a selector of "
                f"{SELECT_SELECTORS}, optionally with a diversity rule: <selector>+threshold or +cluster"
            )
        bad = sorted(set(cfg.ablations) - {"unwarmed", "alpha0"})
        if bad:
            raise ConfigError(
                f"ablations={list(cfg.ablations)}: unknown {bad}; choose from ['unwarmed', 'alpha0']"
            )
        if not cfg.seeds:
            raise ConfigError("seeds is empty: give at least one fine-tune seed")
        from quality_gate.synthetic import CORRUPTIONS

        bad = sorted(set(cfg.data.families) - set(CORRUPTIONS))
        if bad:
            raise ConfigError(f"data.families: unknown {bad}; choose from {list(CORRUPTIONS)}")


SCHEMAS: dict[str, type] = {
    "warmup": WarmupConfig,
    "collect": CollectConfig,
    "select": SelectConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "experiment": ExperimentConfig,
}


# --------------------------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------------------------- #
def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if value is None:
        return
    if isinstance(value, (list, ListConfig)):
        for i, item in enumerate(value):
            _check_value(f"{key}[{i}]", item, meta)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not supported; use one of {list(choices)}")
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if bound in meta and not ok(value, meta[bound]):
            raise ConfigError(f"{key}={value!r} must be {word} {meta[bound]}")
    if meta.get("name"):
        check_name(str(value), key, dataset=meta["name"] == "dataset")


def _unknown_key(key: str, stage: str, known: list[str]) -> ConfigError:
    """A key the schema does not have (Hydra adds any key given with ``+``): name it and the closest one."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(
        f"{key} is not a key of the {stage} config{hint} (Hydra accepts any new key written with +; "
        f"`quality-gate {stage} --help` lists the known ones)"
    )


def _validate_node(node: Any, cls: type, prefix: str, stage: str, known: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    for extra in (k for k in node if k not in names):
        raise _unknown_key(f"{prefix}{extra}", stage, [*(f"{prefix}{n}" for n in names), *known])
    for f in fields:
        key = f"{prefix}{f.name}"
        if OmegaConf.is_missing(node, f.name):
            raise ConfigError(f"{key} is not set ({f.metadata.get('help', 'required')})")
        value = node[f.name]
        kind = hints[f.name]
        inner = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if dataclasses.is_dataclass(kind):
            _validate_node(value, kind, f"{key}.", stage, known)
        elif inner is not None and dataclasses.is_dataclass(inner):
            for i, item in enumerate(value):
                _validate_node(item, inner, f"{key}[{i}].", stage, known)
        else:
            _check_value(key, value, dict(f.metadata))
    group_check = getattr(cls, "check_group", None)
    if group_check is not None:
        group_check(node, prefix.rstrip("."))


def validate(cfg: DictConfig) -> DictConfig:
    """Check ``cfg`` against its stage's schema; :class:`ConfigError` names the key. Returns ``cfg``.

    Every key must be one of the schema's (a key added with ``+`` is refused with the closest known
    one), every value within its field's checks, and each stage's cross-field rules hold. Reads no
    file and imports no torch: the command line runs it before Hydra makes a run dir.
    """
    stage = stage_of(cfg)
    schema = SCHEMAS[stage]
    known = [key for key, _, _ in help_rows(schema)]
    try:
        _validate_node(cfg, schema, "", stage, known)
    except KeyError as e:
        raise ConfigError(f"config key {e} is missing; is this a {stage} config?") from None
    check = getattr(schema, "check", None)
    if check is not None:
        check(cfg)
    return cfg


def stage_of(cfg: DictConfig) -> str:
    """The canonical stage name of ``cfg`` (``cfg.stage``; the seed's ``selection`` means collect)."""
    from quality_gate.compat import STAGE_ALIASES

    stage = cfg.get("stage")
    stage = STAGE_ALIASES.get(stage, stage)
    if stage not in SCHEMAS:
        raise ConfigError(f"config key `stage` is {cfg.get('stage')!r}; expected one of {sorted(SCHEMAS)}")
    return stage


def make_config(
    stage: str, values: dict[str, Any] | None = None, dotlist: typing.Sequence[str] = ()
) -> DictConfig:
    """The config of ``stage``: its schema's defaults, then ``values`` (dotted keys), then ``dotlist``.

    Equal to what ``quality-gate <stage> <dotlist>`` composes (without the ``hydra`` node); used by
    the experiment runner and tests. Raises :class:`ConfigError` for unknown keys and wrong types.
    """
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    cfg = OmegaConf.structured(SCHEMAS[stage])
    try:
        for key, value in (values or {}).items():
            update = OmegaConf.create({})
            OmegaConf.update(update, key, value, force_add=True)
            cfg = OmegaConf.merge(cfg, update)
        if dotlist:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(dotlist)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{stage} config: {e}") from None
    return validate(cfg)


# --------------------------------------------------------------------------------------------- #
# Resolvers used by the configs
# --------------------------------------------------------------------------------------------- #
def _launcher_start_time() -> dt.datetime | None:
    """Start time of the parent process (torchrun's agent), identical for all local ranks."""
    try:
        ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return dt.datetime.fromtimestamp(btime + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _now(fmt: str) -> str:
    """Now, formatted; under torchrun every rank composes its own config, so ranks take the launcher's
    start time instead (``${now:...}`` could differ by a second between ranks)."""
    when = None
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        when = _launcher_start_time()
    return (when or dt.datetime.now()).strftime(fmt)


def _suffix(override_dirname: str) -> str:
    """``-key-value_key2-value2`` for the run dir name, length capped.

    ``=`` and ``,`` become ``-`` and ``_`` (and any other unsafe character ``-``) so that the run dir
    can be pasted unquoted into the next stage's override (Hydra's grammar rejects ``=`` and ``,``).
    """
    import re

    if not override_dirname:
        return ""
    safe = override_dirname.replace("=", "-").replace(",", "_")
    safe = re.sub(r"[^A-Za-z0-9._+-]", "-", safe)
    return "-" + safe[:120]


def _first_set(value: Any, default: str) -> str:
    """``value`` unless it is null or empty, else ``default`` (``hydra.run.dir`` follows ``output_dir``)."""
    return default if value in (None, "") else str(value)


def _asset(relative: str) -> str:
    path = ASSETS_DIR / relative
    if not path.exists():
        raise ConfigError(f"embedded asset {relative!r} not found in {ASSETS_DIR}")
    return str(path)


def _rank_suffix() -> str:
    """``""`` on global rank 0, ``.rank<N>`` on the others: every rank of a launch writes its own log
    file into the shared run dir (``<stage>.log``, ``<stage>.rank1.log``, ...) instead of all of them
    appending to one file, which a shared (network) filesystem does not keep intact across nodes."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f".rank{rank}"


def _hydra_subdir() -> str | None:
    """Hydra's ``.hydra/`` record of the composed config: written by global rank 0 only."""
    return ".hydra" if os.environ.get("RANK", "0") == "0" else None


def register_resolvers() -> None:
    """Register the OmegaConf resolvers the configs use (idempotent)."""
    for name, fn in (
        ("qg_or", _first_set),
        ("qg_now", _now),
        ("qg_suffix", _suffix),
        ("qg_asset", _asset),
        ("qg_rank_suffix", _rank_suffix),
        ("qg_hydra_subdir", _hydra_subdir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register_configs() -> None:
    """Register every stage schema with Hydra's ConfigStore as ``schema_<stage>`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    store = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        store.store(name=f"schema_{stage}", node=schema)


def help_rows(schema: type) -> list[tuple[str, str, str]]:
    """``(dotted key, default, help)`` for every leaf key of a stage schema (the config reference)."""
    return _help_rows(schema, OmegaConf.to_container(OmegaConf.structured(schema), resolve=False), "")


def _help_rows(cls: type, values: dict[str, Any], prefix: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _help_rows(hints[f.name], values[f.name], f"{key}.")
        else:
            rows.append((key, _show(values[f.name]), str(f.metadata.get("help", ""))))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) if not isinstance(v, dict) else _show_dict(v) for v in value) + "]"
    if isinstance(value, dict):
        return _show_dict(value)
    text = str(value)
    return text.replace("${qg_asset:", "<assets>/").rstrip("}") if text.startswith("${qg_asset:") else text


def _show_dict(value: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items() if v is not None) + "}"


ASSETS_NOTE = "<assets>/ is the tiny assets embedded in the package (./assets in a checkout)."
