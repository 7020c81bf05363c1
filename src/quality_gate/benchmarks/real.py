"""The real-label benchmark: every selector's score against human and LLM-judge quality labels.

    quality-gate benchmark --data-dir ../shared/data --out outputs/bench_real      # make bench-real

Recipe (each step resumes: a finished step is reused when its settings are unchanged, and Stage 2
resumes its own shards):

1. pools: CoachLM pairs and AlpaGasus samples (:mod:`quality_gate.benchmarks.pools`), each split into a
   tuning and a held-out half (``data/<half>/<pool>.jsonl``);
2. the selector: a GGUF file or bundled name is dequantised once into a plain model dir;
3. per half, Stage 2 on the model as released (gates of form 2 at weight 0 are exactly the identity):
   the ``perplexity`` and ``ifd`` baselines and the never-warmed gates;
4. per gate variant (:data:`VARIANTS`): Stage 1 on a seeded subset of the tuning half (no labels; the
   held-out half is never trained on), then per half Stage 2 with the warmed gates: the
   ``quality_gate`` score (column statistics within each pool and half, as a selection of that pool);
5. every selector's score on every pool and half (:mod:`quality_gate.benchmarks.metrics`), written to
   ``results.json`` and ``results.md`` in the run dir (and to ``--results``, e.g. docs/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quality_gate.benchmarks.metrics import labelled_metrics, paired_metrics
from quality_gate.benchmarks.pools import HALVES, Pool, alpagasus_pool, coachlm_pool
from quality_gate.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

#: Gate variants: the overrides of Stages 1 and 2 that define each. ``identity`` is the default.
VARIANTS: dict[str, dict[str, Any]] = {
    "identity": {"quality_gate.scale": 2.0},
    "identity_lr3e-3": {"quality_gate.scale": 2.0, "training.learning_rate": 3e-3},
    "identity_lr3e-2": {"quality_gate.scale": 2.0, "training.learning_rate": 3e-2},
    "seed_gate": {"quality_gate.scale": 1.0},
    "seed_gate_lr3e-3": {"quality_gate.scale": 1.0, "training.learning_rate": 3e-3},
}
DEFAULT_VARIANTS = ("identity", "seed_gate")
BASELINES = ("perplexity", "ifd", "length", "random")
STEPS_FILE = "steps.json"


@dataclasses.dataclass
class Settings:
    """What one benchmark run measures (``quality-gate benchmark --help``)."""

    data_dir: str
    out: str
    selector_model: str = "smollm2-135m-instruct"
    coachlm_pairs: int = 160
    alpagasus_samples: int = 480
    max_length: int = 384
    warmup_samples: int = 192
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    halves: tuple[str, ...] = HALVES
    seed: int = 0
    threads: int = 0
    results: str | None = None

    def fingerprint(self, *fields: str) -> str:
        values = {f: getattr(self, f) for f in fields}
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Steps:
    """Finished steps of a run dir (``steps.json``: name -> settings fingerprint), with progress lines."""

    def __init__(self, root: Path, total: int) -> None:
        self.path = root / STEPS_FILE
        self.done: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.total, self.count = total, 0
        self.timings: dict[str, float] = {}

    def run(self, name: str, fingerprint: str, fn: Callable[[], None]) -> None:
        self.count += 1
        if self.done.get(name) == fingerprint:
            log.info("[%d/%d] %s: finished before with these settings, reused", self.count, self.total, name)
            return
        log.info("[%d/%d] %s ...", self.count, self.total, name)
        started = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - started, 1)
        self.done[name] = fingerprint
        atomic_write_json(self.path, self.done)
        log.info("[%d/%d] %s done in %.1f s", self.count, self.total, name, self.timings[name])


POOLS = ("coachlm", "alpagasus")


def _datasets(root: Path, half: str) -> list[dict[str, str]]:
    return [{"path": str(root / "data" / half / f"{p}.jsonl"), "dataset_name": p} for p in POOLS]


def _pools(s: Settings, halves: Sequence[str]) -> list[Pool]:
    return [
        coachlm_pool(Path(s.data_dir), s.coachlm_pairs, s.seed, tuple(halves)),
        alpagasus_pool(Path(s.data_dir), s.alpagasus_samples, s.seed, tuple(halves)),
    ]


def write_pools(s: Settings, root: Path) -> None:
    """``data/<half>/<pool>.jsonl`` (records) and ``data/labels.json`` (id -> pool, label, half, pair)."""
    labels: dict[str, dict[str, Any]] = {}
    for half in s.halves:
        for pool in _pools(s, [half]):
            atomic_write_jsonl(root / "data" / half / f"{pool.name}.jsonl", pool.records)
            labels.update({rid: {**v, "pool": pool.name} for rid, v in pool.labels.items()})
    atomic_write_json(root / "data" / "labels.json", labels)


def plain_selector(source: str, out: Path) -> str:
    """A GGUF file or bundled name dequantised once into a plain model dir (what every stage then
    loads in a fraction of the time); a model dir or Hub id is used as it is."""
    from quality_gate.model_sources import BUNDLED_MODELS, is_gguf
    from quality_gate.models import load_target

    if not (is_gguf(source) or source in BUNDLED_MODELS):
        return source
    model, tokenizer = load_target(source, dtype="float32", device="cpu", key="--selector-model")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def _stage(stage: str, values: dict[str, Any]) -> None:
    """Run ``stage`` with its typed config: :func:`make_config` validates it, then the stage's ``run``
    (a recipe calls the stage modules; it never imports the command line)."""
    import importlib

    from quality_gate.config import make_config

    importlib.import_module(f"quality_gate.stages.{stage}").run(make_config(stage, values))


def _common(s: Settings, root: Path, selector: str, half: str) -> dict[str, Any]:
    return {
        "seed": s.seed,
        "selector_model.path": selector,
        "dataset.dataset_from": "local",
        "dataset.local.datasets": _datasets(root, half),
        "dataset.max_sequence_length": s.max_length,
    }


def released_stage2(s: Settings, root: Path, selector: str, half: str) -> None:
    """Stage 2 of one half with identity gates (form 2, weights 0): perplexity and IFD of the model as
    released."""
    values = {**_common(s, root, selector, half), "quality_gate.scale": 2.0, "quality_gate.init_std": 0.0}
    _stage("collect", {**values, "collect_ifd": True, "output_dir": str(root / "released" / half)})


def variant_warmup(s: Settings, root: Path, selector: str, variant: str) -> None:
    """Stage 1 of one gate variant on a seeded subset of the tuning half (the held-out half is never
    trained on)."""
    total = sum(len(p.records) for p in _pools(s, [HALVES[0]]))
    values = {
        **_common(s, root, selector, HALVES[0]),
        "dataset.subset_ratio": min(1.0, s.warmup_samples / max(total, 1)),
        "dataset.shuffle": True,
        "training.epochs": 1.0,
        "training.gate_stats_samples": 32,
        "training.logging_steps": 2,
        "output_dir": str(root / "variants" / variant / "warmup"),
        **VARIANTS[variant],
    }
    _stage("warmup", values)


def variant_stage2(s: Settings, root: Path, selector: str, variant: str, half: str) -> None:
    """Stage 2 of one half with the variant's warmed gates: the ``quality_gate`` score."""
    stage2_keys = {k: v for k, v in VARIANTS[variant].items() if k.startswith("quality_gate.")}
    values = {
        **_common(s, root, selector, half),
        **stage2_keys,
        "model_checkpoint_path": str(root / "variants" / variant / "warmup"),
        "output_dir": str(root / "variants" / variant / half),
    }
    _stage("collect", values)


