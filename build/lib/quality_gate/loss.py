"""The quality loss of Stage 1: the mean gate value, which pushes gates towards "closed".

    L_quality = mean over samples b of ( mean over layers l and valid tokens t of g[b, l, t] )

``sample`` mode averages within each sample first, so long samples do not dominate; ``token`` mode
averages over all valid (sample, layer, token) triples at once. Padding never counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

QUALITY_LOSS_MODES = ("sample", "token")


def quality_loss(gate_probs: Tensor, mask: Tensor, mode: str = "sample") -> Tensor:
    """Mean gate value over valid tokens.

    Args:
        gate_probs: ``(B, L, T)`` gate values in (0, 1).
        mask: ``(B, T)``, nonzero where the token counts (the attention mask).
        mode: ``"sample"`` (mean within each sample, then over samples that have at least one
            valid token) or ``"token"`` (mean over every valid sample/layer/token).

    Returns:
        A scalar tensor (float32) carrying gradients to ``gate_probs``; 0 when no token is valid.
    """
    if mode not in QUALITY_LOSS_MODES:
        raise ValueError(
            f"training.quality_loss_mode={mode!r} is not supported; use one of {list(QUALITY_LOSS_MODES)}"
        )
    if gate_probs.dim() != 3 or mask.shape != (gate_probs.shape[0], gate_probs.shape[2]):
        raise ValueError(
            f"expected gate_probs (B, L, T) and mask (B, T); got {tuple(gate_probs.shape)} and "
            f"{tuple(mask.shape)}"
        )
    num_layers = gate_probs.shape[1]
    weights = mask.to(torch.float32)  # (B, T)
    per_sample_sum = torch.einsum("blt,bt->b", gate_probs.float(), weights)  # (B,)
    per_sample_count = weights.sum(dim=1) * num_layers  # (B,)
    if mode == "token":
        return per_sample_sum.sum() / per_sample_count.sum().clamp_min(1.0)
    has_tokens = per_sample_count > 0  # (B,)
    per_sample_mean = per_sample_sum / per_sample_count.clamp_min(1.0)  # (B,)
    return (per_sample_mean * has_tokens).sum() / has_tokens.sum().clamp_min(1)
