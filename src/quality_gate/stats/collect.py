"""Stage 2 forward pass: gate values, per-token perplexity and (optionally) IFD losses of a batch, and
of a shard (:class:`ShardScorer`: token-budget batches merged back in sample order).

The hot path runs over every sample of every dataset, so it is built to stay bounded in memory:

* The backbone runs once (``model.get_decoder()``); the LM head is applied only to the positions
  that are scored, ``chunk_tokens`` at a time, and only that chunk is upcast to float32. A
  Qwen vocabulary has 151,936 entries: dense float32 logits of an 8,192-token batch would be 5 GB,
  a 1,024-token chunk is 0.6 GB.
* All reductions (pairing, ragged packing, validity) stay on the device; one batch moves to the
  CPU once, already packed (gates in float16).

Position pairing (the layout of :mod:`quality_gate.stats.store`): position ``t`` of a sample of
``n`` tokens pairs the gate values computed at token ``t`` with the perplexity of token ``t + 1``,
for ``t = 0 .. n - 2``; ``assistant_mask[t]`` says whether token ``t + 1`` carries a label.

IFD (Cherry_LLM's "instruction-following difficulty", ``collect_ifd``): per sample

* ``ifd_loss_cond``: mean NLL of the response tokens given everything before them. It comes from
  the same forward: the positions whose target token carries a label.
* ``ifd_loss_uncond``: mean NLL of the same response tokens alone. A second, batched forward runs
  on the response token ids only; as in Cherry_LLM (``labels=input_ids``), the first response token
  has no context and is not predicted, so the mean is over the other ``m - 1`` tokens.

Cherry_LLM ranks by ``exp(cond) / exp(uncond)`` (a ratio of perplexities); the paper writes the
ratio of the losses. Both losses are stored so either can be computed. Multi-turn samples: the
"response" is every assistant-labelled token of the conversation. The conditioned loss scores each
turn given the whole preceding conversation; the unconditioned forward runs on the concatenation of
all assistant spans (in order), which reduces to Cherry_LLM's definition for one turn. A response
shorter than two tokens gets ``NaN`` for both losses; that does not invalidate the gate statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from quality_gate.data.batching import pad_batch, token_budget_batches
from quality_gate.data.encode import IGNORE_INDEX, EncodedSample
from quality_gate.gate import record_gates
from quality_gate.nll import decoder_of, next_token_nll, scored_positions


def compute_token_perplexity(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-token perplexity ``exp(cross_entropy)`` of a padded batch (the seed's function).

    Args:
        hidden: ``(B, S, H)`` final hidden states of the batch.
        lm_head: the output projection or its weight.
        input_ids: ``(B, S)``.
        attention_mask: ``(B, S)``, 1 on real tokens.
        chunk_tokens: see :func:`chunked_token_nll`.

    Returns:
        ``(B, S)`` float32: entry ``t`` is the perplexity of token ``t + 1`` given tokens ``<= t``
        (the position of the gate that shapes that prediction). Entries that predict nothing (the
        last real token of a sample, and padding) are ``NaN`` rather than 0, so that an unmasked
        sum or mean fails loudly instead of being silently diluted.
    """
    pos = scored_positions(attention_mask)  # (B, S-1)
    nll = next_token_nll(hidden, lm_head, input_ids, pos, chunk_tokens)  # (B, S-1)
    ppl = torch.full(input_ids.shape, float("nan"), dtype=torch.float32, device=hidden.device)  # (B, S)
    ppl[:, :-1] = torch.where(pos, nll.exp(), ppl[:, :-1])
    return ppl


@dataclasses.dataclass
class BatchStats:
    """The packed statistics of one batch, on the CPU, in the batch's sample order.

    ``gates`` (sum T_i, L) float16, ``perplexities`` (sum T_i,) float32, ``assistant_mask``
    (sum T_i,) bool, ``lengths`` (B,) int64, ``valid`` (B,) bool, ``invalid_reason`` B strings,
    ``ifd_loss_cond`` / ``ifd_loss_uncond`` (B,) float32 or None, ``embeddings`` (B, D) float16 or None.
    """

    lengths: torch.Tensor
    gates: torch.Tensor
    perplexities: torch.Tensor
    assistant_mask: torch.Tensor
    valid: torch.Tensor
    invalid_reason: list[str]
    ifd_loss_cond: torch.Tensor | None = None
    ifd_loss_uncond: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None