# --------------------------------------------------------------------------------------------- #
# Scores and metrics
# --------------------------------------------------------------------------------------------- #
def selector_table(stats_dir: Path, names: Sequence[str], seed: int) -> dict[str, dict[str, float]]:
    """selector -> {sample id -> score} from one Stage 2 run, as ``quality-gate select`` ranks them
    (defaults of the select config; column statistics within each pool; ineligible samples -inf)."""
    from quality_gate.config import make_config
    from quality_gate.selection.pipeline import _params
    from quality_gate.selection.scoring import collect_sample_stats, quality_scores
    from quality_gate.selection.selectors import ranking_score, selector_scores
    from quality_gate.stats.store import find_router_data

    params = _params(make_config("select", {"root_dir": str(stats_dir)}))
    stats = collect_sample_stats(find_router_data(stats_dir), params)
    q, _ = quality_scores(stats, params, per_dataset=True)
    out = {}
    for name in names:
        score = ranking_score(selector_scores(name, stats, q, seed))
        out[name] = dict(zip(stats.ids, score.tolist()))
    out["_length"] = dict(zip(stats.ids, stats.response_tokens.astype(float).tolist()))
    return out


def evaluate_scores(
    scores: dict[str, dict[str, float]],
    lengths: dict[str, float],
    labels: dict[str, dict[str, Any]],
    seed: int,
    halves: Sequence[str] = HALVES,
) -> dict[str, Any]:
    """pool -> half -> selector -> metrics (paired for CoachLM)."""
    results: dict[str, Any] = {}
    for pool in ("coachlm", "alpagasus"):
        for half in halves:
            ids = sorted(i for i, v in labels.items() if v["pool"] == pool and v["half"] == half)
            y = np.array([labels[i]["label"] for i in ids])
            length = np.array([lengths.get(i, np.nan) for i in ids])
            for name, table in scores.items():
                score = np.array([table.get(i, -np.inf) for i in ids], dtype=np.float64)
                if pool == "coachlm":
                    pair = np.array([labels[i]["pair"] for i in ids])
                    m = paired_metrics(score, y, length, pair, seed)
                else:
                    m = labelled_metrics(score, y, length, seed)
                m["missing"] = int(sum(i not in table for i in ids))
                results.setdefault(pool, {}).setdefault(half, {})[name] = m
    return results


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def render_markdown(summary: dict[str, Any]) -> str:
    """The results as Markdown tables, one per pool and half."""
    s = summary["settings"]
    lines = [
        "# Quality-Gate on real quality labels",
        "",
        f"Written by `quality-gate benchmark` on {summary['date']} in {summary['wall_time_s'] / 60:.1f} min "
        f"({summary['machine']}). Selector: `{s['selector_model']}`; {s['coachlm_pairs']} CoachLM pairs "
        f"and {s['alpagasus_samples']} AlpaGasus samples (seed {s['seed']}), each split into a tuning and a "
        f"held-out half; at most {s['max_length']} tokens per sample; Stage 1 on "
        f"{summary['warmup_samples_used']} samples of the tuning half of both pools (no labels; the held-out "
        "half is never trained on). Each half is scored by its own Stage 2 run. Scores as "
        "`quality-gate select` ranks them (its defaults). `quality_gate[v]`: the gate score with gate "
        "variant v; `unwarmed`: gates never trained (all equal, so q orders the samples by the sum of their "
        "perplexities: docs/method.md); `perplexity` and `ifd` from the model as released.",
        "",
        "Command: `" + summary["command"] + "`",
        "",
    ]
    for pool, title, cols in (
        (
            "coachlm",
            "CoachLM: revised (better) vs published (worse) answer",
            [
                ("pair acc.", "pair_accuracy", "pair_accuracy_ci"),
                ("length-matched pair acc.", "pair_accuracy_length_matched", None),
                ("AUROC", "auroc", "auroc_ci"),
                ("AUROC beyond length", "auroc_length_residual", None),
            ],
        ),
        (
            "alpagasus",
            "AlpaGasus: judge-rated >= 4.5 vs the rest",
            [
                ("AUROC", "auroc", "auroc_ci"),
                ("AUROC beyond length", "auroc_length_residual", None),
                ("precision top 10 %", "precision_top10", None),
            ],
        ),
    ):
        for half in summary["results"][pool]:
            rows = summary["results"][pool][half]
            any_row = next(iter(rows.values()))
            extra = (
                f"{any_row['pairs']} pairs, {any_row['matched_pairs']} length-matched"
                if pool == "coachlm"
                else f"{any_row['n']} samples, base rate {_f(any_row['base_rate'])}"
            )
            lines += [f"## {title}: {half} half ({extra})", ""]
            lines.append("| selector | " + " | ".join(c[0] for c in cols) + " |")
            lines.append("|---|" + "---:|" * len(cols))
            for name, m in rows.items():
                cells = []
                for _, key, ci in cols:
                    cell = _f(m[key])
                    if ci and m.get(ci) and all(np.isfinite(m[ci])):
                        cell += f" [{_f(m[ci][0], 2)}, {_f(m[ci][1], 2)}]"
                    cells.append(cell)
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Stage 1 per variant (LM loss per assistant token)", ""]
    lines.append(
        "| variant | as released | gates at init | after warmup | gate mean | token spread | warmup s |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for v, w in summary["warmup"].items():
        loss = w.get("lm_loss") or {}
        lines.append(
            f"| {v} | {_f(loss.get('released'))} | {_f(loss.get('at_init'))} | "
            f"{_f(loss.get('after_warmup'))} | {_f(w['gates_after']['mean'])} | "
            f"{_f(w['gates_after']['token_std'], 4)} | {_f(w['wall_time_s'], 0)} |"
        )
    lines.append("")
    return "\n".join(lines)


def _warmup_summary(path: Path) -> dict[str, Any]:
    m = json.loads(path.read_text())
    keep = (
        "lm_loss",
        "gates_before",
        "gates_after",
        "gate_movement",
        "num_train_samples",
        "global_step",
        "tokens_seen",
        "wall_time_s",
    )
    return {k: m.get(k) for k in keep}


def run_benchmark(s: Settings, command: str = "") -> dict[str, Any]:
    """Run (or resume) every step of the benchmark into ``s.out``; returns the summary."""
    import datetime
    import platform

    import torch

    _check_settings(s)
    torch.set_num_threads(s.threads or os.cpu_count() or 1)
    root = Path(s.out)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = run_steps(s, root)
    scores, lengths, warm = gather_scores(s, root)
    labels = json.loads((root / "data" / "labels.json").read_text())
    earlier = _earlier_timings(root)
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "command": command,
        "settings": dataclasses.asdict(s),
        "warmup_samples_used": next(iter(warm.values()), {}).get("num_train_samples"),
        "wall_time_s": round(time.perf_counter() - started + sum(earlier.values()), 1),
        "step_timings_s": {**earlier, **timings},
        "warmup": warm,
        "results": evaluate_scores(scores, lengths, labels, s.seed, s.halves),
    }
    atomic_write_json(root / "timings.json", summary["step_timings_s"])
    atomic_write_json(root / "results.json", summary)
    md = render_markdown(summary)
    atomic_write_text(root / "results.md", md)
    if s.results:
        atomic_write_text(s.results, md)
    log.info("results: %s", root / "results.md")
    return summary


