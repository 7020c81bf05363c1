"""Synthetic router data in Stage 2's on-disk format, for tests and the selection benchmark.

The statistics are random (no model involved); the format, the fingerprint checks and the records
file are the real ones of :mod:`quality_gate.stats.store` and :mod:`quality_gate.selection.pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from quality_gate.io import atomic_write_jsonl
from quality_gate.stats.store import check_or_write_fingerprint, shard_path, write_index, write_shard


def fake_shard(
    ids: Sequence[str],
    lengths: Sequence[int],
    num_layers: int,
    generator: torch.Generator,
    ifd: bool = False,
    embedding_dim: int = 0,
    embeddings: Any = None,
) -> dict[str, Any]:
    """Random statistics of one shard: gates in (0, 1), NLL ~ Exp(mean 2), the last 60 % of each
    sample's positions marked as assistant positions.

    Embeddings (Stage 2's ``embeddings`` (n, D) float16): ``embeddings`` (n, D) as given, else
    ``embedding_dim > 0`` standard normal ones, else none."""
    lens = torch.as_tensor(list(lengths), dtype=torch.int64)
    total = int(lens.sum())
    gates = torch.rand(total, num_layers, generator=generator).to(torch.float16)  # (P, L)
    nll = torch.empty(total).exponential_(0.5, generator=generator)  # (P,)
    offsets = torch.cumsum(lens, 0) - lens  # (n,)
    within = torch.arange(total) - torch.repeat_interleave(offsets, lens)  # position inside its sample
    assistant = within >= (0.4 * torch.repeat_interleave(lens, lens)).to(torch.int64)
    shard: dict[str, Any] = {
        "sample_ids": list(ids),
        "lengths": lens,
        "gates": gates,
        "perplexities": torch.exp(nll),
        "assistant_mask": assistant,
        "valid": lens > 0,
        "invalid_reason": ["" if n > 0 else "empty" for n in lens.tolist()],
    }
    if ifd:
        shard["ifd_loss_cond"] = torch.rand(len(lens), generator=generator) + 0.5
        shard["ifd_loss_uncond"] = torch.rand(len(lens), generator=generator) + 0.7
    if embeddings is not None:
        shard["embeddings"] = torch.as_tensor(embeddings).to(torch.float16).reshape(len(lens), -1)
    elif embedding_dim > 0:
        shard["embeddings"] = torch.randn(len(lens), embedding_dim, generator=generator).to(torch.float16)
    return shard


def fake_record(dataset: str, sample_id: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Question {sample_id}?"},
            {"role": "assistant", "content": f"Answer to {sample_id}."},
        ],
        "dataset": dataset,
        "id": sample_id,
        "meta": meta or {},
    }


def write_router_dataset(
    router_dir: Path,
    dataset: str,
    shards: Sequence[dict[str, Any]],
    fingerprint_fields: dict[str, Any] | None = None,
    records: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write ``shards`` (dicts of :func:`quality_gate.stats.store.write_shard`) as one dataset, its
    index and ``<dataset>_records.jsonl`` (fake records when ``records`` is None). Returns the index."""
    router_dir = Path(router_dir)
    fp = check_or_write_fingerprint(
        router_dir, fingerprint_fields or {"model": "fake", "max_sequence_length": 64}
    )
    paths = []
    for k, shard in enumerate(shards):
        path = shard_path(router_dir, dataset, k)
        write_shard(path, shard, fp)
        paths.append(path)
    ids = [sid for s in shards for sid in s["sample_ids"]]
    if records is None:
        records = [fake_record(dataset, sid) for sid in ids]
    atomic_write_jsonl(router_dir / f"{dataset}_records.jsonl", list(records))
    max_len = max((int(s["lengths"].max()) for s in shards if len(s["lengths"])), default=0) + 1
    return write_index(router_dir, dataset, paths, fp, max_seq_len=max_len)
