"""Router data on disk: ragged, sharded, memory-mapped, written atomically.

Layout of one Stage 2 run (``<run>/router_data/``)::

    fingerprint.json                       what produced the statistics (model, weights, tokenizer, ...)
    <dataset>_router_data.pt               the index of one dataset (the seed's file name)
    <dataset>/shard-00000.pt               a shard: the statistics of a slice of the samples
    <dataset>/shard-00000.pt.done          completion marker, written after the shard itself

A shard is a ``torch.save`` dict of tensors and plain lists (so ``weights_only=True`` reads it)::

    sample_ids      list[str]           n
    lengths         int64 [n]           T_i: stored positions of sample i
    gates           float16 [sum T_i, L] token-major: sample i is rows offsets[i]:offsets[i+1]
    perplexities    float32 [sum T_i]
    assistant_mask  bool [sum T_i]      the position predicts an assistant (label) token
    valid           bool [n]            False: the sample has no usable statistics
    invalid_reason  list[str]           "" for valid samples
    ifd_loss_cond   float32 [n]         optional: mean response NLL given the instruction
    ifd_loss_uncond float32 [n]         optional: mean response NLL without the instruction

Position pairing: position t of a sample pairs the gate values computed at token t with the
perplexity of predicting token t+1 (the gate at t shapes exactly that prediction). A sample of
``n`` tokens therefore has ``T_i = n - 1`` positions; the last token predicts nothing.

Bytes per stored position: 2 x L (gates) + 4 (perplexity) + 1 (mask) <= 2 x L + 8.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from quality_gate.errors import RouterDataError
from quality_gate.io import atomic_torch_save, atomic_write_json, atomic_write_text

FORMAT = "quality-gate/router-data/v1"
INDEX_SUFFIX = "_router_data.pt"
SHARD_KEYS = ("sample_ids", "lengths", "gates", "perplexities", "assistant_mask", "valid", "invalid_reason")


# --------------------------------------------------------------------------------------------- #
# Fingerprint
# --------------------------------------------------------------------------------------------- #
def fingerprint_of(fields: dict[str, Any]) -> str:
    """A stable sha256 of the JSON form of ``fields``."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_or_write_fingerprint(router_dir: Path, fields: dict[str, Any]) -> str:
    """Store ``fields`` in ``router_dir/fingerprint.json``, or check them against the stored ones.

    Raises :class:`RouterDataError` listing the fields that differ, so that statistics of two
    different models, weights, tokenizers or settings are never mixed in one directory.
    """
    router_dir = Path(router_dir)
    path = router_dir / "fingerprint.json"
    fp = fingerprint_of(fields)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") != fp:
            old = stored.get("fields", {})
            diff = {k: (old.get(k), fields.get(k)) for k in sorted(set(old) | set(fields))}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            lines = "\n".join(f"  {k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise RouterDataError(
                f"{router_dir} holds statistics of another setup (fingerprint {stored.get('fingerprint')} "
                f"!= {fp}); refusing to mix them. Differences:\n{lines}\n"
                "Use a new run dir, or rerun with the settings of the stored one."
            )
        return fp
    atomic_write_json(path, {"fingerprint": fp, "fields": fields})
    return fp


# --------------------------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------------------------- #
def shard_path(router_dir: Path, dataset_name: str, index: int) -> Path:
    return Path(router_dir) / dataset_name / f"shard-{index:05d}.pt"


def shard_is_complete(path: Path) -> bool:
    return Path(str(path) + ".done").exists() and Path(path).exists()


def write_shard(path: Path, shard: dict[str, Any], fingerprint: str) -> None:
    """Write one shard atomically, then its completion marker (last)."""
    missing = [k for k in SHARD_KEYS if k not in shard]
    if missing:
        raise ValueError(f"shard is missing keys {missing}")
    n = len(shard["sample_ids"])
    total = int(shard["lengths"].sum())
    if shard["gates"].shape[0] != total or shard["perplexities"].shape[0] != total:
        raise ValueError(
            f"shard arrays disagree: lengths sum to {total}, gates {tuple(shard['gates'].shape)}, "
            f"perplexities {tuple(shard['perplexities'].shape)}"
        )
    if shard["lengths"].shape[0] != n or shard["valid"].shape[0] != n:
        raise ValueError("shard per-sample arrays must have one entry per sample id")
    atomic_torch_save({**shard, "fingerprint": fingerprint, "format": FORMAT}, path)
    atomic_write_text(Path(str(path) + ".done"), fingerprint + "\n")


