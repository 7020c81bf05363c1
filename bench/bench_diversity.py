"""Benchmark of the diversity rules at scale: wall time and peak RSS of each mode, no model involved.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_diversity.py                 # 1,000,000 x 256, 5 % budget
    .venv/bin/python bench/bench_diversity.py --samples 50000 --out /tmp/d.json  # quick look

Generates random-but-clustered float16 embeddings (``--centres`` random directions, each sample one
of them plus Gaussian noise of a per-sample scale, so that some groups are near-duplicates and others
are loose) and scores that depend on the centre (good samples crowd into a few regions, which is what
diversity has to undo), saves them as ``.npy`` under ``--dir``, then runs each mode (``none``,
``threshold``, ``cluster``) of :func:`quality_gate.selection.selectors.select_detailed` in a fresh
subprocess: ``select_s`` is the selection alone (ranking + the rule; k-means fit and assignment
included for ``cluster``), ``peak_rss_mb`` the child's own peak (``VmHWM``: loaded embeddings
included). Writes every figure, the machine's load average and the settings to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from quality_gate.selection.diversity import Diversity, cluster_diversity
from quality_gate.selection.scoring import SampleStats
from quality_gate.selection.selectors import SelectorScores, select_detailed

d, mode = Path(sys.argv[1]), sys.argv[2]
k, tau, clusters = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
emb = np.load(d / "embeddings.npy")  # (N, D) float16
score = np.load(d / "scores.npy")  # (N,)
n = len(score)
ids = [f"s{i:07d}" for i in range(n)]
stats = SampleStats(
    ids=ids, datasets=["bench"] * n, S=np.zeros((n, 1)), mean_nll=np.zeros(n), length=np.ones(n, np.int64),
    scope_positions=np.ones(n, np.int64), valid=np.ones(n, bool), invalid_reason=[""] * n,
    ifd=np.full(n, np.nan), has_ifd={"bench": False}, index_paths={"bench": d}, embeddings=emb,
)
t0 = time.perf_counter()
if mode == "threshold":
    div = Diversity("threshold", tau, embeddings=emb)
elif mode == "cluster":
    div = cluster_diversity(emb, stats.valid, clusters, seed=0)
else:
    div = Diversity()
fit_s = time.perf_counter() - t0
out = select_detailed(SelectorScores(score, np.ones(n, bool)), stats, k, False, div)
wall = time.perf_counter() - t0
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
row = {"mode": mode, "select_s": round(wall, 2), "peak_rss_mb": round(int(hwm[0].split()[1]) / 1024),
       "kept": int(out.selected.sum())}
if mode == "cluster":
    row["kmeans_s"] = round(fit_s, 2)
    row["kmeans"] = div.kmeans
    sizes = out.diversity["all"]["cluster_sizes"]
    row["cluster_sizes_min_max"] = [min(sizes), max(sizes)]
if mode == "threshold":
    g = out.diversity["all"]
    row.update({key: g[key] for key in ("examined", "skipped_near_duplicates", "pool_exhausted")})
print(json.dumps(row))
"""


def generate(out: Path, n: int, dim: int, centres: int, seed: int) -> None:
    """``embeddings.npy`` (n, dim) float16 and ``scores.npy`` (n,) float64, written block by block."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    quality = rng.normal(size=centres)  # some regions score better than others
    emb = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    scores = np.empty(n)
    block = 100_000
    for s in range(0, n, block):
        m = min(block, n - s)
        which = rng.integers(centres, size=m)
        # per-dim noise 0.005 .. 0.08: cosine to the centre from ~0.99 (near-duplicates) to ~0.6
        scale = rng.uniform(0.005, 0.08, size=(m, 1)).astype(np.float32)
        emb[s : s + m] = (c[which] + scale * rng.normal(size=(m, dim)).astype(np.float32)).astype(np.float16)
        scores[s : s + m] = quality[which] + rng.normal(size=m)
    emb.flush()
    del emb
    np.save(out / "scores.npy", scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--centres", type=int, default=2_000, help="regions the embeddings are drawn around")
    ap.add_argument("--percentage", type=float, default=0.05)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--modes", default="none,threshold,cluster")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qg_bench_diversity"))
    ap.add_argument("--out", type=Path, default=Path("bench_diversity.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.dir.exists():
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        generate(args.dir, args.samples, args.dim, args.centres, args.seed)
        print(f"generated {args.samples} x {args.dim} float16 embeddings in {time.perf_counter() - t0:.1f} s")
        results = {
            "samples": args.samples,
            "dim": args.dim,
            "centres": args.centres,
            "percentage": args.percentage,
            "budget": int(np.ceil(round(args.percentage * args.samples, 9))),
            "threshold": args.threshold,
            "clusters": args.clusters,
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_before": os.getloadavg(),
            "modes": [],
        }
        for mode in args.modes.split(","):
            argv = [str(args.dir), mode, str(args.percentage), str(args.threshold), str(args.clusters)]
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True
            )
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["load_average_after"] = os.getloadavg()
            results["modes"].append(row)
            print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
