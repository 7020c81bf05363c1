"""Benchmark of Stage 2 (statistics collection). A script, not a test.

    .venv/bin/python bench/bench_stage2.py --out outputs/bench/stage2.json

(a) tokens/s of Stage 2 (the real stage: token-budget batches, one backbone forward, chunked NLL)
    vs a batch-size-1 loop over the same model and samples that scores the way Cherry_LLM and
    data-juicer do (full float32 logits of one sample at a time). Target: >= 5x.
(b) peak RSS of collection on a tiny model with a 151,936-entry vocabulary at 8,192 tokens per
    batch, measured in a fresh subprocess. Target: < 1.5 GB (dense float32 logits alone: 5 GB).
(c) bytes on disk per scored token in the shards of run (a), the per-sample embeddings counted apart
    (bytes per sample). Target: <= 2 x layers + 8.
(d) CPU efficiency: the achieved FLOP/s of Stage 2's forward (``collect_batch`` over the stage's own
    token-budget batches of the same samples) against a float32 ``torch.matmul`` of
    (tokens, hidden) x (hidden, intermediate) measured in the same run with the same thread count;
    prints the ratio. FLOPs per batch (bench/flops.py): 2 x P_lin x B x S (every decoder Linear,
    gates included, per padded token) + 4 x L x heads x head_dim x B x S^2 (scores and values, the
    dense square) + 2 x V x H x scored positions (the LM head); "useful" counts real tokens only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quality_gate.config import make_config  # noqa: E402


def stage2_config(overrides: list[str]):
    return make_config("collect", dotlist=overrides)


def selector_and_samples(cfg, num_samples: int):
    """The tiny selector (float32, eval), its tokenizer and the first ``num_samples`` encoded samples of
    ``cfg``'s data."""
    from quality_gate.data import encode_records, load_records
    from quality_gate.models import load_selector

    model, tokenizer = load_selector(str(cfg.selector_model.path), dtype="float32", device="cpu")
    model.eval()
    records = load_records(cfg.dataset, seed=int(cfg.seed), report_dir=None)
    samples, _, _ = encode_records(
        records, tokenizer, int(cfg.dataset.max_sequence_length), str(cfg.dataset.truncation)
    )
    return model, tokenizer, samples[:num_samples]


def bench_throughput(num_samples: int, threads: int) -> dict:
    """(a) and (c): Stage 2 on the synthetic data vs a batch-size-1 full-logits loop."""
    from quality_gate.gate import record_gates
    from quality_gate.stages.collect import run
    from quality_gate.stats.store import find_router_data, iter_shards, load_index

    torch.set_num_threads(threads)
    out_dir = Path(tempfile.mkdtemp(prefix="bench_stage2_"))
    cfg = stage2_config([f"output_dir={out_dir}"])
    run(cfg)
    metrics = json.loads((out_dir / "stage2_metrics.json").read_text())
    if metrics["samples"] < num_samples:
        raise SystemExit(f"only {metrics['samples']} samples in dataset.local.datasets; need {num_samples}")

    # (c) bytes per scored position, from the shards written by the run above.
    # The per-sample embeddings (diversity selection) are counted apart: they scale with samples, not tokens.
    shard_bytes, positions, layers, embedding_bytes, stored_samples = 0, 0, None, 0, 0
    for index_path in find_router_data(out_dir):
        index = load_index(index_path)
        layers = index["num_layers"]
        positions += int(index["lengths"].sum())
        shard_bytes += sum((index_path.parent / rel).stat().st_size for rel in index["shards"])
        for shard in iter_shards(index_path):
            stored_samples += len(shard)
            if shard.embeddings is not None:
                embedding_bytes += shard.embeddings.numel() * shard.embeddings.element_size()

    # Baseline: the same model and samples, one sample at a time, full float32 logits.
    model, _, samples = selector_and_samples(cfg, num_samples)
    tokens = sum(len(s.input_ids) for s in samples)
    start = time.perf_counter()
    with torch.inference_mode():
        for s in samples:
            ids = torch.tensor([s.input_ids])
            with record_gates(model) as rec:
                logits = model(input_ids=ids).logits.float()  # (1, n, V): the full-vocabulary logits
                gates = torch.sigmoid(rec.logits())  # (1, L, n)
            ppl = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none").exp()
            gates.cpu(), ppl.cpu()
    baseline_s = time.perf_counter() - start
    baseline_tps = tokens / baseline_s
    return {
        "samples": metrics["samples"],
        "stage2_tokens_per_s": metrics["tokens_per_s"],
        "stage2_samples_per_s": metrics["samples_per_s"],
        "stage2_padding_fraction": metrics["padding_fraction"],
        "baseline_batch1_tokens_per_s": round(baseline_tps, 1),
        "baseline_samples": len(samples),
        "speedup": round(metrics["tokens_per_s"] / baseline_tps, 2),
        "bytes_per_scored_token": round((shard_bytes - embedding_bytes) / max(positions, 1), 3),
        "embedding_bytes_per_sample": round(embedding_bytes / max(stored_samples, 1), 1),
        "bytes_per_scored_token_with_embeddings": round(shard_bytes / max(positions, 1), 3),
        "bytes_per_token_limit": 2 * layers + 8 if layers else None,
        "num_layers": layers,
        "scored_positions": positions,
        "run_dir": str(out_dir),
    }


