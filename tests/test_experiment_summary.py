"""The experiment's statistics and compute matching against hand-computed values and slow references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from quality_gate.config import make_config
from quality_gate.experiment.render import render_markdown
from quality_gate.experiment.runner import finetune_plan
from quality_gate.experiment.statistics import _verdict, paired_difference


def _samples(nll, tokens, correct):
    return {
        "nll": np.asarray(nll, float),
        "tokens": np.asarray(tokens, float),
        "correct": np.asarray([np.nan if c is None else float(c) for c in correct]),
    }


def test_paired_difference_point_estimate_is_the_mean_over_seeds():
    # Seed 0: arm loss (2+4)/(2+2) = 1.5, random (4+4)/4 = 2.0 -> -0.5; seed 1: 1.0 - 1.5 = -0.5.
    arm = [_samples([2, 4], [2, 2], [1, None]), _samples([2, 2], [2, 2], [1, None])]
    base = [_samples([4, 4], [2, 2], [0, None]), _samples([3, 3], [2, 2], [1, None])]
    d = paired_difference(arm, base, "eval_loss", resamples=500, confidence=0.95)
    assert d["difference"] == pytest.approx(-0.5)
    assert d["low"] <= d["difference"] <= d["high"]
    em = paired_difference(arm, base, "exact_match", resamples=500, confidence=0.95)
    assert em["difference"] == pytest.approx(0.5)  # (1 - 0) and (1 - 1); the None rows do not count


def test_bootstrap_interval_matches_a_slow_reference():
    """The vectorised-by-seed bootstrap equals a plain double loop with the same random draws."""
    rng = np.random.default_rng(3)
    arm = [_samples(rng.random(30) * 3, rng.integers(1, 5, 30), rng.integers(0, 2, 30)) for _ in range(3)]
    base = [_samples(rng.random(30) * 3, rng.integers(1, 5, 30), rng.integers(0, 2, 30)) for _ in range(3)]
    got = paired_difference(arm, base, "eval_loss", resamples=300, confidence=0.9, seed=7)
    draws = []
    ref = np.random.default_rng(7)
    for _ in range(300):
        seeds = ref.integers(0, 3, 3)
        idx = ref.integers(0, 30, 30)
        diffs = []
        for s in seeds:
            a = arm[s]["nll"][idx].sum() / arm[s]["tokens"][idx].sum()
            b = base[s]["nll"][idx].sum() / base[s]["tokens"][idx].sum()
            diffs.append(a - b)
        draws.append(sum(diffs) / len(diffs))
    lo, hi = np.quantile(draws, [0.05, 0.95])
    assert got["low"] == pytest.approx(lo) and got["high"] == pytest.approx(hi)


def test_identical_arms_are_never_called_different():
    same = [_samples([1, 2, 3], [1, 1, 1], [1, 0, 1])] * 3
    d = paired_difference(same, same, "eval_loss", resamples=200, confidence=0.95)
    assert d == {"difference": 0.0, "low": 0.0, "high": 0.0}
    assert _verdict("eval_loss", d) == "no clear difference"


@pytest.mark.parametrize(
    ("metric", "diff", "word"),
    [
        ("eval_loss", {"difference": -0.2, "low": -0.3, "high": -0.1}, "better"),
        ("eval_loss", {"difference": 0.2, "low": 0.1, "high": 0.3}, "WORSE"),
        ("exact_match", {"difference": 0.1, "low": 0.05, "high": 0.2}, "better"),
        ("exact_match", {"difference": 0.1, "low": -0.05, "high": 0.2}, "no clear difference"),
        ("exact_match", {"difference": math.nan, "low": math.nan, "high": math.nan}, "no clear difference"),
    ],
)
def test_verdict_only_outside_the_interval(metric, diff, word):
    assert _verdict(metric, diff) == word


def test_compute_matching_by_steps_and_epochs(tmp_path):
    cfg = make_config("experiment", {"compute.match": "steps", "compute.epochs": 10})
    data = {"quality_gate": {"dataset.data_path": str(tmp_path / "a")}, "full": {"dataset.mode": "full"}}
    # batch 32 (overrides.finetune): ceil(10 * 600 / 32) = 188 steps for every arm, full data included.
    assert finetune_plan(cfg, 600, data) == {a: {"training.max_steps": 188} for a in data}
    cfg = make_config("experiment", {"compute.match": "epochs", "compute.epochs": 3})
    assert finetune_plan(cfg, 600, data)["full"] == {"training.epochs": 3.0, "training.max_steps": -1}


def test_compute_matching_by_tokens_gives_longer_samples_fewer_steps(tmp_path):
    import json

    def write(path, answer):
        rows = [
            {
                "messages": [
                    {"role": "user", "content": "Add 1 and 2."},
                    {"role": "assistant", "content": answer},
                ]
            }
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
        return path

    short, long = write(tmp_path / "s.jsonl", "3"), write(tmp_path / "l.jsonl", "three " * 40)
    cfg = make_config("experiment", {"compute.match": "tokens", "compute.epochs": 10})
    from helpers import TARGET
    from transformers import AutoTokenizer

    arms = {
        arm: {"dataset.mode": "subset", "dataset.data_path": str(path), "training.model.name": str(TARGET)}
        for arm, path in (("random", short), ("verbose", long))
    }
    plan = finetune_plan(cfg, 160, arms)
    assert plan["random"]["training.max_steps"] == 50  # ceil(10 * 160 / 32): the reference keeps the steps
    # Same trained tokens: steps scale with the inverse of the mean sample length (target tokenizer).

    tok = AutoTokenizer.from_pretrained(TARGET)

    def length(path):
        row = json.loads(path.read_text().splitlines()[0])
        return len(
            tok(tok.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
        )

    assert length(long) > 2 * length(short)
    assert plan["verbose"]["training.max_steps"] == round(50 * length(short) / length(long))


def _tiny_summary():
    return {
        "name": "t",
        "num_candidates": 100,
        "corrupted_candidates": 30,
        "noise_rate": 0.3,
        "selection_percentage": 0.3,
        "compute": {"match": "steps", "epochs": 12.0},
        "seeds": [0, 1],
        "confidence": 0.95,
        "families": {"garbage": {"n": 15, "kind": "surprising"}, "echo": {"n": 15, "kind": "predictable"}},
        "held_out_families": ["echo"],
        "arms": {
            "quality_gate": {
                "kept": 30,
                "auroc": 0.9,
                "eval_loss": 1.5,
                "exact_match": 0.4,
                "finetune_steps": 23,
                "per_kind": {
                    "garbage": {"auroc": 0.99, "kept_share": 0.0},
                    "echo": {"auroc": 0.4, "kept_share": 0.6},
                },
                "vs_random": {
                    "eval_loss": {"difference": -0.1, "low": -0.2, "high": -0.05, "verdict": "better"}
                },
            },
            "quality_gate (alpha=0)": {"kept": 30, "auroc": 0.7, "selection_only": True},
        },
        "verdicts": ["quality_gate is better than random on held-out loss"],
        "selection_cost": {},
    }


def test_render_markdown_states_compute_intervals_and_families():
    summary = _tiny_summary()
    md = render_markdown(summary)
    assert "compute matched by steps (12 epochs of a k-selection)" in md
    assert "-0.1000 [-0.2000, -0.0500]" in md
    assert "echo (predictable, held out)" in md and "0.400 (0.60)" in md
    assert "quality_gate (alpha=0) (selection only)" in md
    assert "- quality_gate is better than random on held-out loss" in md


def test_an_arm_is_a_selector_optionally_with_a_diversity_rule():
    from quality_gate.errors import ConfigError

    cfg = make_config("experiment", {"selectors": ["quality_gate+cluster", "ifd+threshold", "random"]})
    assert list(cfg.selectors) == ["quality_gate+cluster", "ifd+threshold", "random"]
    for bad, named in (("quality_gate+kmeans", "kmeans"), ("gates+cluster", "gates")):
        with pytest.raises(ConfigError, match=rf"unknown \['{named}'\].*<selector>\+threshold or \+cluster"):
            make_config("experiment", {"selectors": [bad]})


def test_composition_hand_example(tmp_path):
    import json

    from quality_gate.experiment.statistics import composition

    pool = [{"id": f"a{i}", "meta": {"task": "add"}} for i in range(6)] + [
        {"id": f"d{i}", "meta": {"task": "describe"}} for i in range(4)
    ]
    pool.append({"id": "x", "meta": {}})  # no task: not counted

    def write(name, ids):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
        return path

    files = {
        "qg": {0: write("qg.jsonl", ["a0", "a1", "a2", "a3"])},  # only "add"
        "random": {0: write("r0.jsonl", ["a0", "d0"]), 1: write("r1.jsonl", ["a1", "a2", "a3", "d1"])},
    }
    comp = composition(pool, files, "task")
    assert comp["pool_share"] == {"add": 0.6, "describe": 0.4}
    # qg keeps 100 % add: ratio 1 / 0.6, 0 / 0.4; distance 0.5 * (0.4 + 0.4) = 0.4.
    assert comp["arms"]["qg"]["ratio"] == {"add": pytest.approx(1.667, abs=1e-3), "describe": 0.0}
    assert comp["arms"]["qg"]["distance"] == pytest.approx(0.4)
    # random: mean of (0.5, 0.5) and (0.75, 0.25) = (0.625, 0.375): distance 0.025.
    assert comp["arms"]["random"]["distance"] == pytest.approx(0.025)
    assert composition(pool, files, "") is None and composition(pool, files, "category") is None


def test_markdown_to_html_tables_lists_and_escaping():
    from quality_gate.html_page import markdown_to_html

    md = "# T <x>\n\n| a | b |\n|---|---|\n| 1 | `c&d` |\n\n- one\n- two <b>\n\nplain"
    page = markdown_to_html(md)
    assert "<h2>T &lt;x&gt;</h2>" in page
    table = "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td><code>c&amp;d</code></td></tr></table>"
    assert table in page
    assert "<ul><li>one</li><li>two &lt;b&gt;</li></ul>" in page and "<p>plain</p>" in page


def test_steps_time_each_title_and_time_a_repeated_title_anew():
    from quality_gate.experiment.runner import Steps

    steps = Steps()
    ticks = iter([0.0, 1.004, 10.0, 12.5, 20.0, 20.25])
    steps.timer._clock = lambda: next(ticks)
    for title in ("select: random", "fine-tune", "select: random"):  # the next budget of a sweep
        with steps.step(title):
            pass
    assert steps.done == 3
    assert steps.timings == {"select: random": 0.25, "fine-tune": 2.5}  # not 1.25: timed anew
    assert list(steps.timings) == ["select: random", "fine-tune"]


def test_results_file_is_the_rendered_summary_under_a_header_naming_its_command(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from quality_gate.experiment.render import render_sweep_markdown
    from quality_gate.experiment.runner import _results_file, write_results

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "demo" / "2026-12-04" / "10-00-00"
    report = run_dir / "select" / "quality_gate" / "selection_report.html"
    md = render_markdown({**_tiny_summary(), "report": str(report)})
    out = write_results(
        tmp_path / "docs" / "demo.md",
        md,
        run_dir,
        "quality-gate experiment results_file=docs/results/demo.md",
    )
    text = out.read_text()
    title, blank, header = text.splitlines()[:3]
    assert title == "# Quality-Gate experiment: t" and blank == ""
    assert header.startswith(
        "Written by `make demo` (= `quality-gate experiment results_file=docs/results/demo.md`) on 20"
    )
    assert " at commit " in header and "from the run dir `outputs/demo/2026-12-04/10-00-00`" in header
    # The summary itself below the header; paths inside the run dir relative, as the header names it.
    assert text.endswith(md.partition("\n")[2].replace(f"{run_dir}/", "outputs/demo/2026-12-04/10-00-00/"))
    assert (
        "Selection report: `outputs/demo/2026-12-04/10-00-00/select/quality_gate/selection_report.html`"
        in text
    )
    assert str(tmp_path) not in text

    sweep = {"name": "sweep", "wall_time_s": 61.0, "cells": [], "resumed_cells": []}
    other = write_results(
        tmp_path / "s.md", render_sweep_markdown(sweep), Path("/elsewhere"), "quality-gate x"
    )
    assert other.read_text().splitlines()[2].startswith("Written by `quality-gate x` on ")
    assert "`/elsewhere`" in other.read_text()

    # The experiment's config key: set, the file is written (outside Hydra the command says so); unset, not.
    _results_file(OmegaConf.create({"results_file": "r.md"}), md, run_dir)
    assert "(called from Python)" in (tmp_path / "r.md").read_text()
    _results_file(OmegaConf.create({"results_file": None}), md, run_dir)
    assert sorted(p.name for p in tmp_path.glob("*.md")) == ["r.md", "s.md"]
