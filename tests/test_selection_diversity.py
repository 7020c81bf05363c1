"""Diversity rules and the combined selector, against slow, obviously-correct references, and end to
end through ``run_selection`` on fake router data that carries embeddings."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import fake_record, fake_shard, select_config, write_router_dataset

from quality_gate.errors import ConfigError, SelectionError
from quality_gate.selection import run_selection
from quality_gate.selection.diversity import (
    assign_clusters,
    cluster_quotas,
    cluster_select,
    fit_kmeans,
    threshold_filter,
    unit_rows,
)
from quality_gate.selection.selectors import SelectorScores, combined_scores, rank_normalise


# --------------------------------------------------------------------------------------------- #
# References
# --------------------------------------------------------------------------------------------- #
def cosine(a, b) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def threshold_reference(emb: np.ndarray, order, budget: int, tau: float):
    """Deita's loop, one sample at a time, in float64 pure Python."""
    rows = [[float(v) for v in emb[i]] for i in range(len(emb))]
    kept, skipped = [], []
    for i in order:
        if len(kept) == budget:
            break
        if all(cosine(rows[i], rows[j]) <= tau for j in kept):
            kept.append(int(i))
        else:
            skipped.append(int(i))
    return kept, skipped


def clustered(rng: np.random.Generator, n: int, dim: int, centres: int, spread: float) -> np.ndarray:
    """(n, dim) points around ``centres`` random directions: many near-duplicates."""
    c = rng.normal(size=(centres, dim))
    return c[rng.integers(centres, size=n)] + spread * rng.normal(size=(n, dim))


def quotas_reference(sizes, budget):
    """Hamilton's method with exact fractions: floors, then one seat at a time to the largest remainder."""
    total = sum(sizes)
    if budget >= total:
        return list(sizes)
    exact = [Fraction(budget * s, total) for s in sizes]
    q = [math.floor(e) for e in exact]
    rem = sorted(range(len(sizes)), key=lambda c: (-(exact[c] - q[c]), c))
    for c in rem[: budget - sum(q)]:
        q[c] += 1
    return q


# --------------------------------------------------------------------------------------------- #
# threshold
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.2, 0.8, 0.97])
@pytest.mark.parametrize("block", [1, 5, 64, 4096])
def test_threshold_equals_the_sequential_loop(seed, tau, block):
    rng = np.random.default_rng(seed)
    emb = clustered(rng, 150, 6, 8, 0.3).astype(np.float16)
    order = rng.permutation(150)
    for budget in (1, 10, 40, 150):
        out = threshold_filter(emb, order, budget, tau, block=block)
        kept, skipped = threshold_reference(emb.astype(np.float64), order, budget, tau)
        assert out.kept.tolist() == kept
        assert out.skipped.tolist() == skipped
        assert out.examined == len(kept) + len(skipped)
        assert out.exhausted == (len(kept) < budget)


def test_threshold_in_kept_chunks_equals_the_loop(monkeypatch):
    from quality_gate.selection import diversity

    monkeypatch.setattr(diversity, "KEPT_CHUNK", 3)  # the kept set compared in many small chunks
    rng = np.random.default_rng(7)
    emb = clustered(rng, 300, 5, 6, 0.4)
    order = rng.permutation(300)
    for tau in (0.3, 0.9):
        out = threshold_filter(emb, order, 60, tau, block=16)
        kept, skipped = threshold_reference(emb, order, 60, tau)
        assert out.kept.tolist() == kept and out.skipped.tolist() == skipped


def test_threshold_exhausts_on_duplicates_and_keeps_zero_rows():
    emb = np.ones((6, 4), np.float16)
    emb[4] = 0  # no direction: cosine 0 with everything
    out = threshold_filter(emb, np.arange(6), budget=4, threshold=0.9)
    assert out.kept.tolist() == [0, 4]
    assert out.skipped.tolist() == [1, 2, 3, 5]
    assert out.exhausted and out.examined == 6
    # Deita drops only when cosine > threshold: identical rows (cosine 1) pass a threshold of 1.
    assert threshold_filter(emb, np.arange(6), 3, 1.0).kept.tolist() == [0, 1, 2]


