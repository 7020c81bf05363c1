"""Negative log-likelihood without full-vocabulary float32 logits.

A Qwen vocabulary has 151,936 entries: dense float32 logits of an 8,192-token batch are 5 GB. Here
the LM head runs only on the positions that are scored, ``chunk_tokens`` at a time, and only that
chunk is upcast to float32; the peak is one ``(chunk_tokens, V)`` float32 buffer. Stages 2 and 4 use
the per-token form (:func:`chunked_token_nll`, no gradient); Stage 1 can train on the mean form
(:func:`chunked_causal_lm_loss`, each chunk recomputed in backward instead of stored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from quality_gate.data.encode import IGNORE_INDEX


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


def next_token_nll(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    input_ids: torch.Tensor,
    scored: torch.Tensor,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """The t -> t+1 shift in one place: ``(B, S - 1)`` NLL of token ``t + 1`` read at position ``t``.

    Args:
        hidden: ``(B, S, H)`` final hidden states of the batch.
        lm_head: the output projection or its ``(V, H)`` weight.
        input_ids: ``(B, S)`` token ids; entries where ``scored`` is False may be anything >= 0.
        scored: ``(B, S - 1)`` bool, the positions to score (e.g. :func:`scored_positions`).
        chunk_tokens: see :func:`chunked_token_nll`.

    Returns:
        ``(B, S - 1)`` float32 NLL, 0 where ``scored`` is False.
    """
    return chunked_token_nll(hidden[:, :-1], lm_head, input_ids[:, 1:], scored, chunk_tokens)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder (``model.model`` of a HF causal LM, through peft wrappers): its output's
    ``last_hidden_state`` is the final-norm hidden state the LM head reads."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None:
        raise TypeError(f"{type(model).__name__} exposes no decoder (get_decoder() / .model)")
    return decoder


class _Captured:
    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def final_hidden_states(model: nn.Module) -> Iterator[_Captured]:
    """Capture the decoder's ``last_hidden_state`` ``(B, T, H)`` of every forward inside the block.

    A hook on the decoder, so the model is still called as a whole (DDP's and the Trainer's wrappers
    see a normal forward); with ``logits_to_keep=1`` the model's own LM head then costs one position.
    """
    captured = _Captured()

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder_of(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _chunk_nll_sum(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module | torch.Tensor
) -> torch.Tensor:
    """Sum of the float32 cross-entropy of ``hidden`` ``(C, H)`` against ``targets`` ``(C,)``."""
    return F.cross_entropy(_apply_head(lm_head, hidden).float(), targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """transformers' causal-LM loss (float32 cross-entropy of ``labels[:, 1:]`` given
    ``hidden[:, :-1]``, ``-100`` ignored), differentiable, without ``(B, T, V)`` logits.

    Each chunk of ``chunk_tokens`` labelled positions goes through the head under activation
    checkpointing: its logits are freed after the forward and recomputed in backward, so the peak is
    one ``(chunk_tokens, V)`` float32 buffer (and its gradient) instead of the whole batch's logits,
    their float32 copy and their gradient. Costs one more LM-head forward per step.

    Args:
        hidden: ``(B, T, H)`` final hidden states (after the decoder's final norm).
        lm_head: the output projection or its ``(V, H)`` weight.
        labels: ``(B, T)`` token ids, ``-100`` where nothing is predicted.
        chunk_tokens: labelled positions per head call.
        reduction: ``mean`` over the labelled positions, or their ``sum`` (the Trainer divides a sum by
            the labelled positions of the whole accumulated batch).

    Returns:
        A scalar; the mean is NaN when no position is labelled, as transformers' loss.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    flat_hidden = hidden[:, :-1][mask]  # (N, H)
    flat_targets = targets[mask].long()  # (N,)
    n = flat_targets.shape[0]
    if n == 0:  # a zero that keeps the graph (backward still runs); the mean is NaN, as transformers'
        zero = hidden.sum().float() * 0
        return zero if reduction == "sum" else zero * float("nan")
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(
            _chunk_nll_sum, flat_hidden[start:stop], flat_targets[start:stop], lm_head, use_reentrant=False
        )
    return total if reduction == "sum" else total / n


def causal_lm_loss_in_chunks(
    model: nn.Module,
    inner: nn.Module,
    inputs: dict[str, torch.Tensor],
    chunk_tokens: int,
    reduction: str = "mean",
) -> tuple[torch.Tensor, Any]:
    """Run ``model`` (possibly DDP-wrapped; ``inner`` unwrapped) on a batch with its LM head on one
    position only, and return (:func:`chunked_causal_lm_loss` of its final hidden states, outputs)."""
    with final_hidden_states(inner) as captured:
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1
        )
    assert captured.hidden is not None
    loss = chunked_causal_lm_loss(
        captured.hidden, inner.get_output_embeddings(), inputs["labels"], chunk_tokens, reduction
    )
    return loss, outputs
