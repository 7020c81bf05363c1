"""The groups several stages share, written once: model loading, gates, datasets, training, LoRA.

A stage composes them into its schema (:mod:`quality_gate.config.stages`), with its own defaults where
they differ (``DatasetConfig(subset_ratio=0.5)``), and subclasses a group for keys of its own.
"""

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from quality_gate.config.fields import DTYPES, TRUNCATION, asset, opt
from quality_gate.errors import ConfigError
from quality_gate.names import dataset_names


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


@dataclass
class LoraConfig:
    """A LoRA adapter's shape (Stage 1 on the gates, Stage 3 on the target): the seed's fine-tune values
    (Stage 1 composes it with its own)."""

    r: int = opt(128, "LoRA rank (peft_mode=lora only)", ge=1)
    alpha: int = opt(256, "LoRA alpha: the update is scaled by alpha / r (peft_mode=lora only)", ge=1)
    dropout: float = opt(0.05, "LoRA dropout (peft_mode=lora only)", ge=0.0, le=1.0)


LM_LOSS_CHUNK_HELP = (
    "0: the LM loss on transformers' full-vocabulary float32 logits; N: the same loss N labelled "
    "positions at a time, each chunk recomputed in backward (peak ~N x vocab x 4 bytes instead of "
    "batch x length x vocab x 4, several times over; one more LM-head forward per step); not under FSDP"
)


@dataclass
class TrainingConfig:
    """The optimisation both training stages share (Stage 1 the gates, Stage 3 the target).

    The defaults are the seed's fine-tune (Stage 3); Stage 1 composes it with its own values.
    """

    learning_rate: float = opt(2e-4, "peak learning rate", gt=0.0)
    lr_scheduler_type: str = opt("cosine", "transformers scheduler name: constant | linear | cosine | ...")
    warmup_steps: int = opt(0, "learning-rate warmup steps", ge=0)
    batch_size: int = opt(
        64, "total samples per optimizer step = per_device_batch_size x world size x accumulation", ge=1
    )
    per_device_batch_size: int = opt(8, "samples per forward on each process", ge=1)
    epochs: float = opt(3.0, "passes over the data", ge=0.0)
    max_steps: int = opt(-1, "stop after this many optimizer steps; -1: run all epochs")
    gradient_checkpointing: bool = opt(
        False, "recompute activations in backward (non-reentrant): less memory, ~30% slower"
    )
    lm_loss_chunk_tokens: int = opt(0, LM_LOSS_CHUNK_HELP, ge=0)
    logging_steps: int = opt(
        5,
        "log the losses (Stage 1 also quality_loss and gate_mean) every N optimizer steps; the non-finite "
        "loss check runs then too",
        ge=1,
    )
    report_to: list[str] = opt(
        ["tensorboard"],
        "loggers, e.g. [tensorboard] (skipped with a warning when not installed); [] for none",
    )
    dataloader_num_workers: int = opt(0, "DataLoader worker processes", ge=0)

    @staticmethod
    def check_group(node: Any, key: str) -> None:
        """Some step to train, and a total batch that the per-device batches make up (one process)."""
        if float(node.epochs) <= 0 and int(node.max_steps) <= 0:
            raise ConfigError(
                f"{key}.epochs={node.epochs} and {key}.max_steps={node.max_steps} would train zero steps; "
                f"set {key}.epochs > 0 or {key}.max_steps > 0"
            )
        gradient_accumulation_steps(int(node.batch_size), int(node.per_device_batch_size), 1, key)


def gradient_accumulation_steps(
    total_batch_size: int, per_device_batch_size: int, world_size: int, key: str = "training"
) -> int:
    """Return the gradient accumulation steps for ``total = per_device x world_size x accumulation``.

    Raises :class:`ConfigError` (a ``ValueError``) naming the three numbers when ``total`` is not a
    multiple of ``per_device x world_size``; ``key`` is the training group's key in the config. The
    config checks it for one process, the Trainer's arguments for the launch's world size.
    """
    for name, value in (
        (f"{key}.batch_size", total_batch_size),
        (f"{key}.per_device_batch_size", per_device_batch_size),
        ("world size", world_size),
    ):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    effective = per_device_batch_size * world_size
    if total_batch_size % effective != 0:
        raise ConfigError(
            f"{key}.batch_size={total_batch_size} is not a multiple of "
            f"{key}.per_device_batch_size={per_device_batch_size} x world size {world_size} "
            f"= {effective}. Choose a total batch size that is a multiple of {effective}, or change "
            "the per-device batch size."
        )
    return total_batch_size // effective