def test_threshold_stops_when_the_budget_is_full():
    emb = np.eye(10, dtype=np.float16)  # orthogonal: nothing is a duplicate
    out = threshold_filter(emb, np.arange(10)[::-1], budget=3, threshold=0.5)
    assert out.kept.tolist() == [9, 8, 7] and out.examined == 3 and not out.exhausted


# --------------------------------------------------------------------------------------------- #
# cluster
# --------------------------------------------------------------------------------------------- #
def test_quotas_hand_example():
    # exact shares 2.5, 1.5, 1.0: floors 2, 1, 1; the one seat left goes to the tie 0.5 / 0.5 -> cluster 0.
    assert cluster_quotas(np.array([5, 3, 2]), 5).tolist() == [3, 1, 1]
    assert cluster_quotas(np.array([5, 3, 0]), 20).tolist() == [5, 3, 0]


def test_quotas_against_exact_fractions():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 40, size=rng.integers(1, 12))
        if sizes.sum() == 0:
            continue
        budget = int(rng.integers(0, sizes.sum() + 5))
        q = cluster_quotas(sizes, budget)
        assert q.tolist() == quotas_reference(sizes.tolist(), budget)
        assert q.sum() == min(budget, sizes.sum()) and (q <= sizes).all()
        if budget < sizes.sum():
            exact = budget * sizes / sizes.sum()
            assert (np.abs(q - exact) < 1).all()


def test_cluster_select_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n, k = int(rng.integers(5, 60)), int(rng.integers(1, 6))
        score = rng.integers(0, 5, n).astype(float)  # many ties: broken by id
        ids = np.array([f"s{rng.integers(1000):03d}_{i}" for i in range(n)])
        labels = rng.integers(0, k, n)
        cand = rng.random(n) < 0.8
        budget = int(rng.integers(0, cand.sum() + 1))
        selected, info = cluster_select(score, ids, cand, labels, k, budget)
        sizes = [int((cand & (labels == c)).sum()) for c in range(k)]
        quotas = quotas_reference(sizes, budget)
        want = set()
        for c in range(k):
            members = [i for i in range(n) if cand[i] and labels[i] == c]
            members.sort(key=lambda i: (-score[i], ids[i]))
            want |= set(members[: quotas[c]])
        assert set(np.flatnonzero(selected).tolist()) == want
        assert info["sizes"] == sizes and info["quotas"] == quotas and info["kept"] == quotas
        assert selected.sum() == budget


def test_kmeans_assignment_is_the_nearest_centroid_and_finds_planted_clusters():
    rng = np.random.default_rng(3)
    emb = clustered(rng, 400, 8, 5, 0.05).astype(np.float16)
    valid = np.ones(400, bool)
    valid[::7] = False
    rows = np.flatnonzero(valid)
    km = fit_kmeans(emb, rows, 5, seed=0, fit_samples=10_000)
    labels = assign_clusters(emb, rows, km.centroids)
    assert (labels[~valid] == -1).all()
    x = unit_rows(emb).astype(np.float64)
    c = km.centroids.astype(np.float64)
    for i in rows:  # brute force: squared distance to every centroid
        d = [float(((x[i] - c[j]) ** 2).sum()) for j in range(len(c))]
        assert d[labels[i]] <= min(d) + 1e-5
    # Lloyd's fixed point: each centroid is the mean of its members.
    assert km.converged
    for j in range(5):
        assert np.allclose(c[j], x[rows][labels[rows] == j].mean(axis=0), atol=1e-5)
    # Well separated blobs come back as they were planted (one label per blob, up to renaming).
    pairs = {(int(a), int(b)) for a, b in zip(labels[rows], _planted(rows))}
    assert len(pairs) == 5
    # Deterministic for a seed.
    again = fit_kmeans(emb, rows, 5, seed=0, fit_samples=10_000)
    assert np.array_equal(again.centroids, km.centroids)


def _planted(rows):
    """The blob of each row in ``clustered(default_rng(3), 400, 8, 5, ...)`` (same draws)."""
    rng = np.random.default_rng(3)
    rng.normal(size=(5, 8))
    return rng.integers(5, size=400)[rows]


