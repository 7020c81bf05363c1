"""Stage 2's shard plan: which records make up each shard, which part and rank scores it, and the
fingerprint of the setup that every shard is written under.

Every dataset is cut into contiguous shards of ``data_process.shard_size`` records
(:func:`plan_shards`). Work is split by shards, first between parts (independent jobs, no rendezvous)
and then between the ranks of one launch, each by a deterministic greedy balance of the shards'
estimated tokens (:func:`assign_shards`), so that every job computes the same plan from the same
records and every record belongs to exactly one shard. Which shards are finished is read from the
store (:func:`quality_gate.stats.store.shard_problem`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from quality_gate.data import records_fingerprint
from quality_gate.models import model_weights_fingerprint
from quality_gate.stats.store import FORMAT, remove_shard, shard_path, shard_problem

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ShardJob:
    """One shard to score: ``rows`` index the dataset's records; ``est_tokens`` balances the work."""

    dataset: str
    index: int
    rows: range
    est_tokens: int


def _estimated_tokens(record: dict[str, Any]) -> int:
    """A cheap token estimate (characters / 4 plus the template's few tokens per turn) for balancing."""
    return sum(len(m["content"]) // 4 + 4 for m in record["messages"])


def plan_shards(datasets: dict[str, list[dict[str, Any]]], shard_size: int) -> list[ShardJob]:
    """Every dataset cut into contiguous shards of ``shard_size`` records."""
    jobs = []
    for name, records in datasets.items():
        for k, start in enumerate(range(0, len(records), shard_size)):
            rows = range(start, min(start + shard_size, len(records)))
            jobs.append(ShardJob(name, k, rows, sum(_estimated_tokens(records[r]) for r in rows)))
    return jobs


def assign_shards(jobs: list[ShardJob], num_workers: int) -> list[list[ShardJob]]:
    """Deterministic greedy balance: largest shard first, to the least-loaded worker (lowest on ties)."""
    loads = [0] * num_workers
    out: list[list[ShardJob]] = [[] for _ in range(num_workers)]
    for job in sorted(jobs, key=lambda j: (-j.est_tokens, j.dataset, j.index)):
        w = min(range(num_workers), key=lambda i: (loads[i], i))
        loads[w] += job.est_tokens
        out[w].append(job)
    for part in out:
        part.sort(key=lambda j: (j.dataset, j.index))
    return out


def shards_of_rank(
    parts: list[list[ShardJob]], part_index: int | None, num_ranks: int, rank: int
) -> list[ShardJob]:
    """The shards one rank of a launch scores: those of its part (of every part when ``part_index`` is
    None), balanced over the launch's ``num_ranks`` ranks by :func:`assign_shards`."""
    part = range(len(parts)) if part_index is None else [part_index]
    return assign_shards([j for p in part for j in parts[p]], num_ranks)[rank]


def plan_entries(parts: list[list[ShardJob]]) -> list[dict[str, Any]]:
    """``plan.json``'s shard list: dataset, index, number of samples and the part that scores it."""
    entries = [
        {"dataset": j.dataset, "index": j.index, "samples": len(j.rows), "part": p}
        for p, part in enumerate(parts)
        for j in part
    ]
    return sorted(entries, key=lambda e: (e["dataset"], e["index"]))


def _hash_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_fields(
    cfg: DictConfig, tokenizer: Any, weights: dict[str, Any], dtype: torch.dtype, datasets: dict[str, Any]
) -> dict[str, Any]:
    """What the statistics of a Stage 2 run depend on (``router_data/fingerprint.json``'s ``fields``):
    a rerun whose fields differ is refused by :func:`quality_gate.stats.store.check_or_write_fingerprint`.

    ``weights``: what :func:`quality_gate.models.apply_stage1_weights` returned (or the ``none`` kind);
    ``datasets``: the records of each dataset.
    """
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    selector = Path(str(cfg.selector_model.path))
    return {
        "format": FORMAT,
        # Absolute when local, so that selection (run from anywhere) finds the tokenizer for its report.
        "selector_model_path": str(selector.resolve()) if selector.exists() else str(selector),
        # The content of the weight and config files: the same path may hold another model on resume.
        "selector_weights": model_weights_fingerprint(str(cfg.selector_model.path), "selector_model.path"),
        "stage1_weights_kind": weights.get("kind"),
        "stage1_weights_sha256": weights.get("sha256"),
        "gate_init": weights.get("gate_init"),
        "trust_remote_code": bool(cfg.selector_model.trust_remote_code),
        "tokenizer_name": getattr(tokenizer, "name_or_path", None),
        "tokenizer_vocab_sha256": _hash_text(vocab),
        "chat_template_sha256": _hash_text(getattr(tokenizer, "chat_template", None)),
        "max_sequence_length": int(cfg.dataset.max_sequence_length),
        "truncation": str(cfg.dataset.truncation),
        "dtype": str(dtype).removeprefix("torch."),
        "collect_ifd": bool(cfg.collect_ifd),
        "embedding_dim": int(cfg.data_process.embedding_dim),
        **(
            {"embedding_tokens": str(cfg.data_process.embedding_tokens)}
            if int(cfg.data_process.embedding_dim)
            else {}
        ),
        "shard_size": int(cfg.data_process.shard_size),
        "records": {
            name: {"n": len(rows), "sha256": records_fingerprint(rows)} for name, rows in datasets.items()
        },
    }


def pending_shards(jobs: list[ShardJob], router_dir: Path, fingerprint: str) -> list[ShardJob]:
    """The shards of ``jobs`` not finished and intact; a damaged one is named and removed, to be rescored."""
    pending = []
    for job in jobs:
        path = shard_path(router_dir, job.dataset, job.index)
        problem = shard_problem(path, fingerprint)
        if problem is None:
            continue
        if problem != "missing":
            log.warning("shard %s is %s: scoring it again", path, problem)
            remove_shard(path)
        pending.append(job)
    return pending


def unfinished_shards(jobs: list[ShardJob], router_dir: Path, fingerprint: str, num_parts: int) -> list[str]:
    """``"<shard path> (part i): <problem>"`` for every shard that is not finished and intact."""
    part_of = {(j.dataset, j.index): p for p, part in enumerate(assign_shards(jobs, num_parts)) for j in part}
    out = []
    for job in jobs:
        path = shard_path(router_dir, job.dataset, job.index)
        problem = shard_problem(path, fingerprint)
        if problem is not None:
            out.append(f"{path} (part {part_of[(job.dataset, job.index)]}): {problem}")
    return out
