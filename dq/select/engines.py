"""The GraphCut engines: the recursive DQ bins (`dq_bins`), one pool's greedy (`greedy_bins`), one-shot GraphCut.

DQ (Zhou et al., ICCV 2023) splits every class into `num_bins` bins by running GraphCut greedily on
what the earlier bins left, then keeps the same share of every bin. With s(i, j) = 0.5 + 0.5 cos(f_i, f_j)
and S the items picked so far into the bin of pool P, the greedy adds the candidate with the largest

    gain(x) = lam * sum_{j in P} s(j, x) - 2 * sum_{q in S} s(q, x)
            = const + 0.5 * lam * <sigma_P, f̂_x> - <sigma_S, f̂_x>,        sigma_A = sum_{a in A} f̂_a,

ties going to the lowest index. The constant (0.5 lam |P| - |S|) is the same for every candidate, so
both engines below rank candidates by g(x) = 0.5 lam <sigma_P, f̂_x> - <sigma_S, f̂_x> and never
recompute every gain per step:

- `dense`: the cosine block of one class is computed once (BLAS, O(n^2) memory); each pick costs one
  row subtraction, each bin one update of the pool column sums.
- `lazy`: O(n D) memory, for whole-dataset mode and huge classes. For a fixed pool the full gain only
  falls as S grows (a pick subtracts 2 s(q, x) >= 0), so a gain computed once stays an upper bound:
  the lazy greedy (Minoux) keeps these bounds, recomputes in O(D) only the candidates whose bound
  reaches the best fresh gain, and picks exactly what the full greedy picks. A second bound,
  Cauchy-Schwarz since the last projection of all candidates (O(n D), once per bin and whenever the
  recomputations have cost as much), keeps the candidates far from the top out of the recomputations.

Gains are accumulated in float64, and by default (`select.precision: float64`) the rows are normalised and
the dense kernels computed in float64 too: the bins then equal a float64 brute-force reference exactly,
at CIFAR-10 scale as on small inputs. `float32` computes large dense blocks with float32 BLAS, about 1.4x
faster there, but a near-tie can flip, and every later pick of that class moves with it. The lazy
engine computes every gain as a float64 dot product.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from dq.core.errors import DQError
from dq.select.cosine import PRECISION, blas_dtype, check_features, check_labels, class_units, unit_features
from dq.select.method_params import COUNT, POSITIVE
from dq.select.sampling import apportion, bin_budgets, check_ratio

# Gains closer than this (relative to the gain's scale) are ties and go to the lowest index; it absorbs
# float64 rounding so that duplicate rows tie however BLAS orders its sums.
TIE_RTOL = 1e-9
# Classes larger than this use the lazy engine: their dense cosine block would need > 256 MiB.
DENSE_MAX_ITEMS = 8192
# The most one pick can raise g(x) = 0.5 lam <sigma_P, f̂_x> - <sigma_S, f̂_x>: 1 = -min cos, plus a
# hair for unit rows rounded to float32 (their norms can exceed 1 by ~1e-7).
PICK_RISE = 1.0 + 1e-6
# The lazy greedy's first round per pick recomputes the bounds this close to the top (in units of g, which a
# pick moves by at most 1): the best fresh gain is usually among them, so later rounds waste little.
FIRST_ROUND = 0.3


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


def _first_max(g: np.ndarray, tol: float) -> int:
    """Index of the largest value, the lowest index among values within `tol` of it."""
    i = int(np.argmax(g))
    if i == 0:
        return 0
    near = g[:i] >= g[i] - tol
    return int(np.argmax(near)) if near.any() else i


def _tolerance(lam: float, pool_size: int) -> float:
    return TIE_RTOL * (lam * pool_size + 1.0)


def _dense_bins(unit, budgets: Sequence[int], lam: float, dtype, out: np.ndarray) -> None:
    """GraphCut bins of one pool from its cosine block [n, n], computed once."""
    n = len(unit)
    cos = unit.block(dtype)  # [n, n]
    col = cos.sum(axis=0, dtype=np.float64)  # sum over the pool of cos(j, x), [n]
    alive = np.ones(n, bool)
    for k, budget in enumerate(budgets):
        half = 0.5 * lam
        g = half * col
        g[~alive] = -np.inf
        tol = _tolerance(lam, int(alive.sum()))
        picks = np.empty(int(budget), np.int64)
        for t in range(int(budget)):
            q = _first_max(g, tol)
            picks[t] = q
            g -= cos[q]  # the penalty: one similarity row per pick
            g[q] = -np.inf
        alive[picks] = False
        out[picks] = k
        # The penalty sum_{q in S} cos(q, x) is what leaves the pool's column sums with S.
        col[alive] -= half * col[alive] - g[alive]


class _LazyBounds:
    """Upper bounds of H(x) = g(x) - PICK_RISE |S| over the candidates of one bin: the lazy greedy's heap.

    Two bounds hold; each candidate has the tighter of them:
    - lazy (Minoux): a pick q lowers g(x) by cos(q, x) >= -1, so H never rises while the bin fills,
      and H recomputed at any earlier pick bounds it now;
    - epoch (Cauchy-Schwarz): g(x) = g_T(x) - <f̂_x, delta> <= g_T(x) + ||delta||, with g_T from the
      last projection of every candidate (pick T) and delta the sum of the picks since. It holds for
      every candidate at once, and grows like sqrt(picks) when the picks spread over the data, where
      the lazy bound grows like the picks.
    Positions sort the candidates by g_T, descending. key[:front] holds the lazy bounds of those
    looked at since T (-inf: taken, or popped at this pick; +inf: none yet); positions from `front` on
    were not, so the largest of their epoch bounds is the one at `front`.
    """

    def __init__(self, unit, w: np.ndarray):
        self.unit = unit  # the pool of the bin
        self.index = np.arange(len(unit))  # [m] pool index at each position
        self.key = np.zeros(0)
        self.front = 0
        self.project_all(w, 0)

    def project_all(self, w: np.ndarray, picked: int) -> None:
        """Start an epoch at pick T = picked: the exact g of every candidate left, O(n D)."""
        left = np.ones(len(self.index), bool)
        left[:self.front] = self.key[:self.front] != -np.inf  # the taken are all in the front
        self.index = self.index[left]
        g = self.unit.project(w)[self.index]  # [m]: reading all rows in place beats gathering most
        order = np.argsort(-g, kind="stable")
        self.index = self.index[order]
        self.neg_g = -g[order]  # [m] ascending: searchsorted finds where g_T falls below a limit
        self.key = np.empty(len(g))  # [m], valid in [:front]
        self.front = 0
        self.delta = np.zeros_like(w)  # [dim] float64, the sum of the picks since T
        self.drift = 0.0  # PICK_RISE ||delta||
        self.recomputed = 0  # candidates recomputed since T

    def add_pick(self, direction: np.ndarray) -> None:
        self.delta += direction
        self.drift = PICK_RISE * float(np.linalg.norm(self.delta))

    def _epoch_bound(self, picked: int) -> float:
        """What the epoch bound adds to -g_T to give H now."""
        return self.drift - PICK_RISE * picked

    def _head(self, picked: int) -> np.ndarray:
        """Bounds of the front, [front]: the tighter of the lazy and the epoch bound."""
        return np.minimum(self.key[:self.front], self._epoch_bound(picked) - self.neg_g[:self.front])

    def largest(self, picked: int) -> float:
        """The largest bound of a candidate not recomputed at this pick."""
        head = float(self._head(picked).max()) if self.front else -np.inf
        if self.front == len(self.key):
            return head
        return max(head, self._epoch_bound(picked) - float(self.neg_g[self.front]))

    def pop_at_least(self, limit: float, picked: int) -> np.ndarray:
        """Positions of every bound >= limit, taken out of the heap (key -inf until `push`)."""
        shift = self._epoch_bound(picked)
        # One more than the search finds: rounding may misplace the limit by an ulp, and a bound moved
        # to the front stays a bound.
        found = int(np.searchsorted(self.neg_g, shift - limit, side="right"))
        end = min(len(self.key), max(self.front, found) + 1)
        self.key[self.front:end] = np.inf  # no lazy bound yet
        self.front = end
        positions = np.flatnonzero(self._head(picked) >= limit)
        self.key[positions] = -np.inf
        self.recomputed += len(positions)
        return positions

    def push(self, positions: np.ndarray, h: np.ndarray) -> None:
        self.key[positions] = h


def _lazy_pick(bounds: _LazyBounds, w: np.ndarray, picked: int, tol: float) -> tuple[int, int]:
    """One exact greedy step: (pool index of the pick, candidates recomputed).

    w: 0.5 lam sigma_P - sigma_S, [dim] float64. Candidates are recomputed, best bounds first, until
    every other bound lies more than `tol` below the best fresh H; then every candidate within `tol`
    of the best is fresh and the tie rule sees exactly what it would see in the dense engine. (`tol`
    is also far above the float64 rounding of the bounds, ~1e-16 ||w||.)
    """
    positions, fresh = [], []
    best = -np.inf
    while True:
        top = bounds.largest(picked)
        if top < best - tol or top == -np.inf:
            break
        # The first round recomputes the bounds near the top; its best fresh H sets the limit for the rest.
        batch = bounds.pop_at_least(top - FIRST_ROUND if best == -np.inf else best - tol, picked)
        h = bounds.unit.project(w, bounds.index[batch]) - PICK_RISE * picked  # [len(batch)] fresh H
        positions.append(batch)
        fresh.append(h)
        best = max(best, float(h.max()))
    positions, fresh = np.concatenate(positions), np.concatenate(fresh)
    by_index = np.argsort(bounds.index[positions])  # the tie rule wants the lowest pool index first
    positions, fresh = positions[by_index], fresh[by_index]
    i = _first_max(fresh, tol)
    fresh[i] = -np.inf  # taken
    bounds.push(positions, fresh)
    return int(bounds.index[positions[i]]), len(positions)


def _lazy_bins(unit, budgets: Sequence[int], lam: float, out: np.ndarray, stats: dict | None = None,
               progress: bool = False) -> None:
    """GraphCut bins of one pool in O(n D) memory by the lazy greedy; counts into `stats` if given."""
    stats = {} if stats is None else stats
    alive = np.ones(len(unit), bool)
    sigma_pool = unit.total()  # [dim] float64
    for k in _progress(range(len(budgets)), progress, "dq bins", len(budgets)):
        candidates = np.flatnonzero(alive)
        pool = unit.subset(candidates)  # contiguous float64 rows: projections read them without gathers
        w = 0.5 * lam * sigma_pool  # loses f̂_q with every pick q
        bounds = _LazyBounds(pool, w)
        tol = _tolerance(lam, len(pool))
        local = np.empty(int(budgets[k]), np.int64)  # picks, as positions in `candidates`
        for t in range(len(local)):
            # Recomputing as many rows as one projection of all costs: a new epoch is as cheap.
            if bounds.recomputed >= len(bounds.index):
                bounds.project_all(w, t)
                stats["epochs"] = stats.get("epochs", 0) + 1
            local[t], recomputed = _lazy_pick(bounds, w, t, tol)
            direction = pool.direction(local[t])
            w -= direction
            bounds.add_pick(direction)
            stats["picks"] = stats.get("picks", 0) + 1
            stats["recomputed"] = stats.get("recomputed", 0) + recomputed
        picks = candidates[local]
        alive[picks] = False
        out[picks] = k
        if len(picks):
            sigma_pool = sigma_pool - unit.total(picks)


def greedy_bins(unit, budgets: Sequence[int], *, lam: float = 1.0, engine: str = "auto",
                precision: str = "float64", stats: dict | None = None, progress: bool = False) -> np.ndarray:
    """Recursive GraphCut bins of one pool: bin k takes budgets[k] items, the last bin the rest.

    unit: the pool's unit-norm features (`unit_features`); returns int32 [n], values 0..len(budgets).
    engine: dense | lazy | auto (dense up to DENSE_MAX_ITEMS items). precision (dense engine only):
    float64 | float32 (float32 BLAS for kernels larger than dq.select.cosine.FLOAT64_MAX_COST). stats (lazy
    engine only): filled with the counts of picks and of candidates recomputed.
    """
    n = len(unit)
    out = np.full(n, len(budgets), np.int32)
    if engine == "auto":
        engine = "dense" if n <= DENSE_MAX_ITEMS else "lazy"
    if engine == "dense":
        _dense_bins(unit, budgets, lam, blas_dtype(n * n * unit.dim, precision), out)
    elif engine == "lazy":
        _lazy_bins(unit, budgets, lam, out, stats, progress)
    else:
        raise ValueError(f"engine must be dense, lazy or auto, got {engine!r}")
    return out


def _check_num_bins(num_bins, labels: np.ndarray) -> None:
    COUNT.check("num_bins", num_bins)
    classes, counts = np.unique(labels, return_counts=True)
    smallest = int(np.argmin(counts))
    if num_bins > counts[smallest]:
        raise DQError(f"select.num_bins = {num_bins} is larger than the smallest class (class "
                      f"{int(classes[smallest])} has {int(counts[smallest])} samples); expected at most "
                      f"{int(counts[smallest])}")


def dq_bins(features, labels, num_bins: int, *, lam: float = 1.0, per_class: bool = True,
            precision: str = "float64", progress: bool = False) -> np.ndarray:
    """The DQ bin of every sample, int32 [N], values 0..num_bins-1.

    features: float [N, D] or GradientFeatures; labels: int [N]. Per class (default) every class is
    split by its own recursion with the budgets of `bin_budgets`; with per_class=False bin k takes
    round(N / num_bins) items from everything bins 0..k-1 left, in O(N D) memory. precision float64
    (the default) gives exactly the bins of a float64 brute-force reference; float32 is faster on large
    classes but can flip a near-tie, and a flip moves every later pick of that class.
    """
    PRECISION.check("precision", precision)  # before any work
    n = check_features(features)
    labels = check_labels(labels, n)
    _check_num_bins(num_bins, labels)
    POSITIVE.check("lam", lam)
    if not per_class:
        budgets = bin_budgets([n], num_bins)[:, 0]
        return greedy_bins(unit_features(features, precision), budgets, lam=lam, engine="lazy", progress=progress)
    classes, inverse = np.unique(labels, return_inverse=True)
    budgets = bin_budgets(np.bincount(inverse), num_bins)  # [num_bins - 1, num_classes]
    bins = np.empty(n, np.int32)
    visits = _progress(range(len(classes)), progress, "dq bins", len(classes))
    for c, members, unit in class_units(features, labels, precision, visits):
        bins[members] = greedy_bins(unit, budgets[:, c], lam=lam, precision=precision)
    return bins


def graphcut_indices(features, labels, ratio: float, *, lam: float = 1.0, precision: str = "float64") -> np.ndarray:
    """One-shot GraphCut per class; class budgets apportioned from round(ratio * N) as in sample_bins."""
    check_ratio(ratio)
    n = check_features(features)
    labels = check_labels(labels, n)
    _, inverse = np.unique(labels, return_inverse=True)
    quotas = apportion(np.bincount(inverse), round(ratio * n))
    kept = []
    for c, members, unit in class_units(features, labels, precision):
        first = greedy_bins(unit, [int(quotas[c])], lam=lam, precision=precision) == 0
        kept.append(members[first])
    return np.sort(np.concatenate(kept)).astype(np.int64)
