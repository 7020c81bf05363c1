"""Per-token negative log-likelihood without full-vocabulary float32 logits (Stages 2 and 4).

A Qwen vocabulary has 151,936 entries: dense float32 logits of an 8,192-token batch are 5 GB. Here
the LM head runs only on the positions that are scored, ``chunk_tokens`` at a time, and only that
chunk is upcast to float32; the peak is one ``(chunk_tokens, V)`` float32 buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _apply_head(lm_head: nn.Module | torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``(C, V)`` of ``hidden`` ``(C, H)`` under an LM head: a module (plain, tied, or wrapped by
    an adapter such as peft's LoRA, whose forward includes the adapter) or a bare ``(V, H)`` weight."""
    if isinstance(lm_head, torch.Tensor):
        return F.linear(hidden, lm_head)
    if not isinstance(lm_head, nn.Module):
        raise TypeError(f"lm_head must be a module or a (V, H) weight tensor, got {type(lm_head).__name__}")
    return lm_head(hidden)


def chunked_token_nll(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-token negative log-likelihood without materialising the full-vocabulary logits.

    Args:
        hidden: ``(B, T, H)`` final hidden states; ``hidden[b, t]`` predicts ``targets[b, t]``.
        lm_head: the output projection (``nn.Linear``, tied or not, with or without bias) or its
            ``(V, H)`` weight.
        targets: ``(B, T)`` token ids to score (already shifted by the caller).
        mask: ``(B, T)`` bool, positions to score.
        chunk_tokens: scored positions per LM-head call; peak extra memory is about
            ``chunk_tokens x V x 4`` bytes.

    Returns:
        ``(B, T)`` float32 NLL; 0 where ``mask`` is False.
    """
    if chunk_tokens < 1:
        raise ValueError(
            f"chunk_tokens must be >= 1 (config key data_process.nll_chunk_tokens), got {chunk_tokens}"
        )
    mask = mask.bool()
    flat_hidden = hidden[mask]  # (N, H): only scored positions reach the head
    flat_targets = targets[mask].long()  # (N,)
    nll = torch.empty(flat_targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_targets.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        logits = _apply_head(lm_head, flat_hidden[start:stop]).float()  # (C, V)
        target_logit = logits.gather(1, flat_targets[start:stop, None]).squeeze(1)  # (C,)
        # In-place log-sum-exp: one (C, V) float32 buffer is the peak, instead of the two or three
        # that log_softmax / cross_entropy would allocate.
        row_max = logits.amax(dim=1, keepdim=True)  # (C, 1)
        lse = logits.sub_(row_max).exp_().sum(dim=1).log_() + row_max.squeeze(1)  # (C,)
        nll[start:stop] = lse - target_logit
        del logits
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)  # (B, T)
    out[mask] = nll
    return out


def scored_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` attention mask -> ``(B, S - 1)`` bool: position t is scored when t and t+1 are real."""
    am = attention_mask.bool()
    return am[:, :-1] & am[:, 1:]
