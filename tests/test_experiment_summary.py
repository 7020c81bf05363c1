"""The experiment summary: seed aggregation, verdicts, Markdown."""

from __future__ import annotations

import pytest

from quality_gate.experiment import aggregate, render_markdown, verdicts


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
