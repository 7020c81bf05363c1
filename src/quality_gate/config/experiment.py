"""The experiment runner's schema: the whole pipeline once per selector at the same compute."""

from dataclasses import dataclass
from typing import Any

from quality_gate.config.fields import DIVERSITY, SEED_MAX, SELECT_SELECTORS, asset, opt, seed_opt
from quality_gate.errors import ConfigError


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
    results_file: str | None = opt(
        None,
        "also write the summary markdown here, under a header naming the command, date and commit "
        "(make demo: docs/results/demo.md, make sweep: docs/results/sweep.md); null: only the run dir",
    )
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
