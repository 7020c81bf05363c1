"""The experiment summary: kept-corruption share, AUROC, seed aggregation, verdicts, Markdown."""

from __future__ import annotations

import math

import pytest

from quality_gate.experiment import aggregate, load_stage_config, render_markdown, selection_metrics, verdicts


def test_selection_metrics_hand_computed() -> None:
    labels = {"a": "none", "b": "none", "c": "garbage", "d": "wrong_answer", "e": "none"}
    # Clean a, b, e score 0.9, 0.2, 0.7; corrupted c, d score 0.5, 0.1.
    # Pairs (clean, corrupted) ranked correctly: a>c a>d b>d e>c e>d = 5 of 6 -> AUROC 5/6.
    score = {"a": 0.9, "b": 0.2, "c": 0.5, "d": 0.1, "e": 0.7}
    m = selection_metrics(["a", "e", "c"], labels, score)
    assert m["kept"] == 3
    assert m["corrupted_kept_share"] == pytest.approx(1 / 3)
    assert m["auroc_clean_vs_corrupted"] == pytest.approx(5 / 6)


def test_selection_metrics_ties_and_missing() -> None:
    labels = {"a": "none", "b": "garbage"}
    # A tie counts one half; samples that cannot be scored (-inf) still rank last.
    assert selection_metrics(["a"], labels, {"a": 1.0, "b": 1.0})["auroc_clean_vs_corrupted"] == 0.5
    # A sample the selector may not keep (-inf) ranks below every other; NaN is left out.
    m = selection_metrics([], labels, {"a": 0.0, "b": -math.inf})
    assert m["corrupted_kept_share"] is None and m["auroc_clean_vs_corrupted"] == 1.0
    assert selection_metrics([], labels, {"a": 0.0, "b": math.nan})["auroc_clean_vs_corrupted"] is None
    assert selection_metrics(["a"], {"a": "none"}, {"a": 1.0})["auroc_clean_vs_corrupted"] is None


def test_aggregate_mean_and_std() -> None:
    rows = [
        {"exact_match": 0.2, "kept": 10},
        {"exact_match": 0.4, "kept": 10},
        {"exact_match": 0.6, "kept": 10},
    ]
    agg = aggregate(rows)
    assert agg["n_seeds"] == 3
    assert agg["exact_match"] == pytest.approx(0.4)
    assert agg["exact_match_std"] == pytest.approx(0.2)
    assert agg["eval_loss"] is None


def test_verdicts_say_better_worse_and_noise() -> None:
    arms = {
        "quality_gate": {"exact_match": 0.9, "eval_loss": 2.0, "corrupted_kept_share": 0.29},
        "random": {
            "n_seeds": 3,
            "exact_match": 0.5,
            "exact_match_std": 0.05,
            "eval_loss": 1.0,
            "eval_loss_std": 0.1,
            "corrupted_kept_share": 0.3,
            "corrupted_kept_share_std": 0.02,
        },
    }
    text = "\n".join(verdicts(arms))
    assert "better than random on exact match" in text
    assert "WORSE than random on held-out loss" in text
    assert "no clear difference from random on corrupted share of kept" in text


def test_render_markdown_has_every_arm() -> None:
    summary = {
        "name": "t",
        "selection_percentage": 0.3,
        "num_candidates": 10,
        "corrupted_candidates": 3,
        "arms": {
            "quality_gate": {"kept": 3, "exact_match": 0.5},
            "random": {"kept": 3.0, "exact_match": 0.25, "exact_match_std": 0.1},
        },
        "verdicts": ["x"],
        "report": "r.html",
    }
    md = render_markdown(summary)
    assert "| quality_gate | 3 |" in md
    assert "0.2500 ± 0.1000" in md
    assert "- x" in md


def test_load_stage_config_applies_overrides_and_drops_hydra() -> None:
    cfg = load_stage_config("experiment", {"selection_percentage": 0.1, "overrides.finetune": {"a": 1}})
    assert "hydra" not in cfg
    assert cfg.selection_percentage == 0.1
    assert cfg.overrides.finetune.a == 1
    with pytest.raises(FileNotFoundError):
        load_stage_config("no_such_config")
