"""The tiny pipeline end to end on CUDA (bf16) against the same run on CPU (issue 13, part 2).

    python bench/gpu_pipeline_check.py --out outputs/gpu_pipeline        # on a CUDA machine, ~2-4 minutes
    python bench/gpu_pipeline_check.py --devices cpu cpu --small ...     # the CPU smoke test of the tests

Runs ``quality-gate experiment`` (Stage 0 convert, Stage 1, Stage 2, selection with every selector,
Stage 3 LoRA, Stage 4) twice on the embedded tiny assets and the same synthetic pool, each in its own
process: once with the GPU visible (``selector_model.dtype=auto``: bfloat16 on CUDA) and once with
``CUDA_VISIBLE_DEVICES=""`` (float32 on CPU). Then compares the two quality-gate selections: Spearman
rank correlation of the scores ``q`` over the samples both scored, the overlap of the selected ids, and
both runs' held-out loss of the quality_gate arm. Writes ``pipeline_check.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]


def experiment_args(out: Path, small: bool) -> list[str]:
    """One small regime: quality_gate and random arms, one seed."""
    args = [
        "name=gpu_pipeline_check",
        f"output_dir={out}",
        "selectors=[quality_gate,random]",
        "ablations=[]",
        "include_full=false",
        "seeds=[0]",
    ]
    if small:
        args += [
            "data.num_samples=80",
            "selection_percentage=0.25",
            "compute.epochs=1",
            "statistics.bootstrap=100",
            'overrides.warmup=["training.max_steps=2","dataset.subset_ratio=1.0","training.gate_stats_samples=8"]',
            'overrides.finetune=["training.batch_size=8","training.per_device_batch_size=8","training.lora.r=4",'
            '"training.lora.alpha=8","training.report_to=[]"]',
            'overrides.evaluate=["eval.max_samples=16","eval.max_new_tokens=8"]',
        ]
    return args


def run(device: str, out: Path, small: bool) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "quality_gate", "experiment", *experiment_args(out, small)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the {device} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"device": device, "wall_s": round(wall, 1), "summary": summary}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(first: Path, second: Path) -> dict:
    """Rank agreement of ``q`` and overlap of the selections of two runs' quality_gate selections."""
    tables = [
        pq.read_table(p / "select" / "quality_gate" / "scores.parquet").to_pydict() for p in (first, second)
    ]
    rows = [
        {i: (q, sel) for i, q, sel, ok in zip(t["id"], t["q"], t["selected"], t["valid"]) if ok}
        for t in tables
    ]
    common = sorted(set(rows[0]) & set(rows[1]))
    q0 = np.array([rows[0][i][0] for i in common])
    q1 = np.array([rows[1][i][0] for i in common])
    sel = [{i for i in common if r[i][1]} for r in rows]
    return {
        "samples_scored_by_both": len(common),
        "spearman_q": round(spearman(q0, q1), 4),
        "selected_overlap": round(len(sel[0] & sel[1]) / max(len(sel[0] | sel[1]), 1), 4),
        "selected": [len(s) for s in sel],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_pipeline")
    ap.add_argument("--devices", nargs=2, default=["cuda", "cpu"], help="the two runs (cuda | cpu)")
    ap.add_argument("--small", action="store_true", help="a very small configuration (CPU smoke test)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run(dev, args.out / f"{k}_{dev}", args.small) for k, dev in enumerate(args.devices)]
    figures = {
        "runs": [
            {
                "device": r["device"],
                "wall_s": r["wall_s"],
                "quality_gate_eval_loss": r["summary"]["arms"]["quality_gate"]["eval_loss"],
                "quality_gate_auroc": r["summary"]["arms"]["quality_gate"]["auroc"],
                "random_eval_loss": r["summary"]["arms"]["random"]["eval_loss"],
            }
            for r in runs
        ],
        "agreement": compare(args.out / f"0_{args.devices[0]}", args.out / f"1_{args.devices[1]}"),
    }
    figures["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    (args.out / "pipeline_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
