"""The schema of each pipeline stage: Stage 1 warmup, Stage 2 collect, selection, Stage 3 finetune,
Stage 4 evaluate (the experiment runner's is in :mod:`quality_gate.config.experiment`), and
:data:`SCHEMAS`, every stage's schema by its name.

Each stage composes the shared groups of :mod:`quality_gate.config.groups`; ``check`` holds a
stage's cross-field rules.
"""

from dataclasses import dataclass
from typing import Any

from quality_gate.config.experiment import ExperimentConfig
from quality_gate.config.fields import (
    DEFAULT_SEED,
    DIVERSITY,
    PAIRINGS,
    SELECT_SELECTORS,
    SELECTORS,
    TOKEN_SCOPES,
    TRUNCATION,
    asset,
    opt,
    seed_opt,
)
from quality_gate.config.groups import (
    DatasetConfig,
    GateInitConfig,
    LoraConfig,
    SelectorModelConfig,
    TargetModelConfig,
    TrainingConfig,
)
from quality_gate.errors import ConfigError


# --------------------------------------------------------------------------------------------- #
# Stage 1: warmup
# --------------------------------------------------------------------------------------------- #
@dataclass
class WarmupTraining(TrainingConfig):
    """The optimisation of the gates (the keys Stage 1 adds to the shared ones)."""

    peft_mode: str = opt(
        "full_rank",
        "full_rank: train the gate weights | lora: LoRA on quality_gate.gate (training.lora)",
        choices=["full_rank", "lora"],
    )
    lora: LoraConfig = opt(LoraConfig(r=16, alpha=64, dropout=0.0), "LoRA settings of peft_mode=lora")
    quality_loss_weight: float = opt(
        1.0, "weight of the quality loss (mean gate value) next to the LM loss", ge=0.0
    )
    quality_loss_mode: str = opt(
        "sample",
        "sample: mean within each sample, then over samples | token: mean over all tokens",
        choices=["sample", "token"],
    )
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
    training: WarmupTraining = opt(
        # the seed's warmup: lr 3e-4, constant
        WarmupTraining(
            learning_rate=3e-4, lr_scheduler_type="constant", batch_size=16, epochs=2.0, report_to=[]
        ),
        "optimisation of the gates",
    )
    seed: int = seed_opt(DEFAULT_SEED, "seeds gate init, subset_ratio sampling, shuffling and the Trainer")
    output_dir: str | None = opt(None, "run dir; null: outputs/<run_name>/<date>/<time>-<overrides>")


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
    seed: int = seed_opt(
        DEFAULT_SEED, "seeds subset_ratio sampling, shuffling and the init of gates attached on load"
    )
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
        choices=TOKEN_SCOPES,
    )
    pairing: str = opt(
        "same_token",
        "same_token: gate at token t with the perplexity of token t | next_token: of token t+1 "
        "(docs/method.md)",
        choices=PAIRINGS,
    )
    per_dataset: bool = opt(False, "true: the percentage and the column statistics within each dataset")
    seed: int = seed_opt(DEFAULT_SEED, "seed of the random selector and of diversity=cluster's k-means")
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
class FinetuneLora(LoraConfig):
    """LoRA on the target's modules (``peft_mode=lora``)."""

    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "modules that get LoRA"
    )


@dataclass
class FinetuneTraining(TrainingConfig):
    """The target model and the keys Stage 3 adds to the shared optimisation (the seed's values)."""

    model: TargetModelConfig = opt(TargetModelConfig(), "the target model")
    peft_mode: str = opt(
        "lora",
        "lora: train a LoRA adapter (training.lora) | full: train every parameter",
        choices=["lora", "full"],
    )
    lora: FinetuneLora = opt(FinetuneLora(), "LoRA settings of peft_mode=lora")
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", ge=0.0)
    save_steps: int = opt(50, "write a resumable checkpoint-<step>/ every N optimizer steps", ge=1)
    save_total_limit: int | None = opt(
        3, "keep at most this many checkpoint-<step>/ dirs; null keeps all", ge=1
    )


@dataclass
class FinetuneConfig:
    """Stage 3: fine-tune the target model on the selection (or on the full data, the baseline)."""

    stage: str = opt("finetune", "which stage runs (quality-gate <stage> sets it)")
    run_name: str = opt("finetune", "folder under outputs/ for this stage's run dirs", name=True)
    dataset: FinetuneDataset = opt(FinetuneDataset(sort_by_length=False), "the training data")
    training: FinetuneTraining = opt(FinetuneTraining(), "the target model and its optimisation")
    seed: int = seed_opt(DEFAULT_SEED, "seeds LoRA init, subset_ratio sampling, shuffling and the Trainer")
    output_dir: str | None = opt(
        None, "run dir; null: outputs/<run_name>/<date>/<time>-<overrides>; an existing one resumes"
    )

    @staticmethod
    def check(cfg: Any) -> None:
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
    model: TargetModelConfig = opt(
        TargetModelConfig(), "the base model (the one the adapter was trained on) and how it is loaded"
    )
    adapter_path: str | None = opt(
        None,
        "Stage 3 checkpoint-final/ (or checkpoint-<step>/) with adapter_config.json; null: base model only",
    )
    chat_template: str | None = opt(None, "Jinja chat template used when the tokenizer has none")
    eval: EvalOptions = opt(EvalOptions(), "the held-out data and the metrics")
    seed: int = seed_opt(
        DEFAULT_SEED, "seeds generation-independent randomness and lm-eval's few-shot sampling"
    )
    output_dir: str | None = opt(None, "run dir; null: outputs/<run_name>/<date>/<time>-<overrides>")


SCHEMAS: dict[str, type] = {
    "warmup": WarmupConfig,
    "collect": CollectConfig,
    "select": SelectConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "experiment": ExperimentConfig,
}
