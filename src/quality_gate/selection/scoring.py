"""The quality score of method.md, streamed over the router data of Stage 2.

For sample ``i`` with stored positions ``t`` (position t pairs token t's gates with the perplexity
of token t+1, see :mod:`quality_gate.stats.store`) and layers ``l``::

    w[i,t] = ppl[i,t]^alpha / (sum_u ppl[i,u]^alpha + eps)
    S[i,l] = sum_t w[i,t] * G[i,l,t]
    a_l = min_i S[i,l]   b_l = max_i S[i,l]   mu_l = mean_i S[i,l]
    R[i,l] = (S[i,l] - a_l) / (max(b_l - a_l, eps) * D_l)
    q_i = mean_l R[i,l]

Reading of the denominator factor ``D_l`` (method.md writes ``max(mu_l, eps)`` and "with tau > 0:
(mu_l + tau)"): ``D_l = max(mu_l, eps)`` when ``tau == 0`` and ``D_l = mu_l + tau`` when ``tau > 0``.

Numerics. ``ppl^alpha`` overflows float32 (and float64 for large ``alpha * NLL``), so the weights
are computed in log space with a per-sample max shift, in float64::

    x_t = alpha * log(ppl_t),  m = max_t x_t
    w_t = exp(x_t - m) / (sum_u exp(x_u - m) + eps * exp(-m))

which equals the formula exactly (numerator and denominator divided by ``exp(m)``); ``eps`` keeps
its meaning: ``eps * exp(-m)`` is evaluated as ``exp(log(eps) - m)``, and when that overflows the
weights tend to 0, the formula's own limit. ``w`` is *not* normalised to 1 (eps is kept).

``pairing`` (method.md leaves it open): ``next_token`` pairs the gate at token t with the perplexity
of token t+1, the prediction that gate shapes (the stored layout); ``same_token`` pairs the gate at
token t with the perplexity of token t itself, i.e. how the gate reacts to reading a surprising
token (stored gate row t with stored perplexity row t-1, t >= 1).

``token_scope``: ``all`` scores every paired position (the seed); ``assistant`` only the positions
whose perplexity is that of an assistant token. A sample with no position in scope, or a
non-finite perplexity in scope, is invalid: it gets no score and is listed in the summary with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from quality_gate.config import PAIRINGS, TOKEN_SCOPES
from quality_gate.errors import SelectionError
from quality_gate.stats.store import RouterShard, iter_shards, load_index

log = logging.getLogger(__name__)

# Rows of a shard turned into float64 at once in the segment sum: (chunk, L) x 8 bytes stays small.
_ROW_CHUNK = 1 << 18


@dataclasses.dataclass
class ScoreParams:
    """Hyper-parameters of the score (config keys ``alpha``, ``eps``, ``tau``, ``token_scope``,
    ``pairing``)."""

    alpha: float = 1.0
    eps: float = 1e-8
    tau: float = 0.0
    token_scope: str = "all"
    pairing: str = "same_token"

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing={self.pairing!r}; expected one of {list(PAIRINGS)}")
        if self.token_scope not in TOKEN_SCOPES:
            raise ValueError(f"token_scope={self.token_scope!r}; expected one of {list(TOKEN_SCOPES)}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps={self.eps!r} must be a finite number >= 0")
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"tau={self.tau!r} must be a finite number >= 0")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} must be finite")


@dataclasses.dataclass
class SampleStats:
    """Per-sample statistics of all datasets, in index order (dataset by dataset).

    ``S`` is (N, L) float64 (NaN rows for invalid samples); ``mean_nll`` (N,) is the mean log
    perplexity over the positions in scope; ``ifd`` (N,) is NaN where Stage 2 did not collect it.
    ``embeddings`` (N, D) float16 as Stage 2 stored them, when asked for and every dataset has them;
    ``embeddings_missing`` names the datasets without.
    """

    ids: list[str]
    datasets: list[str]
    S: np.ndarray  # (N, L)
    mean_nll: np.ndarray  # (N,)
    length: np.ndarray  # (N,) stored positions T_i
    response_tokens: np.ndarray  # (N,) stored positions whose target is an assistant token
    scope_positions: np.ndarray  # (N,) positions in token_scope
    valid: np.ndarray  # (N,) bool
    invalid_reason: list[str]
    ifd: np.ndarray  # (N,)
    has_ifd: dict[str, bool]
    index_paths: dict[str, Path]
    embeddings: np.ndarray | None = None  # (N, D) float16
    embeddings_missing: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def token_weights(
    perplexities: torch.Tensor, segment: torch.Tensor, num_samples: int, alpha: float, eps: float
) -> torch.Tensor:
    """``w = ppl^alpha / (sum_segment ppl^alpha + eps)``, exact and overflow-safe.

    Args:
        perplexities: (P,) per-position perplexities (any float dtype, finite, > 0).
        segment: (P,) int64 sample index of each position, in [0, num_samples).
        num_samples: number of segments.
    Returns:
        (P,) float64 weights.
    """
    x = alpha * torch.log(perplexities.to(torch.float64))  # (P,)
    m = torch.full((num_samples,), -math.inf, dtype=torch.float64)
    m.scatter_reduce_(0, segment, x, reduce="amax", include_self=True)  # (n,)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty segments: any shift works
    e = torch.exp(x - m[segment])  # (P,) in (0, 1]
    denom = torch.zeros(num_samples, dtype=torch.float64).index_add_(0, segment, e)  # (n,)
    log_eps = math.log(eps) if eps > 0 else -math.inf
    denom = denom + torch.exp(log_eps - m)  # eps * exp(-m); inf -> weights 0, the formula's limit
    return e / denom[segment]


def _paired_rows(shard: RouterShard, pairing: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices ``(gate_rows, ppl_rows)`` (P',) into the shard's arrays, and their sample index."""
    total = int(shard.perplexities.shape[0])
    segment = torch.repeat_interleave(torch.arange(len(shard)), shard.lengths)  # (P,)
    rows = torch.arange(total)
    if pairing == "next_token":
        return rows, rows, segment
    first = shard.offsets[:-1][shard.lengths > 0]  # stored row of token 0 of each sample
    keep = torch.ones(total, dtype=torch.bool)
    keep[first] = False
    gate_rows = rows[keep]  # gate at token t >= 1
    return gate_rows, gate_rows - 1, segment[keep]  # stored row t-1 holds the perplexity of token t


