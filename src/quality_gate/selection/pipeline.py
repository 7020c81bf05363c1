"""Selection end to end: router data -> scores -> kept records, scores table, summary, report, exports.

``run_selection(cfg)`` is the body of the ``select`` stage (``quality-gate select``, the seed's
``scripts/batch_selection.py`` and ``scripts/continue_selection.py``, the experiment runner). Every
check that can fail runs before anything is written; all outputs are first written into a staging
folder inside the output dir and then renamed into place, so a failed run leaves the output dir as
it was.

Output dir: ``output_dir`` when set; else the input dir for ``selector=quality_gate`` (the seed's
``<root_dir>/selected_data.jsonl``) and ``<input dir>/selection_<selector>/`` for the other
selectors, so that several selectors can be run on one Stage 2 run without overwriting each other;
with a diversity rule (``diversity=threshold|cluster``) ``<input dir>/selection_<selector>_<diversity>/``.
Stage 2's own ``config.yaml`` in the input dir is never touched (the report reads it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from quality_gate.data.records import corruption_of
from quality_gate.errors import SelectionError
from quality_gate.io import atomic_write_json, atomic_write_jsonl, install_entries, sha256_file
from quality_gate.runs import check_dir_target
from quality_gate.selection.audit import corruption_audit
from quality_gate.selection.diversity import Diversity, cluster_diversity
from quality_gate.selection.export import export_hf_dataset, export_llamafactory
from quality_gate.selection.result import SelectionResult
from quality_gate.selection.scoring import (
    SampleStats,
    ScoreParams,
    collect_sample_stats,
    quality_scores,
)
from quality_gate.selection.selectors import (
    SelectorScores,
    available_selectors,
    combined_scores,
    groups_of,
    rank_order,
    select_detailed,
    selector_scores,
)
from quality_gate.stats.store import (
    FINGERPRINT_FILE,
    INDEX_SUFFIX,
    PLAN_FILE,
    RECORDS_SUFFIX,
    find_router_data,
    load_index,
    read_fingerprint,
    unfinished_run,
)

log = logging.getLogger(__name__)

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
# The summary lists at most this many invalid samples one by one (all are counted).
MAX_LISTED_INVALID = 1000


# --------------------------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------------------------- #
def _input_dir(cfg: DictConfig) -> tuple[Path, list[Path]]:
    """The input dir and its router data indexes (``root_dir`` recursive, ``router_data_dir`` flat)."""
    root, flat = cfg.root_dir, cfg.router_data_dir
    if root:
        path = Path(root)
        if not path.is_dir():
            raise SelectionError(
                f"root_dir={root} is not a directory; pass the run dir of a finished Stage 2 run"
            )
        found = find_router_data(path)
        key = "root_dir"
        plans = sorted(path.rglob(PLAN_FILE))
    else:
        path = Path(flat)
        if not path.is_dir():
            raise SelectionError(f"router_data_dir={flat} is not a directory")
        found = sorted(p for p in path.glob(f"*{INDEX_SUFFIX}") if p.is_file())
        key = "router_data_dir"
        plans = [path / PLAN_FILE] if (path / PLAN_FILE).is_file() else []
    # A Stage 2 run split into parts (job array) has no index until its last part finished: say which
    # parts and shards are missing instead of "no router data".
    for plan in plans:
        problem = unfinished_run(plan.parent)
        if problem:
            raise SelectionError(f"{key}={path}: {problem}")
    if not found:
        raise SelectionError(
            f"{key}={path} holds no router data (*{INDEX_SUFFIX}); "
            f"run Stage 2 first or point {key} at its run dir"
        )
    return path, found


def _check_fingerprints(index_paths: list[Path]) -> str:
    """All indexes (and the ``fingerprint.json`` beside them) must come from one Stage 2 setup."""
    seen: dict[str, list[str]] = {}
    for p in index_paths:
        fp = str(load_index(p).get("fingerprint"))
        seen.setdefault(fp, []).append(str(p))
        fp_file = p.parent / FINGERPRINT_FILE
        if fp_file.exists():
            stored = read_fingerprint(p.parent).get("fingerprint")
            if stored != fp:
                raise SelectionError(
                    f"{p} has fingerprint {fp} but {fp_file} says {stored}; rerun Stage 2 there"
                )
    if len(seen) > 1:
        lines = "\n".join(f"  {fp}: {paths}" for fp, paths in seen.items())
        raise SelectionError(
            "the router data under the input dir comes from different Stage 2 setups (fingerprints); "
            f"select them separately or rerun Stage 2 with one setup:\n{lines}"
        )
    return next(iter(seen))


def records_path(index_path: Path, dataset: str) -> Path:
    return index_path.parent / f"{dataset}{RECORDS_SUFFIX}"


def _check_records_file(index_path: Path) -> None:
    """The dataset's ``*_records.jsonl`` exists and is the file Stage 2 wrote: its sha256 is the one the
    index recorded (indexes written before it was recorded are not checked). An edited reply would be
    exported although the sample was scored on the original text."""
    index = load_index(index_path)
    path = records_path(index_path, index["dataset_name"])
    if not path.exists():
        raise SelectionError(
            f"records file {path} is missing; Stage 2 writes it beside the router data: rerun it"
        )
    recorded = index.get("records_sha256")
    if recorded is not None and sha256_file(path) != recorded:
        raise SelectionError(
            f"records file {path} was changed after Stage 2 wrote it (sha256 {sha256_file(path)[:16]}..., "
            f"{index_path.name} recorded {str(recorded)[:16]}...): its samples were scored on the original "
            "text. Restore the file, or rerun Stage 2 on the edited data in a new run dir"
        )


def _iter_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SelectionError(f"{path}:{line_no} is not valid JSON ({e}); rerun Stage 2") from e


def _read_records(stats: SampleStats, wanted: set[int]) -> tuple[dict[int, dict[str, Any]], list[str | None]]:
    """Records of the sample indices in ``wanted``, and every sample's corruption label (N,)
    (:func:`~quality_gate.data.records.corruption_of`; None where the record has none)."""
    row_of = {(d, i): k for k, (d, i) in enumerate(zip(stats.datasets, stats.ids))}
    records: dict[int, dict[str, Any]] = {}
    kinds: list[str | None] = [None] * len(stats)
    for dataset, index_path in stats.index_paths.items():
        for record in _iter_records(records_path(index_path, dataset)):
            k = row_of.get((dataset, str(record.get("id"))))
            if k is None:
                continue
            kinds[k] = corruption_of(record)
            if k in wanted:
                records[k] = record
    missing = [stats.ids[k] for k in wanted if k not in records]
    if missing:
        raise SelectionError(
            f"{len(missing)} scored samples have no record in the *{RECORDS_SUFFIX} files "
            f"(e.g. {missing[:3]}); "
            "the records and the router data disagree: rerun Stage 2 in a fresh run dir"
        )
    return records, kinds


def _params(cfg: DictConfig) -> ScoreParams:
    return ScoreParams(
        alpha=float(cfg.alpha),
        eps=float(cfg.eps),
        tau=float(cfg.tau),
        token_scope=str(cfg.token_scope),
        pairing=str(cfg.pairing),
    )


# --------------------------------------------------------------------------------------------- #
# Selection
# --------------------------------------------------------------------------------------------- #
def compute_selection(cfg: DictConfig) -> SelectionResult:
    """Every computation of the selection, nothing written. Raises :class:`SelectionError`."""
    params, k, selector = _params(cfg), float(cfg.selection_percentage), str(cfg.selector)
    per_dataset, mode = bool(cfg.per_dataset), str(cfg.diversity)
    input_dir, index_paths = _input_dir(cfg)
    stats = _load_stats(index_paths, params, mode)
    q, columns = quality_scores(stats, params, per_dataset)
    scores = _selector_scores(cfg, stats, q)
    note = baseline_model_note(cfg, index_paths)
    if note:
        log.warning("%s", note)
    diversity = _diversity(cfg, stats)
    chosen = select_detailed(scores[selector], stats, k, per_dataset, diversity)
    order = rank_order(scores[selector].score, np.asarray(stats.ids), chosen.selected)
    output_dir = _output_dir(cfg, input_dir)
    check_dir_target(output_dir, "output_dir")
    return SelectionResult(
        stats,
        q,
        columns,
        scores,
        selector,
        params,
        k,
        chosen.rank,
        chosen.selected,
        order,
        output_dir,
        diversity=diversity,
        skipped=chosen.skipped if mode == "threshold" else None,
        diversity_report=chosen.diversity,
        per_dataset=per_dataset,
    )


def _load_stats(index_paths: list[Path], params: ScoreParams, mode: str) -> SampleStats:
    """The per-sample statistics of every index, after the checks that make a selection from them safe:
    one fingerprint, intact records files, embeddings where diversity needs them, and at least one
    valid sample in each dataset."""
    _check_fingerprints(index_paths)
    for p in index_paths:
        _check_records_file(p)
    stats = collect_sample_stats(index_paths, params, with_embeddings=mode != "none")
    if mode != "none" and stats.embeddings is None:
        raise SelectionError(
            f"diversity={mode} needs one embedding per sample, but the router data of "
            f"{stats.embeddings_missing or list(stats.index_paths)} has none: rerun Stage 2 with "
            "data_process.embedding_dim > 0 (e.g. 256), or select with diversity=none"
        )
    names = np.asarray(stats.datasets)
    failed = [d for d in stats.index_paths if not stats.valid[names == d].any()]
    if failed:
        reasons = sorted({r for r, d in zip(stats.invalid_reason, stats.datasets) if d in failed})
        raise SelectionError(
            f"every sample of dataset(s) {failed} is invalid (reasons: {reasons[:5]}); fix Stage 2 for them "
            "(e.g. token_scope=assistant needs assistant turns) or remove their router data"
        )
    return stats


def _selector_scores(cfg: DictConfig, stats: SampleStats, q: np.ndarray) -> dict[str, SelectorScores]:
    """The scores of every selector the statistics allow, plus the configured one (``combined``: the
    weighted mean of its parts' ranks); an unavailable configured selector raises why."""
    seed, selector, per_dataset = int(cfg.seed), str(cfg.selector), bool(cfg.per_dataset)
    scores = {name: selector_scores(name, stats, q, seed) for name in available_selectors(stats)}
    if selector == "combined":
        weights = {name: float(w) for name, w in cfg.combined_weights.items() if float(w) > 0}
        for name in weights:
            if name not in scores:
                scores[name] = selector_scores(name, stats, q, seed)  # raises why it is not available
        scores["combined"] = combined_scores(scores, weights, groups_of(stats, per_dataset))
    elif selector not in scores:
        scores[selector] = selector_scores(selector, stats, q, seed)  # raises the reason it is not available
    return scores


def _output_dir(cfg: DictConfig, input_dir: Path) -> Path:
    """``output_dir``, or the seed's default: the input dir for quality_gate, else a folder named
    after the selector (and the diversity rule) inside it."""
    selector, mode = str(cfg.selector), str(cfg.diversity)
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if mode != "none":
        return input_dir / f"selection_{selector}_{mode}"
    return input_dir if selector == "quality_gate" else input_dir / f"selection_{selector}"


def _diversity(cfg: DictConfig, stats: SampleStats) -> Diversity:
    """The diversity rule of ``cfg`` (k-means fitted here for ``cluster``; seeded by ``seed``)."""
    mode = str(cfg.diversity)
    if mode == "threshold":
        return Diversity(mode, float(cfg.diversity_threshold), embeddings=stats.embeddings)
    if mode == "cluster":
        assert stats.embeddings is not None
        div = cluster_diversity(stats.embeddings, stats.valid, int(cfg.diversity_clusters), int(cfg.seed))
        div.pool = float(cfg.diversity_pool)
        return div
    return Diversity()


def _quantiles(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return {}
    return {f"p{round(p * 100)}": float(v) for p, v in zip(QUANTILES, np.quantile(x, QUANTILES))}


BASELINES_FROM_THE_MODEL = ("perplexity", "ifd")


def baseline_model_note(cfg: DictConfig, index_paths: list[Path]) -> str | None:
    """A warning when a perplexity or IFD selection reads a model that its gates changed.

    Stage 2 scores perplexity with the gated selector. Only gates that are exactly the identity (no
    Stage 1 weights, ``quality_gate.scale=2``, weights 0) leave the model as released, which is what the
    baselines of the literature score with.
    """
    selector = str(cfg.selector)
    used = (
        {n for n, w in cfg.combined_weights.items() if float(w) > 0} if selector == "combined" else {selector}
    )
    if not used & set(BASELINES_FROM_THE_MODEL):
        return None
    manifest_path = index_paths[0].parent.parent / "manifest.json"
    weights = json.loads(manifest_path.read_text()).get("stage1_weights") if manifest_path.is_file() else None
    if not weights:
        return None
    init = weights.get("gate_init") or {}
    if weights.get("kind") == "none" and init.get("scale") == 2.0 and init.get("std") == 0.0:
        return None
    return (
        f"selector={selector} reads perplexities of the selector with its gates ({weights.get('kind')} "
        "weights), not of the model as released: for the baseline itself, score the pool with Stage 2 "
        "without model_checkpoint_path (quality_gate.scale=2, init_std=0: the gates are then the identity)"
    )


def stage1_of(index_paths: list[Path]) -> dict[str, Any]:
    """What Stage 1 did to the gates the router data was scored with (carried into the summary).

    Read from the Stage 2 run's manifest (``stage1_weights``) and that Stage 1 run's
    ``warmup_metrics.json``; ``warning`` says when the score came from gates that were never warmed up,
    barely moved or had not converged.
    """
    manifest_path = index_paths[0].parent.parent / "manifest.json"
    weights = json.loads(manifest_path.read_text()).get("stage1_weights") if manifest_path.is_file() else None
    if not weights:
        return {"kind": "unknown", "warning": None}
    if weights.get("kind") == "none":
        return {
            "kind": "none",
            "warning": "the router data was scored with gates that were never warmed up (Stage 2 without "
            "model_checkpoint_path): the quality-gate score reflects their random init",
        }
    metrics_path = Path(str(weights["path"])).parent / "warmup_metrics.json"
    if not metrics_path.is_file():
        return {"kind": weights.get("kind"), "warning": None}
    movement = json.loads(metrics_path.read_text()).get("gate_movement") or {}
    return {"kind": weights.get("kind"), "gate_movement": movement, "warning": movement.get("warning")}


def summary_of(res: SelectionResult, params: dict[str, Any]) -> dict[str, Any]:
    """The content of ``selection_summary.json``."""
    stats = res.stats
    names = np.asarray(stats.datasets)
    per_dataset = {}
    for d in stats.index_paths:
        m = names == d
        valid = int(stats.valid[m].sum())
        kept = int(res.selected[m].sum())
        per_dataset[d] = {
            "num_samples": int(m.sum()),
            "valid": valid,
            "invalid": int(m.sum()) - valid,
            "selected": kept,
            "kept_fraction": kept / valid if valid else 0.0,
        }
    invalid = [
        {"id": i, "dataset": d, "reason": r}
        for i, d, r, ok in zip(stats.ids, stats.datasets, stats.invalid_reason, stats.valid)
        if not ok
    ]
    return {
        "parameters": params,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "num_samples": len(stats),
        "num_valid": int(stats.valid.sum()),
        "num_selected": int(res.selected.sum()),
        "budget_rule": "ceil(selection_percentage * valid samples)"
        + (" per dataset" if params["per_dataset"] else ""),
        "num_layers": int(stats.S.shape[1]),
        "datasets": per_dataset,
        "selectors_computed": sorted(res.scores),
        "score_quantiles": {name: _quantiles(s.score) for name, s in res.scores.items()},
        "column_statistics": {
            g: {"a": c.a.tolist(), "b": c.b.tolist(), "mu": c.mu.tolist()} for g, c in res.columns.items()
        },
        "invalid_samples": {"count": len(invalid), "listed": invalid[:MAX_LISTED_INVALID]},
        "inputs": {d: str(p) for d, p in stats.index_paths.items()},
        "diversity": diversity_summary(res),
    }


def diversity_summary(res: SelectionResult) -> dict[str, Any]:
    """``selection_summary.json``'s ``diversity``: the rule, and per group what it did.

    ``threshold``: ``examined`` candidates walked, ``skipped_near_duplicates`` of them, whether the
    ``pool_exhausted`` before the budget was full. ``cluster``: per cluster the candidates
    (``cluster_sizes``), ``cluster_quotas`` and ``cluster_kept``, and how k-means was fitted."""
    div = res.diversity
    out: dict[str, Any] = {"mode": div.mode}
    if div.mode == "none":
        return out
    groups = res.diversity_report or {}
    if div.mode == "threshold":
        out["threshold"] = div.threshold
        out["rule"] = "walk by score; keep a sample iff max cosine to the kept ones <= threshold (Deita)"
        out["skipped_near_duplicates"] = sum(g["skipped_near_duplicates"] for g in groups.values())
        out["pool_exhausted"] = any(g["pool_exhausted"] for g in groups.values())
    else:
        out["kmeans"] = div.kmeans
        out["pool"] = div.pool
        out["rule"] = (
            "budget split over clusters by candidates (largest remainder), best score within each; "
            "candidates: " + (f"the top {div.pool:g} x budget by score" if div.pool else "every valid sample")
        )
    out["groups"] = groups
    return out


def scores_table(res: SelectionResult) -> pa.Table:
    """One row per sample: id, dataset, q, S_0..S_{L-1}, length, rank, selected, valid, baselines."""
    stats = res.stats
    cols: dict[str, Any] = {
        "id": pa.array(stats.ids, pa.string()),
        "dataset": pa.array(stats.datasets, pa.string()),
        "q": pa.array(res.q),
    }
    for layer in range(stats.S.shape[1]):
        cols[f"S_{layer}"] = pa.array(stats.S[:, layer])
    cols.update(
        length=pa.array(stats.length),
        scope_positions=pa.array(stats.scope_positions),
        rank=pa.array(res.rank),
        selected=pa.array(res.selected),
        valid=pa.array(stats.valid),
        invalid_reason=pa.array(stats.invalid_reason, pa.string()),
        ppl_score=pa.array(stats.mean_nll),
    )
    if "ifd" in res.scores:
        cols["ifd"] = pa.array(stats.ifd)
    cols["random"] = pa.array(res.scores["random"].score)
    if "combined" in res.scores:
        cols["combined"] = pa.array(res.scores["combined"].score)
    if res.diversity.labels is not None:
        cols["cluster"] = pa.array(res.diversity.labels)
    if res.skipped is not None:
        cols["near_duplicate_skipped"] = pa.array(res.skipped)
    return pa.table(cols, metadata={"selector": res.selector})


def run_selection(cfg: DictConfig) -> SelectionResult:
    """Select and write ``selected_data.jsonl``, ``scores.parquet``, ``selection_summary.json``,
    ``selection_report.html``, ``llamafactory/`` and ``hf_dataset/`` into the output dir."""
    from quality_gate.selection.explorer import explorer_rows

    res = compute_selection(cfg)
    top_k = int(cfg.report_top_k)
    ranked_q = rank_order(
        res.scores["quality_gate"].score, np.asarray(res.stats.ids), res.scores["quality_gate"].eligible
    )
    showcase = [int(i) for i in ranked_q[:top_k]] + [int(i) for i in ranked_q[::-1][:top_k]]
    explore = explorer_rows(res) if cfg.report else np.zeros(0, dtype=np.int64)
    records, kinds = _read_records(res.stats, set(res.order.tolist()) | set(showcase) | set(explore.tolist()))
    kept = [records[int(i)] for i in res.order]
    summary = summary_of(res, _parameters(cfg, res))
    summary["stage1"] = stage1_of(list(res.stats.index_paths.values()))
    if summary["stage1"]["warning"] and res.selector == "quality_gate":
        log.warning("quality-gate score: %s", summary["stage1"]["warning"])
    summary["corruption_audit"] = corruption_audit(
        res.stats,
        res.scores,
        kinds,
        res.percentage,
        bool(cfg.per_dataset),
        res.diversity,
        known={res.selector: res.selected},
    )
    report = (records, showcase, kinds, explore) if cfg.report else None
    _install_outputs(res, summary, kept, report)
    log.info(
        "kept %d of %d valid samples (%s, k=%s) -> %s",
        len(kept),
        summary["num_valid"],
        res.selector,
        res.percentage,
        res.output_dir / "selected_data.jsonl",
    )
    return res


def _parameters(cfg: DictConfig, res: SelectionResult) -> dict[str, Any]:
    """The settings a selection was made with, as ``selection_summary.json`` records them."""
    div = res.diversity
    return {
        **dataclasses.asdict(res.params),
        "selection_percentage": res.percentage,
        "selector": res.selector,
        "per_dataset": bool(cfg.per_dataset),
        "seed": int(cfg.seed),
        "input": str(cfg.root_dir or cfg.router_data_dir),
        "diversity": div.mode,
        **({"diversity_threshold": div.threshold} if div.mode == "threshold" else {}),
        **(
            {"diversity_clusters": int(cfg.diversity_clusters), "diversity_pool": float(cfg.diversity_pool)}
            if div.mode == "cluster"
            else {}
        ),
        **({"combined_weights": dict(cfg.combined_weights)} if res.selector == "combined" else {}),
        "tau_rule": "denominator factor max(mu_l, eps) if tau == 0 else mu_l + tau",
    }


def _install_outputs(
    res: SelectionResult, summary: dict[str, Any], kept: list[dict[str, Any]], report: tuple[Any, ...] | None
) -> None:
    """Write every output into a staging dir inside the output dir, then install them all or nothing
    (what they replace, a symbolic link included, is never written through; a failure puts the previous
    selection back). ``report``: ``(records, showcase, kinds, explore)`` for the HTML report, or None."""
    from quality_gate.selection.report import write_report

    res.output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".selection-staging-", dir=res.output_dir))
    try:
        pq.write_table(scores_table(res), staging / "scores.parquet")
        atomic_write_jsonl(staging / "selected_data.jsonl", kept)
        export_llamafactory(kept, staging / "llamafactory")
        export_hf_dataset(kept, res.q[res.order], staging / "hf_dataset")
        if report is not None:
            records, showcase, kinds, explore = report
            write_report(staging / "selection_report.html", res, summary, records, showcase, kinds, explore)
        atomic_write_json(staging / "selection_summary.json", summary)
        install_entries(staging, res.output_dir)
        res.summary = summary
    finally:
        shutil.rmtree(staging, ignore_errors=True)