def _check_settings(s: Settings) -> None:
    from quality_gate.errors import ConfigError

    unknown = sorted(set(s.variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    if not s.halves or set(s.halves) - set(HALVES):
        raise ConfigError(f"--halves={','.join(s.halves)}: use tuning, heldout or both (comma-separated)")


def run_steps(s: Settings, root: Path) -> dict[str, float]:
    """Every step not finished with the same settings: the pools, the plain selector, Stage 2 of each
    half on the model as released, then per variant Stage 1 (tuning half) and Stage 2 of each half.
    Returns the seconds of the steps run now."""
    from quality_gate.model_sources import BUNDLED_MODELS, is_gguf

    steps = Steps(root, 2 + len(s.halves) + len(s.variants) * (1 + len(s.halves)))
    data_keys = ("data_dir", "coachlm_pairs", "alpagasus_samples", "seed")
    steps.run("pools", s.fingerprint(*data_keys, "halves"), lambda: write_pools(s, root))
    selector_dir = root / "selector"
    selector = s.selector_model
    if is_gguf(selector) or selector in BUNDLED_MODELS:
        steps.run("selector", s.fingerprint("selector_model"), lambda: plain_selector(selector, selector_dir))
        selector = str(selector_dir)
    stage_key = s.fingerprint(*data_keys, "selector_model", "max_length")
    for half in s.halves:
        steps.run(
            f"Stage 2 of the {half} half, model as released",
            stage_key,
            lambda half=half: released_stage2(s, root, selector, half),
        )
    for variant in s.variants:
        key = stage_key + s.fingerprint("warmup_samples") + json.dumps(VARIANTS[variant], sort_keys=True)
        steps.run(f"Stage 1, {variant}", key, lambda v=variant: variant_warmup(s, root, selector, v))
        for half in s.halves:
            steps.run(
                f"Stage 2 of the {half} half, {variant}",
                key,
                lambda v=variant, half=half: variant_stage2(s, root, selector, v, half),
            )
    return steps.timings


def gather_scores(
    s: Settings, root: Path
) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, Any]]:
    """Per selector its score of every sample id (the gate score of each variant as
    ``quality_gate[<variant>]``, the unwarmed one as ``unwarmed``), each sample's length, and each
    variant's Stage 1 summary."""
    scores: dict[str, dict[str, float]] = {}
    lengths: dict[str, float] = {}
    released: dict[str, dict[str, float]] = {}
    warm: dict[str, Any] = {}
    for half in s.halves:
        table = selector_table(root / "released" / half, ["quality_gate", *BASELINES], s.seed)
        lengths.update(table.pop("_length"))
        for name, values in table.items():
            released.setdefault(name, {}).update(values)
    for variant in s.variants:
        name = f"quality_gate[{variant}]"
        for half in s.halves:
            table = selector_table(root / "variants" / variant / half, ["quality_gate"], s.seed)
            scores.setdefault(name, {}).update(table["quality_gate"])
        warm[variant] = _warmup_summary(root / "variants" / variant / "warmup" / "warmup_metrics.json")
    scores["unwarmed"] = released.pop("quality_gate")
    scores.update(released)
    return scores, lengths, warm


