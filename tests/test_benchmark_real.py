"""The real-label benchmark: pools, halves, metrics, and a whole run on the tiny selector."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import SELECTOR

from quality_gate.benchmarks.metrics import (
    labelled_metrics,
    length_residual,
    pair_accuracy,
    paired_metrics,
    precision_at,
)
from quality_gate.benchmarks.pools import (
    ALPAGASUS_RANDOM_FILE,
    ALPAGASUS_TOP_FILE,
    COACHLM_FILE,
    alpagasus_pool,
    coachlm_pool,
    split_and_sample,
)
from quality_gate.benchmarks.real import Settings, run_benchmark
from quality_gate.errors import MissingPathError


def fake_data_dir(root: Path, pairs: int = 24, samples: int = 40) -> Path:
    """Files in the published formats: revised answers longer, top-rated samples every third."""
    root.mkdir(parents=True, exist_ok=True)
    coach = [
        {
            "Raw Instruction": f"Describe item {i}.",
            "Raw Input": "" if i % 2 else f"context {i}",
            "Raw Response": f"Item {i} is a thing.",
            "Revised Instruction": f"Describe item {i}.",
            "Revised Input": "" if i % 2 else f"context {i}",
            "Revised Response": f"Item {i} is a useful thing, described here in some more detail.",
            "Distance": 10,
        }
        for i in range(pairs)
    ]
    coach.append({**coach[0], "Revised Response": coach[0]["Raw Response"]})  # unchanged: no label
    rows = [
        {"instruction": f"Task {i}?", "input": "", "output": f"Answer {i} " * (1 + i % 4)}
        for i in range(samples)
    ]
    (root / COACHLM_FILE).write_text(json.dumps(coach))
    (root / ALPAGASUS_RANDOM_FILE).write_text(json.dumps(rows))
    (root / ALPAGASUS_TOP_FILE).write_text(json.dumps(rows[::3]))
    return root


def test_metrics_on_hand_made_scores():
    assert pair_accuracy(np.array([2.0, 1.0, 5.0]), np.array([1.0, 1.0, 6.0])) == pytest.approx(0.5)
    labels = np.array([0, 0, 1, 1])
    assert precision_at(np.array([0.1, 0.2, 0.9, 0.3]), labels, 0.25) == 1.0
    # A score that is only length has nothing left beyond length.
    length = np.array([10, 20, 40, 80, 160, 320])
    assert np.allclose(length_residual(np.log(length).astype(float), length), 0, atol=1e-9)
    assert np.allclose(length_residual(-length.astype(float), length), 0, atol=1e-9)
    m = labelled_metrics(np.array([0.0, 1.0, 2.0, 3.0]), labels, np.array([5, 5, 5, 5]))
    assert m["auroc"] == 1.0 and m["base_rate"] == 0.5 and m["auroc_ci"][0] <= 1.0
    pair = np.array([7, 7, 8, 8, 9, 9])
    y = np.array([0, 1, 0, 1, 1, 0])
    score = np.array([1.0, 2.0, 3.0, 1.0, 4.0, 0.0])
    length = np.array([10, 11, 10, 30, 10, 10])
    p = paired_metrics(score, y, length, pair)
    assert p["pairs"] == 3 and p["pair_accuracy"] == pytest.approx(2 / 3)
    assert p["matched_pairs"] == 2 and p["pair_accuracy_length_matched"] == 1.0


def test_halves_never_share_a_row_whatever_the_size():
    usable = list(range(0, 200, 2))
    small = split_and_sample(usable, 10, seed=0)
    large = split_and_sample(usable, 60, seed=0)
    full = split_and_sample(usable, 0, seed=0)
    half_of = dict(full)
    assert len(full) == 100 and sum(h == "tuning" for _, h in full) == 50
    for sample in (small, large):
        assert all(half_of[row] == half for row, half in sample), "a row changed halves with the size"
    assert split_and_sample(usable, 10, seed=0, halves=("tuning",)) == [r for r in small if r[1] == "tuning"]


def test_pools_label_what_the_files_say(tmp_path):
    data = fake_data_dir(tmp_path / "data")
    coach = coachlm_pool(data, 10, seed=0)
    assert len(coach.records) == 20 and len({v["pair"] for v in coach.labels.values()}) == 10
    assert 24 not in {v["pair"] for v in coach.labels.values()}, "an unchanged pair has no label"
    for rid, v in coach.labels.items():
        assert rid.endswith("_revised") == (v["label"] == 1)
    alpa = alpagasus_pool(data, 0, seed=0)
    top = {f"alpagasus_{i}" for i in range(0, 40, 3)}
    assert {rid for rid, v in alpa.labels.items() if v["label"]} == top
    with pytest.raises(MissingPathError, match="--data-dir"):
        coachlm_pool(tmp_path / "nowhere", 4, seed=0)


def test_the_shared_pools_have_their_published_sizes(shared_data_dir):
    coach = coachlm_pool(shared_data_dir, 0, seed=0)
    alpa = alpagasus_pool(shared_data_dir, 0, seed=0)
    # 24 pairs whose response is unchanged (up to surrounding white space) carry no label.
    assert len(coach.records) == 2 * (2301 - 24)
    # 4 rows have an empty instruction or output.
    assert len(alpa.records) == 9225 and sum(v["label"] for v in alpa.labels.values()) == 935


@pytest.mark.slow
def test_a_whole_benchmark_on_the_tiny_selector_resumes(tmp_path, caplog):
    data = fake_data_dir(tmp_path / "data")
    settings = Settings(
        data_dir=str(data),
        out=str(tmp_path / "run"),
        selector_model=str(SELECTOR),
        coachlm_pairs=12,
        alpagasus_samples=24,
        max_length=64,
        warmup_samples=16,
        variants=("identity",),
        threads=1,
        results=str(tmp_path / "results.md"),
    )
    summary = run_benchmark(settings, "test")
    results = summary["results"]
    assert set(results) == {"coachlm", "alpagasus"} and set(results["coachlm"]) == {"tuning", "heldout"}
    rows = results["coachlm"]["tuning"]
    assert set(rows) == {"quality_gate[identity]", "unwarmed", "perplexity", "ifd", "length", "random"}
    assert all(m["missing"] == 0 and m["pairs"] == 6 for m in rows.values())
    # The revised answers are longer here: the length selector ranks every pair right.
    assert rows["length"]["pair_accuracy"] == 1.0 and rows["length"]["auroc_length_residual"] == 0.5
    assert summary["warmup"]["identity"]["lm_loss"]["at_init"] == pytest.approx(
        summary["warmup"]["identity"]["lm_loss"]["released"], abs=1e-6
    )
    md = (tmp_path / "results.md").read_text()
    assert "CoachLM" in md and "quality_gate[identity]" in md

    caplog.clear()
    caplog.set_level(logging.INFO, logger="quality_gate.benchmarks.real")
    again = run_benchmark(settings, "test")
    reused = [r.message for r in caplog.records if "reused" in r.message]
    # pools, released Stage 2 x 2 halves, Stage 1 and Stage 2 x 2 halves of the variant
    assert len(reused) == 6, reused
    assert json.dumps(again["results"]) == json.dumps(summary["results"])  # NaN != NaN in a dict compare
