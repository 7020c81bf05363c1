"""The vectorised, streamed score equals a line-by-line reference of method.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import fake_shard, write_router_dataset

from quality_gate.selection.scoring import ScoreParams, collect_sample_stats, quality_scores, token_weights


def reference_q(samples, alpha, eps, tau):
    """method.md, literally. samples: list of (gates [T][L] floats, ppl [T] floats)."""
    S = []
    for gates, ppl in samples:
        z = sum(p**alpha for p in ppl)
        w = [p**alpha / (z + eps) for p in ppl]
        S.append([sum(w[t] * gates[t][layer] for t in range(len(ppl))) for layer in range(len(gates[0]))])
    n, num_layers = len(S), len(S[0])
    q = []
    for i in range(n):
        r = []
        for layer in range(num_layers):
            col = [S[j][layer] for j in range(n)]
            a, b, mu = min(col), max(col), sum(col) / n
            d = max(mu, eps) if tau == 0 else mu + tau
            r.append((S[i][layer] - a) / (max(b - a, eps) * d))
        q.append(sum(r) / num_layers)
    return S, q


def _shards(rng_seed: int, num_layers: int = 5):
    g = torch.Generator().manual_seed(rng_seed)
    lengths = [[3, 1, 7, 4], [6, 2], [5, 9, 1]]
    shards = []
    k = 0
    for ls in lengths:
        ids = [f"s{k + j:03d}" for j in range(len(ls))]
        k += len(ls)
        shard = fake_shard(ids, ls, num_layers, g)
        shard["gates"][:, 1] = 0.25  # constant column: b_1 == a_1 (up to the eps-scaled weight sum)
        shard["gates"][:, 3] = 0.0  # a layer whose mean is 0
        shards.append(shard)
    return shards


def _as_samples(shards, scope: str):
    out = []
    for s in shards:
        off = 0
        for n in s["lengths"].tolist():
            rows = range(off, off + n)
            if scope == "assistant":
                rows = [t for t in rows if bool(s["assistant_mask"][t])]
            gates = [[float(v) for v in s["gates"][t].tolist()] for t in rows]
            ppl = [float(s["perplexities"][t]) for t in rows]
            out.append((gates, ppl))
            off += n
    return out


@pytest.mark.parametrize(
    ("alpha", "eps", "tau", "scope"),
    [(1.0, 1e-8, 0.0, "all"), (0.5, 1e-3, 0.0, "all"), (2.0, 1e-8, 0.1, "assistant"), (0.0, 0.5, 1.0, "all")],
)
def test_scores_match_reference(tmp_path, alpha, eps, tau, scope):
    shards = _shards(0)
    index = write_router_dataset(tmp_path, "d", shards)
    params = ScoreParams(alpha=alpha, eps=eps, tau=tau, token_scope=scope, pairing="next_token")
    stats = collect_sample_stats([index], params)
    q, cols = quality_scores(stats, params, per_dataset=False)
    S_ref, q_ref = reference_q(_as_samples(shards, scope), alpha, eps, tau)
    np.testing.assert_allclose(stats.S, np.array(S_ref), rtol=1e-10, atol=1e-12)
    # The near-constant column divides rounding noise (~1e-17) by eps * mu_1 (~1e-9): atol 1e-7.
    np.testing.assert_allclose(q, np.array(q_ref), rtol=1e-9, atol=1e-7)
    assert cols["all"].mu[3] == 0.0 and np.all(stats.S[:, 3] == 0.0)
    assert stats.valid.all()


def test_weights_overflow_safe_and_keep_eps():
    # NLL 80 with alpha 20: ppl^alpha = e^1600 overflows float64; with eps = 0 w is a softmax.
    nll = torch.tensor([80.0, 79.0, 1.0, 3.0], dtype=torch.float64)
    seg = torch.tensor([0, 0, 1, 1])
    w = token_weights(torch.exp(nll).float(), seg, 2, alpha=20.0, eps=0.0)
    x = 20.0 * torch.log(torch.exp(nll).float().double())
    expected = torch.cat([torch.softmax(x[:2], 0), torch.softmax(x[2:], 0)])
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0.0)
    # ppl = 1 everywhere: w = 1 / (T + eps) exactly, eps not dropped.
    w = token_weights(torch.ones(3), torch.zeros(3, dtype=torch.int64), 1, alpha=3.0, eps=0.5)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3.5, dtype=torch.float64))
    # eps dominates a sample of tiny ppl^alpha (alpha < 0 here): weights are small but finite.
    w = token_weights(torch.tensor([math.e**50]), torch.zeros(1, dtype=torch.int64), 1, alpha=-20.0, eps=1.0)
    assert torch.isfinite(w).all() and float(w) == pytest.approx(math.exp(-1000) / (math.exp(-1000) + 1.0))


def test_scope_without_positions_is_invalid(tmp_path):
    g = torch.Generator().manual_seed(1)
    shard = fake_shard(["a", "b", "c"], [4, 3, 5], 2, g)
    shard["assistant_mask"][4:7] = False  # sample b has no assistant position
    index = write_router_dataset(tmp_path, "d", [shard])
    stats = collect_sample_stats([index], ScoreParams(token_scope="assistant", pairing="next_token"))
    assert stats.valid.tolist() == [True, False, True]
    assert "token_scope=assistant" in stats.invalid_reason[1]
    assert np.isnan(stats.S[1]).all()
    q, _ = quality_scores(
        stats, ScoreParams(token_scope="assistant", pairing="next_token"), per_dataset=False
    )
    assert np.isnan(q[1]) and np.isfinite(q[[0, 2]]).all()


def test_multi_dataset_columns_global_vs_per_dataset(tmp_path):
    g = torch.Generator().manual_seed(2)
    a = fake_shard(["a0", "a1", "a2"], [3, 4, 5], 3, g)
    b = fake_shard(["b0", "b1"], [2, 6], 3, g)
    b["gates"] = (b["gates"].float() * 0.2 + 0.8).half()  # dataset b's gates are all high
    ia = write_router_dataset(tmp_path, "a", [a])
    ib = write_router_dataset(tmp_path, "b", [b])
    params = ScoreParams(pairing="next_token")
    stats = collect_sample_stats([ia, ib], params)
    q_global, cols = quality_scores(stats, params, per_dataset=False)
    _, q_ref = reference_q(_as_samples([a, b], "all"), 1.0, 1e-8, 0.0)
    np.testing.assert_allclose(q_global, q_ref, rtol=1e-9)
    q_per, cols_per = quality_scores(stats, params, per_dataset=True)
    _, q_ref_a = reference_q(_as_samples([a], "all"), 1.0, 1e-8, 0.0)
    _, q_ref_b = reference_q(_as_samples([b], "all"), 1.0, 1e-8, 0.0)
    np.testing.assert_allclose(q_per, q_ref_a + q_ref_b, rtol=1e-9)
    assert set(cols) == {"all"} and set(cols_per) == {"a", "b"}
    assert q_global[3:].min() > q_global[:3].max()  # globally, b dominates


def test_bad_params():
    with pytest.raises(ValueError, match="token_scope"):
        ScoreParams(token_scope="user")
    with pytest.raises(ValueError, match="tau"):
        ScoreParams(tau=-1.0)


def _as_samples_same_token(shards, scope: str):
    """Pairing same_token: gate at token t (stored row t) with perplexity of token t (stored row t-1)."""
    out = []
    for s in shards:
        off = 0
        for n in s["lengths"].tolist():
            pairs = [(off + t, off + t - 1) for t in range(1, n)]
            if scope == "assistant":
                pairs = [(g, p) for g, p in pairs if bool(s["assistant_mask"][p])]
            gates = [[float(v) for v in s["gates"][g].tolist()] for g, _ in pairs]
            out.append((gates, [float(s["perplexities"][p]) for _, p in pairs]))
            off += n
    return out


@pytest.mark.parametrize("scope", ["all", "assistant"])
def test_same_token_pairing_matches_reference(tmp_path, scope):
    g = torch.Generator().manual_seed(3)
    shards = [fake_shard(["a", "b", "c"], [4, 6, 3], 3, g), fake_shard(["d", "e"], [5, 8], 3, g)]
    for s in shards:
        s["assistant_mask"][:] = True
        s["assistant_mask"][::3] = False
    index = write_router_dataset(tmp_path, "d", shards)
    params = ScoreParams(alpha=1.0, token_scope=scope, pairing="same_token")
    stats = collect_sample_stats([index], params)
    q, _ = quality_scores(stats, params, per_dataset=False)
    S_ref, q_ref = reference_q(_as_samples_same_token(shards, scope), 1.0, 1e-8, 0.0)
    assert stats.valid.all()
    np.testing.assert_allclose(stats.S, np.array(S_ref), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q, np.array(q_ref), rtol=1e-9, atol=1e-9)
    # The pairing leaves the perplexity baseline alone: it is over every stored position in scope.
    plain = collect_sample_stats([index], ScoreParams(token_scope=scope))
    np.testing.assert_allclose(stats.mean_nll, plain.mean_nll)
    with pytest.raises(ValueError, match="pairing"):
        ScoreParams(pairing="previous")
