"""Router data on disk: ragged, sharded, memory-mapped, written atomically.

Layout of one Stage 2 run (``<run>/router_data/``)::

    fingerprint.json                       what produced the statistics (model, weights, tokenizer, ...)
    plan.json                              every shard of the run and the part (job) that scores it
    <dataset>_router_data.pt               the index of one dataset (the seed's file name)
    <dataset>_records.jsonl                the records of the indexed samples, in sample order (Stage 2)
    <dataset>/shard-00000.pt               a shard: the statistics of a slice of the samples
    <dataset>/shard-00000.pt.done          completion marker, written after the shard itself: JSON with the
                                           fingerprint, the shard's size in bytes and its sha256

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
    embeddings      float16 [n, D]      optional: the selector's last hidden state, mean over the tokens of
                                        data_process.embedding_tokens (default: the prompt), randomly
                                        projected to D = data_process.embedding_dim dims (kept whole
                                        when D >= hidden size); for diversity selection
    encode_stats    dict                counts of the shard's records (kept, truncated, dropped)
    dropped         list[dict]          records of the shard the encoder dropped: id, reason

Position pairing: position t of a sample pairs the gate values computed at token t with the
perplexity of predicting token t+1 (the gate at t shapes exactly that prediction). A sample of
``n`` tokens therefore has ``T_i = n - 1`` positions; the last token predicts nothing.

Bytes per stored position: 2 x L (gates) + 4 (perplexity) + 1 (mask) <= 2 x L + 8; per sample
2 x D more for the embedding.

Integrity: a shard counts as finished only when its marker exists and the file still has the size
and sha256 the marker recorded (:func:`shard_problem`). Stage 2 rescores a damaged shard on rerun;
selection refuses to read one and names it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from quality_gate.errors import RouterDataError
from quality_gate.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_jsonl,
    load_tensors,
    read_json,
    sha256_file,
)

log = logging.getLogger(__name__)

FORMAT = "quality-gate/router-data/v2"
INDEX_SUFFIX = "_router_data.pt"
RECORDS_SUFFIX = "_records.jsonl"
PLAN_FILE = "plan.json"
FINGERPRINT_FILE = "fingerprint.json"
SHARD_KEYS = ("sample_ids", "lengths", "gates", "perplexities", "assistant_mask", "valid", "invalid_reason")


# --------------------------------------------------------------------------------------------- #
# Fingerprint
# --------------------------------------------------------------------------------------------- #
def fingerprint_of(fields: dict[str, Any]) -> str:
    """A stable sha256 of the JSON form of ``fields``."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key: stored X, now Y"`` for every field that differs; a dict field (the selector's weight
    files, the records per dataset) is compared one entry at a time, so the line names the file."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            lines += [f"{key}.{line}" for line in _differences(a, b)]
        else:
            lines.append(f"{key}: stored {a!r}, now {b!r}")
    return lines


def _recorded_fingerprints(router_dir: Path) -> set[str]:
    """The fingerprints the plan and the shard markers in ``router_dir`` were written under."""
    found = set()
    for path in [router_dir / PLAN_FILE, *sorted(router_dir.glob("*/shard-*.pt.done"))]:
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            found.add(value)
    return found


def check_or_write_fingerprint(router_dir: Path, fields: dict[str, Any]) -> str:
    """Store ``fields`` in ``router_dir/fingerprint.json``, or check them against the stored ones.

    Raises :class:`RouterDataError` listing the fields that differ, so that statistics of two
    different models, weights, tokenizers or settings are never mixed in one directory.

    A damaged ``fingerprint.json`` (truncated, garbled) is rewritten when everything beside it (plan,
    shard markers) was written under this very fingerprint, or there is nothing yet; otherwise the
    error names the file and says how to start over. So a run is always repairable by a rerun.
    """
    router_dir = Path(router_dir)
    path = router_dir / FINGERPRINT_FILE
    fp = fingerprint_of(fields)
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict):
                raise ValueError(f"a JSON {type(stored).__name__}, not an object")
        except (OSError, ValueError) as err:
            recorded = _recorded_fingerprints(router_dir)
            if recorded - {fp}:
                raise RouterDataError(
                    f"{path} is damaged ({type(err).__name__}: {str(err)[:100]}) and the router data beside "
                    f"it was written under fingerprint {sorted(recorded)}, not this setup's {fp}: rerun with "
                    f"the settings of that run (its config.yaml), or delete {router_dir} to score anew"
                ) from None
            log.warning(
                "%s was damaged (%s); the router data beside it was written under this same setup "
                "(fingerprint %s): rewriting it",
                path,
                type(err).__name__,
                fp,
            )
            atomic_write_json(path, {"fingerprint": fp, "fields": fields})
            return fp
        if stored.get("fingerprint") != fp:
            lines = "\n".join(f"  {line}" for line in _differences(stored.get("fields") or {}, fields))
            raise RouterDataError(
                f"{router_dir} holds statistics of another setup (fingerprint {stored.get('fingerprint')} "
                f"!= {fp}); refusing to mix them. Differences:\n{lines}\n"
                "Use a new run dir, or rerun with the settings of the stored one."
            )
        return fp
    atomic_write_json(path, {"fingerprint": fp, "fields": fields})
    return fp