def _earlier_timings(root: Path) -> dict[str, float]:
    path = root / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Settings(data_dir="", out="")
    parser.add_argument(
        "--data-dir", required=True, help="folder with the labelled files (../shared/data here)"
    )
    parser.add_argument("--out", default="outputs/bench_real", help="run dir; rerun the same to resume")
    parser.add_argument(
        "--selector-model", default=d.selector_model, help="model dir, HF id, .gguf or bundled name"
    )
    parser.add_argument("--coachlm-pairs", type=int, default=d.coachlm_pairs, help="CoachLM pairs (0: all)")
    parser.add_argument(
        "--alpagasus-samples", type=int, default=d.alpagasus_samples, help="AlpaGasus samples (0: all)"
    )
    parser.add_argument("--max-length", type=int, default=d.max_length, help="tokens per sample")
    parser.add_argument("--warmup-samples", type=int, default=d.warmup_samples, help="Stage 1 samples")
    parser.add_argument(
        "--variants",
        default=",".join(d.variants),
        help=f"gate variants, comma-separated, of {sorted(VARIANTS)}",
    )
    parser.add_argument(
        "--halves", default=",".join(HALVES), help="tuning,heldout (default) or tuning alone while tuning"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the pools, halves and stages")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--results", default=None, help="also write the Markdown table here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Command line; user errors print one line and exit 1."""
    import sys

    from quality_gate.errors import exit_on_user_error

    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def split(text: str) -> tuple[str, ...]:
        return tuple(v for v in text.split(",") if v)

    # Every option is a Settings field of the same name; the two lists arrive comma-separated.
    settings = Settings(**{**vars(args), "variants": split(args.variants), "halves": split(args.halves)})
    command = " ".join(["quality-gate benchmark", *(argv if argv is not None else sys.argv[2:])])
    with exit_on_user_error():
        run_benchmark(settings, command)
