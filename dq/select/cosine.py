"""The cosine kernel's view of the features: unit-norm rows, their blocks and projections, one class at a time.

Selection compares samples by s(i, j) = 0.5 + 0.5 cos(f_i, f_j), so all it needs of the features is the
unit rows f̂ = f / ||f||: `unit_features` checks the features (finite, non-zero rows, one line naming the first
bad row otherwise) and returns that view, for dense embeddings [N, D] or for last-layer gradients in factored
form (`GradientFeatures`, never materialised). `class_units` visits one class at a time, so what selection
holds beyond the features grows with the largest class, not with N.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dq.core.errors import DQError
from dq.select.method_params import one_of

PRECISIONS = ("float64", "float32")  # select.precision
PRECISION = one_of(PRECISIONS)
# Rows per slice when checking features for NaN or zero rows (bounds the temporaries).
CHECK_ROWS = 65536
# Kernels costing up to this many multiply-adds are computed in float64, larger ones in float32.
FLOAT64_MAX_COST = 2**27
# Rows projected per einsum call: bounds the gathered copy (16 MiB of float64 rows at D = 512). Projections
# use einsum's single-threaded loop, not BLAS: the lazy greedy's few hundred rows per step would spend
# more time waking BLAS threads (milliseconds on a loaded machine) than computing.
PROJECT_CHUNK = 4096


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


def blas_dtype(cost: float, precision: str):
    """The dtype of a kernel costing `cost` multiply-adds: float64 kernels are exact against the float64
    reference; `float32` trades that for speed where a kernel is large (small ones stay float64: there it costs
    nothing)."""
    PRECISION.check("precision", precision)
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


def class_unit(features, members: np.ndarray, precision: str = "float64", whole_size: int | None = None):
    """The unit view of the rows `members` alone (`unit_features` of `_class_rows`)."""
    return unit_features(_class_rows(features, members), precision, whole_size)


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
        unit = class_unit(features, members, precision, whole)
        yield c, members, unit.subset(np.arange(len(members)))  # float64 rows, as the engines take them


def check_features(features) -> int:
    """Refuse features that are not finite, non-zero rows (one line naming the first bad row of the whole set);
    returns N."""
    return len(_checked(features))


def check_labels(labels, n: int) -> np.ndarray:
    """labels as int64 [n], or one DQError line: one integer class id per feature row."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DQError(f"labels: expected one label per feature row ({n}), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DQError(f"labels: expected integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64)
