"""Quality *and* diversity: which of the best-scoring samples to keep so that the selection is not
a pile of near-duplicates. Works on any selector's ranking, with Stage 2's per-sample embeddings
(``embeddings`` (N, D) float16 in the shards: the selector's last hidden state mean-pooled over the
prompt tokens by default, ``data_process.embedding_tokens``; randomly projected to D <= 256).

Modes (config key ``diversity``):

* ``none``: the top ``budget`` by score (no embeddings needed).
* ``threshold``: Deita's representation filter (``IterativeFilter.filter`` of hkust-nlp/deita with
  its default ``batch_size=1``): walk the samples best score first; the first is kept; a later
  sample is kept when its cosine similarity to every sample kept so far is ``<= diversity_threshold``
  (Deita drops it when any similarity is ``> threshold``); stop once ``budget`` samples are kept. When
  the walk runs out of candidates first, fewer than ``budget`` are kept and the summary says so.
* ``cluster``: k-means of the L2-normalised embeddings (spherical k-means: Euclidean k-means on unit
  vectors, the cosine geometry of ``threshold``) into ``k`` clusters; the budget is split over the
  clusters in proportion to their number of candidates (largest-remainder rounding, the total is
  exactly the budget); within each cluster the best scores are kept. The candidates are all valid
  samples (``diversity_pool=0``: the selection keeps the pool's make-up, junk clusters included), or
  only the top ``P x budget`` by score (``diversity_pool=P >= 1``: a quality floor first, then the
  clusters' shares of what passed it; ``P = 1`` is the plain top by score).

Scale (1,000,000 x 256 on 2 cores, ``bench/bench_diversity.py``): ``threshold`` compares blocks of
candidates against the kept set with float32 matrix products (never an N x N matrix) and stops as
soon as the budget is full; ``cluster`` fits k-means with Lloyd iterations on a seeded subsample of
at most ``FIT_SAMPLES`` rows, then assigns every row once, block by block. Embeddings stay float16
in memory (2 x D bytes per sample) and are turned into float32 one block at a time.

Zero embeddings (no hidden state to pool) have no direction: they are given cosine 0 with everything,
so ``threshold`` never drops them for similarity.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import scipy.sparse

log = logging.getLogger(__name__)

DIVERSITY_MODES = ("none", "threshold", "cluster")
# Candidates compared against the kept set at once; their (BLOCK, KEPT_CHUNK) float32 similarities are
# 128 MiB at most. Smaller blocks waste less work after the budget is full, larger ones call BLAS less.
BLOCK = 2048
KEPT_CHUNK = 16384
# Rows turned into float32 at once when assigning clusters: (ASSIGN_BLOCK, k) + (ASSIGN_BLOCK, D) floats.
ASSIGN_BLOCK = 32768
# k-means is fitted on at most this many rows (seeded subsample): 500 per cluster at the default 100
# clusters, plenty for centroids that only steer quotas; one Lloyd iteration costs ~0.3 s on 2 cores.
FIT_SAMPLES = 50_000
MAX_ITER = 50
# Lloyd stops once at most this fraction of the fitted rows changes cluster (Lloyd's tail moves a
# handful of boundary points for many iterations without changing the clusters' sizes).
TOL = 1e-3


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` (n, D) as float32 rows of unit L2 norm; zero rows stay zero (cosine 0 with everything)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


# --------------------------------------------------------------------------------------------- #
# threshold
# --------------------------------------------------------------------------------------------- #
@dataclasses.dataclass
class ThresholdOutcome:
    """What the walk of :func:`threshold_filter` did; indices are into the embeddings' rows.

    ``kept`` (m,) in walk order; ``skipped`` (s,) walked but dropped as near-duplicates of a kept
    sample; ``examined`` = m + s, the candidates walked; ``exhausted``: the candidates ran out before
    ``budget`` were kept.
    """

    kept: np.ndarray
    skipped: np.ndarray
    examined: int
    exhausted: bool


def threshold_filter(
    embeddings: np.ndarray, order: np.ndarray, budget: int, threshold: float, block: int = BLOCK
) -> ThresholdOutcome:
    """Deita's rule: walk ``order`` and keep a sample iff ``max cos(x, kept) <= threshold``.

    Args:
        embeddings: (N, D) any float dtype; only the rows in ``order`` are read.
        order: (n,) int row indices, best first (the walk order).
        budget: stop once this many are kept.
        threshold: cosine similarity in [-1, 1].
        block: candidates processed at once (exactly the sequential rule for any block size).
    """
    order = np.asarray(order, dtype=np.int64)
    dim = embeddings.shape[1]
    cap = min(budget, len(order))
    kept_vecs = np.empty((cap, dim), dtype=np.float32)  # unit rows of the kept samples
    kept: list[np.ndarray] = []
    skipped: list[np.ndarray] = []
    m = 0  # kept so far
    examined = 0
    start = 0
    while m < cap and start < len(order):
        rows = order[start : start + block]  # (B,)
        x = unit_rows(embeddings[rows])  # (B, D)
        # 1. Against the samples kept in earlier blocks, chunk by chunk (bounded memory); a row found a
        #    duplicate is not compared with later chunks (where most candidates are duplicates, as
        #    with a low threshold, this saves most of the products).
        dup = np.zeros(len(rows), dtype=bool)
        for c in range(0, m, KEPT_CHUNK):
            live = np.flatnonzero(~dup)
            if not len(live):
                break
            sims = x[live] @ kept_vecs[c : min(m, c + KEPT_CHUNK)].T  # (live, chunk)
            dup[live] = (sims > threshold).any(axis=1)
        # 2. Within the block, in walk order: only survivors of step 1 can be kept, and a survivor is
        #    dropped by an earlier survivor of this block only if that one is itself kept.
        surv = np.flatnonzero(~dup)  # (S,) positions in the block
        gram = x[surv] @ x[surv].T  # (S, S)
        alive = np.ones(len(surv), dtype=bool)
        accepted: list[int] = []
        stop = len(rows)  # positions [0, stop) of the block are examined
        for a in range(len(surv)):
            if not alive[a]:
                continue
            accepted.append(a)
            alive[a + 1 :] &= gram[a, a + 1 :] <= threshold
            if m + len(accepted) == cap:
                stop = int(surv[a]) + 1
                break
        acc = surv[np.asarray(accepted, dtype=np.int64)]  # (A,) positions in the block
        kept_vecs[m : m + len(acc)] = x[acc]
        m += len(acc)
        walked = np.zeros(len(rows), dtype=bool)
        walked[:stop] = True
        walked[acc] = False
        kept.append(rows[acc])
        skipped.append(rows[walked])
        examined += stop
        start += len(rows)
    kept_idx = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return ThresholdOutcome(
        kept=kept_idx,
        skipped=np.concatenate(skipped) if skipped else np.zeros(0, np.int64),
        examined=examined,
        exhausted=len(kept_idx) < budget,
    )


# --------------------------------------------------------------------------------------------- #
# cluster
# --------------------------------------------------------------------------------------------- #
@dataclasses.dataclass
class KMeans:
    """A fitted k-means: ``centroids`` (k, D) float32 (in the unit-row space), the rows it was fitted
    on, the Lloyd iterations run, and whether the assignments stopped changing."""

    centroids: np.ndarray
    fit_rows: int
    iterations: int
    converged: bool


def _nearest(x: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) index of the nearest centroid (lowest index on ties) and (n,) squared distance, for unit
    rows ``x`` (n, D): ``|x - c|^2 = |x|^2 + |c|^2 - 2 x.c``."""
    d = c_sq[None, :] - 2.0 * (x @ centroids.T)  # (n, k) without the |x|^2 constant of each row
    label = d.argmin(axis=1)
    x_sq = np.einsum("ij,ij->i", x, x)
    return label, np.maximum(d[np.arange(len(x)), label] + x_sq, 0.0)