def test_kmeans_on_a_subsample_still_labels_every_row():
    rng = np.random.default_rng(4)
    emb = clustered(rng, 3000, 4, 3, 0.1).astype(np.float16)
    rows = np.arange(3000)
    km = fit_kmeans(emb, rows, 3, seed=1, fit_samples=500)
    assert km.fit_rows == 500
    labels = assign_clusters(emb, rows, km.centroids)
    assert (labels >= 0).all() and len(np.unique(labels)) == 3


# --------------------------------------------------------------------------------------------- #
# combined
# --------------------------------------------------------------------------------------------- #
def test_rank_normalise_hand_example():
    r = rank_normalise(np.array([0.5, 0.5, 0.1, 9.0]), np.array([True, True, True, False]))
    # ascending: 0.1 -> rank 1, the tied 0.5s -> average rank 2.5; (rank - 1) / (n - 1).
    assert r[:3].tolist() == [0.75, 0.75, 0.0] and np.isnan(r[3])
    assert rank_normalise(np.array([3.0]), np.array([True])).tolist() == [1.0]


def test_combined_hand_example():
    qg = SelectorScores(np.array([0.1, 0.4, 0.3, 0.2, 0.9]), np.array([True] * 5))
    ppl = SelectorScores(
        np.array([-1.0, -4.0, -2.0, -3.0, np.nan]), np.array([True, True, True, True, False])
    )
    groups = {"all": np.ones(5, bool)}
    out = combined_scores(
        {"quality_gate": qg, "perplexity": ppl}, {"quality_gate": 1.0, "perplexity": 3.0}, groups
    )
    # Among the 4 samples both may keep: qg ranks s0 0, s3 1/3, s2 2/3, s1 1; perplexity s1 0, s3 1/3,
    # s2 2/3, s0 1. Weighted mean (r_q + 3 r_p) / 4:
    assert np.allclose(out.score[:4], [0.75, 0.25, 2 / 3, 1 / 3])
    assert np.isnan(out.score[4]) and out.eligible.tolist() == [True, True, True, True, False]
    # A weight of 0 leaves a selector out (and its eligibility with it).
    only_q = combined_scores(
        {"quality_gate": qg, "perplexity": ppl}, {"quality_gate": 2.0, "perplexity": 0}, groups
    )
    assert np.allclose(only_q.score, [0.0, 0.75, 0.5, 0.25, 1.0])
    # Per dataset: ranks within each group.
    per = combined_scores(
        {"quality_gate": qg}, {"quality_gate": 1.0}, {"a": np.arange(5) < 2, "b": np.arange(5) >= 2}
    )
    assert np.allclose(per.score, [0.0, 1.0, 0.5, 0.0, 1.0])


def test_command_line_sets_weights_without_plus():
    from helpers import compose

    cfg = compose(
        "select",
        ["root_dir=x", "selector=combined", "combined_weights.ifd=0.5", "combined_weights.perplexity=0"],
    )
    assert dict(cfg.combined_weights) == {"quality_gate": 1.0, "perplexity": 0.0, "ifd": 0.5, "random": 0.0}


def test_config_rejects_bad_weights_and_modes():
    with pytest.raises(ConfigError, match="unknown selectors"):
        select_config(root_dir="x", combined_weights={"bogus": 1.0})
    with pytest.raises(ConfigError, match="one > 0"):
        select_config(root_dir="x", combined_weights={"quality_gate": 0.0, "perplexity": 0.0})
    with pytest.raises(ConfigError, match="diversity"):
        select_config(root_dir="x", diversity="dedupe")


# --------------------------------------------------------------------------------------------- #
# End to end
# --------------------------------------------------------------------------------------------- #
N_ALPHA, N_BETA, DIM = 36, 24, 16


