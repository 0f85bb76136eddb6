"""Class-balanced sampling: the ratio rule, DQ's bin budgets, largest-remainder quotas and the draws of sample_bins.

Every selection keeps exactly round(ratio * N) samples, apportioned over the classes (or the (bin, class)
cells) by largest remainder: `bin_cells` gives the budgets, `sample_bins` draws them uniformly.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dq.core.errors import DQError
from dq.select.cosine import check_labels


def ratio_problem(ratio) -> str | None:
    """What `ratio` (the share of samples kept) must be when it is not: one rule for params and the functions."""
    ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and 0 < ratio <= 1
    return None if ok else "a number in (0, 1]"


def check_ratio(ratio) -> None:
    """One DQError line unless `ratio_problem` finds nothing wrong with `ratio`."""
    problem = ratio_problem(ratio)
    if problem:
        raise DQError(f"ratio = {ratio!r} is not allowed; expected {problem}")


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


def apportion(sizes: np.ndarray, total: int) -> np.ndarray:
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


def sample_bins(bins, labels, ratio: float, seed: int) -> np.ndarray:
    """Keep the same share of every (bin, class) cell: sorted int64 indices, exactly round(ratio * N).

    The total is apportioned over the cells by largest remainder (ties: the lower bin, then the lower
    class); each cell's quota is drawn uniformly with np.random.default_rng(seed). bins of -1
    everywhere make the cells just the classes.
    """
    bins = np.asarray(bins).astype(np.int64)
    labels = check_labels(labels, bins.shape[0] if bins.ndim == 1 else -1)
    check_ratio(ratio)
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
    quotas = apportion(sizes, round(ratio * n))
    return [(order[s:s + size], int(q)) for s, size, q in zip(starts, sizes, quotas)]