def read_fingerprint(router_dir: Path) -> dict[str, Any]:
    """The content of ``router_dir/fingerprint.json`` (``{"fingerprint", "fields"}``); a damaged one is a
    :class:`RouterDataError` saying that a Stage 2 rerun in the same run dir rewrites it."""
    path = Path(router_dir) / FINGERPRINT_FILE
    stored = read_json(path, _RERUN_ADVICE.format(run_dir=Path(router_dir).parent), RouterDataError)
    if not isinstance(stored, dict):
        raise RouterDataError(
            f"{path} is not a fingerprint (a JSON object); "
            + _RERUN_ADVICE.format(run_dir=Path(router_dir).parent)
        )
    return stored


_RERUN_ADVICE = (
    "rerun Stage 2 with output_dir={run_dir} (the same settings): it rewrites the file and keeps every "
    "finished shard"
)


# --------------------------------------------------------------------------------------------- #
# Plan: which shards make up the run, and which part (job) scores each
# --------------------------------------------------------------------------------------------- #
def write_plan(router_dir: Path, fingerprint: str, num_parts: int, shards: list[dict[str, Any]]) -> None:
    """Store the shard plan of a Stage 2 run (``plan.json``), so that readers (selection) can tell an
    unfinished run from a finished one and name what is missing without reading the records.

    ``shards``: ``{"dataset", "index", "samples", "part"}`` per shard. Every job writes the same plan
    (it is a function of the records, ``shard_size`` and ``num_parts``); the write is atomic.
    """
    atomic_write_json(
        Path(router_dir) / PLAN_FILE,
        {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "num_parts": int(num_parts),
            "datasets": sorted({s["dataset"] for s in shards}),
            "shards": shards,
        },
    )


def unfinished_run(router_dir: Path) -> str | None:
    """Why the Stage 2 run in ``router_dir`` cannot be read yet, or None when it can (or has no plan).

    Checks that every dataset of the plan has its index and, when one is missing, lists the shards
    that are not finished (size against the marker; the full checksum is verified when shards are
    read) with the part that scores each.
    """
    router_dir = Path(router_dir)
    plan_file = router_dir / PLAN_FILE
    if not plan_file.is_file():
        return None
    plan = read_json(plan_file, _RERUN_ADVICE.format(run_dir=router_dir.parent), RouterDataError)
    if not isinstance(plan, dict) or not isinstance(plan.get("shards"), list) or "datasets" not in plan:
        raise RouterDataError(
            f"{plan_file} is not a shard plan; " + _RERUN_ADVICE.format(run_dir=router_dir.parent)
        )
    missing_index = [d for d in plan["datasets"] if not (router_dir / f"{d}{INDEX_SUFFIX}").is_file()]
    if not missing_index:
        return None
    fp, num_parts = plan.get("fingerprint"), int(plan.get("num_parts", 1))
    missing = []
    for s in plan["shards"]:
        path = shard_path(router_dir, s["dataset"], int(s["index"]))
        problem = shard_problem(path, fp, verify_checksum=False)
        if problem is not None:
            missing.append((path, int(s["part"]), problem))
    run_dir = router_dir.parent
    if not missing:
        return (
            f"every shard of the Stage 2 run {run_dir} is finished but the index of {missing_index} was not "
            "written (the last part was interrupted while finishing?); run Stage 2 with "
            f"data_process.finalize_only=true output_dir={run_dir} to write it"
        )
    parts = sorted({p for _, p, _ in missing})
    listed = "; ".join(f"{p.relative_to(router_dir)} (part {part}): {why}" for p, part, why in missing[:5])
    more = f"; ... ({len(missing)} in all)" if len(missing) > 5 else ""
    return (
        f"the Stage 2 run {run_dir} is not finished: {len(missing)} of {len(plan['shards'])} shards are not "
        f"scored yet, in part(s) {parts} of data_process.num_parts={num_parts}: {listed}{more}. Run those "
        f"parts (data_process.part_index=<i> output_dir={run_dir}); the last one to finish writes the "
        "indexes (or run data_process.finalize_only=true afterwards)"
    )


