"""Stage 2 (collect): every sample's gate values and per-token perplexities, one forward pass.

``quality-gate collect model_checkpoint_path=<warmup run dir>`` (seed: ``python src/main.py
--config-name stage_2_selection ...``; several GPUs: ``torchrun --nproc_per_node=N src/main.py
--config-name collect ...`` or ``accelerate launch src/main.py --config-name collect ...``; a job
array: ``data_process.num_parts=N data_process.part_index=i output_dir=<shared dir>``).

Recipe: load the gated selector and its Stage 1 weights -> read every dataset's records -> cut each
dataset into shards of ``data_process.shard_size`` records -> fingerprint the setup (a rerun with
other settings refuses to mix, before anything is written) and write the shard plan
(``router_data/plan.json``: every shard and its part, so that selection can name what an unfinished
run still lacks) -> for the shards of this job (part) and rank that are not finished and intact:
encode the shard's records (the next shard is encoded in a background thread while this one is
scored), score them in token-budget batches (one backbone forward each), write the shard atomically
with a marker holding its size and sha256 -> once every
shard is finished (here, or by the other parts), rank 0 writes each dataset's index
(``router_data/<dataset>_router_data.pt``), the scored records (``router_data/<dataset>_records.jsonl``),
``dropped_samples.jsonl`` and ``stage2_metrics.json``. The library under the recipe: the shard plan and
the fingerprint fields in :mod:`quality_gate.stats.shards`, the scoring of a shard in
:class:`quality_gate.stats.collect.ShardScorer`, every file under ``router_data/`` (its one format, written
and read) in :mod:`quality_gate.stats.store`.

Resume: rerun with the same ``output_dir``; finished shards are skipped, damaged ones (size or checksum
differ from their marker) are named and rescored; a rerun whose setup differs (the selector's weight
files included) is refused. One launch at a time writes a run dir: rank 0 holds ``collect.lock``
(``collect.part-<i>.lock`` per part), which says who holds it. A shard's content depends only on its
records and the config, so the result equals an uninterrupted run. Work is split by shards: between
parts (independent jobs, no rendezvous) and then between the ranks of one launch, each by a
deterministic greedy balance of the shards' estimated tokens; every record belongs to exactly one shard,
no rank or part ever writes another's shard, and only rank 0 of a launch writes the indexes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import resource
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from quality_gate.data import encode_records, ensure_chat_template
from quality_gate.data.sources import SKIPPED_ROWS_FILE, read_records, report_skipped
from quality_gate.errors import RouterDataError
from quality_gate.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from quality_gate.model_sources import check_model_source, resolve_stage1_checkpoint
from quality_gate.models import (
    apply_stage1_weights,
    default_device,
    is_converted_dir,
    load_options,
    load_selector,
)
from quality_gate.runs import (
    PhaseTimer,
    RunLock,
    init_run,
    is_main_process,
    rank,
    run_dir_of,
    update_manifest,
    world_size,
)
from quality_gate.stats.collect import ShardScorer
from quality_gate.stats.shards import (
    ShardJob,
    assign_shards,
    fingerprint_fields,
    pending_shards,
    plan_entries,
    plan_shards,
    shards_of_rank,
    unfinished_shards,
)
from quality_gate.stats.store import (
    check_or_write_fingerprint,
    shard_path,
    shards_summary,
    write_index,
    write_plan,
    write_shard,
)

log = logging.getLogger(__name__)

# Ranks finish their shards at different times; the slowest may trail by far more than the
# default 10-minute collective timeout on a large dataset.
_BARRIER_TIMEOUT = dt.timedelta(hours=12)
# Records the encoder dropped (too long under truncation=drop, or no assistant token left).
DROPPED_SAMPLES_FILE = "dropped_samples.jsonl"
METRICS_FILE = "stage2_metrics.json"


# --------------------------------------------------------------------------------------------- #
# Setup
# --------------------------------------------------------------------------------------------- #
def _load_model(cfg: DictConfig, device: str) -> tuple[Any, Any, dict[str, Any]]:
    sel = cfg.selector_model
    # A plain (unconverted) selector gets freshly initialised gates: seed them, so that every rank,
    # every part and every resumed run scores with the same gates.
    torch.manual_seed(int(cfg.seed))
    model, tokenizer = load_selector(
        str(sel.path),
        device=device,
        **load_options(sel),
        gate_init_mean=float(cfg.quality_gate.init_mean),
        gate_init_std=float(cfg.quality_gate.init_std),
        gate_scale=float(cfg.quality_gate.scale),
        key="selector_model.path",
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
            "scale": float(cfg.quality_gate.scale),
        }
    model.eval().requires_grad_(False)
    return model, tokenizer, weights


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


def _by_dataset(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by dataset, in first-seen order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        out.setdefault(record["dataset"], []).append(record)
    return out


# --------------------------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------------------------- #
@dataclasses.dataclass
class EncodedShard:
    job: ShardJob
    samples: list[Any]
    encode_stats: dict[str, int]
    dropped: list[dict[str, Any]]


def _encode_shard(
    job: ShardJob, records: list[dict[str, Any]], tokenizer: Any, cfg: DictConfig
) -> EncodedShard:
    rows = [records[r] for r in job.rows]
    samples, stats, skipped = encode_records(
        rows,
        tokenizer,
        int(cfg.dataset.max_sequence_length),
        str(cfg.dataset.truncation),
        desc=f"encode {job.dataset}/{job.index}",
    )
    dropped = [
        {"dataset": job.dataset, "id": s.file.removeprefix("id="), "reason": s.reason} for s in skipped
    ]
    return EncodedShard(job, samples, stats.as_dict(), dropped)


def _peak_memory(device: str) -> dict[str, float | None]:
    # ru_maxrss is in KiB on Linux.
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return {
        "peak_rss_gb": round(rss_gb, 3),
        "peak_cuda_allocated_gb": None if cuda_gb is None else round(cuda_gb, 3),
    }


def _score_assigned(
    scorer: ShardScorer,
    jobs: list[ShardJob],
    datasets: dict[str, list[dict[str, Any]]],
    tokenizer: Any,
    cfg: DictConfig,
    router_dir: Path,
    fingerprint: str,
) -> dict[str, Any]:
    """Encode and score this rank's unfinished shards; returns this rank's counters."""
    pending = pending_shards(jobs, router_dir, fingerprint)
    log.info(
        "rank %d: %d shards assigned, %d already finished, %d to score",
        rank(),
        len(jobs),
        len(jobs) - len(pending),
        len(pending),
    )
    totals = {"tokens": 0.0, "padded_slots": 0.0, "samples": 0.0}
    start = time.perf_counter()
    bar = tqdm(
        total=sum(len(j.rows) for j in pending),
        unit="sample",
        desc=f"stage 2 rank {rank()}",
        disable=not is_main_process(),
        dynamic_ncols=True,
    )

    def encode(job: ShardJob) -> EncodedShard:
        return _encode_shard(job, datasets[job.dataset], tokenizer, cfg)

    prefetch = bool(cfg.data_process.prefetch)
    # One worker thread encodes the next shard while this one is scored (the forward releases the GIL).
    with bar, ThreadPoolExecutor(max_workers=1) as pool:
        ahead: Future[EncodedShard] | None = None
        for k, job in enumerate(pending):
            encoded = ahead.result() if ahead is not None else encode(job)
            ahead = pool.submit(encode, pending[k + 1]) if prefetch and k + 1 < len(pending) else None
            shard, counters = scorer.score(encoded.samples, bar)
            shard.update(encode_stats=encoded.encode_stats, dropped=encoded.dropped)
            write_shard(shard_path(router_dir, job.dataset, job.index), shard, fingerprint)
            for key, value in counters.items():
                totals[key] += value
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(
                tokens_per_s=f"{totals['tokens'] / elapsed:.0f}", shard=f"{job.dataset}/{job.index}"
            )
    return {
        **totals,
        "seconds": time.perf_counter() - start,
        "shards_scored": len(pending),
        "shards_skipped": len(jobs) - len(pending),
        **_peak_memory(scorer.device),
    }


def _gather(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------- #
# Finishing: indexes, records, metrics
# --------------------------------------------------------------------------------------------- #
def _finalise(
    run_dir: Path,
    router_dir: Path,
    jobs: list[ShardJob],
    datasets: dict[str, list[dict[str, Any]]],
    cfg: DictConfig,
    fingerprint: str,
    per_rank: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """Rank 0: check every shard, write the indexes, the scored records, the dropped ones and the metrics."""
    invalid: list[dict[str, str]] = []
    dropped: list[dict[str, Any]] = []
    per_dataset: dict[str, dict[str, Any]] = {}
    for name, records in datasets.items():
        paths = [shard_path(router_dir, j.dataset, j.index) for j in jobs if j.dataset == name]
        max_len, extra = int(cfg.dataset.max_sequence_length), {"collect_ifd": bool(cfg.collect_ifd)}
        write_index(router_dir, name, paths, fingerprint, max_len, extra=extra, records=records)
        summary = shards_summary(paths)
        dropped.extend(summary["dropped"])
        invalid += [{"dataset": name, "id": sid, "reason": why} for sid, why in summary["invalid"]]
        per_dataset[name] = {
            "records": len(records),
            "samples": summary["samples"],
            "encode": dict(summary["encode"]),
            "dropped_by_encoder": len(records) - summary["samples"],
            "truncated": int(summary["encode"].get("truncated", 0)),
        }
    atomic_write_jsonl(run_dir / DROPPED_SAMPLES_FILE, dropped)
    skipped_file = run_dir / SKIPPED_ROWS_FILE
    skipped_rows = read_jsonl(skipped_file) if skipped_file.exists() else []
    tokens = sum(r["tokens"] for r in per_rank)
    slots = sum(r["padded_slots"] for r in per_rank)
    scored_samples = sum(r["samples"] for r in per_rank)
    busy = max((r["seconds"] for r in per_rank), default=0.0)
    metrics = {
        "samples": sum(d["samples"] for d in per_dataset.values()),
        "samples_scored_this_run": int(scored_samples),
        "tokens_scored_this_run": int(tokens),
        "padding_fraction": round(1 - tokens / slots, 4) if slots else 0.0,
        "tokens_per_s": round(tokens / busy, 1) if busy else None,
        "samples_per_s": round(scored_samples / busy, 2) if busy else None,
        "wall_time_s": round(wall_s, 2),
        "world_size": world_size(),
        "num_parts": int(cfg.data_process.num_parts),
        "shards_total": len(jobs),
        "shards_scored_this_run": sum(r["shards_scored"] for r in per_rank),
        "shards_resumed": sum(r["shards_skipped"] for r in per_rank),
        "peak_rss_gb_per_rank": [r["peak_rss_gb"] for r in per_rank],
        "peak_cuda_allocated_gb_per_rank": [r["peak_cuda_allocated_gb"] for r in per_rank],
        "datasets": per_dataset,
        "skipped_rows": len(skipped_rows),
        "skipped_rows_by_dataset": dict(Counter(r.get("dataset") for r in skipped_rows)),
        "invalid_samples": len(invalid),
        "invalid": invalid,
    }
    if invalid:
        log.warning("%d samples have no usable statistics (valid=False); see %s", len(invalid), METRICS_FILE)
    return metrics


# --------------------------------------------------------------------------------------------- #
# The stage
# --------------------------------------------------------------------------------------------- #
def run(cfg: DictConfig) -> None:
    """Stage 2: score every sample of the configured datasets; see the module docstring."""
    timer = PhaseTimer()
    with timer("init"):
        # Paths first: a typo must not cost a model load, nor leave a run dir behind.
        check_model_source(str(cfg.selector_model.path), "selector_model.path")
        if cfg.model_checkpoint_path:
            resolve_stage1_checkpoint(str(cfg.model_checkpoint_path))
        # One launch at a time writes these parts of the run dir (rank 0 holds the locks for the launch),
        # taken before anything is written there.
        locks = _run_locks(cfg) if is_main_process() else []
    try:
        _score(cfg, timer)
    finally:
        _release(locks)


def _score(cfg: DictConfig, timer: PhaseTimer) -> None:
    dp = cfg.data_process
    with timer("init"):
        run_dir = init_run(cfg, "collect")
    router_dir = run_dir / "router_data"
    started = time.perf_counter()
    device, own_group = _init_distributed()
    try:
        with timer("load_model"):
            model, tokenizer, weights = _load_model(cfg, device)
        with timer("read"):
            records, skipped = read_records(cfg.dataset, seed=int(cfg.seed))
            datasets = _by_dataset(records)
        jobs = plan_shards(datasets, int(dp.shard_size))
        fields = fingerprint_fields(cfg, tokenizer, weights, next(model.parameters()).dtype, datasets)
        parts = assign_shards(jobs, int(dp.num_parts))
        if is_main_process():
            # Refuse a run dir of another setup before writing anything into it.
            fp = check_or_write_fingerprint(router_dir, fields)
            report_skipped(skipped, run_dir)
            # Every part writes the same plan: selection reads it to name what is still missing.
            write_plan(router_dir, fp, int(dp.num_parts), plan_entries(parts))
        _barrier()
        fingerprint = check_or_write_fingerprint(router_dir, fields)  # every rank verifies
        part = None if dp.part_index is None else int(dp.part_index)
        mine = [] if dp.finalize_only else shards_of_rank(parts, part, world_size(), rank())
        with timer("encode_and_score"):
            scorer = ShardScorer(model, cfg, int(tokenizer.pad_token_id), device)
            counters = _score_assigned(scorer, mine, datasets, tokenizer, cfg, router_dir, fingerprint)
        del model, scorer
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        per_rank = _gather(counters)
        _barrier()
        if is_main_process() and _all_finished(jobs, router_dir, fingerprint, dp):
            with timer("finalise"):
                wall_s = time.perf_counter() - started
                metrics = _finalise(run_dir, router_dir, jobs, datasets, cfg, fingerprint, per_rank, wall_s)
            _write_metrics(run_dir, metrics, timer, weights, fingerprint)
        _barrier()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _all_finished(jobs: list[ShardJob], router_dir: Path, fingerprint: str, dp: DictConfig) -> bool:
    """True when every shard of the run is finished; else says which are not (an error for
    ``finalize_only``, which has nothing else to do)."""
    missing = unfinished_shards(jobs, router_dir, fingerprint, int(dp.num_parts))
    if not missing:
        return True
    what = "; ".join(missing[:5]) + (f"; ... ({len(missing)} in all)" if len(missing) > 5 else "")
    if dp.finalize_only:
        raise RouterDataError(
            f"{len(missing)} of {len(jobs)} shards are not finished, so the indexes cannot be "
            f"written: {what}. Run (or rerun) those parts, then finalize again."
        )
    log.info(
        "part %s done; %d of %d shards still pending in other parts (%s). The last part to "
        "finish writes the indexes; or run data_process.finalize_only=true afterwards.",
        dp.part_index,
        len(missing),
        len(jobs),
        what,
    )
    return False


def _write_metrics(
    run_dir: Path, metrics: dict[str, Any], timer: PhaseTimer, weights: dict[str, Any], fingerprint: str
) -> None:
    """``stage2_metrics.json`` (with the time of each phase) and the run's manifest."""
    metrics["phases_s"] = timer.as_dict()
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    update_manifest(
        run_dir, stage1_weights=weights, router_fingerprint=fingerprint, stage2_samples=metrics["samples"]
    )
    log.info(
        "stage 2 done: %d samples, %.0f tokens/s, router data in %s",
        metrics["samples"],
        metrics["tokens_per_s"] or 0.0,
        run_dir / "router_data",
    )


def lock_names(num_parts: int, part_index: int | None) -> list[str]:
    """The lock files a Stage 2 job holds in its run dir: one per part it scores (``collect.lock`` for a
    run in one part), so that independent parts of a job array run side by side but no part twice."""
    if num_parts == 1:
        return ["collect.lock"]
    parts = range(num_parts) if part_index is None else [part_index]
    return [f"collect.part-{p}.lock" for p in parts]


def _run_locks(cfg: DictConfig) -> list[RunLock]:
    """Take the locks of :func:`lock_names` (none for ``finalize_only``, which scores nothing); a lock held
    by another live run is a :class:`~quality_gate.errors.RunLockedError` saying who holds it."""
    dp = cfg.data_process
    if dp.finalize_only:
        return []
    run_dir = run_dir_of(cfg)
    locks: list[RunLock] = []
    try:
        for name in lock_names(int(dp.num_parts), None if dp.part_index is None else int(dp.part_index)):
            locks.append(RunLock(run_dir / name, "Stage 2 (collect)").acquire())
    except BaseException:
        _release(locks)
        raise
    return locks


def _release(locks: list[RunLock]) -> None:
    for lock in reversed(locks):
        lock.release()
