"""Batches by token budget, right padding, and the collator used with the HF ``Trainer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from quality_gate.data.encode import IGNORE_INDEX, EncodedSample
from quality_gate.errors import ConfigError


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, max_batch_size: int, sort_by_length: bool = True
) -> list[list[int]]:
    """Group sample indices into batches whose padded size ``B x max_len`` stays within ``max_tokens``.

    With ``sort_by_length`` the samples go longest first (ties by index), so the largest batch runs
    first and an out-of-memory error shows at once; otherwise the input order is kept. A sample
    longer than ``max_tokens`` gets a batch of its own. Deterministic.
    """
    if max_tokens < 1 or max_batch_size < 1:
        raise ConfigError(
            f"max_tokens={max_tokens} and max_batch_size={max_batch_size} must be positive "
            "(data_process.max_tokens_per_batch / data_process.batch_size)"
        )
    order = (
        sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if sort_by_length else range(len(lengths))
    )
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, int(lengths[i]))
        if batch and (len(batch) == max_batch_size or grown * (len(batch) + 1) > max_tokens):
            batches.append(batch)
            batch, grown = [], int(lengths[i])
        batch.append(i)
        longest = grown
    if batch:
        batches.append(batch)
    return batches


def _pad(rows: Sequence[Sequence[int]], value: int, width: int) -> torch.Tensor:
    """``(B, T=width)`` int64: each row followed by ``value``. One tensor built from the padded lists
    (3x faster than filling a tensor row by row for short rows, as fast for long ones)."""
    return torch.tensor([[*row, *([value] * (width - len(row)))] for row in rows], dtype=torch.long)


def _collate(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    if not input_ids:
        raise ValueError("cannot pad an empty batch")
    width = max(len(r) for r in input_ids)
    mask = _pad([[1] * len(r) for r in input_ids], 0, width)
    return {
        "input_ids": _pad(input_ids, pad_token_id, width),  # (B, T)
        "attention_mask": mask,  # (B, T)
        "labels": _pad(labels, IGNORE_INDEX, width),  # (B, T), -100 on padding
    }


def pad_batch(samples: Sequence[EncodedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples to ``input_ids``, ``attention_mask``, ``labels``, each (B, T) int64."""
    return _collate([s.input_ids for s in samples], [s.labels for s in samples], pad_token_id)


class SFTDataCollator:
    """HF ``Trainer`` collator: a list of ``{"input_ids", "labels", ...}`` -> right-padded (B, T) tensors."""

    def __init__(self, pad_token_id: int | None) -> None:
        if pad_token_id is None:
            raise ConfigError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)"
            )
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return _collate(
            [list(f["input_ids"]) for f in features],
            [list(f["labels"]) for f in features],
            self.pad_token_id,
        )


def to_hf_dataset(samples: Sequence[EncodedSample]) -> Any:
    """A ``datasets.Dataset`` with columns ``input_ids``, ``labels`` and ``id`` (one row per sample)."""
    from datasets import Dataset  # deferred: importing datasets costs about a second

    return Dataset.from_dict(
        {
            "input_ids": [s.input_ids for s in samples],
            "labels": [s.labels for s in samples],
            "id": [s.id for s in samples],
        }
    )
