"""Selection end to end: router data -> scores -> kept records, scores table, summary, report, exports.

``run_selection(cfg)`` is what ``scripts/batch_selection.py`` and ``scripts/continue_selection.py``
call (and the experiment runner, in-process). Every check that can fail runs before anything is
written; all outputs are first written into a staging folder inside the output dir and then renamed
into place, so a failed run leaves the output dir as it was.

Output dir: ``output_dir`` when set; else the input dir for ``selector=quality_gate`` (the seed's
``<root_dir>/selected_data.jsonl``) and ``<input dir>/selection_<selector>/`` for the other
selectors, so that several selectors can be run on one Stage 2 run without overwriting each other.
Stage 2's own ``config.yaml`` in the input dir is never touched (the report reads it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from quality_gate.io import atomic_write_json, atomic_write_jsonl
from quality_gate.selection.export import export_hf_dataset, export_llamafactory
from quality_gate.selection.scoring import (
    ColumnStats,
    SampleStats,
    ScoreParams,
    collect_sample_stats,
    quality_scores,
)
from quality_gate.selection.selectors import (
    SELECTORS,
    SelectionError,
    SelectorScores,
    available_selectors,
    rank_order,
    select,
    selector_scores,
)
from quality_gate.stats.store import INDEX_SUFFIX, RouterDataError, find_router_data, load_index

log = logging.getLogger(__name__)

RECORDS_SUFFIX = "_records.jsonl"
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
# The summary lists at most this many invalid samples one by one (all are counted).
MAX_LISTED_INVALID = 1000


@dataclasses.dataclass
class SelectionResult:
    """What a selection computed; ``order`` (n_kept,) are sample indices of the kept ones, best first."""

    stats: SampleStats
    q: np.ndarray
    columns: dict[str, ColumnStats]
    scores: dict[str, SelectorScores]
    selector: str
    params: ScoreParams
    percentage: float
    rank: np.ndarray
    selected: np.ndarray
    order: np.ndarray
    output_dir: Path


# --------------------------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------------------------- #
def _input_dir(cfg: DictConfig) -> tuple[Path, list[Path]]:
    """The input dir and its router data indexes (``root_dir`` recursive, ``router_data_dir`` flat)."""
    root, flat = cfg.get("root_dir"), cfg.get("router_data_dir")
    if bool(root) == bool(flat):
        raise SelectionError("set exactly one of root_dir=<Stage 2 run dir> or router_data_dir=<dir>")
    if root:
        path = Path(root)
        if not path.is_dir():
            raise SelectionError(
                f"root_dir={root} is not a directory; pass the run dir of a finished Stage 2 run"
            )
        found = find_router_data(path)
        key = "root_dir"
    else:
        path = Path(flat)
        if not path.is_dir():
            raise SelectionError(f"router_data_dir={flat} is not a directory")
        found = sorted(p for p in path.glob(f"*{INDEX_SUFFIX}") if p.is_file())
        key = "router_data_dir"
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
        fp_file = p.parent / "fingerprint.json"
        if fp_file.exists():
            stored = json.loads(fp_file.read_text()).get("fingerprint")
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


def _iter_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SelectionError(f"{path}:{line_no} is not valid JSON ({e}); rerun Stage 2") from e


def corruption_label(record: dict[str, Any]) -> int | None:
    """1: ``meta.corruption`` names a corruption; 0: clean; None: the record carries no label."""
    meta = record.get("meta") or {}
    if "corruption" not in meta:
        return None
    value = meta["corruption"]
    return 0 if value in (None, "", False, "none", "clean") else 1


def _read_records(
    stats: SampleStats, wanted: set[int]
) -> tuple[dict[int, dict[str, Any]], np.ndarray | None]:
    """Records of the sample indices in ``wanted``, and corruption labels (N,) (-1: none) if any."""
    row_of = {(d, i): k for k, (d, i) in enumerate(zip(stats.datasets, stats.ids))}
    records: dict[int, dict[str, Any]] = {}
    labels = np.full(len(stats), -1, dtype=np.int64)
    for dataset, index_path in stats.index_paths.items():
        for record in _iter_records(records_path(index_path, dataset)):
            k = row_of.get((dataset, str(record.get("id"))))
            if k is None:
                continue
            label = corruption_label(record)
            if label is not None:
                labels[k] = label
            if k in wanted:
                records[k] = record
    missing = [stats.ids[k] for k in wanted if k not in records]
    if missing:
        raise SelectionError(
            f"{len(missing)} scored samples have no record in the *{RECORDS_SUFFIX} files "
            f"(e.g. {missing[:3]}); "
            "the records and the router data disagree: rerun Stage 2 in a fresh run dir"
        )
    return records, (labels if (labels >= 0).any() else None)


def _validate(cfg: DictConfig) -> tuple[ScoreParams, float, str]:
    k = cfg.get("selection_percentage")
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 < float(k) <= 1:
        raise SelectionError(f"selection_percentage={k!r} must be a number in (0, 1], e.g. 0.05 for 5 %")
    selector = cfg.get("selector", "quality_gate")
    if selector not in SELECTORS:
        raise SelectionError(f"selector={selector!r}; expected one of {list(SELECTORS)}")
    try:
        params = ScoreParams(
            alpha=float(cfg.get("alpha", 1.0)),
            eps=float(cfg.get("eps", 1e-8)),
            tau=float(cfg.get("tau", 0.0)),
            token_scope=str(cfg.get("token_scope", "all")),
            pairing=str(cfg.get("pairing", "same_token")),
        )
    except ValueError as e:
        raise SelectionError(str(e)) from e
    return params, float(k), selector


# --------------------------------------------------------------------------------------------- #
# Selection
# --------------------------------------------------------------------------------------------- #
def compute_selection(cfg: DictConfig) -> SelectionResult:
    """Every computation of the selection, nothing written. Raises :class:`SelectionError`."""
    params, k, selector = _validate(cfg)
    input_dir, index_paths = _input_dir(cfg)
    _check_fingerprints(index_paths)
    for p in index_paths:
        name = load_index(p)["dataset_name"]
        if not records_path(p, name).exists():
            raise SelectionError(
                f"records file {records_path(p, name)} is missing; "
                "Stage 2 writes it beside the router data: rerun it"
            )
    per_dataset = bool(cfg.get("per_dataset", False))
    try:
        stats = collect_sample_stats(index_paths, params)
    except ValueError as e:  # inconsistent router data (duplicate dataset, layer counts, no samples)
        raise SelectionError(str(e)) from e
    names = np.asarray(stats.datasets)
    failed = [d for d in stats.index_paths if not stats.valid[names == d].any()]
    if failed:
        reasons = sorted({r for r, d in zip(stats.invalid_reason, stats.datasets) if d in failed})
        raise SelectionError(
            f"every sample of dataset(s) {failed} is invalid (reasons: {reasons[:5]}); fix Stage 2 for them "
            "(e.g. token_scope=assistant needs assistant turns) or remove their router data"
        )
    q, columns = quality_scores(stats, params, per_dataset)
    seed = int(cfg.get("seed", 42))
    scores = {name: selector_scores(name, stats, q, seed) for name in available_selectors(stats)}
    if selector not in scores:
        scores[selector] = selector_scores(selector, stats, q, seed)  # raises the reason it is not available
    rank, selected = select(scores[selector], stats, k, per_dataset)
    order = rank_order(scores[selector].score, np.asarray(stats.ids), selected)
    out = cfg.get("output_dir")
    if out:
        output_dir = Path(out)
    else:
        output_dir = input_dir if selector == "quality_gate" else input_dir / f"selection_{selector}"
    return SelectionResult(stats, q, columns, scores, selector, params, k, rank, selected, order, output_dir)


def _quantiles(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return {}
    return {f"p{round(p * 100)}": float(v) for p, v in zip(QUANTILES, np.quantile(x, QUANTILES))}


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
    }


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
    return pa.table(cols, metadata={"selector": res.selector})


def _install(staging: Path, output_dir: Path) -> None:
    """Move every staged entry into ``output_dir`` (each rename is atomic)."""
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if entry.is_dir() and target.exists():
            shutil.rmtree(target)
        os.replace(entry, target)


def run_selection(cfg: DictConfig) -> SelectionResult:
    """Select and write ``selected_data.jsonl``, ``scores.parquet``, ``selection_summary.json``,
    ``selection_report.html``, ``llamafactory/`` and ``hf_dataset/`` into the output dir."""
    from quality_gate.selection.report import write_report

    res = compute_selection(cfg)
    top_k = int(cfg.get("report_top_k", 10))
    ranked_q = rank_order(
        res.scores["quality_gate"].score, np.asarray(res.stats.ids), res.scores["quality_gate"].eligible
    )
    showcase = [int(i) for i in ranked_q[:top_k]] + [int(i) for i in ranked_q[::-1][:top_k]]
    records, labels = _read_records(res.stats, set(res.order.tolist()) | set(showcase))
    kept = [records[int(i)] for i in res.order]
    parameters = {
        **dataclasses.asdict(res.params),
        "selection_percentage": res.percentage,
        "selector": res.selector,
        "per_dataset": bool(cfg.get("per_dataset", False)),
        "seed": int(cfg.get("seed", 42)),
        "input": str(cfg.get("root_dir") or cfg.get("router_data_dir")),
        "tau_rule": "denominator factor max(mu_l, eps) if tau == 0 else mu_l + tau",
    }
    summary = summary_of(res, parameters)
    res.output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".selection-staging-", dir=res.output_dir))
    try:
        pq.write_table(scores_table(res), staging / "scores.parquet")
        atomic_write_jsonl(staging / "selected_data.jsonl", kept)
        export_llamafactory(kept, staging / "llamafactory")
        export_hf_dataset(kept, res.q[res.order], staging / "hf_dataset")
        if cfg.get("report", True):
            write_report(staging / "selection_report.html", res, summary, records, showcase, labels)
        atomic_write_json(staging / "selection_summary.json", summary)
        _install(staging, res.output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "kept %d of %d valid samples (%s, k=%s) -> %s",
        len(kept),
        summary["num_valid"],
        res.selector,
        res.percentage,
        res.output_dir / "selected_data.jsonl",
    )
    return res


def run(cfg: DictConfig) -> None:
    """Hydra-style entry: :func:`run_selection`, with :class:`SelectionError` as a clear exit."""
    try:
        run_selection(cfg)
    except (SelectionError, RouterDataError) as e:
        raise SystemExit(f"selection failed: {e}") from e


def config_from_overrides(**overrides: Any) -> DictConfig:
    """A selection config from keyword overrides (tests, the experiment runner)."""
    path = Path(__file__).resolve().parents[3] / "configs" / "batch_selection.yaml"
    base = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for key in ("hydra", "defaults"):
        base.pop(key, None)
    base["root_dir"] = None  # "???" in the file: required on the command line
    unknown = set(overrides) - set(base)
    if unknown:
        raise SelectionError(f"unknown selection config keys {sorted(unknown)}; known: {sorted(base)}")
    return OmegaConf.create({**base, **overrides})