def embeddings_of(n: int, seed: int) -> np.ndarray:
    """Near-duplicate groups of 4: the threshold rule has something to skip, k-means something to find."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n // 4 + 1, DIM))
    return (np.repeat(base, 4, axis=0)[:n] + 0.15 * rng.normal(size=(n, DIM))).astype(np.float16)


def make_stage2(root: Path, embed: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(0)
    vectors: dict[str, np.ndarray] = {}
    for k, (name, n) in enumerate((("alpha", N_ALPHA), ("beta", N_BETA))):
        ids = [f"{name}_{i}" for i in range(n)]
        emb = embeddings_of(n, k)
        vectors.update(zip(ids, emb))
        lengths = torch.randint(2, 12, (n,), generator=g).tolist()
        half = n // 2
        shards = [
            fake_shard(ids[:half], lengths[:half], 3, g, True, embeddings=emb[:half] if embed else None),
            fake_shard(ids[half:], lengths[half:], 3, g, True, embeddings=emb[half:] if embed else None),
        ]
        records = [
            fake_record(name, sid, {"corruption": "shuffle" if i % 3 == 0 else "none"})
            for i, sid in enumerate(ids)
        ]
        write_router_dataset(root / "router_data", name, shards, records=records)
    return root, vectors


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    return make_stage2(tmp_path_factory.mktemp("div"))


def _table(out_dir: Path):
    return pq.read_table(out_dir / "scores.parquet").to_pandas()


def _walk_order(table):
    """The selection's walk: eligible samples by rank (rank -1 = may not be kept)."""
    t = table[table["rank"] >= 0].sort_values("rank")
    return t.id.tolist()


@pytest.mark.parametrize("selector", ["quality_gate", "perplexity", "ifd", "random", "combined"])
def test_threshold_end_to_end_for_every_selector(stage2, selector):
    root, vectors = stage2
    res = run_selection(
        select_config(
            root_dir=str(root),
            selector=selector,
            diversity="threshold",
            diversity_threshold=0.8,
            selection_percentage=0.5,
        )
    )
    out = root / f"selection_{selector}_threshold"
    assert res.output_dir == out
    table = _table(out)
    walk = _walk_order(table)
    budget = math.ceil(0.5 * len(table))
    emb = np.stack([vectors[i] for i in walk]).astype(np.float64)
    kept_ref, skipped_ref = threshold_reference(emb, range(len(walk)), budget, 0.8)
    kept_ids = [json.loads(line)["id"] for line in (out / "selected_data.jsonl").read_text().splitlines()]
    assert set(kept_ids) == {walk[i] for i in kept_ref}
    assert set(table[table.near_duplicate_skipped].id) == {walk[i] for i in skipped_ref}
    summary = json.loads((out / "selection_summary.json").read_text())
    div = summary["diversity"]
    assert div["mode"] == "threshold" and div["threshold"] == 0.8
    assert div["skipped_near_duplicates"] == len(skipped_ref) > 0
    assert div["groups"]["all"]["kept"] == len(kept_ref) == summary["num_selected"]
    assert div["pool_exhausted"] == (len(kept_ref) < budget)
    # The audit judges every selector under the same rule (every sample here is labelled).
    audit = summary["corruption_audit"]["selectors"]
    assert audit[selector]["kept_labelled"] == len(kept_ref)
    assert all(row["kept_labelled"] <= budget for row in audit.values())
    for a in kept_ids:  # no two kept samples are near-duplicates
        for b in kept_ids:
            assert a == b or cosine(vectors[a].astype(float), vectors[b].astype(float)) <= 0.8 + 1e-6


def test_threshold_pool_runs_out(stage2):
    root, _ = stage2
    res = run_selection(
        select_config(
            root_dir=str(root),
            diversity="threshold",
            diversity_threshold=-1.0,
            selection_percentage=0.5,
            output_dir=str(root / "strict"),
        )
    )
    summary = json.loads((root / "strict" / "selection_summary.json").read_text())
    # cos > -1 for any two non-opposite vectors: only the best sample passes.
    assert res.selected.sum() == 1 and summary["num_selected"] == 1
    assert summary["diversity"]["pool_exhausted"] is True
    assert summary["diversity"]["groups"]["all"]["budget"] == 30