# --------------------------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------------------------- #
def shard_path(router_dir: Path, dataset_name: str, index: int) -> Path:
    return Path(router_dir) / dataset_name / f"shard-{index:05d}.pt"


def marker_path(path: Path) -> Path:
    return Path(str(path) + ".done")


def shard_problem(path: Path, fingerprint: str | None = None, verify_checksum: bool = True) -> str | None:
    """None when the shard at ``path`` is finished and intact; else why it is not, in a few words.

    Finished: the marker exists, is this format's JSON, carries ``fingerprint`` (when given), and the
    shard file has the recorded size and (with ``verify_checksum``) sha256.
    """
    path, marker = Path(path), marker_path(Path(path))
    if not marker.exists():
        return "not finished (no completion marker)" if path.exists() else "missing"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        recorded_size, recorded_sha = int(record["bytes"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its completion marker is unreadable (written by another version, or damaged)"
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        return f"written under fingerprint {record.get('fingerprint')}, not {fingerprint}"
    if not path.exists():
        return "missing although its completion marker exists"
    size = path.stat().st_size
    if size != recorded_size:
        return f"damaged: {size} bytes, {recorded_size} recorded when it was written (truncated copy?)"
    if verify_checksum and sha256_file(path) != recorded_sha:
        return "damaged: its sha256 differs from the one recorded when it was written"
    return None


def write_shard(path: Path, shard: dict[str, Any], fingerprint: str) -> None:
    """Write one shard atomically, then its completion marker (size and sha256 of the file, last)."""
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
    path = Path(path)
    atomic_torch_save({**shard, "fingerprint": fingerprint, "format": FORMAT}, path)
    marker = {
        "fingerprint": fingerprint,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "samples": n,
    }
    atomic_write_json(marker_path(path), marker)


def remove_shard(path: Path) -> None:
    """Delete a shard and its marker (marker first: a crash in between leaves an unfinished shard)."""
    marker_path(path).unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)


def write_index(
    router_dir: Path,
    dataset_name: str,
    shard_paths: Sequence[Path],
    fingerprint: str,
    max_seq_len: int,
    extra: dict[str, Any] | None = None,
    records: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Gather the shards of one dataset into ``<dataset>_router_data.pt`` (atomic).

    The index holds ids and lengths of all samples and the relative shard paths; the big arrays
    stay in the shards. With ``records`` (the dataset's records, each with an ``id``), the records of
    the indexed samples are first written to ``<dataset>_records.jsonl``, in sample order, and the
    index records that file's name and sha256 (selection refuses an edited copy).
    """
    router_dir = Path(router_dir)
    sample_ids: list[str] = []
    lengths: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    counts: list[int] = []
    num_layers = None
    has_ifd = True
    for p in shard_paths:
        problem = shard_problem(p, fingerprint)
        if problem is not None:
            raise RouterDataError(
                f"shard {p} is {problem}; rerun Stage 2 in the same run dir to (re)score it"
            )
        s = read_router_file(p)
        sample_ids.extend(s["sample_ids"])
        lengths.append(s["lengths"].clone())
        valid.append(s["valid"].clone())
        counts.append(len(s["sample_ids"]))
        if len(s["sample_ids"]) and num_layers is None:
            num_layers = int(s["gates"].shape[1])
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
        **(_write_records(router_dir, dataset_name, records, sample_ids) if records is not None else {}),
    }
    out = router_dir / f"{dataset_name}{INDEX_SUFFIX}"
    atomic_torch_save(index, out)
    return out


def _write_records(
    router_dir: Path, dataset_name: str, records: Sequence[dict[str, Any]], sample_ids: list[str]
) -> dict[str, Any]:
    """Write the records of ``sample_ids`` to ``<dataset>_records.jsonl``; the index fields naming it."""
    by_id = {r["id"]: r for r in records}
    path = router_dir / f"{dataset_name}{RECORDS_SUFFIX}"
    atomic_write_jsonl(path, [by_id[i] for i in sample_ids])
    return {"records_file": path.name, "records_sha256": sha256_file(path)}


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
    embeddings: torch.Tensor | None = None  # (n, D) float16

    def __len__(self) -> int:
        return len(self.sample_ids)

    def sample_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def read_router_file(path: Path) -> dict[str, Any]:
    """``torch.load`` of a shard or index (weights only, memory-mapped); a file torch cannot read is a
    :class:`RouterDataError` naming it."""
    payload = load_tensors(
        path,
        "it is not router data. Rerun Stage 2 with output_dir=<its run dir>: damaged shards are rescored "
        "and the indexes rewritten.",
        RouterDataError,
        mmap=True,
    )
    if not isinstance(payload, dict):
        raise RouterDataError(f"{path} holds a {type(payload).__name__}, not router data; rerun Stage 2")
    return payload


def shards_summary(shard_paths: Sequence[Path]) -> dict[str, Any]:
    """What Stage 2 reports of a dataset's shards: ``samples`` (their number), ``encode`` (the encoder's
    counts, summed over the shards), ``dropped`` (the records the encoder dropped) and ``invalid``
    (``(sample id, reason)`` of every sample without usable statistics), each in shard order."""
    samples = 0
    encode: Counter[str] = Counter()
    dropped: list[dict[str, Any]] = []
    invalid: list[tuple[str, str]] = []
    for path in shard_paths:
        shard = read_router_file(path)
        samples += len(shard["sample_ids"])
        encode.update(shard["encode_stats"])
        dropped.extend(shard["dropped"])
        invalid += [(sid, why) for sid, why in zip(shard["sample_ids"], shard["invalid_reason"]) if why]
    return {"samples": samples, "encode": encode, "dropped": dropped, "invalid": invalid}


def _load_shard(path: Path) -> RouterShard:
    s = read_router_file(path)
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
        embeddings=s.get("embeddings"),
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
    index = read_router_file(path)
    if index.get("format") != FORMAT:
        raise RouterDataError(
            f"{path} is not Quality-Gate router data ({FORMAT}); format={index.get('format')!r}"
        )
    return index


def iter_shards(index_path: str | Path, verify_checksum: bool = True) -> Iterator[RouterShard]:
    """Stream the shards of one dataset, in sample order, memory-mapped; each is checked against its
    marker first (size, sha256, fingerprint) and a damaged one is a :class:`RouterDataError` naming it."""
    index_path = Path(index_path)
    index = load_index(index_path)
    for rel in index["shards"]:
        yield _checked_shard(index_path.parent / rel, index, index_path, verify_checksum)


def _checked_shard(
    path: Path, index: dict[str, Any], index_path: Path, verify_checksum: bool = True
) -> RouterShard:
    """The shard at ``path`` after :func:`shard_problem` found it intact; else :class:`RouterDataError`.

    torch.load does not notice flipped bytes inside a tensor (it reads them as other values), so the
    size and sha256 of the marker are the only guard against silently reading damaged statistics.
    """
    problem = shard_problem(path, index.get("fingerprint"), verify_checksum)
    if problem is not None:
        raise RouterDataError(
            f"shard {path} of {index_path.name} is {problem}. Rerun Stage 2 with output_dir=<its run dir>: "
            "it rescores missing and damaged shards and rewrites the index."
        )
    return _load_shard(path)


class RaggedView(Sequence):
    """Per-sample, lazy access to one ragged field over all shards of a dataset."""

    def __init__(
        self, index_path: Path, index: dict[str, Any], field: str, cache: dict[int, RouterShard] | None = None
    ) -> None:
        self._index_path = index_path
        self._index = index
        self._dir = index_path.parent
        self._shards: list[str] = index["shards"]
        counts = torch.tensor([0, *index["shard_num_samples"]], dtype=torch.int64)
        self._starts = torch.cumsum(counts, 0)
        self._field = field
        # Shared by the views of one dataset, so that each shard is checked and opened once.
        self._cache: dict[int, RouterShard] = {} if cache is None else cache

    def _shard(self, k: int) -> RouterShard:
        if k not in self._cache:
            # Checked like iter_shards: a damaged shard is an error, never read silently.
            self._cache[k] = _checked_shard(self._dir / self._shards[k], self._index, self._index_path)
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
    shards: dict[int, RouterShard] = {}
    return {
        **index,
        "quality_gates": RaggedView(path, index, "quality_gates", shards),
        "perplexities": RaggedView(path, index, "perplexities", shards),
        "assistant_mask": RaggedView(path, index, "assistant_mask", shards),
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
