"""Difficulty-aware selection methods beside DQ (issue 36): ccs, d2, moderate and our hybrid dq-ccs.

Registered in dq.select.methods.METHODS by path, with their params dataclasses (CcsParams, D2Params, DqCcsParams
there), so params know their names and keys without this module. Each is a `(features, labels, ratio, seed,
params, **context) -> (bins int32 [N], sorted int64 indices)` like the others; the context carries `scores`
(the scores stage's, dq.scores.file). Class balance as sample_bins: the budgets are
dq.select.sampling.bin_cells' quotas, exactly round(ratio * N) in all, each method choosing inside a class
(dq-ccs: inside a (bin, class) cell). Difficulty is "higher = harder" (dq.scores.file.difficulty: -AUM, EL2N,
forgetting).

Random draws (ccs, dq-ccs) take, inside a stratum, the members with the smallest keys of
u = np.random.default_rng(seed).random(N): a uniform draw without replacement that does not depend on the
order the strata are visited in.
"""
from __future__ import annotations

import numpy as np

from dq.scores.file import class_neighbours, difficulty, embedding_of, median_distance, unit_rows
from dq.select.cosine import check_features
from dq.select.engines import dq_bins
from dq.select.sampling import bin_cells

NO_BINS = -1


def _no_bins(n: int) -> np.ndarray:
    return np.full(n, NO_BINS, np.int32)


def _sorted(picks: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, np.int64)


def prune_hardest(members: np.ndarray, hard: np.ndarray, quota: int, beta: float) -> np.ndarray:
    """`members` without its round(beta * n) hardest (never below `quota` left): CCS's hard-prune share.

    members int64 [n] ascending, hard float64 [N] (higher = harder). Equal difficulty: the lower index goes first.
    """
    n = len(members)
    drop = min(round(beta * n), n - quota)
    if drop <= 0:
        return members
    order = np.lexsort((members, -hard[members]))  # hardest first
    return np.sort(members[order[drop:]])


def strata_of(values: np.ndarray, strata: int) -> np.ndarray:
    """int64 [n]: the equal-width stratum of each value over [min, max] (the max in the last stratum)."""
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.zeros(len(values), np.int64)
    width = (hi - lo) / strata
    return np.minimum(((values - lo) / width).astype(np.int64), strata - 1)


