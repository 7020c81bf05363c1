"""GPU check of Stage 2 at the real Qwen3-1.7B size, with no download.

Builds a randomly initialised model from the real Qwen3-1.7B configuration (28 layers, hidden 2048,
vocab 151,936), attaches the quality gates, and runs Stage 2's collection (gates + chunked per-token
NLL) in bf16 over synthetic token sequences of realistic, varied lengths, batched by token budget.
Reports tokens/s, the share of the compute floor it reaches, and peak GPU memory.

    python bench/gpu_check.py                      # on a CUDA machine, ~2-5 minutes
    python bench/gpu_check.py --small --device cpu # the CPU smoke test used by the test suite

Compute floor: a forward costs about 2 x parameters FLOP per token (3.5 GFLOP for Qwen3-1.7B,
attention on top); at ``--peak-tflops`` (H100 bf16 dense ~ 800) that bounds tokens/s from above.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quality_gate.data.batching import token_budget_batches
from quality_gate.gate import attach_quality_gates
from quality_gate.stats.collect import collect_batch

# Qwen/Qwen3-1.7B config.json (public), written out so that nothing is downloaded.
QWEN3_1P7B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)
SMALL = dict(
    QWEN3_1P7B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=4096,
)


def sample_lengths(n: int, max_len: int, seed: int) -> list[int]:
    """Log-normal lengths like instruction data (median ~ 300 tokens, long tail), clipped to max_len."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(300)).clamp(16, max_len)
    return [int(x) for x in lengths]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--max-tokens-per-batch", type=int, default=65536)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--nll-chunk-tokens", type=int, default=4096)
    ap.add_argument("--peak-tflops", type=float, default=800.0, help="the card's dense bf16 TFLOP/s")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny configuration (CPU smoke test)")
    ap.add_argument("--warmup-batches", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen3Config(**(SMALL if args.small else QWEN3_1P7B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    attach_quality_gates(model)
    model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    flop_per_token = 2 * n_params

    lengths = sample_lengths(args.num_samples, args.max_len, seed=0)
    batches = token_budget_batches(
        lengths, args.max_tokens_per_batch, args.max_batch_size, sort_by_length=True
    )
    gen = torch.Generator().manual_seed(1)

    def make_batch(idx: list[int]) -> tuple[torch.Tensor, ...]:
        width = max(lengths[i] for i in idx)
        ids = torch.randint(0, config.vocab_size, (len(idx), width), generator=gen)
        mask = (torch.arange(width)[None, :] < torch.tensor([lengths[i] for i in idx])[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : width // 4] = -100  # a prompt part without labels
        return ids.to(device), mask.to(device), labels.to(device)

    def run(idx: list[int]) -> None:
        ids, mask, labels = make_batch(idx)
        collect_batch(model, ids, mask, labels, chunk_tokens=args.nll_chunk_tokens)

    for idx in batches[: args.warmup_batches]:
        run(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = batches[args.warmup_batches :] or batches
    tokens = sum(lengths[i] for b in timed for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in timed)
    t0 = time.perf_counter()
    for idx in timed:
        run(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tps = tokens / wall
    floor_tps = args.peak_tflops * 1e12 / flop_per_token
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": "small" if args.small else "Qwen3-1.7B (random init)",
        "parameters": n_params,
        "dtype": str(dtype),
        "samples": sum(len(b) for b in timed),
        "tokens": tokens,
        "padding_fraction": round(1 - tokens / padded, 4),
        "batches": len(timed),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tps, 1),
        "gflop_per_token": float(f"{flop_per_token / 1e9:.4g}"),
        "achieved_tflops": float(f"{tps * flop_per_token / 1e12:.4g}"),
        "compute_floor_tokens_per_s": round(floor_tps, 1),
        "fraction_of_floor": float(f"{tps / floor_tps:.3g}"),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
