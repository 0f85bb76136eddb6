"""DQ selection against an independent brute-force reference, sampling, baselines, errors, the stage."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import yaml

from dq.select import cosine, engines
from dq.core.errors import DQError
from dq.data.prepared import Prepared
from dq.data.prepared_writer import write_prepared
from dq.select import dq_bins, sample_bins, select_indices
from dq.select.cosine import GradientFeatures, unit_features
from dq.select.engines import greedy_bins
from dq.select.folder import diversity
from dq.select.sampling import bin_budgets


# ------------------------------------------------------------------------ the brute-force reference

def exact_kernel(f) -> list[list[int]]:
    """s(i, j) = 0.5 + 0.5 cos(f_i, f_j) rounded to multiples of 2**-60, as Python integers [n][n]."""
    n = len(f)
    norm = [math.sqrt(math.fsum(v * v for v in row)) for row in f]
    kernel = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            cos = 1.0 if i == j else math.fsum(a * b for a, b in zip(f[i], f[j])) / (norm[i] * norm[j])
            kernel[i][j] = kernel[j][i] = round((0.5 + 0.5 * cos) * 2**60)
    return kernel


def exact_graphcut(kernel, lam, pool, budget) -> list[int]:
    """The textbook greedy: every gain lam * sum_{j in pool} s(j, x) - 2 * sum_{q chosen} s(q, x) recomputed."""
    lam_num, lam_den = Fraction(lam).as_integer_ratio()
    chosen = []
    for _ in range(budget):
        candidates = [x for x in pool if x not in chosen]
        gains = [lam_num * sum(kernel[j][x] for j in pool) - 2 * lam_den * sum(kernel[q][x] for q in chosen)
                 for x in candidates]
        best = max(range(len(candidates)), key=lambda i: (gains[i], -candidates[i]))
        chosen.append(candidates[best])
    return chosen


def reference_bins(f, labels, num_bins, lam=1.0, per_class=True):
    """Textbook DQ: a dense kernel, every gain recomputed at every step, in exact arithmetic.

    The kernel is rounded to multiples of 2**-60 and gains are summed as Python integers, so gains
    that are equal in exact arithmetic (duplicate rows; with lam = 2 the last two candidates of a
    bin) tie exactly and go to the lowest index.
    """
    f = np.asarray(f, np.float64)
    n = len(f)
    kernel = exact_kernel(f)
    bins = np.full(n, num_bins - 1, np.int32)
    bin_size = round(n / num_bins)
    groups = sorted(set(labels.tolist())) if per_class else [None]
    left = {c: [i for i in range(n) if c is None or labels[i] == c] for c in groups}
    for k in range(num_bins - 1):
        n_left = sum(len(v) for v in left.values())
        if n_left == 0:
            break
        if per_class:
            budgets = {c: min(len(v), round(bin_size / n_left * len(v))) for c, v in left.items()}
        else:
            budgets = {None: min(bin_size, n_left)}
        for c in groups:
            for x in exact_graphcut(kernel, lam, left[c], budgets[c]):
                bins[x] = k
                left[c].remove(x)
    return bins


def random_case(seed, kind):
    """Clustered features with unequal classes and exact duplicate rows (ties)."""
    rng = np.random.default_rng(seed)
    num_bins = 2 + seed % 11
    sizes = rng.integers(num_bins, num_bins + 25, size=rng.integers(1, 4))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    n = len(labels)
    centres = rng.normal(size=(3, 5))
    h = centres[rng.integers(0, 3, n)] + 0.6 * rng.normal(size=(n, 5))
    e = rng.normal(size=(n, 3))
    for _ in range(max(1, n // 10)):  # duplicates, within and across classes
        i, j = rng.integers(0, n, 2)
        h[j], e[j] = h[i], e[i]
    lam = [1.0, 0.5, 2.0][seed % 3]
    feats = GradientFeatures(e, h) if kind == "gradient" else h
    return feats, labels, num_bins, lam


@pytest.mark.parametrize("per_class", [True, False], ids=["per-class", "whole"])
@pytest.mark.parametrize("kind", ["embedding", "gradient"])
@pytest.mark.parametrize("seed", range(33))
def test_bins_equal_brute_force_reference(seed, kind, per_class, monkeypatch):
    if seed % 2:  # every class through the lazy engine too (whole-dataset mode always uses it)
        monkeypatch.setattr(engines, "DENSE_MAX_ITEMS", 0)
    feats, labels, num_bins, lam = random_case(seed, kind)
    explicit = feats.materialise() if kind == "gradient" else feats
    expected = reference_bins(explicit, labels, num_bins, lam, per_class)
    got = dq_bins(feats, labels, num_bins, lam=lam, per_class=per_class)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(0, 33, 4))
def test_float64_precision_stays_exact_where_float32_kernels_would_be_used(seed, monkeypatch):
    """select.precision float64 (the default) never drops to float32, however large a kernel: with the size
    threshold at 0, every float32 kernel would be float32, and the default still equals the reference."""
    monkeypatch.setattr(cosine, "FLOAT64_MAX_COST", 0)
    feats, labels, num_bins, lam = random_case(seed, "embedding")
    feats = np.asarray(feats, np.float32)  # float32 features: the case where rows used to stay float32
    expected = reference_bins(feats, labels, num_bins, lam)
    np.testing.assert_array_equal(dq_bins(feats, labels, num_bins, lam=lam), expected)
    fast = dq_bins(feats, labels, num_bins, lam=lam, precision="float32")
    assert np.array_equal(np.bincount(fast, minlength=num_bins), np.bincount(expected, minlength=num_bins))


def test_unknown_precision_is_refused():
    with pytest.raises(DQError, match="select.precision = 'float16' is not allowed"):
        dq_bins(_x(), np.zeros(30, int), 3, precision="float16")


def test_duplicates_tie_to_the_lowest_index():
    for seed in range(5):
        x = np.random.default_rng(seed).normal(size=(12, 4))
        x = np.concatenate([x, x])  # row i and row i + 12 are equal: every gain ties with its copy
        labels = np.zeros(24, np.int64)
        np.testing.assert_array_equal(dq_bins(x, labels, 3), reference_bins(x, labels, 3))
        for engine in ("dense", "lazy"):
            first = greedy_bins(unit_features(x), [1], engine=engine)
            assert np.flatnonzero(first == 0)[0] < 12


@pytest.mark.parametrize("per_class", [True, False])
def test_factored_gradient_kernel_equals_materialised(per_class):
    rng = np.random.default_rng(7)
    n = 400
    g = GradientFeatures(rng.normal(size=(n, 10)).astype(np.float32),
                         rng.normal(size=(n, 16)).astype(np.float32))
    labels = rng.integers(0, 4, n)
    a = dq_bins(g, labels, 6, per_class=per_class)
    b = dq_bins(g.materialise(), labels, 6, per_class=per_class)
    np.testing.assert_array_equal(a, b)
    unit = unit_features(g)
    explicit = unit_features(g.materialise())
    np.testing.assert_allclose(unit.block(np.float64), explicit.block(np.float64), atol=1e-12)


def _clustered(n, dim, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, dim))
    return (centres[rng.integers(0, 6, n)] + 0.5 * rng.normal(size=(n, dim))).astype(dtype)


def test_lazy_engine_equals_dense_engine():
    x = _clustered(1500, 12, seed=11)
    unit = unit_features(x)
    budgets = bin_budgets([1500], 8)[:, 0]
    dense = greedy_bins(unit, budgets, engine="dense", precision="float64")
    np.testing.assert_array_equal(greedy_bins(unit, budgets, engine="lazy"), dense)


def test_whole_dataset_mode_at_moderate_size():
    # Clustered float32 data as a backbone gives it: many near-equal gains, and enough picks that the
    # lazy engine starts new epochs. The dense engine in float64 is the exact greedy.
    n = 3000
    x = _clustered(n, 64, seed=3, dtype=np.float32)
    labels = np.random.default_rng(0).integers(0, 10, n)
    stats = {}
    unit = unit_features(x)
    budgets = bin_budgets([n], 10)[:, 0]
    lazy = greedy_bins(unit, budgets, engine="lazy", stats=stats)
    np.testing.assert_array_equal(dq_bins(x, labels, 10, per_class=False), lazy)
    dense = greedy_bins(unit, budgets, engine="dense", precision="float64")
    assert (lazy == dense).mean() >= 0.99
    assert stats["picks"] == budgets.sum() and stats["epochs"] > 0
    # Lazy: far fewer recomputations than the candidates a full greedy step looks at.
    full = sum((n - budgets[:k].sum() - t) for k in range(len(budgets)) for t in range(budgets[k]))
    assert stats["recomputed"] < 0.2 * full


def test_bin_sizes_follow_the_budgets():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), [50, 37, 91])
    x = rng.normal(size=(len(labels), 6))
    budgets = bin_budgets([50, 37, 91], 7)
    assert budgets.shape == (6, 3)
    bins = dq_bins(x, labels, 7)
    for c in range(3):
        counts = np.bincount(bins[labels == c], minlength=7)
        np.testing.assert_array_equal(counts[:6], budgets[:, c])
        assert counts.sum() == [50, 37, 91][c]
    whole = np.bincount(dq_bins(x, labels, 7, per_class=False), minlength=7)
    assert whole[:6].tolist() == [round(178 / 7)] * 6 and whole.sum() == 178


def test_budgets_use_pythons_round():
    # N = 10, 4 bins: bin_size = round(2.5) = 2 (banker's rounding), shares round(2 / 10 * 5) = 1.
    np.testing.assert_array_equal(bin_budgets([5, 5], 4), [[1, 1], [1, 1], [1, 1]])
    np.testing.assert_array_equal(bin_budgets([15], 10)[:, 0], [2, 2, 2, 2, 2, 2, 2, 1, 0])


# --------------------------------------------------------------------------------------- sampling

def test_sample_bins_totals_are_exact():
    labels = np.repeat(np.arange(10), 100)
    bins = np.tile(np.arange(10), 100).astype(np.int32)
    idx = sample_bins(bins, labels, 0.125, seed=0)
    assert idx.dtype == np.int64 and len(idx) == 125  # not 100 (per-cell rounding) nor 124
    assert np.all(np.diff(idx) > 0)
    cells = np.zeros((10, 10), int)
    np.add.at(cells, (bins[idx], labels[idx]), 1)
    assert set(np.unique(cells)) <= {1, 2}  # every cell of 10 gets floor or ceil of 1.25


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.125, 0.333, 0.5, 0.9, 1.0])
def test_sample_bins_cells_are_proportional(ratio):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 997)
    bins = rng.integers(0, 5, 997)
    idx = sample_bins(bins, labels, ratio, seed=3)
    assert len(idx) == round(ratio * 997) and len(np.unique(idx)) == len(idx)
    for b in range(5):
        for c in range(7):
            size = int(((bins == b) & (labels == c)).sum())
            got = int(((bins[idx] == b) & (labels[idx] == c)).sum())
            share = round(ratio * 997) * size / 997
            assert math.floor(share) <= got <= math.ceil(share)


def test_sample_bins_seeds():
    labels = np.repeat(np.arange(4), 50)
    bins = np.tile(np.arange(5), 40)
    a = sample_bins(bins, labels, 0.3, seed=1)
    np.testing.assert_array_equal(a, sample_bins(bins, labels, 0.3, seed=1))
    assert not np.array_equal(a, sample_bins(bins, labels, 0.3, seed=2))


def test_no_bins_means_class_cells():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    idx = sample_bins(np.full(60, -1), labels, 0.5, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 10, 15])


# -------------------------------------------------------------------------------------- baselines

def test_baselines():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), [40, 60, 100])
    x = rng.normal(size=(200, 8))
    for method in ("dq", "graphcut", "random"):
        bins, idx = select_indices(method, x, labels, 0.2, seed=0, num_bins=5)
        assert len(idx) == 40 and np.all(np.diff(idx) > 0)
        if method == "dq":  # every (bin, class) cell gives its share: 1.6, 2.4 or 4 items
            cells = np.zeros((5, 3), int)
            np.add.at(cells, (bins[idx], labels[idx]), 1)
            assert set(cells[:, 0]) <= {1, 2} and set(cells[:, 1]) <= {2, 3} and set(cells[:, 2]) == {4}
        else:
            np.testing.assert_array_equal(np.bincount(labels[idx]), [8, 12, 20])
        assert bins.dtype == np.int32 and ((bins >= 0).all() if method == "dq" else (bins == -1).all())
    _, gc = select_indices("graphcut", x, labels, 0.2, seed=0)
    members = np.flatnonzero(labels == 1)
    one_shot = greedy_bins(unit_features(x[members]), [12]) == 0
    np.testing.assert_array_equal(gc[labels[gc] == 1], members[one_shot])
    _, r1 = select_indices("random", x, labels, 0.2, seed=0)
    _, r2 = select_indices("random", x, labels, 0.2, seed=9)
    assert not np.array_equal(r1, r2)


# ----------------------------------------------------------------------------------------- errors

def _x(n=30):
    return np.random.default_rng(0).normal(size=(n, 4))


@pytest.mark.parametrize("bad, words", [
    ("nan", ["row 3", "NaN"]), ("inf", ["row 3", "infinite"]), ("zero", ["row 3", "zero norm"]),
])
def test_bad_features(bad, words):
    x = _x()
    x[3] = {"nan": [np.nan, 0, 0, 0], "inf": [np.inf, 0, 0, 0], "zero": [0, 0, 0, 0]}[bad]
    with pytest.raises(DQError) as err:
        dq_bins(x, np.zeros(30, int), 3)
    assert all(w in str(err.value) for w in words)


def test_zero_gradient_row():
    e = np.ones((30, 3))
    e[5] = 0
    with pytest.raises(DQError, match="logit_grad: row 5 has zero norm"):
        dq_bins(GradientFeatures(e, _x()), np.zeros(30, int), 3)


def test_label_count_mismatch():
    with pytest.raises(DQError, match="labels: expected one label per feature row"):
        dq_bins(_x(), np.zeros(29, int), 3)


def test_num_bins_errors():
    labels = np.repeat([0, 1], [22, 8])
    with pytest.raises(DQError) as err:
        dq_bins(_x(), labels, 9)
    assert "select.num_bins = 9" in str(err.value) and "class 1 has 8 samples" in str(err.value)
    with pytest.raises(DQError, match="select.num_bins = 0"):
        dq_bins(_x(), labels, 0)
    assert (dq_bins(_x(), labels, 1) == 0).all()


# ------------------------------------------------------------------------------------------ stage

def _write_features(tmp_path, embedding, logit_grad=None):
    from dq.features.file import Features, write_features

    c = 3
    write_features(tmp_path / "features" / "train.h5", Features(
        embedding=embedding, logit_grad=logit_grad, probe_weight=np.zeros((c, embedding.shape[1]), np.float32),
        probe_bias=np.zeros(c, np.float32), kind="embedding" if logit_grad is None else "gradient",
        backbone="efficientnet_lite0", weights="none", input_size=32, classes=["a", "b", "c"],
        probe_train_accuracy=1.0))


def _write_stage_inputs(tmp_path, gradient):
    rng = np.random.default_rng(0)
    n = 120
    labels = np.repeat(np.arange(3), 40)
    write_prepared(tmp_path / "prepared" / "train",
                   Prepared(np.zeros((n, 8, 8, 3), np.uint8), labels, ["a", "b", "c"], "synthetic"))
    embedding = rng.normal(size=(n, 6)).astype(np.float32) + labels[:, None]
    _write_features(tmp_path, embedding, rng.normal(size=(n, 3)).astype(np.float32) if gradient else None)
    params = yaml.safe_load(open("params.yaml"))
    params["ratio"] = 0.25
    params["select"]["num_bins"] = 4
    params["features"]["weights"] = "none"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path, labels


@pytest.mark.parametrize("gradient", [False, True])
def test_stage_writes_selection(tmp_path, gradient):
    from stages.select import main

    params, labels = _write_stage_inputs(tmp_path, gradient)
    main(["--params", str(params), "--data", str(tmp_path)])
    out = tmp_path / "selection"
    bins, idx = np.load(out / "bins.npy"), np.load(out / "indices.npy")
    assert bins.dtype == np.int32 and bins.shape == (120,) and set(bins.tolist()) == {0, 1, 2, 3}
    assert idx.dtype == np.int64 and len(idx) == 30 and np.all(np.diff(idx) > 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 30 and summary["kept_per_class"] == {"0": 10, "1": 10, "2": 10}
    assert summary["kind"] == ("gradient" if gradient else "embedding")
    assert sum(summary["per_bin"].values()) == 120
    assert "diversity" not in summary  # floats that move with the BLAS live in the metrics file
    metrics = json.loads((tmp_path / "selection_metrics.json").read_text())
    for part in ("kept", "full"):
        assert 0 < metrics["diversity"][part]["mean_nn_distance"] < 2
    png = (tmp_path / "selection_plots" / "bins.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    first = (out / "summary.json").read_bytes(), (out / "indices.npy").read_bytes()
    main(["--params", str(params), "--data", str(tmp_path)])  # same params: same bytes
    assert first == ((out / "summary.json").read_bytes(), (out / "indices.npy").read_bytes())
    assert not list(tmp_path.glob(".selection*"))


def test_selection_bytes_do_not_move_with_the_last_bits_of_the_features(tmp_path):
    """compress depends on data/selection: a 1-ulp change of every feature (as another BLAS or machine
    gives) must leave its bytes alone, and the diversity metrics beside it too (rounded by dq.core.io.write_metrics)."""
    from dq.features.file import read_features
    from stages.select import main

    params, _ = _write_stage_inputs(tmp_path, False)
    main(["--params", str(params), "--data", str(tmp_path)])
    before = {p.name: p.read_bytes() for p in sorted((tmp_path / "selection").iterdir())}
    metrics_before = (tmp_path / "selection_metrics.json").read_bytes()

    embedding = read_features(tmp_path / "features" / "train.h5").embedding
    nudged = np.nextafter(embedding, np.float32(np.inf))
    assert (nudged != embedding).all()
    _write_features(tmp_path, nudged)
    main(["--params", str(params), "--data", str(tmp_path)])
    after = {p.name: p.read_bytes() for p in sorted((tmp_path / "selection").iterdir())}
    assert after == before
    assert set(before) == {"bins.npy", "indices.npy", "summary.json"}
    # the diversity floats moved in their last bits, but a metrics file keeps 6 significant digits (issue 37)
    assert (tmp_path / "selection_metrics.json").read_bytes() == metrics_before


def test_stage_rejects_mismatched_files(tmp_path):
    from stages.select import main

    params, _ = _write_stage_inputs(tmp_path, False)
    _write_features(tmp_path, np.ones((100, 6), np.float32))
    with pytest.raises(DQError, match="has 100 rows but the prepared training set has 120"):
        main(["--params", str(params), "--data", str(tmp_path)])
    assert not (tmp_path / "selection").exists()


def test_selection_normalises_one_class_at_a_time_with_the_whole_set_bits(monkeypatch):
    """dq, graphcut and diversity hold unit rows of one class at a time (memory beyond the features grows with
    the largest class, not with N), and the bins equal those of the whole-set unit view, cut per class."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), [50, 80, 30, 40])
    x = (rng.normal(size=(200, 12)) + labels[:, None]).astype(np.float32)
    whole = unit_features(x)
    reference = np.empty(200, np.int32)
    budgets = bin_budgets(np.bincount(labels), 5)
    for c in range(4):
        members = np.flatnonzero(labels == c)
        reference[members] = greedy_bins(whole.subset(members), budgets[:, c])
    largest = []
    monkeypatch.setattr(cosine, "unit_features",
                        lambda f, *a, **k: (largest.append(len(f)), unit_features(f, *a, **k))[1])
    assert np.array_equal(dq_bins(x, labels, 5), reference)
    select_indices("graphcut", x, labels, 0.2, 0)
    diversity(x, labels)
    assert largest and max(largest) == 80


def test_a_bad_row_is_named_by_its_row_in_the_whole_set():
    x = np.ones((200_000, 2), np.float32)
    x[150_001] = np.nan
    x[199_999] = np.inf
    with pytest.raises(DQError, match=r"^features: row 150001 holds NaN or infinite values \(2 such rows\)"):
        dq_bins(x, np.zeros(200_000, np.int64), 2)