def test_cluster_end_to_end_per_dataset(stage2):
    root, _ = stage2
    settings = dict(
        root_dir=str(root),
        diversity="cluster",
        diversity_clusters=4,
        per_dataset=True,
        selection_percentage=0.3,
    )
    res = run_selection(select_config(**settings))
    out = root / "selection_quality_gate_cluster"
    table = _table(out)
    summary = json.loads((out / "selection_summary.json").read_text())
    assert summary["diversity"]["kmeans"]["clusters"] == 4
    for group, n in (("alpha", N_ALPHA), ("beta", N_BETA)):
        t = table[(table.dataset == group) & (table["rank"] >= 0)]
        budget = math.ceil(0.3 * n)
        sizes = [int((t.cluster == c).sum()) for c in range(4)]
        quotas = quotas_reference(sizes, budget)
        g = summary["diversity"]["groups"][group]
        assert g["cluster_sizes"] == sizes and g["cluster_quotas"] == quotas and g["cluster_kept"] == quotas
        assert g["kept"] == budget == int(t.selected.sum())
        for c in range(4):  # the kept of each cluster are its best q
            members = t[t.cluster == c].sort_values(["q", "id"], ascending=[False, True])
            assert set(members.id[: quotas[c]]) == set(members[members.selected].id)
    # Labels are the nearest centroid of a deterministic fit: a second run labels the same.
    again = run_selection(select_config(**settings, output_dir=str(root / "again")))
    assert np.array_equal(again.diversity.labels, res.diversity.labels)
    assert np.array_equal(again.selected, res.selected)


@pytest.mark.parametrize("pool", [1.0, 1.5, 2.0, 100.0])
def test_cluster_pool_quotas_follow_the_top_of_the_ranking(stage2, pool):
    """``diversity_pool=P``: the candidates are the top ``ceil(P x budget)`` by score (pure Python
    reference); quotas follow their clusters; ``P = 1`` keeps exactly the plain top by score."""
    root, _ = stage2
    out = root / f"pool{pool:g}"
    res = run_selection(
        select_config(
            root_dir=str(root),
            diversity="cluster",
            diversity_clusters=4,
            diversity_pool=pool,
            selection_percentage=0.25,
            output_dir=str(out),
        )
    )
    table = _table(out)
    walk = _walk_order(table)  # eligible ids, best first
    budget = math.ceil(0.25 * len(table))
    top = walk[: math.ceil(pool * budget)]
    cluster = dict(zip(table.id, table.cluster))
    sizes = [sum(cluster[i] == c for i in top) for c in range(4)]
    quotas = quotas_reference(sizes, budget)
    want = {i for c in range(4) for i in [j for j in top if cluster[j] == c][: quotas[c]]}
    kept = set(table[table.selected].id)
    assert kept == want and len(kept) == budget == res.selected.sum()
    if pool == 1.0:
        assert kept == set(walk[:budget])
    summary = json.loads((out / "selection_summary.json").read_text())
    assert summary["diversity"]["pool"] == pool and summary["parameters"]["diversity_pool"] == pool
    assert summary["diversity"]["groups"]["all"]["candidates"] == len(top)


def test_cluster_pool_between_0_and_1_is_refused():
    with pytest.raises(ConfigError, match=r"diversity_pool=0.5: 0 \(all valid samples\) or a factor >= 1"):
        select_config(root_dir="x", diversity="cluster", diversity_pool=0.5)


def test_combined_end_to_end(stage2):
    from scipy.stats import rankdata

    root, _ = stage2
    run_selection(
        select_config(
            root_dir=str(root),
            selector="combined",
            combined_weights={"quality_gate": 2.0, "perplexity": 1.0},
            selection_percentage=0.25,
        )
    )
    out = root / "selection_combined"
    table = _table(out)
    ok = table.valid.to_numpy()
    rq = (rankdata(table.q[ok]) - 1) / (ok.sum() - 1)
    rp = (rankdata(-table.ppl_score[ok]) - 1) / (ok.sum() - 1)
    assert np.allclose(table.combined[ok], (2 * rq + rp) / 3)
    top = table[ok].sort_values(["combined", "id"], ascending=[False, True]).id[: math.ceil(0.25 * ok.sum())]
    assert set(top) == set(table[table.selected].id)
    summary = json.loads((out / "selection_summary.json").read_text())
    assert summary["parameters"]["combined_weights"] == {
        "quality_gate": 2.0,
        "perplexity": 1.0,
        "ifd": 0.0,
        "random": 0.0,
    }
    assert "combined" in summary["corruption_audit"]["selectors"]


def test_diversity_without_embeddings_is_a_clear_error(tmp_path):
    root, _ = make_stage2(tmp_path, embed=False)
    with pytest.raises(SelectionError, match=r"data_process.embedding_dim > 0"):
        run_selection(select_config(root_dir=str(root), diversity="cluster"))
    # diversity=none needs none.
    run_selection(select_config(root_dir=str(root)))