def embedding_projection(hidden_size: int, dim: int, device: torch.device | str) -> torch.Tensor | None:
    """A fixed ``(H, D)`` random projection (seed 0, ``N(0, 1/D)``), or None when ``D >= H`` (no projection).

    Random projections keep cosine similarities approximately (Johnson-Lindenstrauss), and being
    seeded they are the same in every run, rank and job of a Stage 2 run.
    """
    if dim <= 0 or dim >= hidden_size:
        return None
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(hidden_size, dim, generator=gen) / dim**0.5).to(device)


EMBEDDING_TOKENS = ("prompt", "response", "all")


def _sample_embeddings(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    proj: torch.Tensor | None,
    tokens: str = "prompt",
) -> torch.Tensor:
    """``(B, D)`` float16: the mean final hidden state over each sample's ``tokens``, projected by
    ``proj`` ``(H, D)``.

    ``prompt``: the tokens before the first assistant (labelled) token; in a causal LM their hidden
    states never saw a response, so the embedding says what the sample asks, not how well it is
    answered. ``response``: the assistant tokens. ``all``: every real token. A sample with none of
    the chosen tokens falls back to all of its tokens.
    """
    labelled = labels != IGNORE_INDEX  # (B, S)
    if tokens == "prompt":
        weight = ((labelled.long().cumsum(1) == 0) & mask.bool()).float()  # (B, S)
    elif tokens == "response":
        weight = labelled.float()
    elif tokens == "all":
        weight = mask.float()
    else:
        raise ValueError(f"embedding tokens {tokens!r}; expected one of {EMBEDDING_TOKENS}")
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, mask.float())  # (B, S)
    total = weight.sum(1, keepdim=True).clamp_min(1)  # (B, 1)
    pooled = torch.einsum("bsh,bs->bh", hidden.float(), weight) / total  # (B, H)
    if proj is not None:
        pooled = pooled @ proj  # (B, D)
    return pooled.to(torch.float16)


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum ``values`` (N,) into ``num_segments`` bins given by ``segment`` (N,) -> (num_segments,)."""
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    return out.index_add_(0, segment, values.float())


def _unconditioned_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Mean NLL of each sample's response tokens scored alone: ``(B,)`` float32, NaN below 2 tokens.

    The response of sample b is ``input_ids[b][labels[b] != -100]`` (every assistant span, in
    order); the responses are right-padded into one batch and run through the model once.
    """
    resp_mask = labels != IGNORE_INDEX  # (B, S)
    resp_len = resp_mask.sum(dim=1)  # (B,)
    width = max(int(resp_len.max()), 1)
    # Stable sort puts each row's response tokens first, in their original order.
    order = torch.sort((~resp_mask).to(torch.int8), dim=1, stable=True).indices[:, :width]  # (B, W)
    ids = input_ids.gather(1, order)  # (B, W)
    am = torch.arange(width, device=ids.device)[None, :] < resp_len[:, None]  # (B, W)
    ids = ids.masked_fill(~am, 0)
    hidden = decoder_of(model)(input_ids=ids, attention_mask=am.long(), use_cache=False).last_hidden_state
    pos = scored_positions(am)  # (B, W-1)
    nll = next_token_nll(hidden, model.get_output_embeddings(), ids, pos, chunk_tokens)  # (B, W-1)
    count = pos.sum(dim=1)  # (B,)
    return torch.where(count > 0, nll.sum(dim=1) / count.clamp(min=1), float("nan"))