def shard_scores(shard: RouterShard, params: ScoreParams) -> dict[str, object]:
    """``S`` (n, L) float64, mean NLL (n,), positions in scope (n,), validity and reasons of one shard.

    The mean NLL (the perplexity baseline) is over every stored position in ``token_scope``, whatever
    the pairing; ``S`` uses the paired positions.
    """
    n = len(shard)
    num_layers = int(shard.gates.shape[1])
    gate_rows, ppl_rows, segment = _paired_rows(shard, params.pairing)
    ppl = shard.perplexities[ppl_rows].to(torch.float64)  # (P,)
    in_scope = torch.ones_like(ppl, dtype=torch.bool)
    if params.token_scope == "assistant":
        in_scope = shard.assistant_mask[ppl_rows].to(torch.bool)
    sample_ok = shard.valid.to(torch.bool).clone()  # (n,)
    in_scope &= sample_ok[segment]
    finite = torch.isfinite(ppl) & (ppl > 0)
    count = torch.zeros(n, dtype=torch.int64).index_add_(0, segment, in_scope.to(torch.int64))
    bad = torch.zeros(n, dtype=torch.int64).index_add_(0, segment, (in_scope & ~finite).to(torch.int64))
    reasons = list(shard.invalid_reason)
    for i, (ok, c, b) in enumerate(zip(sample_ok.tolist(), count.tolist(), bad.tolist())):
        if not ok:
            reasons[i] = reasons[i] or "invalid in Stage 2"
        elif c == 0:
            reasons[i] = f"no positions in token_scope={params.token_scope}"
        elif b > 0:
            reasons[i] = "non-finite or non-positive perplexity"
    sample_ok &= (count > 0) & (bad == 0)
    in_scope &= sample_ok[segment]

    pos = torch.nonzero(in_scope).squeeze(1)  # (P',)
    seg = segment[pos]
    w = token_weights(ppl[pos], seg, n, params.alpha, params.eps)  # (P',)
    S = torch.zeros(n, num_layers, dtype=torch.float64)
    for start in range(0, len(pos), _ROW_CHUNK):
        rows = gate_rows[pos[start : start + _ROW_CHUNK]]
        g = shard.gates[rows].to(torch.float64)  # (chunk, L)
        S.index_add_(0, seg[start : start + _ROW_CHUNK], g * w[start : start + _ROW_CHUNK, None])
    mean_nll = _mean_nll(shard, params.token_scope, n)
    response = torch.zeros(n, dtype=torch.int64).index_add_(
        0, torch.repeat_interleave(torch.arange(n), shard.lengths), shard.assistant_mask.to(torch.int64)
    )
    S[~sample_ok] = math.nan
    mean_nll[~sample_ok] = math.nan
    return {
        "S": S.numpy(),
        "mean_nll": mean_nll.numpy(),
        "scope_positions": count.numpy(),
        "response_tokens": response.numpy(),
        "valid": sample_ok.numpy(),
        "invalid_reason": ["" if ok else r for ok, r in zip(sample_ok.tolist(), reasons)],
    }


