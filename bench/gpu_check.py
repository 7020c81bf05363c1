"""GPU check at the real model sizes, with no download (issue 13), in one run:

1. ``collect``: a randomly initialised model with the real Qwen3-1.7B configuration (28 layers, hidden
   2048, vocab 151,936), gates attached, Stage 2's collection (gates + chunked per-token NLL) in bf16 over
   synthetic token sequences of realistic, varied lengths, batched by token budget: tokens/s, achieved
   TFLOP/s, the share of the compute floor, peak GPU memory.
2. ``batch1``: the gates removed, a plain HF forward per sample with full logits and per-token
   perplexity (the way Cherry_LLM / Superfiltering / Data-Juicer score) over the first
   ``--batch1-samples`` of the same samples: tokens/s and the ratio of (1) to it.
3. ``finetune``: a randomly initialised Qwen2.5-1.5B-shaped target with PEFT LoRA (r=128 on every
   linear layer of the blocks, Stage 3's default), AdamW, ``--ft-batch`` x ``--ft-len`` tokens per step,
   with and without gradient checkpointing: median step time and peak GPU memory.

    python bench/gpu_check.py --out gpu_check.json   # on a CUDA machine, ~3-6 minutes
    python bench/gpu_check.py --small --device cpu   # the CPU smoke test used by the test suite

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
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from real_shape import FULL_LAYERS, SELECTOR_SHAPE, TARGET_SHAPE

from quality_gate.data.batching import token_budget_batches
from quality_gate.gate import attach_quality_gates, remove_quality_gates
from quality_gate.stats.collect import collect_batch

# The public config.json values of both models (bench/real_shape.py), 28 layers each; no download.
LAYERS = {"num_hidden_layers": FULL_LAYERS}
QWEN3_1P7B = {k: v for k, v in SELECTOR_SHAPE.items() if k != "model_type"} | LAYERS
QWEN25_1P5B = {k: v for k, v in TARGET_SHAPE.items() if k != "model_type"} | LAYERS
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_TARGET = dict(
    QWEN25_1P5B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
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


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch1_loop(model: torch.nn.Module, sample_lengths_: list[int]) -> dict:
    """A plain HF forward per sample (gates removed): full logits, float32 per-token perplexity."""
    remove_quality_gates(model)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, vocab, (1, n), generator=gen) for n in sample_lengths_]
    with torch.inference_mode():
        for ids in seqs[:2]:  # warmup
            model(input_ids=ids.to(device))
        _sync(device)
        t0 = time.perf_counter()
        for ids in seqs:
            ids = ids.to(device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            torch.exp(F.cross_entropy(logits, ids[0, 1:], reduction="none")).tolist()
        _sync(device)
    wall = time.perf_counter() - t0
    tokens = sum(int(s.shape[1]) for s in seqs)
    return {
        "samples": len(seqs),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
    }


def finetune_steps(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, checkpointing: bool
) -> dict:
    """LoRA steps on a random Qwen2.5-1.5B-shaped target: median step time (after the first), peak memory."""
    from peft import LoraConfig, get_peft_model

    config = Qwen2Config(**(SMALL_TARGET if args.small else QWEN25_1P5B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.ft_steps):
        ids = torch.randint(0, config.vocab_size, (args.ft_batch, args.ft_len), generator=gen).to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    steady = sorted(times[1:] or times)
    out = {
        "steps": args.ft_steps,
        "tokens_per_step": args.ft_batch * args.ft_len,
        "median_step_s": round(steady[len(steady) // 2], 3),
        "tokens_per_s": round(args.ft_batch * args.ft_len / steady[len(steady) // 2], 1),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    del model, opt
    return out


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
    ap.add_argument("--parts", default="collect,batch1,finetune", help="comma-separated: which parts run")
    ap.add_argument("--batch1-samples", type=int, default=300, help="samples of the batch-1 loop")
    ap.add_argument("--ft-steps", type=int, default=6, help="LoRA steps per setting (the first is warmup)")
    ap.add_argument("--ft-batch", type=int, default=4)
    ap.add_argument("--ft-len", type=int, default=2048)
    ap.add_argument("--lora-r", type=int, default=128)
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen3Config(**(SMALL if args.small else QWEN3_1P7B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    attach_quality_gates(model)
    model.to(device).eval()

    lengths = sample_lengths(args.num_samples, args.max_len, seed=0)
    batches = token_budget_batches(
        lengths, args.max_tokens_per_batch, args.max_batch_size, sort_by_length=True
    )

    timed = batches[args.warmup_batches :] or batches
    figures: dict = {
        "device": _device_name(device),
        "config": "small" if args.small else "Qwen3-1.7B (random init)",
    }
    if "collect" in parts:
        figures.update(collect_part(args, model, lengths, batches, timed))
    if "batch1" in parts:
        scored = [lengths[i] for b in timed for i in b]  # sorted by length: take an even spread
        stride = max(1, len(scored) // max(args.batch1_samples, 1))
        figures["batch1"] = batch1_loop(model, scored[::stride][: args.batch1_samples])
        if "tokens_per_s" in figures:
            figures["batch1"]["speedup_of_collect"] = round(
                figures["tokens_per_s"] / figures["batch1"]["tokens_per_s"], 2
            )
    model.to("meta")  # free the selector before the target is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "finetune" in parts:
        figures["finetune"] = {
            f"gradient_checkpointing={gc}": finetune_steps(args, device, dtype, gc) for gc in (False, True)
        }
    figures["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def collect_part(
    args: argparse.Namespace,
    model: torch.nn.Module,
    lengths: list[int],
    batches: list[list[int]],
    timed: list[list[int]],
) -> dict:
    """Stage 2's collection over ``timed`` (after ``--warmup-batches``): tokens/s, share of the floor."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    flop_per_token = 2 * sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)

    def run(idx: list[int]) -> None:
        width = max(lengths[i] for i in idx)
        ids = torch.randint(0, vocab, (len(idx), width), generator=gen)
        mask = (torch.arange(width)[None, :] < torch.tensor([lengths[i] for i in idx])[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : width // 4] = -100  # a prompt part without labels
        collect_batch(
            model, ids.to(device), mask.to(device), labels.to(device), chunk_tokens=args.nll_chunk_tokens
        )

    for idx in batches[: args.warmup_batches]:
        run(idx)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = sum(lengths[i] for b in timed for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in timed)
    t0 = time.perf_counter()
    for idx in timed:
        run(idx)
    _sync(device)
    wall = time.perf_counter() - t0
    tps = tokens / wall
    floor_tps = args.peak_tflops * 1e12 / flop_per_token
    return {
        "parameters": flop_per_token // 2,
        "dtype": str(next(model.parameters()).dtype),
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
    }


if __name__ == "__main__":
    sys.exit(main())