def write_index(
    router_dir: Path,
    dataset_name: str,
    shard_paths: Sequence[Path],
    fingerprint: str,
    max_seq_len: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Gather the shards of one dataset into ``<dataset>_router_data.pt`` (atomic).

    The index holds ids and lengths of all samples and the relative shard paths; the big arrays
    stay in the shards.
    """
    router_dir = Path(router_dir)
    sample_ids: list[str] = []
    lengths: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    counts: list[int] = []
    num_layers = None
    has_ifd = True
    for p in shard_paths:
        if not shard_is_complete(p):
            raise RouterDataError(
                f"shard {p} is not complete; rerun Stage 2 in the same run dir to finish it"
            )
        s = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        if s.get("fingerprint") != fingerprint:
            raise RouterDataError(
                f"shard {p} was written under fingerprint {s.get('fingerprint')}, not {fingerprint}"
            )
        sample_ids.extend(s["sample_ids"])
        lengths.append(s["lengths"].clone())
        valid.append(s["valid"].clone())
        counts.append(len(s["sample_ids"]))
        num_layers = int(s["gates"].shape[1]) if num_layers is None else num_layers
        has_ifd = has_ifd and "ifd_loss_cond" in s
    if len(set(sample_ids)) != len(sample_ids):
        raise RouterDataError(f"dataset {dataset_name}: duplicate sample ids across shards")
    index = {
        "format": FORMAT,
        "dataset_name": dataset_name,
        "num_samples": len(sample_ids),
        "num_layers": num_layers,
        "max_seq_len": int(max_seq_len),
        "sample_ids": sample_ids,
        "lengths": torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int64),
        "valid": torch.cat(valid) if valid else torch.zeros(0, dtype=torch.bool),
        "shards": [str(Path(p).relative_to(router_dir)) for p in shard_paths],
        "shard_num_samples": counts,
        "has_ifd": has_ifd,
        "fingerprint": fingerprint,
        "created_at": dt.datetime.now().isoformat(timespec="seconds"),
        **(extra or {}),
    }
    out = router_dir / f"{dataset_name}{INDEX_SUFFIX}"
    atomic_torch_save(index, out)
    return out


# --------------------------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------------------------- #
@dataclasses.dataclass
class RouterShard:
    """One shard in memory (tensors memory-mapped). ``offsets`` is int64 [n+1]."""

    sample_ids: list[str]
    lengths: torch.Tensor
    offsets: torch.Tensor
    gates: torch.Tensor  # (sum T_i, L) float16
    perplexities: torch.Tensor  # (sum T_i,) float32
    assistant_mask: torch.Tensor  # (sum T_i,) bool
    valid: torch.Tensor  # (n,) bool
    invalid_reason: list[str]
    ifd_loss_cond: torch.Tensor | None = None
    ifd_loss_uncond: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def sample_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def _load_shard(path: Path) -> RouterShard:
    s = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    lengths = s["lengths"].to(torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return RouterShard(
        sample_ids=list(s["sample_ids"]),
        lengths=lengths,
        offsets=offsets,
        gates=s["gates"],
        perplexities=s["perplexities"],
        assistant_mask=s["assistant_mask"],
        valid=s["valid"],
        invalid_reason=list(s["invalid_reason"]),
        ifd_loss_cond=s.get("ifd_loss_cond"),
        ifd_loss_uncond=s.get("ifd_loss_uncond"),
    )


def find_router_data(root: str | Path) -> list[Path]:
    """Every ``*_router_data.pt`` index under ``root`` (recursively), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.exists():
        raise RouterDataError(f"{root} does not exist; pass the run dir of a finished Stage 2 run")
    return sorted(p for p in root.rglob(f"*{INDEX_SUFFIX}") if p.is_file())


def load_index(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RouterDataError(f"router data index {path} does not exist")
    index = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if index.get("format") != FORMAT:
        raise RouterDataError(
            f"{path} is not Quality-Gate router data ({FORMAT}); format={index.get('format')!r}"
        )
    return index


def iter_shards(index_path: str | Path) -> Iterator[RouterShard]:
    """Stream the shards of one dataset, in sample order, memory-mapped."""
    index_path = Path(index_path)
    index = load_index(index_path)
    for rel in index["shards"]:
        p = index_path.parent / rel
        if not shard_is_complete(p):
            raise RouterDataError(f"shard {p} listed in {index_path} is missing or incomplete")
        yield _load_shard(p)


class RaggedView(Sequence):
    """Per-sample, lazy access to one ragged field over all shards of a dataset."""

    def __init__(self, index_path: Path, index: dict[str, Any], field: str) -> None:
        self._dir = index_path.parent
        self._shards: list[str] = index["shards"]
        counts = torch.tensor([0, *index["shard_num_samples"]], dtype=torch.int64)
        self._starts = torch.cumsum(counts, 0)
        self._field = field
        self._cache: dict[int, RouterShard] = {}

    def _shard(self, k: int) -> RouterShard:
        if k not in self._cache:
            self._cache[k] = _load_shard(self._dir / self._shards[k])
        return self._cache[k]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(torch.searchsorted(self._starts, torch.tensor(i), right=True)) - 1
        shard = self._shard(k)
        rows = shard.sample_slice(i - int(self._starts[k]))
        if self._field == "quality_gates":
            return shard.gates[rows].T  # (L, T_i)
        return getattr(shard, self._field)[rows]  # (T_i,)


def load_router_data(router_data_path: str | Path) -> dict[str, Any]:
    """Open one dataset's router data (the index file, or a run/router dir holding exactly one).

    Returns the seed's keys: ``dataset_name``, ``num_samples``, ``quality_gates`` (per sample
    ``[L, T_i]`` float16), ``perplexities`` (per sample ``[T_i]``), ``sample_ids``, ``max_seq_len``;
    plus ``num_layers``, ``lengths``, ``valid``, ``assistant_mask`` (per sample ``[T_i]``),
    ``fingerprint``, ``index_path``. Nothing is read into memory until a sample is accessed.
    """
    path = Path(router_data_path)
    if path.is_dir():
        found = find_router_data(path)
        if len(found) != 1:
            raise RouterDataError(
                f"{path} holds {len(found)} router data files; pass one of: {[str(f) for f in found]}"
            )
        path = found[0]
    index = load_index(path)
    return {
        **index,
        "quality_gates": RaggedView(path, index, "quality_gates"),
        "perplexities": RaggedView(path, index, "perplexities"),
        "assistant_mask": RaggedView(path, index, "assistant_mask"),
        "index_path": str(path),
    }


def get_sample_router_info(router_data: dict[str, Any], sample_id: str) -> dict[str, Any]:
    """The statistics of one sample by id: ``quality_gates`` [L, T_i], ``perplexities`` [T_i], ..."""
    if "_id_to_row" not in router_data:
        router_data["_id_to_row"] = {sid: i for i, sid in enumerate(router_data["sample_ids"])}
    row = router_data["_id_to_row"].get(sample_id)
    if row is None:
        raise KeyError(f"sample id {sample_id!r} is not in {router_data.get('dataset_name')!r}")
    return {
        "sample_id": sample_id,
        "row": row,
        "dataset_name": router_data["dataset_name"],
        "quality_gates": router_data["quality_gates"][row],
        "perplexities": router_data["perplexities"][row],
        "assistant_mask": router_data["assistant_mask"][row],
        "length": int(router_data["lengths"][row]),
        "valid": bool(router_data["valid"][row]),
    }
