"""The corruption audit (selection summary, report and experiment runner) against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quality_gate.selection.audit import corruption_audit
from quality_gate.selection.scoring import SampleStats
from quality_gate.selection.selectors import selector_scores


def _stats(scores: list[float], valid: list[bool] | None = None) -> SampleStats:
    n = len(scores)
    valid_arr = np.ones(n, bool) if valid is None else np.asarray(valid)
    return SampleStats(
        ids=[chr(ord("a") + i) for i in range(n)],
        datasets=["d"] * n,
        S=np.zeros((n, 2)),
        mean_nll=-np.asarray(scores, dtype=float),  # the perplexity selector scores -mean_nll
        length=np.full(n, 5),
        response_tokens=np.full(n, 3),
        scope_positions=np.full(n, 5),
        valid=valid_arr,
        invalid_reason=["" if v else "x" for v in valid_arr],
        ifd=np.full(n, np.nan),
        has_ifd={"d": False},
        index_paths={"d": Path("d_router_data.pt")},
    )


def _audit(scores, kinds, k, valid=None):
    stats = _stats(scores, valid)
    sc = {"perplexity": selector_scores("perplexity", stats, np.zeros(len(scores)), 0)}
    return corruption_audit(stats, sc, kinds, k, per_dataset=False)["selectors"]["perplexity"]


KINDS = ["none", "none", "garbage", "wrong_answer", "none"]
SCORES = [0.9, 0.2, 0.5, 0.1, 0.7]  # a b c d e


def test_hand_computed_shares_and_auroc():
    row = _audit(SCORES, KINDS, 0.6)
    # Kept: ceil(0.6 * 5) = 3 -> a, e, c: one of three corrupted.
    assert row["kept_labelled"] == 3 and row["corrupted_share_of_kept"] == pytest.approx(1 / 3)
    # Clean above corrupted: a>c a>d e>c e>d b>d = 5 of 6 pairs.
    assert row["auroc"] == pytest.approx(5 / 6)
    # Per kind: garbage (c) is beaten by a and e, not b -> 2/3; wrong_answer (d) by all three -> 1.
    assert row["per_kind"]["garbage"]["auroc"] == pytest.approx(2 / 3)
    assert row["per_kind"]["wrong_answer"]["auroc"] == pytest.approx(1.0)
    assert (
        row["per_kind"]["garbage"]["kept_share"] == 1.0 and row["per_kind"]["wrong_answer"]["kept_share"] == 0
    )
    assert row["clean_kept_share"] == pytest.approx(2 / 3)


def test_invalid_samples_rank_last_and_ties_count_half():
    # b (clean) is invalid: it ranks below everything, so b>d no longer holds: 4 of 6.
    row = _audit(SCORES, KINDS, 0.6, valid=[True, False, True, True, True])
    assert row["auroc"] == pytest.approx(4 / 6)
    # Budget counts valid samples only: ceil(0.6 * 4) = 3.
    assert row["kept_labelled"] == 3
    assert _audit([1.0, 1.0], ["none", "garbage"], 0.5)["auroc"] == pytest.approx(0.5)


def test_unlabelled_pools_and_one_class():
    stats = _stats(SCORES)
    sc = {"perplexity": selector_scores("perplexity", stats, np.zeros(5), 0)}
    assert corruption_audit(stats, sc, [None] * 5, 0.5, False) is None
    assert _audit([0.3, 0.2], ["none", "none"], 0.5)["auroc"] is None


def test_length_selector_keeps_the_longest_responses():
    stats = _stats([0.0, 0.0, 0.0, 0.0], valid=[True, True, True, False])
    stats.response_tokens = np.array([4, 9, 1, 50])
    sc = selector_scores("length", stats, np.zeros(4), 0)
    assert sc.score.tolist() == [4.0, 9.0, 1.0, 50.0]
    assert sc.eligible.tolist() == [True, True, True, False]  # an invalid sample is never kept