@torch.inference_mode()
def collect_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    collect_ifd: bool = False,
    embed: bool = False,
    projection: torch.Tensor | None = None,
    embedding_tokens: str = "prompt",
) -> BatchStats:
    """Run one right-padded batch through the gated model and pack its statistics.

    Args:
        model: a causal LM with quality gates attached (eval mode), on the batch's device.
        input_ids: ``(B, S)`` token ids, right-padded.
        attention_mask: ``(B, S)``, 1 on real tokens.
        labels: ``(B, S)``, ``-100`` outside assistant content (from the data layer's encoder).
        chunk_tokens: scored positions per LM-head call (``data_process.nll_chunk_tokens``).
        collect_ifd: also compute the conditioned / unconditioned response losses.
        embed: also return one embedding per sample (:func:`embedding_projection` gives ``projection``),
            the mean hidden state over ``embedding_tokens`` (see :func:`_sample_embeddings`).

    Returns:
        :class:`BatchStats` on the CPU. A sample with no scored position or no assistant token, or
        with a non-finite gate or perplexity, has ``valid=False`` and a reason.
    """
    with record_gates(model) as rec:
        hidden = decoder_of(model)(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, S, H)
        gate_logits = rec.logits()  # (B, L, S)
    batch = input_ids.shape[0]
    pos = scored_positions(attention_mask)  # (B, S-1)
    nll = next_token_nll(hidden, model.get_output_embeddings(), input_ids, pos, chunk_tokens)  # (B, S-1)
    target_has_label = labels[:, 1:] != IGNORE_INDEX  # (B, S-1)

    gates = torch.sigmoid(gate_logits[:, :, :-1].float()).transpose(1, 2)[pos]  # (N, L), token-major
    ppl = nll.exp()[pos]  # (N,)
    assistant = target_has_label[pos]  # (N,)
    lengths = pos.sum(dim=1)  # (B,)
    segment = torch.repeat_interleave(torch.arange(batch, device=pos.device), lengths)  # (N,)
    bad_position = ~torch.isfinite(ppl) | ~torch.isfinite(gates).all(dim=1)  # (N,)
    num_bad = _segment_sum(bad_position, segment, batch)  # (B,)
    num_assistant = _segment_sum(assistant, segment, batch)  # (B,)

    embeddings = None
    if embed:
        embeddings = _sample_embeddings(hidden, labels, attention_mask, projection, embedding_tokens).cpu()
    cond = uncond = None
    if collect_ifd:
        label_pos = pos & target_has_label  # (B, S-1)
        count = label_pos.sum(dim=1)
        cond = torch.where(count > 0, (nll * label_pos).sum(dim=1) / count.clamp(min=1), float("nan"))
        uncond = _unconditioned_loss(model, input_ids, labels, chunk_tokens)

    # One transfer per batch, already packed.
    lengths_c, num_bad_c, num_assistant_c = (t.cpu() for t in (lengths, num_bad, num_assistant))
    reasons = []
    for n_pos, n_bad, n_asst in zip(lengths_c.tolist(), num_bad_c.tolist(), num_assistant_c.tolist()):
        if n_pos == 0:
            reasons.append("no scored positions: the sample has fewer than 2 tokens")
        elif n_asst == 0:
            reasons.append("no assistant tokens to score: the response is empty or was truncated away")
        elif n_bad > 0:
            reasons.append(f"non-finite gate or perplexity at {int(n_bad)} of {n_pos} positions")
        else:
            reasons.append("")
    return BatchStats(
        lengths=lengths_c.to(torch.int64),
        gates=gates.to(torch.float16).cpu(),
        perplexities=ppl.cpu(),
        assistant_mask=assistant.cpu(),
        valid=torch.tensor([r == "" for r in reasons], dtype=torch.bool),
        invalid_reason=reasons,
        ifd_loss_cond=None if cond is None else cond.float().cpu(),
        ifd_loss_uncond=None if uncond is None else uncond.float().cpu(),
        embeddings=embeddings,
    )


