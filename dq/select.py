"""Dataset Quantization selection: GraphCut kernels, the recursive DQ bins, bin sampling, baselines.

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

Selection methods (`select.method`) are entries of the registry `METHODS` (dq.registry): a function
`(features, labels, ratio, seed, *, num_bins, lam, per_class, precision, progress, score, beta, strata, k, gamma,
gamma_reverse, scores) -> (bins int32 [N], sorted int64 indices)` that declares whether it makes bins
(`makes_bins`; without, bins are -1), whether it reads the features (`needs_features`) and whether it ranks by
the scores stage's difficulty (`needs_scores`: ccs, d2, dq-ccs, in dq.select_difficulty, registered here by
path). `select_indices` looks the method up; adding one is one function:

    @METHODS.register("first", makes_bins=False, needs_features=False)
    def first(features, labels, ratio, seed, **select_params):
        n = len(labels)
        return np.full(n, -1, np.int32), np.arange(round(ratio * n), dtype=np.int64)
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dq.errors import DQError
from dq.registry import Registry

PRECISIONS = ("float64", "float32")  # select.precision
# needs_scores: the method ranks samples by a difficulty score of the scores stage (select_indices' `scores`)
METHODS = Registry("selection method", "select.method", makes_bins=False, needs_features=True, needs_scores=False)
DIFFICULTY_SCORES = ("aum", "el2n", "forgetting")  # select.score: dq.scores' training-dynamics scores
# The params of the difficulty-aware methods (dq.select_difficulty), their defaults and rules: one home for
# params validation (dq.params.SelectParams) and for select_indices called directly.
DIFFICULTY_DEFAULTS = {"score": "aum", "beta": 0.1, "strata": 50, "k": 10, "gamma": 1.0, "gamma_reverse": 1.0}


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


SELECT_PARAM_RULES = {
    "score": (lambda v: v in DIFFICULTY_SCORES, f"one of {', '.join(DIFFICULTY_SCORES)}"),
    "beta": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "strata": (_is_count, "a positive integer"),
    "k": (_is_count, "a positive integer"),
    "gamma": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "gamma_reverse": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
}


def select_param_problem(name: str, value) -> str | None:
    """What select.`name` (a param of the difficulty-aware methods) must be when `value` is not that."""
    ok, expected = SELECT_PARAM_RULES[name]
    return None if ok(value) else expected


def check_select_params(**values) -> None:
    """One DQError line naming the first bad param, e.g. `select.beta = 2 is not allowed; expected a number in [0, 1)`."""
    for name, value in values.items():
        problem = select_param_problem(name, value)
        if problem:
            raise DQError(f"select.{name} = {value!r} is not allowed; expected {problem}")


def ratio_problem(ratio) -> str | None:
    """What `ratio` (the share of samples kept) must be when it is not: one rule for params and the functions."""
    ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and 0 < ratio <= 1
    return None if ok else "a number in (0, 1]"


def check_ratio(ratio) -> None:
    problem = ratio_problem(ratio)
    if problem:
        raise DQError(f"ratio = {ratio!r} is not allowed; expected {problem}")

# Gains closer than this (relative to the gain's scale) are ties and go to the lowest index; it absorbs
# float64 rounding so that duplicate rows tie however BLAS orders its sums.
TIE_RTOL = 1e-9
# Rows per slice when checking features for NaN or zero rows (bounds the temporaries).
CHECK_ROWS = 65536
# Kernels costing up to this many multiply-adds are computed in float64, larger ones in float32.
FLOAT64_MAX_COST = 2**27
# Classes larger than this use the lazy engine: their dense cosine block would need > 256 MiB.
DENSE_MAX_ITEMS = 8192
# Rows projected per einsum call: bounds the gathered copy (16 MiB of float64 rows at D = 512). Projections
# use einsum's single-threaded loop, not BLAS: the lazy greedy's few hundred rows per step would spend
# more time waking BLAS threads (milliseconds on a loaded machine) than computing.
PROJECT_CHUNK = 4096
# The most one pick can raise g(x) = 0.5 lam <sigma_P, f̂_x> - <sigma_S, f̂_x>: 1 = -min cos, plus a
# hair for unit rows rounded to float32 (their norms can exceed 1 by ~1e-7).
PICK_RISE = 1.0 + 1e-6
# The lazy greedy's first round per pick recomputes the bounds this close to the top (in units of g, which a
# pick moves by at most 1): the best fresh gain is usually among them, so later rounds waste little.
FIRST_ROUND = 0.3


# ----------------------------------------------------------------------------------------- features

@dataclass(frozen=True)
class GradientFeatures:
    """Last-layer gradient features in factored form, never materialised.

    The gradient of the loss w.r.t. the last linear layer (weights and bias) of sample i is
    f_i = [e_i, vec(e_i ⊗ h_i)], so <f_i, f_j> = <e_i, e_j> (1 + <h_i, h_j>).

    logit_grad: e, [N, C] (dLoss/dlogits); embedding: h, [N, D] (the input of the last layer).
    """

    logit_grad: np.ndarray
    embedding: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.logit_grad)[0])

    def materialise(self) -> np.ndarray:
        """The explicit features f, [N, C + C*D] (tests and small data only)."""
        e = np.asarray(self.logit_grad, np.float64)
        h = np.asarray(self.embedding, np.float64)
        return np.concatenate([e, (e[:, :, None] * h[:, None, :]).reshape(len(e), -1)], axis=1)


def _blas_dtype(cost: float, precision: str):
    """float64 kernels are exact against the float64 reference; `float32` trades that for speed where a
    kernel is large (small ones stay float64: there it costs nothing)."""
    if precision not in PRECISIONS:
        raise DQError(f"select.precision = {precision!r} is not allowed; expected one of {', '.join(PRECISIONS)}")
    return np.float32 if precision == "float32" and cost > FLOAT64_MAX_COST else np.float64


class _UnitRows:
    """Rows f̂ = f / ||f|| of dense features: the only view of the data the kernel needs.

    Directions (sums of rows) are float64 vectors [D].
    """

    def __init__(self, rows: np.ndarray):
        self.rows = rows  # [n, D] float64 (float32 for large float32 inputs), unit norm
        self._cast = {rows.dtype.type: rows}

    @classmethod
    def from_features(cls, x: np.ndarray, precision: str = "float64", whole_size: int | None = None) -> "_UnitRows":
        # With float32 precision, large float32 inputs stay float32 (their kernels are float32 anyway);
        # norms are float64 either way. whole_size: the size of the set x was cut from (one class of it).
        size = x.size if whole_size is None else whole_size
        keep32 = precision == "float32" and x.dtype == np.float32 and size > FLOAT64_MAX_COST // 32
        norm = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))
        return cls(x / norm[:, None].astype(x.dtype) if keep32 else np.asarray(x, np.float64) / norm[:, None])

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def _as(self, dtype) -> np.ndarray:
        if dtype not in self._cast:
            self._cast[dtype] = self.rows.astype(dtype)
        return self._cast[dtype]

    def subset(self, idx: np.ndarray) -> "_UnitRows":
        """The rows idx, as float64: engines run on subsets, and the lazy engine's dot products are
        twice as fast without a cast."""
        return _UnitRows(self.rows[idx].astype(np.float64, copy=False))

    def block(self, dtype, rows=None, cols=None) -> np.ndarray:
        """Cosines between two subsets of rows, [len(rows), len(cols)] in `dtype`."""
        x = self._as(dtype)
        a = x if rows is None else x[rows]
        b = x if cols is None else x[cols]
        return a @ b.T

    def project(self, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """<f̂_i, w> in float64 for every row (or the rows `rows`), [len(rows)]; w: [D] float64."""
        return _chunked(lambda r: np.einsum("nd,d->n", self.rows[r], w), len(self), rows)

    def direction(self, i: int) -> np.ndarray:
        """f̂_i, [D] float64."""
        return self.rows[i].astype(np.float64)

    def total(self, idx=None) -> np.ndarray:
        """sigma = sum of the rows (all, or idx), [D] float64."""
        return (self.rows if idx is None else self.rows[idx]).sum(axis=0, dtype=np.float64)


class _UnitGradients:
    """Rows f̂ of factored gradient features: ê = e / ||f|| [n, C] beside h [n, D].

    A direction w in f-space is stored flat as [u (C), vec(M) (C*D)], so <f̂_i, w> =
    <ê_i, u> + ê_iᵀ M h_i costs O(C D) per row and f is never formed.
    """

    def __init__(self, e_hat: np.ndarray, h: np.ndarray):
        self.e = e_hat  # [n, C] float64
        self.h = h  # [n, D] float64
        self._cast = {np.float64: (e_hat, h)}

    @classmethod
    def from_features(cls, g: GradientFeatures) -> "_UnitGradients":
        e = np.asarray(g.logit_grad, np.float64)
        h = np.asarray(g.embedding, np.float64)
        norm = np.linalg.norm(e, axis=1) * np.sqrt(1.0 + np.einsum("nd,nd->n", h, h))
        return cls(e / norm[:, None], h)

    def __len__(self) -> int:
        return self.e.shape[0]

    @property
    def dim(self) -> int:
        c, d = self.e.shape[1], self.h.shape[1]
        return c + c * d

    def _as(self, dtype):
        if dtype not in self._cast:
            self._cast[dtype] = (self.e.astype(dtype), self.h.astype(dtype))
        return self._cast[dtype]

    def subset(self, idx: np.ndarray) -> "_UnitGradients":
        return _UnitGradients(self.e[idx], self.h[idx])

    def block(self, dtype, rows=None, cols=None) -> np.ndarray:
        e, h = self._as(dtype)
        ea, ha = (e, h) if rows is None else (e[rows], h[rows])
        eb, hb = (e, h) if cols is None else (e[cols], h[cols])
        return (ea @ eb.T) * (1 + ha @ hb.T)

    def project(self, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """<f̂_i, w> = <ê_i, u> + ê_iᵀ M h_i in float64, O(C D) per row; w: [C + C*D] float64."""
        c = self.e.shape[1]
        u, m = w[:c], w[c:].reshape(c, -1)
        def part(r):
            # Contract D first (u + M h_i, [n, C]): einsum runs this pair 3x faster than all three at once.
            return np.einsum("nc,nc->n", self.e[r], u + np.einsum("nd,cd->nc", self.h[r], m))

        return _chunked(part, len(self), rows)

    def direction(self, i: int) -> np.ndarray:
        """f̂_i = [ê_i, vec(ê_i ⊗ h_i)], [C + C*D] float64."""
        return np.concatenate([self.e[i], np.outer(self.e[i], self.h[i]).ravel()])

    def total(self, idx=None) -> np.ndarray:
        e, h = (self.e, self.h) if idx is None else (self.e[idx], self.h[idx])
        return np.concatenate([e.sum(axis=0), (e.T @ h).ravel()])


def _chunked(fn, n: int, rows: np.ndarray | None) -> np.ndarray:
    """fn(r) for consecutive chunks r of `rows` (default: all n rows), concatenated: [len(rows)] float64.

    Chunking bounds the temporaries (gathered rows, float64 casts) to PROJECT_CHUNK rows.
    """
    if rows is None:  # slices are views: no gathered copy at all
        parts = [fn(slice(s, s + PROJECT_CHUNK)) for s in range(0, n, PROJECT_CHUNK)]
    else:
        rows = np.asarray(rows)
        parts = [fn(rows[s:s + PROJECT_CHUNK]) for s in range(0, len(rows), PROJECT_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0)


def unit_features(features, precision: str = "float64", whole_size: int | None = None) -> "_UnitRows | _UnitGradients":
    """Check `features` (dense [N, D] or GradientFeatures) and return its unit-norm view.

    precision float64 (the default) normalises in float64; float32 keeps large float32 inputs in float32
    (large: judged by `whole_size` elements when `features` is one class of a larger set).
    """
    checked = _checked(features)
    if isinstance(checked, GradientFeatures):
        return _UnitGradients.from_features(checked)
    return _UnitRows.from_features(checked, precision, whole_size)


def _checked(features) -> "np.ndarray | GradientFeatures":
    """`features` with its arrays checked (finite, non-zero rows, one row of each per sample): one line naming
    the first bad row otherwise. The checks run in slices: no whole-set float64 copy of float32 features."""
    if isinstance(features, GradientFeatures):
        e, h = _finite_2d(features.logit_grad, "logit_grad"), _finite_2d(features.embedding, "embedding")
        if len(e) != len(h):
            raise DQError(f"features: logit_grad has {len(e)} rows but embedding has {len(h)}; "
                          "expected one row of each per sample")
        _nonzero_rows(e, "logit_grad")
        return GradientFeatures(e, h)
    x = _finite_2d(features, "features")
    _nonzero_rows(x, "features")
    return x


def _finite_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DQError(f"{name}: expected a numeric array [N, D], got dtype {x.dtype}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DQError(f"{name}: expected a non-empty float array [N, D], got shape {x.shape}")
    _check_rows(x, name, lambda part: ~np.isfinite(part).all(axis=1), "holds NaN or infinite values",
                "expected finite features")
    return x


def _nonzero_rows(x: np.ndarray, name: str) -> None:
    _check_rows(x, name, lambda part: ~(part != 0).any(axis=1), "has zero norm",
                "cosine similarity needs nonzero feature rows")


def _check_rows(x: np.ndarray, name: str, is_bad, what: str, expected: str) -> None:
    """One line naming the first row where is_bad(rows) holds and how many do; CHECK_ROWS rows at a time, so
    the temporaries stay small however many samples there are."""
    first, count = None, 0
    for start in range(0, x.shape[0], CHECK_ROWS):
        bad = np.flatnonzero(is_bad(x[start:start + CHECK_ROWS]))
        if bad.size and first is None:
            first = start + int(bad[0])
        count += bad.size
    if count:
        raise DQError(f"{name}: row {first} {what} ({count} such rows); {expected}")


def _class_rows(features, members: np.ndarray):
    """The rows `members` of dense features [N, D] or of GradientFeatures: one class's copy, not the set's."""
    if isinstance(features, GradientFeatures):
        return GradientFeatures(np.asarray(features.logit_grad)[members], np.asarray(features.embedding)[members])
    return np.asarray(features)[members]


def class_units(features, labels: np.ndarray, precision: str = "float64", classes=None):
    """(class index, members int64 [n_c], unit view of the class's rows) for each class in turn.

    Rows are normalised one class at a time, so what selection holds beyond the features themselves grows
    with the largest class, not with N. Row-wise normalisation gives each row the bits it gets in the
    whole-set view. `classes`: the class indices to visit (default: all, ascending); labels: int [N].
    """
    uniq, inverse = np.unique(labels, return_inverse=True)
    whole = None if isinstance(features, GradientFeatures) else np.asarray(features).size
    for c in range(len(uniq)) if classes is None else classes:
        members = np.flatnonzero(inverse == c)
        unit = unit_features(_class_rows(features, members), precision, whole)
        yield c, members, unit.subset(np.arange(len(members)))  # float64 rows, as the engines take them


def check_features(features) -> int:
    """Refuse features that are not finite, non-zero rows (one line naming the first bad row of the whole set);
    returns N."""
    return len(_checked(features))


def _check_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DQError(f"labels: expected one label per feature row ({n}), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DQError(f"labels: expected integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64)


# ------------------------------------------------------------------------------------------ budgets

def bin_budgets(class_sizes: Sequence[int], num_bins: int) -> np.ndarray:
    """Per-class budgets of bins 0..num_bins-2, [num_bins - 1, num_classes] int64.

    bin_size = round(N / num_bins); class c's share of bin k is round(bin_size / n_left * n_c_left)
    (Python's round), where n_left counts what bins 0..k-1 left in all classes. Shares are capped at
    what the class has left. The last bin is the remainder and has no budget. One class with
    N items gives the whole-dataset budgets.
    """
    left = [int(n) for n in class_sizes]
    bin_size = round(sum(left) / num_bins)
    budgets = np.zeros((max(num_bins - 1, 0), len(left)), np.int64)
    for k in range(num_bins - 1):
        n_left = sum(left)
        if n_left == 0:
            break
        for c, n_c in enumerate(left):
            budgets[k, c] = min(n_c, max(0, round(bin_size / n_left * n_c)))
        left = [n_c - int(b) for n_c, b in zip(left, budgets[k])]
    return budgets


def _apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over cells proportionally to `sizes` by largest remainder, exactly, in integers.

    Equal remainders go to the earlier cell.
    """
    sizes = np.asarray(sizes, np.int64)
    n = int(sizes.sum())
    quota = total * sizes // n
    remainder = total * sizes % n
    extra = total - int(quota.sum())
    order = np.lexsort((np.arange(len(sizes)), -remainder))
    quota[order[:extra]] += 1
    return quota


# ---------------------------------------------------------------------------------- greedy engines

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
    float64 | float32 (float32 BLAS for kernels larger than FLOAT64_MAX_COST). stats (lazy engine only): filled with the counts of picks and of
    candidates recomputed.
    """
    n = len(unit)
    out = np.full(n, len(budgets), np.int32)
    if engine == "auto":
        engine = "dense" if n <= DENSE_MAX_ITEMS else "lazy"
    if engine == "dense":
        _dense_bins(unit, budgets, lam, _blas_dtype(n * n * unit.dim, precision), out)
    elif engine == "lazy":
        _lazy_bins(unit, budgets, lam, out, stats, progress)
    else:
        raise ValueError(f"engine must be dense, lazy or auto, got {engine!r}")
    return out


# ------------------------------------------------------------------------------------------ DQ bins

def _check_num_bins(num_bins, labels: np.ndarray) -> None:
    if not isinstance(num_bins, (int, np.integer)) or isinstance(num_bins, bool) or num_bins < 1:
        raise DQError(f"select.num_bins = {num_bins!r} is not allowed; expected a positive integer")
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
    _blas_dtype(0, precision)  # refuse an unknown precision before any work
    n = check_features(features)
    labels = _check_labels(labels, n)
    _check_num_bins(num_bins, labels)
    if not (math.isfinite(lam) and lam > 0):
        raise DQError(f"select.lam = {lam!r} is not allowed; expected a finite number > 0")
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


# --------------------------------------------------------------------------------- sampling, methods

def sample_bins(bins, labels, ratio: float, seed: int) -> np.ndarray:
    """Keep the same share of every (bin, class) cell: sorted int64 indices, exactly round(ratio * N).

    The total is apportioned over the cells by largest remainder (ties: the lower bin, then the lower
    class); each cell's quota is drawn uniformly with np.random.default_rng(seed). bins of -1
    everywhere make the cells just the classes.
    """
    bins = np.asarray(bins).astype(np.int64)
    labels = _check_labels(labels, bins.shape[0] if bins.ndim == 1 else -1)
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 1):
        raise DQError(f"ratio = {ratio!r} is not allowed; expected a number in (0, 1]")
    rng = np.random.default_rng(seed)
    kept = [rng.choice(members, size=q, replace=False) for members, q in bin_cells(bins, labels, ratio) if q]
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.zeros(0, np.int64)


def bin_cells(bins, labels, ratio: float) -> list[tuple[np.ndarray, int]]:
    """(members int64 [n_cell] ascending, quota) of every (bin, class) cell, in (bin, class) order: the
    budgets of `sample_bins`, whose quotas sum to exactly round(ratio * N) by largest remainder. bins of -1
    everywhere make the cells the classes (what the difficulty-aware methods draw from)."""
    bins = np.asarray(bins).astype(np.int64)
    labels = np.asarray(labels).astype(np.int64)
    n = len(labels)
    if n == 0:
        return []
    order = np.lexsort((np.arange(n), labels, bins))  # cells in (bin, class) order, members ascending
    key_b, key_c = bins[order], labels[order]
    starts = np.flatnonzero(np.r_[True, (key_b[1:] != key_b[:-1]) | (key_c[1:] != key_c[:-1])])
    sizes = np.diff(np.r_[starts, n])
    quotas = _apportion(sizes, round(ratio * n))
    return [(order[s:s + size], int(q)) for s, size, q in zip(starts, sizes, quotas)]


def graphcut_indices(features, labels, ratio: float, *, lam: float = 1.0, precision: str = "float64") -> np.ndarray:
    """One-shot GraphCut per class; class budgets apportioned from round(ratio * N) as in sample_bins."""
    check_ratio(ratio)
    n = check_features(features)
    labels = _check_labels(labels, n)
    _, inverse = np.unique(labels, return_inverse=True)
    quotas = _apportion(np.bincount(inverse), round(ratio * n))
    kept = []
    for c, members, unit in class_units(features, labels, precision):
        first = greedy_bins(unit, [int(quotas[c])], lam=lam, precision=precision) == 0
        kept.append(members[first])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def select_indices(method: str, features, labels, ratio: float, seed: int, num_bins: int = 10,
                   lam: float = 1.0, per_class: bool = True, precision: str = "float64", progress: bool = False,
                   score: str = "aum", beta: float = 0.1, strata: int = 50, k: int = 10, gamma: float = 1.0,
                   gamma_reverse: float = 1.0, scores=None):
    """(bins int32 [N], sorted int64 indices) of the registered method `method` (select.method).

    The keyword arguments after `seed` but `scores` are the keys of params.yaml's `select` section but
    `method` (their defaults: DIFFICULTY_DEFAULTS for the difficulty-aware ones). `scores`: the per-sample
    scores of the scores stage (a mapping name -> float [N], e.g. dq.scores.read_scores), which methods
    registered with `needs_scores` rank by. Methods without bins return bins of -1.
    """
    entry = METHODS.get(method)
    check_ratio(ratio)
    check_select_params(score=score, beta=beta, strata=strata, k=k, gamma=gamma, gamma_reverse=gamma_reverse)
    if entry.needs_scores and scores is None:
        raise DQError(f"select.method = {method!r} ranks samples by difficulty and needs the scores stage's "
                      "scores (data/scores); run the scores stage first")
    return entry.obj(features, np.asarray(labels), ratio, seed, num_bins=num_bins, lam=lam, per_class=per_class,
                     precision=precision, progress=progress, score=score, beta=beta, strata=strata, k=k,
                     gamma=gamma, gamma_reverse=gamma_reverse, scores=scores)


@METHODS.register("dq", makes_bins=True)
def _dq(features, labels, ratio, seed, *, num_bins, lam, per_class, precision, progress, **_):
    """DQ: GraphCut bins per class, then the same share of every bin."""
    bins = dq_bins(features, labels, num_bins, lam=lam, per_class=per_class, precision=precision, progress=progress)
    return bins, sample_bins(bins, labels, ratio, seed)


@METHODS.register("graphcut")
def _graphcut(features, labels, ratio, seed, *, lam, precision, **_):
    """One-shot GraphCut at each class's quota: no bins."""
    return np.full(check_features(features), -1, np.int32), graphcut_indices(features, labels, ratio, lam=lam,
                                                                              precision=precision)


@METHODS.register("random", needs_features=False)
def _random(features, labels, ratio, seed, **_):
    """Class-balanced random sampling: one bin per class."""
    no_bins = np.full(len(labels), -1, np.int32)
    return no_bins, sample_bins(no_bins, labels, ratio, seed)


# The difficulty-aware methods (issue 36) live in dq.select_difficulty and register here by path: their names
# and traits are known to params validation without loading them, and only the select stage imports them.
METHODS.register_lazy("ccs", "dq.select_difficulty:ccs", needs_scores=True)
METHODS.register_lazy("d2", "dq.select_difficulty:d2", needs_scores=True)
METHODS.register_lazy("moderate", "dq.select_difficulty:moderate")
METHODS.register_lazy("dq-ccs", "dq.select_difficulty:dq_ccs", makes_bins=True, needs_scores=True)


# -------------------------------------------------------------------------------------- diversity

def diversity(features, labels, subset: np.ndarray | None = None, chunk: int = 2048) -> dict:
    """Spread of a set within its classes, in cosine distance (1 - cos).

    Returns mean_distance_to_class_centre and mean_nn_distance (nearest other member of the same
    class in the set), averaged over the samples of the set; `subset`: indices, None for all.
    """
    labels = _check_labels(labels, check_features(features))
    idx = np.arange(len(labels)) if subset is None else np.asarray(subset, np.int64)
    centre_d, nn_d = [], []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        part = unit_features(_class_rows(features, members))
        sigma = part.total()
        centre_d.append(1.0 - part.project(sigma) / max(np.linalg.norm(sigma), 1e-300))
        if len(members) < 2:
            continue
        best = np.full(len(members), -np.inf)
        for s in range(0, len(members), chunk):
            rows = np.arange(s, min(s + chunk, len(members)))
            cos = part.block(np.float32, rows).astype(np.float64)  # [chunk, n]
            cos[np.arange(len(rows)), rows] = -np.inf
            best[rows] = cos.max(axis=1)
        nn_d.append(1.0 - best)
    centre = np.concatenate(centre_d) if centre_d else np.zeros(0)
    nn = np.concatenate(nn_d) if nn_d else np.zeros(0)
    return {"samples": int(len(idx)),
            "mean_distance_to_class_centre": float(centre.mean()) if centre.size else None,
            "mean_nn_distance": float(nn.mean()) if nn.size else None}
