"""Stage 2 (collect): every sample's gate values and per-token perplexities, one forward pass.

``quality-gate collect model_checkpoint_path=<warmup run dir>`` (seed: ``python src/main.py
--config-name stage_2_selection ...``; several GPUs: ``torchrun --nproc_per_node=N src/main.py
--config-name collect ...`` or ``accelerate launch src/main.py --config-name collect ...``).

Recipe: load the gated selector and its Stage 1 weights -> load and encode every dataset -> cut
each dataset into shards of ``data_process.shard_size`` samples -> fingerprint the setup (a rerun
with other settings refuses to mix) -> score the shards not finished yet (token-budget batches,
one backbone forward each), each written atomically with a completion marker -> rank 0 writes each
dataset's index (``router_data/<dataset>_router_data.pt``), the scored records
(``router_data/<dataset>_records.jsonl``) and ``stage2_metrics.json``.

Resume: rerun with the same run dir (``hydra.run.dir=<dir>`` or ``output_dir=<dir>``); finished
shards are skipped, and since a shard's batches depend only on its samples and the config, the
result equals an uninterrupted run. Data parallel: shards go to ranks by a deterministic greedy
balance of their token counts; every sample belongs to exactly one shard.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import hashlib
import json
import logging
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from quality_gate.config import validate
from quality_gate.data import (
    encode_records,
    ensure_chat_template,
    load_records,
    pad_batch,
    token_budget_batches,
)
from quality_gate.data.sources import SKIPPED_ROWS_FILE
from quality_gate.errors import DataError
from quality_gate.io import atomic_write_json, atomic_write_jsonl
from quality_gate.models import apply_stage1_weights, default_device, is_converted_dir, load_selector
from quality_gate.runs import init_run, is_main_process, rank, update_manifest, world_size
from quality_gate.stats.collect import collect_batch, concat_batch_stats
from quality_gate.stats.store import (
    FORMAT,
    check_or_write_fingerprint,
    shard_is_complete,
    shard_path,
    write_index,
    write_shard,
)

log = logging.getLogger(__name__)

# Ranks finish their shards at different times; the slowest may trail by far more than the
# default 10-minute collective timeout on a large dataset.
_BARRIER_TIMEOUT = dt.timedelta(hours=12)
# Records the encoder dropped (too long under truncation=drop, or no assistant token left).
DROPPED_SAMPLES_FILE = "dropped_samples.jsonl"


@dataclasses.dataclass
class ShardJob:
    """One shard to score: ``rows`` index the dataset's encoded samples."""

    dataset: str
    index: int
    rows: list[int]
    tokens: int


def _hash_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_model(cfg: DictConfig, device: str) -> tuple[Any, Any, dict[str, Any]]:
    sel = cfg.selector_model
    # A plain (unconverted) selector gets freshly initialised gates: seed them, so that every rank
    # and every resumed run scores with the same gates.
    torch.manual_seed(int(cfg.seed))
    model, tokenizer = load_selector(
        str(sel.path),
        dtype=str(sel.dtype),
        device=device,
        trust_remote_code=bool(sel.trust_remote_code),
        attn_implementation=sel.attn_implementation,
        gate_init_mean=float(cfg.quality_gate.init_mean),
        gate_init_std=float(cfg.quality_gate.init_std),
    )
    ensure_chat_template(tokenizer, cfg.dataset.chat_template)
    if cfg.model_checkpoint_path:
        weights = apply_stage1_weights(model, str(cfg.model_checkpoint_path))
    else:
        log.warning(
            "model_checkpoint_path is null: scoring with the gates of %s as they are (not warmed up); "
            "pass the Stage 1 run dir or its full_rank_weights.pt for meaningful statistics",
            sel.path,
        )
        weights = {"kind": "none", "path": None, "sha256": None}
    if weights["kind"] == "none" and not is_converted_dir(str(sel.path)):
        weights["gate_init"] = {
            "seed": int(cfg.seed),
            "mean": float(cfg.quality_gate.init_mean),
            "std": float(cfg.quality_gate.init_std),
        }
    model.eval().requires_grad_(False)
    return model, tokenizer, weights


