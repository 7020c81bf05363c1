"""Whole-process cost of a stage: Stage 2 (collect) vs a plain batch-1 HF loop, each its own process.

    .venv/bin/python bench/bench_startup.py [--samples 8000] [--out outputs/bench/startup.json]

Measures, each as a fresh subprocess started from this machine's shell (imports, model load, data
encoding, scoring, writing, exit all included):

(a) ``quality-gate collect`` over N synthetic samples on the tiny selector (the real stage: token-budget
    batches, one backbone forward each, chunked NLL, atomic shards, indexes, records, metrics);
(b) a batch-size-1 loop of plain HF forwards over the same samples: ``AutoModelForCausalLM``, the
    chat template tokenized per record, full float32 logits, per-token perplexity kept per sample
    (the way Cherry_LLM and Data-Juicer score);
(c) the fixed cost of a stage run: ``quality-gate collect`` over 1 sample;
(d) ``quality-gate collect --help`` and a config error (``data_process.batch_size=abc``).

Target (issue 10): (b) / (a) >= 3 at N = 8,000. Every process gets OMP_NUM_THREADS = --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

BATCH1 = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
path, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path)
rows = [json.loads(line) for line in open(data)]
scores = {}
with torch.no_grad():
    for r in rows:
        ids = tok.apply_chat_template(r["messages"], return_tensors="pt", return_dict=True)["input_ids"]
        logits = model(input_ids=ids).logits[0, :-1].float()
        ppl = torch.exp(F.cross_entropy(logits, ids[0, 1:], reduction="none"))
        scores[r["id"]] = ppl.tolist()
json.dump({"n": len(scores)}, open(out, "w"))
"""


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs of (a) and (b), alternating; medians reported"
    )
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "startup.json")
    args = ap.parse_args()

    from quality_gate.io import atomic_write_jsonl
    from quality_gate.synthetic import make_records

    work = Path(tempfile.mkdtemp(prefix="qg_bench_startup_"))
    data = work / "pool.jsonl"
    atomic_write_jsonl(data, make_records(args.samples, 0.3, seed=11, dataset_name="pool"))
    one = work / "one.jsonl"
    atomic_write_jsonl(one, make_records(1, 0.0, seed=12, dataset_name="one"))
    selector = REPO / "src" / "quality_gate" / "assets" / "models" / "tiny-qwen3-selector"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    qg = [sys.executable, "-m", "quality_gate"]

    def collect(path: Path, out: Path) -> list[str]:
        return [
            *qg,
            "collect",
            f"dataset.local.datasets=[{{path: {path}, dataset_name: pool}}]",
            f"output_dir={out}",
        ]

    def batch1() -> list[str]:
        return [sys.executable, "-c", BATCH1, str(selector), str(data), str(work / "b1.json")]

    figures: dict[str, object] = {
        "samples": args.samples,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    walls, walls_b1, phases = [], [], []
    for k in range(args.repeats):
        out = work / f"collect{k}"
        wall, proc = timed(collect(data, out), env, work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((out / "stage2_metrics.json").read_text())
        walls.append(round(wall, 2))
        phases.append(metrics["phases_s"])
        figures["collect_tokens"] = metrics["tokens_scored_this_run"]
        wall_b1, proc = timed(batch1(), env, work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        walls_b1.append(round(wall_b1, 2))
    figures["collect_wall_s"] = walls
    figures["batch1_wall_s"] = walls_b1
    figures["speedup_per_pair"] = [round(b / a, 2) for a, b in zip(walls, walls_b1)]
    figures["speedup_whole_process_median"] = round(statistics.median(walls_b1) / statistics.median(walls), 2)
    figures["collect_phases_s_first_run"] = phases[0]

    wall_one, proc = timed(collect(one, work / "one"), env, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures["fixed_cost_one_sample_s"] = round(wall_one, 2)
    figures["fixed_cost_phases_s"] = json.loads((work / "one" / "stage2_metrics.json").read_text())[
        "phases_s"
    ]
    wall_help, proc = timed([*qg, "collect", "--help"], env, work)
    figures["help_s"] = round(wall_help, 3)
    wall_err, proc = timed([*qg, "collect", "data_process.batch_size=abc"], env, work)
    assert proc.returncode != 0 and "data_process.batch_size" in proc.stderr + proc.stdout
    figures["config_error_s"] = round(wall_err, 3)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