def _mean_nll(shard: RouterShard, token_scope: str, n: int) -> torch.Tensor:
    """(n,) mean log perplexity over the stored positions in scope (NaN where none)."""
    segment = torch.repeat_interleave(torch.arange(n), shard.lengths)
    log_ppl = torch.log(shard.perplexities.to(torch.float64))
    mask = torch.ones_like(log_ppl, dtype=torch.bool)
    if token_scope == "assistant":
        mask = shard.assistant_mask.to(torch.bool)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, segment, torch.where(mask, log_ppl, 0.0))
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, segment, mask.to(torch.float64))
    return total / count


def collect_sample_stats(
    index_paths: Sequence[Path], params: ScoreParams, with_embeddings: bool = False
) -> SampleStats:
    """Stream the shards of every dataset and compute per-sample ``S`` and baseline statistics; with
    ``with_embeddings``, also gather the shards' ``embeddings`` (N, D) float16 in the same pass."""
    parts: dict[str, list] = {
        k: [] for k in ("S", "mean_nll", "scope", "valid", "reason", "ifd", "length", "response")
    }
    ids: list[str] = []
    datasets: list[str] = []
    has_ifd: dict[str, bool] = {}
    paths: dict[str, Path] = {}
    num_layers = None
    emb = _EmbeddingGather(index_paths) if with_embeddings else None
    for index_path in index_paths:
        index = load_index(index_path)
        name = index["dataset_name"]
        if name in paths:
            raise SelectionError(
                f"dataset {name!r} appears twice ({paths[name]} and {index_path}); select one run"
            )
        paths[name] = Path(index_path)
        has_ifd[name] = bool(index.get("has_ifd"))
        if num_layers is not None and index["num_layers"] != num_layers:
            raise SelectionError(f"{index_path} has {index['num_layers']} layers, others {num_layers}")
        num_layers = index["num_layers"]
        log.info("scoring %s: %d samples", name, index["num_samples"])
        for shard in iter_shards(index_path):
            out = shard_scores(shard, params)
            ids.extend(shard.sample_ids)
            datasets.extend([name] * len(shard))
            parts["S"].append(out["S"])
            parts["mean_nll"].append(out["mean_nll"])
            parts["scope"].append(out["scope_positions"])
            parts["valid"].append(out["valid"])
            parts["reason"].extend(out["invalid_reason"])
            parts["length"].append(shard.lengths.numpy().copy())
            parts["response"].append(out["response_tokens"])
            if emb is not None:
                emb.add(name, shard)
            if shard.ifd_loss_cond is not None and shard.ifd_loss_uncond is not None:
                cond = shard.ifd_loss_cond.to(torch.float64).numpy()
                with np.errstate(divide="ignore", invalid="ignore"):
                    parts["ifd"].append(cond / shard.ifd_loss_uncond.to(torch.float64).numpy())
            else:
                parts["ifd"].append(np.full(len(shard), np.nan))
    if not ids:
        raise SelectionError("the router data holds no samples")

    def cat(key: str, dtype: type) -> np.ndarray:
        return np.concatenate(parts[key]).astype(dtype, copy=False)

    return SampleStats(
        ids=ids,
        datasets=datasets,
        S=np.concatenate(parts["S"], axis=0),
        mean_nll=cat("mean_nll", np.float64),
        length=cat("length", np.int64),
        response_tokens=cat("response", np.int64),
        scope_positions=cat("scope", np.int64),
        valid=cat("valid", bool),
        invalid_reason=parts["reason"],
        ifd=cat("ifd", np.float64),
        has_ifd=has_ifd,
        index_paths=paths,
        embeddings=None if emb is None else emb.result(),
        embeddings_missing=[] if emb is None else sorted(emb.missing),
    )


