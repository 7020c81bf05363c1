"""The experiment's orchestration: the pool, Stages 1-2, the selections, the fine-tunes at matched
compute and the evaluations of every arm; one regime or a resumable sweep.

See :mod:`quality_gate.experiment` for what is compared and how; the statistics are
:mod:`.statistics`'s, the pages :mod:`.render`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from quality_gate.config import make_config
from quality_gate.data.encode import encode_with_config
from quality_gate.data.records import corruption_of
from quality_gate.data.sources import load_local_file, read_records
from quality_gate.errors import DataError
from quality_gate.experiment.render import (
    arms_figure,
    render_html,
    render_markdown,
    render_sweep_html,
    render_sweep_markdown,
)
from quality_gate.experiment.statistics import composition, families_of, summarise_arms, verdicts
from quality_gate.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json, read_jsonl
from quality_gate.runs import PhaseTimer, git_commit, init_run

log = logging.getLogger(__name__)


class Steps:
    """Numbered progress lines (``[3] Stage 2 statistics ... done in 4.2 s``) over a
    :class:`~quality_gate.runs.PhaseTimer`; ``timings`` per title, in seconds to 0.01."""

    def __init__(self) -> None:
        self.done, self.timer = 0, PhaseTimer()

    @property
    def timings(self) -> dict[str, float]:
        return {title: round(s, 2) for title, s in self.timer.phases.items()}

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        log.info("[%d] %s ...", self.done, title)
        # A title met again (the next budget of a sweep, on the same Stages 1-2) is timed anew, in
        # its first place (PhaseTimer would add the two).
        self.timer.phases[title] = 0.0
        with self.timer(title):
            yield
        log.info("[%d] %s done in %.1f s", self.done, title, self.timer.phases[title])


# --------------------------------------------------------------------------------------------- #
# Running stages
# --------------------------------------------------------------------------------------------- #
def _overrides(cfg: DictConfig, stage: str) -> list[str]:
    return [str(x) for x in cfg.overrides[stage]]


def _run(cfg: DictConfig, stage: str, values: dict[str, Any]) -> Any:
    """Run ``stage`` (warmup, collect, finetune, evaluate) with its typed config, ``values`` and
    ``overrides.<stage>``: :func:`make_config` validates it, then the stage module's ``run(cfg)``.

    The library calls the stage modules itself: it never imports the command line
    (:mod:`quality_gate.cli`), which calls this runner.
    """
    stage_cfg = make_config(stage, values, _overrides(cfg, stage))
    return importlib.import_module(f"quality_gate.stages.{stage}").run(stage_cfg)


def _params(model_path: str) -> int:
    """Parameter count of a model dir from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for file in Path(model_path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                total += math.prod(f.get_slice(key).get_shape())
    return total


# --------------------------------------------------------------------------------------------- #
# Pool, Stages 1-2
# --------------------------------------------------------------------------------------------- #
PREPARED_FILE = "prepared.json"


def prepare(cfg: DictConfig, root: Path, steps: Steps, reuse: bool = False) -> dict[str, Any]:
    """The pool, the converted selector, Stage 1 and Stage 2 (warmed, and unwarmed when ablated).

    ``reuse``: when ``root/prepared.json`` says these steps finished with the same config (a sweep
    resuming), return their outputs without running anything (their timings are read back).
    """
    name = str(cfg.data.dataset_name)
    train_path = root / "data" / "train.jsonl" if cfg.data.generate else Path(str(cfg.data.train_path))
    common = {
        "seed": int(cfg.seed),
        "dataset.dataset_from": "local",
        "dataset.local.datasets": [{"path": str(train_path), "dataset_name": name}],
    }
    selector = str(root / "converted_selector") if cfg.convert_selector else str(cfg.selector_model)
    warm, stats = root / "warmup", root / "collect"
    out = {"train_path": train_path, "common": common, "selector": selector, "warmup": warm, "collect": stats}
    if "unwarmed" in cfg.ablations:
        out["collect_unwarmed"] = root / "collect_unwarmed"
    fingerprint = cell_fingerprint(cfg, -1.0)
    marker = root / PREPARED_FILE
    if reuse and marker.is_file():
        done = read_json(marker)
        if done.get("config_fingerprint") == fingerprint:
            log.info("Stages 1-2 in %s finished before with this config: reused", root)
            steps.timer.phases.update(done.get("timings_s") or {})
            return out

    with steps.step("data"):
        if cfg.data.generate:
            from quality_gate.synthetic import make_records

            families = list(cfg.data.families) or None
            records = make_records(
                int(cfg.data.num_samples), float(cfg.data.noise_rate), int(cfg.seed), name, families=families
            )
            atomic_write_jsonl(train_path, records)
    with steps.step("convert the selector"):
        if cfg.convert_selector:
            from quality_gate.convert import convert

            # The new gates' init is seeded: the run is reproducible per seed.
            convert(str(cfg.selector_model), Path(selector), seed=int(cfg.seed))
    with steps.step("Stage 1 warmup"):
        _run(cfg, "warmup", {**common, "selector_model.path": selector, "output_dir": str(warm)})
    collect = {
        **common,
        "selector_model.path": selector,
        "collect_ifd": any(str(a).partition("+")[0] in ("ifd", "combined") for a in cfg.selectors),
        "output_dir": str(stats),
    }
    with steps.step("Stage 2 statistics"):
        _run(cfg, "collect", {**collect, "model_checkpoint_path": str(warm)})
    if "collect_unwarmed" in out:
        with steps.step("Stage 2 statistics, unwarmed gates"):
            _run(
                cfg, "collect", {**collect, "collect_ifd": False, "output_dir": str(out["collect_unwarmed"])}
            )
    atomic_write_json(marker, {"config_fingerprint": fingerprint, "timings_s": dict(steps.timings)})
    return out


def selection_cost(prep: dict[str, Any], steps: Steps) -> dict[str, Any]:
    """Wall time and estimated FLOPs of Stages 1 and 2 (the selection's own bill).

    FLOPs: a forward is ~2 N T (N selector parameters, T tokens); Stage 1's backward through the frozen
    backbone computes activation gradients only, another ~2 N T; Stage 2 is forward only (IFD adds a
    forward over the responses).
    """
    warm = read_json(prep["warmup"] / "warmup_metrics.json")
    stats = read_json(prep["collect"] / "stage2_metrics.json")
    n = _params(prep["selector"])
    warm_tokens = int(warm.get("tokens_seen") or 0)
    stats_tokens = int(stats["tokens_scored_this_run"])
    return {
        "selector_params": n,
        "stage1_wall_s": steps.timings.get("Stage 1 warmup"),
        "stage1_tokens": warm_tokens,
        "stage1_flops": 4 * n * warm_tokens,
        "stage2_wall_s": steps.timings.get("Stage 2 statistics"),
        "stage2_tokens": stats_tokens,
        "stage2_flops": 2 * n * stats_tokens,
        "formula": "Stage 1: 4 N T (forward + activation gradients, frozen backbone); Stage 2: 2 N T",
    }


# --------------------------------------------------------------------------------------------- #
# Selections
# --------------------------------------------------------------------------------------------- #
def _select(
    cfg: DictConfig, root_dir: Path, out: Path, k: float, selector: str, seed: int, **extra: Any
) -> Any:
    from quality_gate.selection.pipeline import run_selection

    values = {
        "root_dir": str(root_dir),
        "selector": selector,
        "seed": int(seed),
        "output_dir": str(out),
        "selection_percentage": float(k),
        **extra,
    }
    return run_selection(make_config("select", values, _overrides(cfg, "select")))


def _audit_row(summary: dict[str, Any], selector: str) -> dict[str, Any]:
    """An arm's selection metrics from its ``selection_summary.json`` (quality_gate.selection.audit)."""
    audit = (summary.get("corruption_audit") or {}).get("selectors", {}).get(selector, {})
    return {
        "kept": summary["num_selected"],
        "corrupted_kept_share": audit.get("corrupted_share_of_kept"),
        "auroc": audit.get("auroc"),
        "per_kind": audit.get("per_kind", {}),
        "clean_kept_share": audit.get("clean_kept_share"),
    }


def run_selections(
    cfg: DictConfig, prep: dict[str, Any], root: Path, k: float, steps: Steps
) -> dict[str, Any]:
    """Every arm's selection (random once per seed), the ablation rows, and the audit of the pool."""
    rows: dict[str, Any] = {}
    files: dict[str, dict[int, Path]] = {}
    audit = None
    for name in cfg.selectors:
        selector, _, diversity = str(name).partition("+")
        extra = {"diversity": diversity} if diversity else {}
        seeds = list(cfg.seeds) if selector == "random" else [int(cfg.seed)]
        for seed in seeds:
            arm = f"{name}_seed{seed}" if selector == "random" else name
            with steps.step(f"select: {arm}"):
                res = _select(cfg, prep["collect"], root / "select" / arm, k, selector, seed, **extra)
            rows[arm] = _audit_row(res.summary, selector)
            audit = audit or res.summary.get("corruption_audit")
            files.setdefault(name, {})[seed] = root / "select" / arm / "selected_data.jsonl"
    if "alpha0" in cfg.ablations:
        with steps.step("select: quality_gate, alpha=0"):
            res = _select(
                cfg, prep["collect"], root / "select" / "quality_gate_alpha0", k, "quality_gate", 0, alpha=0.0
            )
        rows["quality_gate (alpha=0)"] = _audit_row(res.summary, "quality_gate")
    if "unwarmed" in cfg.ablations:
        with steps.step("select: quality_gate, unwarmed gates"):
            res = _select(
                cfg, prep["collect_unwarmed"], root / "select" / "quality_gate_unwarmed", k, "quality_gate", 0
            )
        rows["quality_gate (unwarmed gates)"] = _audit_row(res.summary, "quality_gate")
    return {"rows": rows, "files": files, "audit": audit}


# --------------------------------------------------------------------------------------------- #
# Fine-tuning at matched compute
# --------------------------------------------------------------------------------------------- #
def _finetune_values(
    cfg: DictConfig, prep: dict[str, Any], arm: str, data: Path, seed: int
) -> dict[str, Any]:
    """An arm's Stage 3 values (its data, seed and target model): ``full`` trains on the pool as
    Stages 1-2 read it, every other arm on its selection file ``data``."""
    source = (
        {"dataset.mode": "full", **prep["common"]}
        if arm == "full"
        else {"dataset.mode": "subset", "dataset.data_path": str(data)}
    )
    return {**source, "seed": int(seed), "training.model.name": str(cfg.target_model)}


def _target_tokenizer(ft: DictConfig) -> Any:
    """The tokenizer of Stage 3's ``training.model`` (no weights loaded)."""
    from quality_gate.model_sources import check_model_source
    from quality_gate.models import load_tokenizer

    spec = ft.training.model
    path = check_model_source(str(spec.name), "training.model.name")
    return load_tokenizer(path, bool(spec.trust_remote_code), "training.model.name")


def _mean_tokens(ft: DictConfig, tokenizer: Any, arm: str) -> float:
    """Mean length of the samples Stage 3 trains on under the finetune config ``ft``: its records
    encoded as it encodes them (chat template or ``dataset.chat_template``, ``max_sequence_length``,
    ``truncation``); dropped samples do not count."""
    ds = ft.dataset
    if ds.mode == "full":
        records, _ = read_records(ds, seed=int(ft.seed))
    else:
        records, _ = load_local_file(str(ds.data_path), str(ds.dataset_name), strict=bool(ds.strict))
    samples, _, _ = encode_with_config(records, tokenizer, ds, desc=f"count tokens: {arm}")
    if not samples:
        raise DataError(
            f"arm {arm}: no training samples left after encoding; check dataset.max_sequence_length and "
            "dataset.truncation (drop skips every sample longer than the limit)"
        )
    return float(np.mean([len(s) for s in samples]))


def finetune_plan(
    cfg: DictConfig, k_samples: int, arms: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per fine-tuned arm: the ``training.*`` values that give it the configured compute.

    ``arms`` maps arm -> its Stage 3 values (:func:`_finetune_values`; ``tokens`` counts what Stage 3
    trains on under them and ``overrides.finetune``). Batch size from ``overrides.finetune``.
    """
    overrides = _overrides(cfg, "finetune")
    ft = make_config("finetune", {"dataset.mode": "full"}, overrides)  # for the batch size
    batch = int(ft.training.batch_size)
    epochs = float(cfg.compute.epochs)
    budget_steps = math.ceil(epochs * k_samples / batch)
    match = str(cfg.compute.match)
    if match == "epochs":
        return {arm: {"training.epochs": epochs, "training.max_steps": -1} for arm in arms}
    if match == "steps":
        return {arm: {"training.max_steps": budget_steps} for arm in arms}
    configs = {arm: make_config("finetune", values, overrides) for arm, values in arms.items()}
    tokenizer = _target_tokenizer(next(iter(configs.values())))  # every arm has the same target
    lengths = {arm: _mean_tokens(ft, tokenizer, arm) for arm, ft in configs.items()}
    reference = lengths.get("random", float(np.mean(list(lengths.values()))))
    budget_tokens = budget_steps * batch * reference
    return {
        arm: {"training.max_steps": max(1, round(budget_tokens / (batch * mean)))}
        for arm, mean in lengths.items()
    }


def run_finetunes(
    cfg: DictConfig, prep: dict[str, Any], sel: dict[str, Any], root: Path, steps: Steps
) -> dict[str, dict[int, dict[str, Any]]]:
    """Fine-tune and evaluate every arm x seed; returns ``{arm: {seed: {eval dir, train metrics}}}``."""
    arms: dict[str, dict[int, Path]] = {}
    for selector, by_seed in sel["files"].items():
        arms[selector] = {s: by_seed.get(s, by_seed.get(int(cfg.seed))) for s in cfg.seeds}
    if cfg.include_full:
        arms["full"] = dict.fromkeys(cfg.seeds, prep["train_path"])
    k_samples = next(iter(sel["rows"].values()))["kept"]
    first = {}  # per arm, its first seed's values: what compute matching measures
    for arm, by_seed in arms.items():
        seed, data = next(iter(by_seed.items()))
        first[arm] = _finetune_values(cfg, prep, arm, data, seed)
    plan = finetune_plan(cfg, int(k_samples), first)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for arm, by_seed in arms.items():
        for seed, data in by_seed.items():
            ft_dir, ev_dir = root / "finetune" / f"{arm}_seed{seed}", root / "evaluate" / f"{arm}_seed{seed}"
            values = {**_finetune_values(cfg, prep, arm, data, seed), **plan[arm], "output_dir": str(ft_dir)}
            with steps.step(f"fine-tune: {arm}, seed {seed}"):
                _run(cfg, "finetune", values)
            with steps.step(f"evaluate: {arm}, seed {seed}"):
                _evaluate(cfg, ft_dir / "checkpoint-final", ev_dir, seed)
            out.setdefault(arm, {})[seed] = {
                "eval": ev_dir,
                "train": read_json(ft_dir / "train_metrics.json"),
            }
    if cfg.include_base:
        with steps.step("evaluate: base model (no fine-tune)"):
            _evaluate(cfg, None, root / "evaluate" / "base", int(cfg.seed))
        out["base (no fine-tune)"] = {int(cfg.seed): {"eval": root / "evaluate" / "base", "train": None}}
    return out


def _evaluate(cfg: DictConfig, adapter: Path | None, out_dir: Path, seed: int) -> None:
    values = {
        "model.name": str(cfg.target_model),
        "adapter_path": None if adapter is None else str(adapter),
        "eval.data_path": str(cfg.data.eval_path),
        "output_dir": str(out_dir),
        "seed": int(seed),
    }
    _run(cfg, "evaluate", values)


def regime_summary(
    cfg: DictConfig, root: Path, prep: dict[str, Any], k: float, steps: Steps
) -> dict[str, Any]:
    """Selections, fine-tunes and evaluations at budget ``k`` over prepared Stages 1-2; the summary."""
    from quality_gate.synthetic import HELD_OUT_FAMILIES

    sel = run_selections(cfg, prep, root, k, steps)
    runs = run_finetunes(cfg, prep, sel, root, steps)
    arms = summarise_arms(cfg, sel, runs)
    records = read_jsonl(prep["train_path"])
    labelled = [corruption_of(r) for r in records if corruption_of(r) is not None]
    if "full" in arms:  # the full arm keeps the whole pool
        arms["full"]["kept"] = len(records)
        arms["full"]["corrupted_kept_share"] = (
            sum(k != "none" for k in labelled) / len(labelled) if labelled else None
        )
    warm = read_json(prep["warmup"] / "warmup_metrics.json")
    return {
        "name": str(cfg.name),
        "run_dir": str(root),
        "noise_rate": float(cfg.data.noise_rate),
        "selection_percentage": float(k),
        "num_candidates": len(records),
        "corrupted_candidates": sum(corruption_of(r) not in (None, "none") for r in records),
        "families": families_of(records),
        "composition": composition(records, sel["files"], str(cfg.composition_key)),
        "held_out_families": list(HELD_OUT_FAMILIES),
        "seeds": list(cfg.seeds),
        "compute": OmegaConf.to_container(cfg.compute),
        "confidence": float(cfg.statistics.confidence),
        "arms": arms,
        "verdicts": verdicts(arms, float(cfg.statistics.confidence)),
        "selection_cost": selection_cost(prep, steps),
        "gate_movement": warm.get("gate_movement"),
        "report": str(root / "select" / "quality_gate" / "selection_report.html"),
        "timings_s": dict(steps.timings),
    }


def _write(run_dir: Path, summary: dict[str, Any], stem: str = "summary") -> None:
    atomic_write_json(run_dir / f"{stem}.json", summary)
    atomic_write_text(run_dir / f"{stem}.md", render_markdown(summary))
    atomic_write_text(
        run_dir / f"{stem}.html", render_html(summary, {"held-out metrics per arm": arms_figure(summary)})
    )


# The Makefile's commands that write docs/results/ (the header names the make target too).
MAKE_TARGETS = {
    "quality-gate experiment results_file=docs/results/demo.md": "make demo",
    "quality-gate experiment_sweep results_file=docs/results/sweep.md": "make sweep",
}


def _command() -> str:
    """This run's command line as Hydra composed it (``quality-gate <config> <overrides>``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except (ImportError, ValueError):
        return "quality_gate.experiment.run_experiment (called from Python)"
    return " ".join(["quality-gate", str(hydra.job.config_name), *hydra.overrides.task])


def write_results(path: str | Path, markdown: str, run_dir: Path, command: str) -> Path:
    """Write ``markdown`` (a rendered summary) to ``path`` atomically, under its title a line that
    says how it was made: the command (and its make target), the date, the git commit, the run dir."""
    make = MAKE_TARGETS.get(command)
    named = f"`{make}` (= `{command}`)" if make else f"`{command}`"
    absolute = run_dir.resolve()
    with contextlib.suppress(ValueError):  # a run dir under the cwd is named relative to it, in the
        run_dir = absolute.relative_to(Path.cwd().resolve())  # header and in the paths of the summary
        markdown = markdown.replace(f"{absolute}/", f"{run_dir}/")
    header = (
        f"Written by {named} on {dt.date.today().isoformat()} at commit {git_commit() or 'unknown'}, "
        f"from the run dir `{run_dir}`; rerun the command to rewrite this file."
    )
    title, _, rest = markdown.partition("\n")
    text = f"{title}\n\n{header}\n{rest}" if title.startswith("# ") else f"{header}\n\n{markdown}"
    atomic_write_text(Path(path), text)
    log.info("results written to %s", path)
    return Path(path)


def _results_file(cfg: DictConfig, markdown: str, run_dir: Path) -> None:
    """``results_file``, when set: the summary's Markdown, headed by how it was made."""
    if cfg.results_file:
        write_results(str(cfg.results_file), markdown, run_dir, _command())


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """One regime (or the sweep, when ``sweep.noise_rates`` / ``sweep.budgets`` are set); writes the
    summaries into the run dir (and to ``results_file`` when set)."""
    run_dir = init_run(cfg, "experiment")
    if cfg.sweep.noise_rates or cfg.sweep.budgets:
        return run_sweep(cfg, run_dir)
    steps = Steps()
    prep = prepare(cfg, run_dir, steps)
    summary = regime_summary(cfg, run_dir, prep, float(cfg.selection_percentage), steps)
    _write(run_dir, summary)
    _results_file(cfg, render_markdown(summary), run_dir)
    return summary


def cell_fingerprint(cfg: DictConfig, k: float) -> str:
    """What a sweep cell's results depend on: the resolved config (less ``output_dir`` and
    ``results_file``, which say where results go) and the budget."""
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    values.pop("output_dir", None)
    values.pop("results_file", None)
    if values["compute"]["match"] == "tokens":
        # Tokens are counted as Stage 3 encodes them since issue #20 (truncation, dropped samples): a
        # tokens cell budgeted by the older count is not read back as if it were this one.
        values["compute"]["token_count"] = "stage3_encoding"
    text = json.dumps([values, float(k)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finished_cell(cell_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The cell's summary when a previous run into this dir finished it with the same config."""
    path = cell_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s is unreadable (%s); the cell runs again", path, err)
        return None
    if summary.get("config_fingerprint") != fingerprint:
        log.warning("%s was made with another config; the cell runs again", path)
        return None
    return summary


def run_sweep(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Stages 1-2 once per noise rate, then every budget; ``sweep_summary.{json,md,html}`` with the plot.

    Resumable: rerun with ``output_dir=<this run dir>`` and the cells that finished with the same config
    (their ``summary.json`` carries its fingerprint) are read back instead of run again; a noise rate
    whose cells are all finished skips its Stages 1-2 too.
    """
    noise_rates = list(cfg.sweep.noise_rates) or [float(cfg.data.noise_rate)]
    budgets = list(cfg.sweep.budgets) or [float(cfg.selection_percentage)]
    cells, resumed = [], []
    started = time.perf_counter()
    for noise in noise_rates:
        sub = OmegaConf.merge(cfg, {"data": {"noise_rate": float(noise)}})
        noise_dir = run_dir / f"noise{noise:g}"
        todo = {}
        for k in budgets:
            fingerprint = cell_fingerprint(sub, k)
            done = _finished_cell(noise_dir / f"k{k:g}", fingerprint)
            todo[k] = (fingerprint, done)
        prep, steps = None, Steps()
        for k, (fingerprint, summary) in todo.items():
            cell_dir = noise_dir / f"k{k:g}"
            if summary is not None:
                log.info("sweep cell noise %g, k %g: finished before, read from %s", noise, k, cell_dir)
                resumed.append(str(cell_dir.relative_to(run_dir)))
            else:
                if prep is None:
                    prep = prepare(sub, noise_dir, steps, reuse=True)
                summary = regime_summary(sub, cell_dir, prep, float(k), steps)
                summary["config_fingerprint"] = fingerprint
                _write(cell_dir, summary)
            cells.append(summary)
    sweep = {
        "name": str(cfg.name),
        "run_dir": str(run_dir),
        "noise_rates": noise_rates,
        "budgets": budgets,
        "cells": cells,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "resumed_cells": resumed,
    }
    atomic_write_json(run_dir / "sweep_summary.json", sweep)
    atomic_write_text(run_dir / "sweep_summary.md", render_sweep_markdown(sweep))
    atomic_write_text(run_dir / "sweep_summary.html", render_sweep_html(sweep))
    _results_file(cfg, render_sweep_markdown(sweep), run_dir)
    return sweep


def run(cfg: DictConfig) -> dict[str, Any]:
    """The ``experiment`` stage: run every arm, log the summary table and where the files are."""
    summary = run_experiment(cfg)
    if "cells" in summary:
        log.info("\n%s", render_sweep_markdown(summary))
        log.info("sweep summary: %s", Path(summary["run_dir"]) / "sweep_summary.html")
    else:
        log.info("\n%s", render_markdown(summary))
        log.info("summary: %s", Path(summary["run_dir"]) / "summary.md")
        log.info("selection report: %s", summary["report"])
    return summary