def concat_batch_stats(parts: list[tuple[list[int], BatchStats]], num_samples: int) -> dict[str, Any]:
    """Merge batches back into one shard in sample order.

    Args:
        parts: ``(rows, stats)`` per batch; ``rows[j]`` is the shard row of the batch's sample j.
        num_samples: rows in the shard; every row must come exactly once.

    Returns:
        The ragged shard fields of :mod:`quality_gate.stats.store` (without ``sample_ids``).
    """
    per_row: list[tuple[BatchStats, int, int, int] | None] = [None] * num_samples
    for rows, stats in parts:
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), stats.lengths.cumsum(0)]).tolist()
        for j, row in enumerate(rows):
            if per_row[row] is not None:
                raise ValueError(f"shard row {row} was scored twice")
            per_row[row] = (stats, j, offsets[j], offsets[j + 1])
    missing = [i for i, p in enumerate(per_row) if p is None]
    if missing:
        raise ValueError(f"shard rows {missing[:10]} were never scored")
    entries = [p for p in per_row if p is not None]
    shard: dict[str, Any] = {
        "lengths": torch.stack([s.lengths[j] for s, j, _, _ in entries]),
        "gates": torch.cat([s.gates[a:b] for s, _, a, b in entries]),
        "perplexities": torch.cat([s.perplexities[a:b] for s, _, a, b in entries]),
        "assistant_mask": torch.cat([s.assistant_mask[a:b] for s, _, a, b in entries]),
        "valid": torch.stack([s.valid[j] for s, j, _, _ in entries]),
        "invalid_reason": [s.invalid_reason[j] for s, j, _, _ in entries],
    }
    if entries and entries[0][0].embeddings is not None:
        shard["embeddings"] = torch.stack([s.embeddings[j] for s, j, _, _ in entries])  # type: ignore[index]
    if entries and entries[0][0].ifd_loss_cond is not None:
        shard["ifd_loss_cond"] = torch.stack([s.ifd_loss_cond[j] for s, j, _, _ in entries])  # type: ignore[index]
        shard["ifd_loss_uncond"] = torch.stack([s.ifd_loss_uncond[j] for s, j, _, _ in entries])  # type: ignore[index]
    return shard


class ShardScorer:
    """Scores the encoded samples of Stage 2's shards with one model on one device: token-budget batches
    (``data_process.max_tokens_per_batch``), one :func:`collect_batch` each, merged back in sample order."""

    def __init__(self, model: Any, cfg: DictConfig, pad_token_id: int, device: str) -> None:
        self.model, self.cfg, self.pad_token_id, self.device = model, cfg, pad_token_id, device
        dim = int(cfg.data_process.embedding_dim)
        hidden = int(model.config.get_text_config().hidden_size)
        self.embed = dim > 0
        self.projection = embedding_projection(hidden, dim, device) if self.embed else None

    def score(self, samples: list[EncodedSample], bar: tqdm) -> tuple[dict[str, Any], dict[str, float]]:
        """Score the samples of one shard; returns its store fields (:mod:`quality_gate.stats.store`, with
        ``sample_ids``) and counters (tokens, padded slots, samples); ``bar`` advances by each batch."""
        dp = self.cfg.data_process
        batches = token_budget_batches(
            [len(s.input_ids) for s in samples],
            int(dp.max_tokens_per_batch),
            int(dp.batch_size),
            bool(self.cfg.dataset.sort_by_length),
        )
        parts = []
        counters = {"tokens": 0.0, "padded_slots": 0.0, "samples": 0.0}
        for batch_rows in batches:
            batch = pad_batch([samples[i] for i in batch_rows], self.pad_token_id)
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            stats = collect_batch(
                self.model,
                ids,
                batch["attention_mask"].to(self.device, non_blocking=True),
                batch["labels"].to(self.device, non_blocking=True),
                chunk_tokens=int(dp.nll_chunk_tokens),
                collect_ifd=bool(self.cfg.collect_ifd),
                embed=self.embed,
                projection=self.projection,
                embedding_tokens=str(dp.embedding_tokens),
            )
            parts.append((list(batch_rows), stats))
            counters["tokens"] += int(batch["attention_mask"].sum())
            counters["padded_slots"] += ids.numel()
            counters["samples"] += len(batch_rows)
            bar.update(len(batch_rows))
        shard = concat_batch_stats(parts, len(samples)) if samples else _empty_shard(self.embed)
        shard["sample_ids"] = [s.id for s in samples]
        return shard, counters


def _empty_shard(embed: bool) -> dict[str, Any]:
    """The fields of a shard none of whose records survived encoding."""
    shard: dict[str, Any] = {
        "lengths": torch.zeros(0, dtype=torch.int64),
        "gates": torch.zeros(0, 0, dtype=torch.float16),
        "perplexities": torch.zeros(0),
        "assistant_mask": torch.zeros(0, dtype=torch.bool),
        "valid": torch.zeros(0, dtype=torch.bool),
        "invalid_reason": [],
    }
    if embed:
        shard["embeddings"] = torch.zeros(0, 0, dtype=torch.float16)
    return shard