class _EmbeddingGather:
    """Copies each shard's ``embeddings`` into one (N, D) float16 array allocated once (no
    concatenation, so the peak stays 2 x D bytes per sample)."""

    def __init__(self, index_paths: Sequence[Path]) -> None:
        self._total = sum(int(load_index(p)["num_samples"]) for p in index_paths)
        self._out: np.ndarray | None = None
        self._row = 0
        self.missing: set[str] = set()

    def add(self, dataset: str, shard: RouterShard) -> None:
        n, e = len(shard), shard.embeddings
        if e is None:
            self.missing.add(dataset)
        elif e.ndim != 2 or e.shape[0] != n:
            raise SelectionError(
                f"dataset {dataset}: a shard's embeddings have shape {tuple(e.shape)} for {n} samples; "
                "rerun Stage 2"
            )
        elif self._out is None:
            self._out = np.zeros((self._total, int(e.shape[1])), dtype=np.float16)
        elif e.shape[1] != self._out.shape[1]:
            raise SelectionError(
                f"dataset {dataset}: embeddings of {e.shape[1]} dims, other shards {self._out.shape[1]}; "
                "select router data of one Stage 2 setup (data_process.embedding_dim)"
            )
        if e is not None and self._out is not None:
            self._out[self._row : self._row + n] = e.to(torch.float16).numpy()
        self._row += n

    def result(self) -> np.ndarray | None:
        return None if self.missing or self._out is None else self._out


@dataclasses.dataclass
class ColumnStats:
    """Per-layer column statistics of one group of samples, each (L,)."""

    a: np.ndarray
    b: np.ndarray
    mu: np.ndarray


def column_map(S: np.ndarray, eps: float, tau: float) -> tuple[np.ndarray, np.ndarray, ColumnStats]:
    """``R`` (N, L) and ``q`` (N,) from ``S`` (N, L) of valid samples (the column statistics' group)."""
    a = S.min(axis=0)  # (L,)
    b = S.max(axis=0)
    mu = S.mean(axis=0)
    scale = np.maximum(b - a, eps) * (np.maximum(mu, eps) if tau == 0 else mu + tau)  # (L,)
    with np.errstate(divide="ignore", invalid="ignore"):
        R = (S - a) / scale  # (N, L); scale == 0 only when eps == 0 and a column is constant or 0
    return R, R.mean(axis=1), ColumnStats(a=a, b=b, mu=mu)


def quality_scores(
    stats: SampleStats, params: ScoreParams, per_dataset: bool
) -> tuple[np.ndarray, dict[str, ColumnStats]]:
    """``q`` (N,) (NaN for invalid samples) and the column statistics of each group.

    Groups: ``{"all": ...}`` (column statistics over every dataset together, method.md), or one
    group per dataset when ``per_dataset``.
    """
    q = np.full(len(stats), np.nan)
    names = np.asarray(stats.datasets)
    groups = (
        {"all": stats.valid}
        if not per_dataset
        else {d: stats.valid & (names == d) for d in stats.index_paths}
    )
    columns: dict[str, ColumnStats] = {}
    for group, mask in groups.items():
        if not mask.any():
            continue
        _, q[mask], columns[group] = column_map(stats.S[mask], params.eps, params.tau)
    return q, columns
