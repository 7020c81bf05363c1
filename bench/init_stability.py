"""How much does the quality-gate score depend on the gate's random init (and the warmup's data order)?

    .venv/bin/python bench/init_stability.py --variants normal_init zero_init --seeds 0 1 2 3 4 \
        --pool-seed 100 --families held_out --out outputs/bench/init_stability.json

For every variant and warmup seed: convert the tiny selector with that seed (gate init), run Stage 1
(seeded: init of gates attached on load, data order) and Stage 2 on a synthetic pool, then select
with the quality-gate score. Reported per variant, over the seeds: AUROC clean vs corrupted (mean,
std), kept share of corrupted samples at k, and the rank agreement of the scores between seeds
(mean pairwise Spearman of q). The pool is generated with ``--pool-seed`` and ``--families``
(``tuning`` / ``held_out`` / ``all`` or a list): decisions are made on tuning families and seeds
(0-9) only; held-out families (truncated, echo) and held-out pool seeds (100-102) are for reporting.

Variants (``name: overrides``) are defined in VARIANTS below; add one to try another fix. The same
Stage 2 settings are used for all.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

VARIANTS: dict[str, dict[str, list[str]]] = {
    # method.md's init, Normal(0, 0.02): the default until 2026-11-26 (the study's "default" rows).
    "normal_init": {
        "convert": ["--init-std", "0.02", "--scale", "1"],
        "warmup": ["quality_gate.init_std=0.02", "quality_gate.scale=1"],
    },
    # Every gate starts at exactly sigmoid(0) = 0.5: the gradient alone shapes them (the default from
    # 2026-11-26 to 2026-12-04).
    "zero_init": {
        "convert": ["--init-std", "0", "--scale", "1"],
        "warmup": ["quality_gate.init_std=0", "quality_gate.scale=1", "quality_gate.scale=1"],
    },
    # The gate 2 * sigmoid(w . x) with w = 0: exactly the identity at init (an option since 2026-12-04;
    # docs/method.md has its figures on the real-label benchmark).
    "identity": {
        "convert": ["--init-std", "0", "--scale", "2"],
        "warmup": ["quality_gate.init_std=0", "quality_gate.scale=1", "quality_gate.scale=2"],
    },
    # method.md's init, a warmup three times as long.
    "long_warmup": {
        "convert": ["--init-std", "0.02", "--scale", "1"],
        "warmup": ["quality_gate.init_std=0.02", "quality_gate.scale=1", "training.epochs=6"],
    },
    # Zero init and the long warmup.
    "zero_init_long": {
        "convert": ["--init-std", "0", "--scale", "1"],
        "warmup": ["quality_gate.init_std=0", "quality_gate.scale=1", "training.epochs=6"],
    },
    # Zero init and a cosine decay to 0: the last batches (their order differs by seed) move the gates less.
    "zero_init_cosine": {
        "convert": ["--init-std", "0", "--scale", "1"],
        "warmup": ["quality_gate.init_std=0", "quality_gate.scale=1", "training.lr_scheduler_type=cosine"],
    },
    # Zero init and a 4x larger batch (less order noise per step, 4x fewer steps).
    "zero_init_bs64": {
        "convert": ["--init-std", "0", "--scale", "1"],
        "warmup": [
            "quality_gate.init_std=0",
            "quality_gate.scale=1",
            "training.batch_size=64",
            "training.per_device_batch_size=16",
        ],
    },
    # Zero init, cosine decay and a higher peak learning rate.
    "zero_init_cosine_lr1e-3": {
        "convert": ["--init-std", "0", "--scale", "1"],
        "warmup": [
            "quality_gate.init_std=0",
            "quality_gate.scale=1",
            "training.lr_scheduler_type=cosine",
            "training.learning_rate=1e-3",
        ],
    },
    # Zero init, higher learning rate (the gradient is the only signal, so let it move further).
    "zero_init_lr1e-3": {
        "convert": ["--init-std", "0", "--scale", "1"],
        "warmup": ["quality_gate.init_std=0", "quality_gate.scale=1", "training.learning_rate=1e-3"],
    },
}


def families_of(spec: list[str]) -> list[str]:
    from quality_gate.synthetic import CORRUPTIONS, HELD_OUT_FAMILIES, TUNING_FAMILIES

    if spec == ["tuning"]:
        return list(TUNING_FAMILIES)
    if spec == ["held_out"]:
        return list(HELD_OUT_FAMILIES)
    if spec == ["all"]:
        return list(CORRUPTIONS)
    return spec


def one_run(work: Path, pool: Path, variant: dict[str, list[str]], seed: int, k: float) -> dict:
    """Convert, warm up, collect, select for one seed; returns q per id and the audit row."""
    from quality_gate.cli import run_stage
    from quality_gate.config import make_config
    from quality_gate.convert import main as convert_main
    from quality_gate.selection.pipeline import run_selection

    selector = work / "selector"
    convert_main(
        ["--model", str(REPO / "assets" / "models" / "tiny-qwen3-selector"), "--save-path", str(selector),
         "--seed", str(seed), *variant["convert"]]
    )  # fmt: skip
    data = [f"dataset.local.datasets=[{{path: {pool}, dataset_name: pool}}]", f"seed={seed}"]
    model = [*data, f"selector_model.path={selector}"]
    warm = [*model, f"output_dir={work / 'warm'}", *variant["warmup"]]
    run_stage(make_config("warmup", {}, warm))
    stats = [*model, f"output_dir={work / 'stats'}", f"model_checkpoint_path={work / 'warm'}"]
    run_stage(make_config("collect", {}, [*stats, "data_process.embedding_dim=0"]))
    res = run_selection(
        make_config("select", {"root_dir": str(work / "stats"), "selection_percentage": k, "report": False})
    )
    warm = json.loads((work / "warm" / "warmup_metrics.json").read_text())
    audit = res.summary["corruption_audit"]["selectors"]["quality_gate"]
    return {
        "q": dict(zip(res.stats.ids, res.q.tolist())),
        "auroc": audit["auroc"],
        "per_kind": {f: v["auroc"] for f, v in audit["per_kind"].items()},
        "corrupted_share_of_kept": audit["corrupted_share_of_kept"],
        "gate_movement": {
            k2: warm["gate_movement"][k2] for k2 in ("learned_spread", "mean_shift", "late_share")
        },
        "perplexity_auroc": res.summary["corruption_audit"]["selectors"]["perplexity"]["auroc"],
    }


def spearman_mean(qs: list[dict[str, float]]) -> float:
    from quality_gate.selection.metrics import spearman

    ids = sorted(qs[0])
    vals = [np.array([q[i] for i in ids]) for q in qs]
    pairs = [spearman(a, b) for a, b in itertools.combinations(vals, 2)]
    return float(np.mean(pairs)) if pairs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["normal_init", "zero_init"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--pool-seed", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=["tuning"])
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--noise-rate", type=float, default=0.3)
    ap.add_argument("--k", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "init_stability.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from quality_gate.io import atomic_write_jsonl
    from quality_gate.synthetic import make_records

    # One thread: the tiny model gains little from a second one, and OpenMP spin-waits make a loaded
    # machine 10x slower with more threads than free cores.
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="qg_init_"))
    pool = work / "pool.jsonl"
    families = families_of(args.families)
    atomic_write_jsonl(
        pool, make_records(args.num_samples, args.noise_rate, args.pool_seed, "pool", families=families)
    )
    results = {"pool_seed": args.pool_seed, "families": families, "seeds": args.seeds, "variants": {}}
    for name in args.variants:
        t0 = time.perf_counter()
        runs = [one_run(work / f"{name}_{s}", pool, VARIANTS[name], s, args.k) for s in args.seeds]
        aurocs = [r["auroc"] for r in runs]
        results["variants"][name] = {
            "auroc_mean": float(np.mean(aurocs)),
            "auroc_std": float(np.std(aurocs, ddof=1)) if len(aurocs) > 1 else 0.0,
            "aurocs": aurocs,
            "per_kind_mean": {
                f: float(np.mean([r["per_kind"][f] for r in runs])) for f in runs[0]["per_kind"]
            },
            "corrupted_share_of_kept_mean": float(np.mean([r["corrupted_share_of_kept"] for r in runs])),
            "rank_agreement_spearman": spearman_mean([r["q"] for r in runs]),
            "gate_movement": [r["gate_movement"] for r in runs],
            "perplexity_auroc": runs[0]["perplexity_auroc"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        row = results["variants"][name]
        print(
            f"{name}: AUROC {row['auroc_mean']:.4f} +- {row['auroc_std']:.4f} {np.round(aurocs, 4).tolist()}"
            "; "
            f"rank agreement {row['rank_agreement_spearman']:.3f}; "
            f"corrupted kept {row['corrupted_share_of_kept_mean']:.3f}; "
            f"perplexity AUROC {row['perplexity_auroc']:.4f}; {row['seconds']} s",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