def strata_budgets(sizes: np.ndarray, quota: int) -> np.ndarray:
    """CCS's allocation: strata from the smallest (ties: lower stratum), each min(size, rest // strata left).

    sizes int [m]; returns int64 [m] summing to min(quota, sizes.sum()).
    """
    budgets = np.zeros(len(sizes), np.int64)
    rest = int(quota)
    for i, s in enumerate(np.lexsort((np.arange(len(sizes)), sizes))):
        budgets[s] = min(int(sizes[s]), rest // (len(sizes) - i))
        rest -= int(budgets[s])
    return budgets


def ccs_cell(members: np.ndarray, quota: int, hard: np.ndarray, keys: np.ndarray, beta: float, strata: int) -> np.ndarray:
    """CCS in one cell (Zheng et al., ICLR 2023, Algorithm 1): prune the hardest beta share, split the rest
    into `strata` equal-width difficulty strata, give each stratum its `strata_budgets` share of `quota`, and
    draw it uniformly (the smallest `keys`). Returns the picked members, int64 [quota]."""
    if quota <= 0:
        return np.zeros(0, np.int64)
    pool = prune_hardest(members, hard, quota, beta)
    which = strata_of(hard[pool], strata)
    budgets = strata_budgets(np.bincount(which, minlength=strata), quota)
    picks = []
    for s in np.flatnonzero(budgets):
        inside = pool[which == s]
        picks.append(inside[np.lexsort((inside, keys[inside]))[:budgets[s]]])
    return np.concatenate(picks)


def _ccs_over_cells(bins, labels, ratio, seed, hard, params) -> np.ndarray:
    """ccs_cell in every (bin, class) cell with params' beta and strata, hard: difficulty float64 [N]."""
    keys = np.random.default_rng(seed).random(len(labels))
    return _sorted([ccs_cell(members, quota, hard, keys, params.beta, params.strata)
                    for members, quota in bin_cells(bins, labels, ratio)])


def ccs(features, labels, ratio, seed, params, *, scores, **_):
    """Coverage-centric coreset selection (Zheng et al., ICLR 2023), per class: prune the hardest `beta` share
    by `score` (AUM by default: low AUM = hard), then sample evenly over `strata` equal-width difficulty
    strata, smallest strata first (`ccs_cell`). No bins. params: dq.select.methods.CcsParams."""
    bins = _no_bins(len(labels))
    return bins, _ccs_over_cells(bins, labels, ratio, seed, difficulty(scores, params.score), params)


def dq_ccs(features, labels, ratio, seed, params, *, scores, **context):
    """Ours: DQ's coverage bins, CCS's difficulty coverage inside each. DQ's GraphCut bins (dq_bins) give the
    (bin, class) cells and their quotas exactly as sample_bins does; inside each cell `ccs_cell` replaces the
    uniform draw (prune the cell's hardest `beta` share, then even strata). Bins as dq's. params:
    dq.select.methods.DqCcsParams."""
    bins = dq_bins(features, labels, params.num_bins, lam=params.lam, per_class=params.per_class,
                   precision=params.precision, progress=context.get("progress", False))
    return bins, _ccs_over_cells(bins, labels, ratio, seed, difficulty(scores, params.score), params)


def moderate(features, labels, ratio, seed, params, **_):
    """Moderate-DS (Xia et al., ICLR 2023), per class: the distance of each embedding to the element-wise
    median of its class (dq.scores.file.median_distance), and the class's quota taken from the middle of the
    sorted distances, positions [(n - q) // 2, (n - q) // 2 + q) (ties: the lower index first). No draws."""
    check_features(features)
    distance = median_distance(embedding_of(features), labels)
    picks = []
    for members, quota in bin_cells(_no_bins(len(labels)), labels, ratio):
        order = members[np.lexsort((members, distance[members]))]
        start = (len(members) - quota) // 2
        picks.append(order[start:start + quota])
    return _no_bins(len(labels)), _sorted(picks)


def d2_cell(unit: np.ndarray, node: np.ndarray, quota: int, k: int, gamma: float, gamma_reverse: float) -> np.ndarray:
    """D2 pruning (Maharana et al., ICLR 2024) in one class: positions [quota] of the picked rows.

    unit float64 [n, D] unit-norm embeddings, node float64 [n] difficulty >= 0. The kNN graph joins each row
    to its k nearest (class_neighbours). Forward message passing: s_i = node_i + sum_{j in N(i)}
    exp(-gamma d_ij) node_j. Reverse message passing while sampling: pick the largest s (ties: the lower
    row), then each neighbour j of the pick loses exp(-gamma_reverse d_pj) s_p, so its neighbourhood is
    less likely to be picked next.
    """
    nbrs, dist = class_neighbours(unit, k)  # [n, k]
    s = node + (np.exp(-gamma * dist) * node[nbrs]).sum(axis=1)
    down = np.exp(-gamma_reverse * dist)  # [n, k]
    picked = np.zeros(len(node), bool)
    out = np.empty(quota, np.int64)
    for t in range(quota):
        p = int(np.argmax(np.where(picked, -np.inf, s)))
        out[t], picked[p] = p, True
        s[nbrs[p]] -= down[p] * s[p]
    return out


def d2(features, labels, ratio, seed, params, *, scores, **_):
    """D2 pruning (Maharana et al., ICLR 2024), per class, on unit-norm embeddings: prune the hardest `beta`
    share as CCS does (0: none), then `d2_cell` on what is left, with node difficulty the `score` (higher =
    harder) scaled to [0, 1] over the whole set. Deterministic (no draws). No bins. params:
    dq.select.methods.D2Params."""
    check_features(features)
    hard = difficulty(scores, params.score)
    span = float(hard.max() - hard.min())
    node = (hard - hard.min()) / span if span > 0 else np.ones_like(hard)
    x = embedding_of(features)
    picks = []
    for members, quota in bin_cells(_no_bins(len(labels)), labels, ratio):
        if quota == 0:
            continue
        pool = prune_hardest(members, hard, quota, params.beta)
        picks.append(pool[d2_cell(unit_rows(x[pool]), node[pool], quota, params.k, params.gamma,
                                  params.gamma_reverse)])
    return _no_bins(len(labels)), _sorted(picks)
