"""Stages 1 and 2 with the real selector (SmolLM2-135M-Instruct, bundled GGUF) on this machine's CPUs.

    .venv/bin/python bench/bench_real_selector.py --data-dir ../shared/data --out bench/real_selector.json
    .venv/bin/python bench/bench_real_selector.py --dtype bfloat16 --out bench/real_selector_bf16.json

Runs the real stages (the same code as ``quality-gate warmup`` / ``collect``) on Alpaca samples of
``alpagasus_random_9k.json`` and reports tokens/s and peak RSS of each, against what the same CPUs do
in a float32 matmul of the model's width: the achieved FLOP/s of the stage (2 N T for a forward,
4 N T for Stage 1's forward plus activation gradients, N the parameters without the tied embedding
counted twice, T the tokens; attention's T^2 term left out, so the share is a lower bound) divided by
the matmul's FLOP/s. Each stage runs in its own subprocess so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def matmul_gflops(hidden: int, inter: int, tokens: int = 2048, repeats: int = 5) -> float:
    """FLOP/s (in GFLOP/s) of a float32 (tokens, hidden) x (hidden, intermediate) matmul, best of repeats."""
    import torch

    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inter)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * tokens * hidden * inter / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def child(stage: str, values_json: str) -> None:
    """Run one stage in this process; print its peak RSS (GB) last."""
    import importlib

    from quality_gate.config import make_config

    values = json.loads(values_json)
    importlib.import_module(f"quality_gate.stages.{stage}").run(make_config(stage, values))
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))


def run_child(stage: str, values: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, __file__, "--child", stage, json.dumps(values)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "real_selector.json")
    ap.add_argument("--samples", type=int, default=96, help="Stage 2 samples (Stage 1: a third of them)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="auto", help="selector_model.dtype (auto: float32 on a CPU)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch
    from transformers import AutoConfig

    from quality_gate.benchmarks.real import plain_selector
    from quality_gate.io import atomic_write_json, atomic_write_jsonl

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="qg_real_sel_"))
    selector = plain_selector("smollm2-135m-instruct", work / "selector")
    cfg = AutoConfig.from_pretrained(selector)
    n_params = sum(
        p.numel()
        for name, p in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(str(Path(selector) / "model.safetensors"))
        .items()
    )
    rows = json.loads((args.data_dir / "alpagasus_random_9k.json").read_text())[: args.samples]
    data = work / "pool.jsonl"
    atomic_write_jsonl(data, [{"id": f"a{i}", **r} for i, r in enumerate(rows)])
    common = {
        "selector_model.path": selector,
        "dataset.local.datasets": [{"path": str(data), "dataset_name": "alpaca"}],
        "dataset.max_sequence_length": 384,
        "selector_model.dtype": args.dtype,
    }
    stage2 = run_child("collect", {**common, "output_dir": str(work / "collect")}, args.threads)
    m2 = json.loads((work / "collect" / "stage2_metrics.json").read_text())
    stage1 = run_child(
        "warmup",
        {
            **common,
            "dataset.subset_ratio": 1 / 3,
            "training.epochs": 1.0,
            "training.gate_stats_samples": 8,
            "output_dir": str(work / "warmup"),
        },
        args.threads,
    )
    m1 = json.loads((work / "warmup" / "warmup_metrics.json").read_text())
    gflops = matmul_gflops(cfg.hidden_size, cfg.intermediate_size)
    s2_tps = float(m2["tokens_per_s"])
    s1_tps = m1["tokens_seen"] / m1["train_runtime_s"]
    result = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, dequantised to float32)",
        "params": n_params,
        "threads": args.threads,
        "dtype": args.dtype,
        "matmul_gflops": round(gflops, 1),
        "stage2": {
            "samples": args.samples,
            "tokens_per_s": s2_tps,
            "achieved_gflops": round(2 * n_params * s2_tps / 1e9, 1),
            "share_of_matmul": round(2 * n_params * s2_tps / 1e9 / gflops, 3),
            "peak_rss_gb": round(stage2["peak_rss_gb"], 2),
        },
        "stage1": {
            "samples": m1["num_train_samples"],
            "tokens_per_s": round(s1_tps, 1),
            "achieved_gflops": round(4 * n_params * s1_tps / 1e9, 1),
            "share_of_matmul": round(4 * n_params * s1_tps / 1e9 / gflops, 3),
            "peak_rss_gb": round(stage1["peak_rss_gb"], 2),
        },
        "load_average": os.getloadavg(),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
