"""bench/selection_accuracy.py's bin-weighted sampling (the select.bin_weighting candidate of issue 16): exact counts."""
from __future__ import annotations

import math

import numpy as np

from bench.selection_accuracy import bin_weights, sample_bins_weighted
from dq.select import sample_bins


def test_bin_weights():
    np.testing.assert_allclose(bin_weights(3, 2.0), [1.0, math.e, math.e ** 2])
    np.testing.assert_array_equal(bin_weights(4, 0.0), [1, 1, 1, 1])
    np.testing.assert_array_equal(bin_weights(1, -3.0), [1])


def test_weighted_sampling_counts_follow_the_weights():
    # one class of 100 in 4 bins of 25; weights 1:1:2:4 → 16 kept split 2:2:4:8
    labels = np.zeros(100, np.int64)
    bins = np.repeat(np.arange(4), 25)
    idx = sample_bins_weighted(bins, labels, 0.16, seed=0, weights=[1.0, 1.0, 2.0, 4.0])
    assert len(idx) == 16 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(bins[idx], minlength=4), [2, 2, 4, 8])


def test_weighted_sampling_caps_full_bins_and_spreads_the_rest():
    # bins of 2, 10, 10: weights 100:1:1 want ~all of 12 from bin 0, which holds 2; the other 10 split 5:5
    labels = np.zeros(22, np.int64)
    bins = np.repeat(np.arange(3), [2, 10, 10])
    idx = sample_bins_weighted(bins, labels, 12 / 22, seed=1, weights=[100.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.bincount(bins[idx], minlength=3), [2, 5, 5])


def test_weighted_sampling_class_totals_equal_class_balanced_random():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, 503)
    bins = rng.integers(0, 6, 503)
    for ratio in (0.01, 0.07, 0.3, 1.0):
        idx = sample_bins_weighted(bins, labels, ratio, seed=2, weights=bin_weights(6, -2.0))
        assert len(idx) == round(ratio * 503) and len(np.unique(idx)) == len(idx)
        ref = sample_bins(np.full(503, -1), labels, ratio, seed=2)
        np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), np.bincount(labels[ref], minlength=5))
        if ratio < 1:  # bin 0 weighs e^2 times bin 5, and the share it gets is at least as large
            share = np.bincount(bins[idx], minlength=6) / np.bincount(bins, minlength=6)
            assert share[0] >= share[5]
