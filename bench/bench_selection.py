"""Benchmark of the selection at scale: wall time and peak RSS of the selection process alone.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_selection.py            # 100,000 x 28 layers x ~200 tokens
    .venv/bin/python bench/bench_selection.py --samples 2000 --keep        # quick look, keep the data

Generates random router data in Stage 2's format under ``--dir`` (lengths uniform in [100, 300],
mean 200: about 1.1 GB of float16 gates) with fake records (30 % labelled corrupted), then runs
``run_selection`` (report and exports included) in a fresh subprocess and reports its wall time
and peak RSS (``VmHWM`` of the child). Targets on 2 cores: under 60 s and under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# The synthetic router data of the selection tests (tests/helpers.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import fake_record, fake_shard, write_router_dataset

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from quality_gate.config import make_config
from quality_gate.selection import run_selection
res = run_selection(make_config("select", {"root_dir": sys.argv[1], "selection_percentage": 0.05}))
wall = time.perf_counter() - t0
# VmHWM is this process's own peak: ru_maxrss would also carry the generator parent's peak, which
# Linux keeps across fork + exec.
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
rss_mb = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mb": round(rss_mb), "kept": int(res.selected.sum())}))
"""


def generate(root: Path, samples: int, layers: int, shard_size: int, seed: int) -> float:
    """Write the router data and records; returns the gigabytes of gates written."""
    g = torch.Generator().manual_seed(seed)
    shards = []
    for start in range(0, samples, shard_size):
        n = min(shard_size, samples - start)
        ids = [f"bench_{i}" for i in range(start, start + n)]
        lengths = torch.randint(100, 301, (n,), generator=g).tolist()
        shards.append(fake_shard(ids, lengths, layers, g, ifd=True))
        print(f"generated shard {len(shards)} ({start + n}/{samples} samples)", flush=True)
    records = [
        fake_record("bench", sid, {"corruption": "shuffle" if k % 10 < 3 else None})
        for k, sid in enumerate(s for sh in shards for s in sh["sample_ids"])
    ]
    write_router_dataset(root / "router_data", "bench", shards, records=records)
    return sum(s["gates"].numel() * 2 for s in shards) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--shard-size", type=int, default=5_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qg_bench_selection"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the generated data (default: delete it)")
    args = ap.parse_args()

    if args.dir.exists():
        shutil.rmtree(args.dir)
    t0 = time.perf_counter()
    gb = generate(args.dir, args.samples, args.layers, args.shard_size, args.seed)
    took = time.perf_counter() - t0
    print(f"generated {args.samples} samples x {args.layers} layers, {gb:.2f} GB of gates in {took:.1f} s")
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.dir)], capture_output=True, text=True, check=True
        )
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            json.dumps({"samples": args.samples, "layers": args.layers, "gates_gb": round(gb, 2), **figures})
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
