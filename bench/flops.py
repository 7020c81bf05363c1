"""FLOP counts of Stage 2's forward and this machine's matmul rate (shared by the bench scripts).

Stage 2's forward of one right-padded batch of ``B`` samples, ``S`` tokens wide, real lengths ``n_i``:

    linear    = 2 x P_lin x B x S                 P_lin: weights of every Linear in the decoder layers
                                                  (q, k, v, o, gate/up/down and the quality gate),
                                                  touched once per token, padding included
    attention = 4 x L x heads x head_dim x B x S^2   scores Q K^T and the weighted sum of V, the dense
                                                  S x S square SDPA computes under a padding mask
    lm_head   = 2 x V x H x sum_i (n_i - 1)       only the scored positions reach the head (chunked NLL)

"executed" counts that; "useful" counts real tokens only (linear over sum n_i, causal attention
2 x L x heads x head_dim x sum n_i^2). Norms, rotary embeddings, softmax, SiLU and the NLL's
log-sum-exp are O(tokens x width) and left out (under 1 % at these widths).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def decoder_dims(model: nn.Module) -> dict[str, int]:
    """``P_lin`` (Linear weights inside the decoder layers, gates included), layers, heads, head_dim,
    hidden and vocabulary of a (gated) causal LM."""
    from quality_gate.gate import _decoder_layers

    cfg = model.config.get_text_config()
    layers = list(_decoder_layers(model))
    p_lin = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    heads = int(cfg.num_attention_heads)
    return {
        "linear_params": int(p_lin),
        "layers": len(layers),
        "heads": heads,
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "hidden": int(cfg.hidden_size),
        "intermediate": int(cfg.intermediate_size),
        "vocab": int(cfg.vocab_size),
    }


def batch_flops(dims: dict[str, int], width: int, lengths: Sequence[int]) -> dict[str, float]:
    """``{"executed", "useful"}`` FLOPs of Stage 2's forward of one batch (module docstring)."""
    b = len(lengths)
    attn = dims["layers"] * dims["heads"] * dims["head_dim"]
    head = 2 * dims["vocab"] * dims["hidden"] * sum(max(n - 1, 0) for n in lengths)
    executed = 2 * dims["linear_params"] * b * width + 4 * attn * b * width * width + head
    useful = 2 * dims["linear_params"] * sum(lengths) + 2 * attn * sum(n * n for n in lengths) + head
    return {"executed": float(executed), "useful": float(useful)}


def matmul_flops_per_s(
    tokens: int, hidden: int, intermediate: int, min_seconds: float = 1.0
) -> dict[str, Any]:
    """FLOP/s of ``torch.matmul`` of (tokens, hidden) x (hidden, intermediate) in float32 on the CPU,
    with torch's current thread count: the rate a forward of that width could reach at best here."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(hidden, intermediate, generator=gen)
    out = torch.empty(tokens, intermediate)
    torch.matmul(a, w, out=out)  # warm-up (allocation, kernel choice)
    reps, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, w, out=out)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and reps >= 3:
            break
    flops = 2.0 * tokens * hidden * intermediate * reps
    return {
        "shape": [[tokens, hidden], [hidden, intermediate]],
        "threads": torch.get_num_threads(),
        "reps": reps,
        "gflop_per_s": round(flops / elapsed / 1e9, 2),
    }