def _assign_blocks(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    labels, dist = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for s in range(0, len(x), ASSIGN_BLOCK):
        labels[s : s + ASSIGN_BLOCK], dist[s : s + ASSIGN_BLOCK] = _nearest(
            x[s : s + ASSIGN_BLOCK], centroids, c_sq
        )
    return labels, dist


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability
    proportional to the squared distance to the nearest centre so far. (k, D) float32."""
    n = len(x)
    x_sq = np.einsum("ij,ij->i", x, x).astype(np.float64)  # (n,)

    def sq_dist(c: np.ndarray) -> np.ndarray:  # (n,) |x - c|^2 by one matrix-vector product
        return np.maximum(x_sq + float(c @ c) - 2.0 * (x @ c), 0.0)

    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[rng.integers(n)]
    best = sq_dist(centres[0])
    for j in range(1, k):
        total = best.sum()
        # All points coincide with a centre already: any point will do (a duplicate centre stays empty).
        pick = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=best / total))
        centres[j] = x[pick]
        best = np.minimum(best, sq_dist(centres[j]))
    return centres


def fit_kmeans(
    embeddings: np.ndarray,
    rows: np.ndarray,
    k: int,
    seed: int,
    fit_samples: int = FIT_SAMPLES,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
) -> KMeans:
    """Spherical k-means of ``embeddings[rows]`` (unit rows): k-means++ seeding, then Lloyd iterations
    until at most ``tol`` of the rows change cluster (or ``max_iter``), on a seeded subsample of
    ``fit_samples`` rows. ``converged`` then holds; with no row changing, the centroids are exactly
    their members' means.

    Args:
        embeddings: (N, D) any float dtype.
        rows: (n,) the rows to cluster (e.g. the valid samples); ``k <= n``.
    Empty clusters keep their previous centroid (deterministic; they get a quota of 0).
    """
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > fit_samples:
        rows = np.sort(rng.choice(rows, fit_samples, replace=False))
    x = unit_rows(embeddings[rows])  # (n_fit, D)
    centroids = _kmeans_pp(x, k, rng)
    labels = np.full(len(x), -1, dtype=np.int64)
    iterations, converged = 0, False
    ones = np.ones(len(x), dtype=np.float32)
    while iterations < max_iter:
        new, _ = _assign_blocks(x, centroids)
        iterations += 1
        changed = int((new != labels).sum())
        labels = new
        if changed == 0:
            converged = True
            break
        # Centroid = mean of its members; a sparse (k, n) one-hot times x sums them in one product.
        member = scipy.sparse.csr_matrix((ones, (labels, np.arange(len(x)))), shape=(k, len(x)))
        sums = np.asarray(member @ x, dtype=np.float32)  # (k, D)
        counts = np.bincount(labels, minlength=k)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        if changed <= tol * len(x):
            converged = True  # the centroids are the means of the last assignment
            break
    return KMeans(centroids=centroids, fit_rows=len(x), iterations=iterations, converged=converged)


def assign_clusters(embeddings: np.ndarray, rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N,) int64: the nearest centroid of each of ``rows`` (unit rows), -1 for the other rows.
    Reads ``embeddings`` (N, D) in blocks of ``ASSIGN_BLOCK`` rows."""
    labels = np.full(len(embeddings), -1, dtype=np.int64)
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    rows = np.asarray(rows, dtype=np.int64)
    for s in range(0, len(rows), ASSIGN_BLOCK):
        r = rows[s : s + ASSIGN_BLOCK]
        labels[r], _ = _nearest(unit_rows(embeddings[r]), centroids, c_sq)
    return labels


def cluster_quotas(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` over clusters of ``sizes`` (k,) in proportion to size (Hamilton's
    largest-remainder method, exact in integers): ``floor(budget * n_c / n)`` each, then one more for
    the largest remainders, ties to the lower cluster index. Sums to ``min(budget, n)``; never more
    than a cluster's size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if budget >= total:
        return sizes.copy()
    num = budget * sizes
    quotas, rem = num // total, num % total
    left = budget - int(quotas.sum())
    quotas[np.lexsort((np.arange(len(sizes)), -rem))[:left]] += 1
    return quotas


def cluster_select(
    score: np.ndarray, ids: np.ndarray, candidates: np.ndarray, labels: np.ndarray, k: int, budget: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Keep the best ``quota_c`` candidates of every cluster ``c``.

    Args:
        score: (N,) higher is better; ties broken by ``ids`` (N,) increasing.
        candidates: (N,) bool, the samples that may be kept; each has a cluster in ``labels`` (N,).
        k: number of clusters; ``budget``: total to keep.
    Returns ``selected`` (N,) bool and the per-cluster ``sizes``, ``quotas``, ``kept`` lists.
    """
    idx = np.flatnonzero(candidates)
    lab = labels[idx]
    if (lab < 0).any():
        raise ValueError("every candidate needs a cluster label")
    order = idx[np.lexsort((ids[idx], -score[idx], lab))]  # by cluster, then best first
    lab = labels[order]
    sizes = np.bincount(lab, minlength=k)
    quotas = cluster_quotas(sizes, budget)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (k,) start of each cluster in `order`
    position = np.arange(len(order)) - first[lab]  # rank within the cluster
    selected = np.zeros(len(score), dtype=bool)
    selected[order[position < quotas[lab]]] = True
    kept = np.bincount(labels[selected], minlength=k)
    return selected, {"sizes": sizes.tolist(), "quotas": quotas.tolist(), "kept": kept.tolist()}


# --------------------------------------------------------------------------------------------- #
# The setting a selection runs with
# --------------------------------------------------------------------------------------------- #
@dataclasses.dataclass
class Diversity:
    """How :func:`quality_gate.selection.selectors.select` spreads the budget.

    ``embeddings`` (N, D) (float16 as stored) for ``threshold``; ``labels`` (N,) the cluster of every
    valid sample (-1 for the others) and ``num_clusters`` for ``cluster``; ``kmeans``: how it was fitted;
    ``pool``: 0, or the factor of the budget that ``cluster`` draws its candidates from (best first).
    """

    mode: str = "none"
    threshold: float = 0.9
    embeddings: np.ndarray | None = None
    labels: np.ndarray | None = None
    num_clusters: int = 0
    kmeans: dict[str, Any] | None = None
    pool: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in DIVERSITY_MODES:
            raise ValueError(f"diversity={self.mode!r}; expected one of {list(DIVERSITY_MODES)}")
        if self.mode == "threshold" and self.embeddings is None:
            raise ValueError("diversity=threshold needs embeddings")
        if self.mode == "cluster" and self.labels is None:
            raise ValueError("diversity=cluster needs cluster labels")


def cluster_diversity(
    embeddings: np.ndarray, valid: np.ndarray, k: int, seed: int, fit_samples: int = FIT_SAMPLES
) -> Diversity:
    """Fit k-means on the valid samples' embeddings (N, D) and label every valid sample; ``k`` is
    capped at the number of valid samples."""
    rows = np.flatnonzero(valid)
    k_used = min(k, len(rows))
    if k_used < k:
        log.warning("diversity_clusters=%d > %d valid samples; using %d clusters", k, len(rows), k_used)
    km = fit_kmeans(embeddings, rows, k_used, seed, fit_samples)
    labels = assign_clusters(embeddings, rows, km.centroids)
    info = {
        "clusters_requested": k,
        "clusters": k_used,
        "fit_rows": km.fit_rows,
        "iterations": km.iterations,
        "converged": km.converged,
        "space": "L2-normalised embeddings (spherical k-means), k-means++ seeding, seed = config seed",
    }
    log.info("k-means: %d clusters, fitted on %d rows in %d iterations", k_used, km.fit_rows, km.iterations)
    return Diversity(mode="cluster", labels=labels, num_clusters=k_used, kmeans=info)