def get_model_and_tokenizer(cfg: DictConfig) -> tuple[Any, Any]:
    """The gated selector (``selector_model.*``) with the Stage 1 weights applied, in eval mode."""
    model, tokenizer, _ = _load_model(cfg, default_device())
    return model, tokenizer


def _init_distributed() -> tuple[str, bool]:
    """``(device, initialised_here)``; starts the process group under torchrun / accelerate."""
    device = default_device()
    if world_size() == 1 or dist.is_initialized():
        return device, False
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=_BARRIER_TIMEOUT)
    return device, True


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _encode_datasets(cfg: DictConfig, tokenizer: Any, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per dataset (in first-seen order): its records by id, encoded samples and encode stats."""
    records = load_records(cfg.dataset, seed=int(cfg.seed), report_dir=run_dir if is_main_process() else None)
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_dataset.setdefault(record["dataset"], []).append(record)
    out = {}
    for name, rows in by_dataset.items():
        samples, stats, skipped = encode_records(
            rows, tokenizer, int(cfg.dataset.max_sequence_length), str(cfg.dataset.truncation)
        )
        out[name] = {
            "records": {r["id"]: r for r in rows},
            "samples": samples,
            "encode_stats": stats,
            "skipped": skipped,
        }
        log.info("dataset %s: %d records, %d samples encoded", name, len(rows), len(samples))
    return out


def _plan_shards(datasets: dict[str, dict[str, Any]], shard_size: int) -> list[ShardJob]:
    jobs = []
    for name, data in datasets.items():
        samples = data["samples"]
        for k, start in enumerate(range(0, len(samples), shard_size)):
            rows = list(range(start, min(start + shard_size, len(samples))))
            jobs.append(ShardJob(name, k, rows, sum(len(samples[r].input_ids) for r in rows)))
    return jobs


def assign_shards(jobs: list[ShardJob], num_ranks: int) -> list[list[ShardJob]]:
    """Deterministic greedy balance: largest shard first, to the least-loaded rank (lowest on ties)."""
    loads = [0] * num_ranks
    out: list[list[ShardJob]] = [[] for _ in range(num_ranks)]
    for job in sorted(jobs, key=lambda j: (-j.tokens, j.dataset, j.index)):
        r = min(range(num_ranks), key=lambda i: (loads[i], i))
        loads[r] += job.tokens
        out[r].append(job)
    return out


def _fingerprint_fields(
    cfg: DictConfig, tokenizer: Any, weights: dict[str, Any], dtype: torch.dtype, datasets: dict[str, Any]
) -> dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    data_hash = hashlib.sha256()
    for name, data in datasets.items():
        for s in data["samples"]:
            data_hash.update(f"{name}\0{s.id}\0{len(s.input_ids)}\n".encode())
    return {
        "format": FORMAT,
        "selector_model_path": str(Path(str(cfg.selector_model.path)).resolve())
        if Path(str(cfg.selector_model.path)).exists()
        else str(cfg.selector_model.path),
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
        "shard_size": int(cfg.data_process.shard_size),
        "samples_sha256": data_hash.hexdigest()[:16],
    }


def _score_shard(
    model: Any, job: ShardJob, samples: list[Any], cfg: DictConfig, pad_token_id: int, device: str, bar: tqdm
) -> tuple[dict[str, Any], dict[str, float]]:
    """Score one shard; returns its store fields and counters (tokens, padded slots, samples)."""
    dp = cfg.data_process
    shard_samples = [samples[r] for r in job.rows]
    batches = token_budget_batches(
        [len(s.input_ids) for s in shard_samples],
        int(dp.max_tokens_per_batch),
        int(dp.batch_size),
        bool(cfg.dataset.sort_by_length),
    )
    parts = []
    counters = {"tokens": 0.0, "padded_slots": 0.0, "samples": 0.0}
    for batch_rows in batches:
        batch = pad_batch([shard_samples[i] for i in batch_rows], pad_token_id)
        ids = batch["input_ids"].to(device, non_blocking=True)
        stats = collect_batch(
            model,
            ids,
            batch["attention_mask"].to(device, non_blocking=True),
            batch["labels"].to(device, non_blocking=True),
            chunk_tokens=int(dp.nll_chunk_tokens),
            collect_ifd=bool(cfg.collect_ifd),
        )
        parts.append((list(batch_rows), stats))
        real = int(batch["attention_mask"].sum())
        counters["tokens"] += real
        counters["padded_slots"] += ids.numel()
        counters["samples"] += len(batch_rows)
        bar.update(real)
    shard = concat_batch_stats(parts, len(shard_samples))
    shard["sample_ids"] = [s.id for s in shard_samples]
    return shard, counters


def _peak_memory(device: str) -> dict[str, float | None]:
    # ru_maxrss is in KiB on Linux.
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return {
        "peak_rss_gb": round(rss_gb, 3),
        "peak_cuda_allocated_gb": None if cuda_gb is None else round(cuda_gb, 3),
    }


def _score_assigned(
    model: Any,
    jobs: list[ShardJob],
    datasets: dict[str, Any],
    cfg: DictConfig,
    router_dir: Path,
    fingerprint: str,
    pad_token_id: int,
    device: str,
) -> dict[str, Any]:
    """Score this rank's unfinished shards; returns this rank's counters."""
    pending = [j for j in jobs if not shard_is_complete(shard_path(router_dir, j.dataset, j.index))]
    log.info(
        "rank %d: %d shards assigned, %d already complete, %d to score",
        rank(),
        len(jobs),
        len(jobs) - len(pending),
        len(pending),
    )
    totals = {"tokens": 0.0, "padded_slots": 0.0, "samples": 0.0}
    start = time.perf_counter()
    bar = tqdm(
        total=sum(j.tokens for j in pending),
        unit="tok",
        unit_scale=True,
        desc=f"stage 2 rank {rank()}",
        disable=not is_main_process(),
        dynamic_ncols=True,
    )
    with bar:
        for job in pending:
            shard, counters = _score_shard(
                model, job, datasets[job.dataset]["samples"], cfg, pad_token_id, device, bar
            )
            write_shard(shard_path(router_dir, job.dataset, job.index), shard, fingerprint)
            for key, value in counters.items():
                totals[key] += value
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(
                samples_per_s=f"{totals['samples'] / elapsed:.1f}", shard=f"{job.dataset}/{job.index}"
            )
    return {
        **totals,
        "seconds": time.perf_counter() - start,
        "shards_scored": len(pending),
        "shards_skipped": len(jobs) - len(pending),
        **_peak_memory(device),
    }


def _gather(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _finalise(
    run_dir: Path,
    router_dir: Path,
    jobs: list[ShardJob],
    datasets: dict[str, Any],
    cfg: DictConfig,
    fingerprint: str,
    per_rank: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """Rank 0: check every shard, write the indexes, the scored records and the metrics."""
    invalid: list[dict[str, str]] = []
    for name, data in datasets.items():
        paths = [shard_path(router_dir, j.dataset, j.index) for j in jobs if j.dataset == name]
        write_index(
            router_dir,
            name,
            paths,
            fingerprint,
            int(cfg.dataset.max_sequence_length),
            extra={"collect_ifd": bool(cfg.collect_ifd)},
        )
        for p in paths:
            shard = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            invalid += [
                {"dataset": name, "id": sid, "reason": reason}
                for sid, reason in zip(shard["sample_ids"], shard["invalid_reason"])
                if reason
            ]
        atomic_write_jsonl(
            router_dir / f"{name}_records.jsonl", [data["records"][s.id] for s in data["samples"]]
        )
    dropped = [row.as_dict() for d in datasets.values() for row in d["skipped"]]
    atomic_write_jsonl(run_dir / DROPPED_SAMPLES_FILE, dropped)
    skipped_file = run_dir / SKIPPED_ROWS_FILE  # written by load_records: bad rows, one per line
    skipped_rows = (
        [json.loads(line) for line in skipped_file.read_text().splitlines() if line.strip()]
        if skipped_file.exists()
        else []
    )
    tokens = sum(r["tokens"] for r in per_rank)
    slots = sum(r["padded_slots"] for r in per_rank)
    scored_samples = sum(r["samples"] for r in per_rank)
    busy = max((r["seconds"] for r in per_rank), default=0.0)
    metrics = {
        "samples": sum(len(d["samples"]) for d in datasets.values()),
        "samples_scored_this_run": int(scored_samples),
        "tokens_scored_this_run": int(tokens),
        "padding_fraction": round(1 - tokens / slots, 4) if slots else 0.0,
        "tokens_per_s": round(tokens / busy, 1) if busy else None,
        "samples_per_s": round(scored_samples / busy, 2) if busy else None,
        "wall_time_s": round(wall_s, 2),
        "world_size": world_size(),
        "shards_total": len(jobs),
        "shards_scored_this_run": sum(r["shards_scored"] for r in per_rank),
        "shards_resumed": sum(r["shards_skipped"] for r in per_rank),
        "peak_rss_gb_per_rank": [r["peak_rss_gb"] for r in per_rank],
        "peak_cuda_allocated_gb_per_rank": [r["peak_cuda_allocated_gb"] for r in per_rank],
        "datasets": {
            name: {
                "samples": len(d["samples"]),
                "encode": d["encode_stats"].as_dict(),
                "dropped_by_encoder": len(d["skipped"]),
                "truncated": sum(bool(s.truncated) for s in d["samples"]),
            }
            for name, d in datasets.items()
        },
        "skipped_rows": len(skipped_rows),
        "skipped_rows_by_dataset": dict(Counter(r.get("dataset") for r in skipped_rows)),
        "invalid_samples": len(invalid),
        "invalid": invalid,
    }
    atomic_write_json(run_dir / "stage2_metrics.json", metrics)
    if invalid:
        log.warning(
            "%d samples have no usable statistics (valid=False); see stage2_metrics.json", len(invalid)
        )
    return metrics


def run(cfg: DictConfig) -> None:
    """Stage 2: score every sample of the configured datasets; see the module docstring."""
    validate(cfg)
    run_dir = init_run(cfg, "collect")
    started = time.perf_counter()
    device, own_group = _init_distributed()
    try:
        model, tokenizer, weights = _load_model(cfg, device)
        datasets = _encode_datasets(cfg, tokenizer, run_dir)
        if not datasets:
            raise DataError("no samples to score: check dataset.* (paths, subset_ratio, max_sequence_length)")
        jobs = _plan_shards(datasets, int(cfg.data_process.shard_size))
        router_dir = run_dir / "router_data"
        dtype = next(model.parameters()).dtype
        fields = _fingerprint_fields(cfg, tokenizer, weights, dtype, datasets)
        if is_main_process():
            check_or_write_fingerprint(router_dir, fields)
        _barrier()
        # Every rank checks too: the stored file now exists, so this only verifies.
        fingerprint = check_or_write_fingerprint(router_dir, fields)
        mine = assign_shards(jobs, world_size())[rank()]
        counters = _score_assigned(
            model, mine, datasets, cfg, router_dir, fingerprint, int(tokenizer.pad_token_id), device
        )
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        per_rank = _gather(counters)
        _barrier()
        if is_main_process():
            metrics = _finalise(
                run_dir, router_dir, jobs, datasets, cfg, fingerprint, per_rank, time.perf_counter() - started
            )
            update_manifest(
                run_dir,
                stage1_weights=weights,
                router_fingerprint=fingerprint,
                stage2_samples=metrics["samples"],
            )
            log.info(
                "stage 2 done: %d samples, %.0f tokens/s, router data in %s",
                metrics["samples"],
                metrics["tokens_per_s"] or 0.0,
                router_dir,
            )
        _barrier()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