def bench_flops(num_samples: int, threads: int) -> dict:
    """(d) achieved FLOP/s of Stage 2's forward vs a matmul of the same width, same thread count."""
    from flops import batch_flops, decoder_dims, matmul_flops_per_s

    from quality_gate.data import pad_batch, token_budget_batches
    from quality_gate.stats.collect import collect_batch

    torch.set_num_threads(threads)
    cfg = stage2_config([])
    dp = cfg.data_process
    model, tokenizer, samples = selector_and_samples(cfg, num_samples)
    batches = token_budget_batches(
        [len(s.input_ids) for s in samples],
        int(dp.max_tokens_per_batch),
        int(dp.batch_size),
        bool(cfg.dataset.sort_by_length),
    )
    dims = decoder_dims(model)
    padded = [pad_batch([samples[i] for i in rows], int(tokenizer.pad_token_id)) for rows in batches]

    def forward(batch: dict) -> None:
        collect_batch(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            chunk_tokens=int(dp.nll_chunk_tokens),
        )

    forward(padded[0])  # warm-up
    seconds, executed, useful, slots = 0.0, 0.0, 0.0, 0
    for batch in padded:
        start = time.perf_counter()
        forward(batch)
        seconds += time.perf_counter() - start
        b, width = batch["input_ids"].shape
        f = batch_flops(dims, width, batch["attention_mask"].sum(1).tolist())
        executed, useful, slots = executed + f["executed"], useful + f["useful"], slots + b * width
    tokens = max(1, round(slots / len(padded)))  # the mean padded batch: the shape the forward ran
    matmul = matmul_flops_per_s(tokens, dims["hidden"], dims["intermediate"])
    achieved = executed / seconds / 1e9
    return {
        "model": dims,
        "batches": len(padded),
        "samples": len(samples),
        "forward_seconds": round(seconds, 3),
        "executed_gflop": round(executed / 1e9, 2),
        "useful_gflop": round(useful / 1e9, 2),
        "achieved_gflop_per_s": round(achieved, 2),
        "achieved_useful_gflop_per_s": round(useful / seconds / 1e9, 2),
        "matmul": matmul,
        "ratio_to_matmul": round(achieved / matmul["gflop_per_s"], 3),
        "threads": threads,
    }


def rss_child(vocab: int, tokens_per_batch: int, chunk: int) -> None:
    """(b), in a fresh process: collect one 8,192-token batch on a tiny 151,936-vocab model."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from quality_gate.gate import attach_quality_gates
    from quality_gate.stats.collect import collect_batch

    torch.set_num_threads(1)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    attach_quality_gates(model)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    seq = 1024
    batch = tokens_per_batch // seq
    ids = torch.randint(0, vocab, (batch, seq))
    am = torch.ones_like(ids)
    labels = ids.clone()
    start = time.perf_counter()
    stats = collect_batch(model, ids, am, labels, chunk_tokens=chunk)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "vocab_size": vocab,
                "tokens_per_batch": batch * seq,
                "batch_shape": [batch, seq],
                "nll_chunk_tokens": chunk,
                "peak_rss_gb": round(peak, 3),
                "rss_after_model_load_gb": round(rss_model, 3),
                "dense_fp32_logits_gb": round(batch * seq * vocab * 4 / 2**30, 2),
                "collect_seconds": round(seconds, 2),
                "scored_positions": int(stats.lengths.sum()),
            }
        )
    )


def bench_rss(vocab: int, tokens_per_batch: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", f"--vocab={vocab}", f"--tokens={tokens_per_batch}"]
    cmd.append(f"--chunk={chunk}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "stage2.json")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.vocab, args.tokens, args.chunk)
        return
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rss": bench_rss(args.vocab, args.tokens, args.chunk),
        "throughput": bench_throughput(args.num_samples, args.threads),
        "flops": bench_flops(args.num_samples, args.threads),
    }
    results["targets_met"] = {
        "speedup_ge_5x": results["throughput"]["speedup"] >= 5,
        "peak_rss_lt_1_5_gb": results["rss"]["peak_rss_gb"] < 1.5,
        "bytes_per_token_le_2L_plus_8": results["throughput"]["bytes_per_scored_token"]
        <= results["throughput"]["bytes_per_token_limit"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    f = results["flops"]
    print(
        f"Stage 2 forward: {f['achieved_gflop_per_s']} GFLOP/s executed "
        f"({f['achieved_useful_gflop_per_s']} useful) vs matmul {f['matmul']['shape']} "
        f"{f['matmul']['gflop_per_s']} GFLOP/s on {f['threads']} thread(s): ratio {f['ratio_to_matmul']}"
    )


if __name__ == "__main__":
    main()
