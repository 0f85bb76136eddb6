"""The difficulty-aware selection methods (dq.select.difficulty) against independent references written here in
plain loops from the published rules: CCS (Zheng et al. 2023), D2 pruning (Maharana et al. 2024), Moderate-DS
(Xia et al. 2023) and our dq-ccs; their params' one-line errors; the cost of selecting from stored scores."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from dq.core.errors import DQError
from dq.params import params_from_dict
from dq.select import METHODS, dq_bins, sample_bins, select_indices
from tests.pipeline_repo import tiny_params


def _data(n_per=(23, 31, 17), d=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(n_per)), n_per)
    rng.shuffle(labels)
    x = rng.normal(size=(len(labels), d)) + 2.0 * labels[:, None]
    scores = {"aum": rng.normal(size=len(labels)), "el2n": rng.random(len(labels)),
              "forgetting": rng.integers(0, 4, len(labels)).astype(float)}
    return x, labels, scores


# ------------------------------------------------------------------------------- plain-loop references

def ref_quotas(sizes, total):
    """Largest remainder: floor(total * size / n) each, the rest one by one to the largest remainders (ties: earlier)."""
    n = sum(sizes)
    quotas = [total * s // n for s in sizes]
    rema = [total * s % n for s in sizes]
    for _ in range(total - sum(quotas)):
        best = max(range(len(sizes)), key=lambda i: (rema[i], -i))
        quotas[best] += 1
        rema[best] = -1
    return quotas


def ref_cells(bins, labels, ratio):
    """[(members ascending, quota)] of the (bin, class) cells in (bin, class) order."""
    keys = sorted({(int(b), int(c)) for b, c in zip(bins, labels)})
    members = [[i for i in range(len(labels)) if (bins[i], labels[i]) == key] for key in keys]
    quotas = ref_quotas([len(m) for m in members], round(ratio * len(labels)))
    return list(zip(members, quotas))


def ref_ccs_cell(members, quota, hard, keys, beta, strata):
    n = len(members)
    drop = max(0, min(round(beta * n), n - quota))
    hardest_first = sorted(members, key=lambda i: (-hard[i], i))
    pool = sorted(hardest_first[drop:])
    lo, hi = min(hard[i] for i in pool), max(hard[i] for i in pool)
    stratum = {}
    for i in pool:
        stratum[i] = 0 if hi == lo else min(int((hard[i] - lo) / ((hi - lo) / strata)), strata - 1)
    sizes = [sum(1 for i in pool if stratum[i] == s) for s in range(strata)]
    budget, rest = [0] * strata, quota
    for left, s in zip(range(strata, 0, -1), sorted(range(strata), key=lambda s: (sizes[s], s))):
        budget[s] = min(sizes[s], rest // left)
        rest -= budget[s]
    picks = []
    for s in range(strata):
        inside = sorted((i for i in pool if stratum[i] == s), key=lambda i: (keys[i], i))
        picks += inside[:budget[s]]
    return picks


def ref_ccs(bins, labels, ratio, seed, hard, beta, strata):
    keys = np.random.default_rng(seed).random(len(labels))
    picks = []
    for members, quota in ref_cells(bins, labels, ratio):
        if quota:
            picks += ref_ccs_cell(members, quota, hard, keys, beta, strata)
    return sorted(picks)


def ref_moderate(x, labels, ratio):
    picks = []
    for members, quota in ref_cells([-1] * len(labels), labels, ratio):
        median = [float(np.median([x[i][j] for i in members])) for j in range(len(x[0]))]
        dist = {i: math.sqrt(sum((x[i][j] - median[j]) ** 2 for j in range(len(median)))) for i in members}
        ordered = sorted(members, key=lambda i: (dist[i], i))
        start = (len(members) - quota) // 2
        picks += ordered[start:start + quota]
    return sorted(picks)


def ref_d2(x, labels, ratio, hard, d2):
    """d2: the params beta, k, gamma, gamma_reverse (a dict)."""
    beta, k, gamma, gamma_reverse = d2["beta"], d2["k"], d2["gamma"], d2["gamma_reverse"]
    lo, hi = min(hard), max(hard)
    node = [(h - lo) / (hi - lo) for h in hard]
    picks = []
    for members, quota in ref_cells([-1] * len(labels), labels, ratio):
        if not quota:
            continue
        n = len(members)
        drop = max(0, min(round(beta * n), n - quota))
        pool = sorted(sorted(members, key=lambda i: (-hard[i], i))[drop:])
        unit = {i: [v / math.sqrt(sum(w * w for w in x[i])) for v in x[i]] for i in pool}
        def dist(a, b):
            return math.sqrt(sum((p - q) ** 2 for p, q in zip(unit[a], unit[b])))
        kk = min(k, len(pool) - 1)
        nbrs = {i: sorted((j for j in pool if j != i), key=lambda j: (dist(i, j), j))[:kk] for i in pool}
        s = {i: node[i] + sum(math.exp(-gamma * dist(i, j)) * node[j] for j in nbrs[i]) for i in pool}
        chosen = []
        for _ in range(quota):
            best = max((i for i in pool if i not in chosen), key=lambda i: (s[i], -i))
            chosen.append(best)
            for j in nbrs[best]:
                s[j] -= math.exp(-gamma_reverse * dist(best, j)) * s[best]
        picks += chosen
    return sorted(picks)


# ------------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("ratio,beta,strata,score", [(0.2, 0.1, 5, "aum"), (0.35, 0.0, 3, "el2n"),
                                                     (0.1, 0.3, 50, "forgetting"), (0.7, 0.4, 4, "aum")])
@pytest.mark.parametrize("seed", [0, 7])
def test_ccs_equals_reference(ratio, beta, strata, score, seed):
    x, labels, scores = _data(seed=seed)
    hard = list(-scores["aum"] if score == "aum" else scores[score])
    bins, idx = select_indices("ccs", x, labels, ratio, seed, scores=scores, score=score, beta=beta, strata=strata)
    assert (bins == -1).all()
    assert idx.tolist() == ref_ccs([-1] * len(labels), labels, ratio, seed, hard, beta, strata)


@pytest.mark.parametrize("ratio,beta", [(0.2, 0.1), (0.5, 0.0)])
def test_dq_ccs_equals_reference(ratio, beta):
    x, labels, scores = _data(seed=3)
    bins, idx = select_indices("dq-ccs", x, labels, ratio, 5, num_bins=3, scores=scores, beta=beta, strata=4)
    assert np.array_equal(bins, dq_bins(x, labels, 3))  # dq's bins (their own reference: tests/test_select.py)
    assert idx.tolist() == ref_ccs(bins.tolist(), labels, ratio, 5, list(-scores["aum"]), beta, 4)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.6])
def test_moderate_equals_reference(ratio):
    x, labels, _ = _data(seed=1)
    bins, idx = select_indices("moderate", x, labels, ratio, 0)
    assert (bins == -1).all() and idx.tolist() == ref_moderate(x.tolist(), labels.tolist(), ratio)


@pytest.mark.parametrize("ratio,beta,k,gamma,gamma_reverse", [(0.2, 0.0, 3, 1.0, 1.0), (0.3, 0.1, 5, 0.5, 2.0),
                                                              (0.5, 0.2, 40, 1.0, 0.0)])
def test_d2_equals_reference(ratio, beta, k, gamma, gamma_reverse):
    x, labels, scores = _data(seed=2)
    d2 = {"beta": beta, "k": k, "gamma": gamma, "gamma_reverse": gamma_reverse}
    bins, idx = select_indices("d2", x, labels, ratio, 0, scores=scores, score="el2n", **d2)
    assert (bins == -1).all()
    assert idx.tolist() == ref_d2(x.tolist(), labels.tolist(), ratio, list(scores["el2n"]), d2)


@pytest.mark.parametrize("method", ["ccs", "d2", "moderate", "dq-ccs"])
@pytest.mark.parametrize("ratio", [0.05, 0.33, 1.0])
def test_totals_are_exact_and_class_balanced(method, ratio):
    x, labels, scores = _data(n_per=(40, 25, 61), seed=4)
    bins, idx = select_indices(method, x, labels, ratio, 1, num_bins=4, scores=scores, beta=0.2, strata=6)
    drawn = sample_bins(bins, labels, ratio, 1)  # the quotas of dq (dq-ccs) or of class-balanced random (the others)
    assert len(idx) == round(ratio * len(labels)) and len(np.unique(idx)) == len(idx)
    assert np.array_equal(np.bincount(labels[idx] * 5 + bins[idx] + 1, minlength=15),
                          np.bincount(labels[drawn] * 5 + bins[drawn] + 1, minlength=15))


def test_ccs_prunes_the_hardest_and_covers_the_rest():
    """With beta the hardest share never enters; the strata spread the picks over the remaining difficulty."""
    labels = np.zeros(100, np.int64)
    aum = np.linspace(-5.0, 5.0, 100)  # sample 0 hardest
    _, idx = select_indices("ccs", np.ones((100, 2)), labels, 0.1, 0, scores={"aum": aum}, beta=0.2, strata=10)
    assert idx.min() >= 20 and len(idx) == 10
    assert len(np.unique((idx - 20) // 8)) == 10  # one pick in each of the 10 strata of 8 samples


def test_methods_without_scores_are_refused_in_one_line():
    x, labels, _ = _data()
    with pytest.raises(DQError, match=r"^select.method = 'ccs' ranks samples by difficulty and needs the scores"):
        select_indices("ccs", x, labels, 0.2, 0)
    assert METHODS.get("moderate").needs_scores is False and METHODS.get("dq-ccs").makes_bins is True


@pytest.mark.parametrize("method,key,value,expected", [
    ("ccs", "beta", 2.0, r"a number in \[0, 1\)"), ("d2", "beta", -0.1, r"a number in \[0, 1\)"),
    ("dq-ccs", "strata", 0, "a positive integer"), ("d2", "k", 0, "a positive integer"),
    ("d2", "gamma", -1.0, "a finite number >= 0"), ("d2", "gamma_reverse", -2.0, "a finite number >= 0"),
    ("ccs", "score", "loss", "one of aum, el2n, forgetting")])
def test_bad_params_give_one_line(method, key, value, expected):
    """Params check every method's keys whatever select.method; select_indices those of its method."""
    raw = tiny_params({"select": {"method": "moderate", key: value}})
    with pytest.raises(DQError, match=rf"^params: select.{key} = {value!r} is not allowed; expected {expected}$"):
        params_from_dict(raw)
    x, labels, scores = _data()
    with pytest.raises(DQError, match=rf"^select.{key} = {value!r} is not allowed; expected {expected}$"):
        select_indices(method, x, labels, 0.2, 0, scores=scores, **{key: value})


def test_select_indices_ignores_other_methods_keys_and_refuses_undeclared_ones():
    x, labels, scores = _data()
    _, idx = select_indices("ccs", x, labels, 0.2, 0, scores=scores, k=0, num_bins=0)  # d2's and dq's keys
    np.testing.assert_array_equal(idx, select_indices("ccs", x, labels, 0.2, 0, scores=scores)[1])
    with pytest.raises(DQError, match=r"^select.stride is not a param of any registered selection method; "
                                      r"expected one of num_bins, lam, per_class, precision, score, beta"):
        select_indices("ccs", x, labels, 0.2, 0, scores=scores, stride=2)


@pytest.mark.parametrize("method", ["dq", "graphcut", "random", "ccs", "d2", "moderate", "dq-ccs"])
def test_select_indices_defaults_are_the_params_defaults(method):
    """What select_indices takes for a key left out is what params.yaml's select section gives it then."""
    from dq.params import SelectParams

    x, labels, scores = _data()
    defaults = SelectParams().method_params
    assert list(defaults) == ["num_bins", "lam", "per_class", "precision", "score", "beta", "strata", "k", "gamma",
                              "gamma_reverse"]
    bins, idx = select_indices(method, x, labels, 0.2, 3, scores=scores)
    expected = select_indices(method, x, labels, 0.2, 3, scores=scores, **defaults)
    np.testing.assert_array_equal(bins, expected[0])
    np.testing.assert_array_equal(idx, expected[1])


@pytest.mark.parametrize("method", ["ccs", "d2", "moderate"])
def test_selection_from_stored_scores_is_fast(method):
    """Selection from stored scores on 6,000 samples of 1,280-d features (the default run's shape) in under 5 s."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 600)
    x = rng.normal(size=(6000, 1280)).astype(np.float32)
    scores = {name: rng.normal(size=6000) for name in ("aum", "el2n", "forgetting")}
    start = time.perf_counter()
    _, idx = select_indices(method, x, labels, 0.2, 0, scores=scores)
    assert len(idx) == 1200 and time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------------------ stage

@pytest.mark.parametrize("method", ["ccs", "dq-ccs", "d2", "moderate"])
def test_stage_selects_with_stored_scores(tmp_path, method):
    """stages.select reads data/scores only for the methods that need it, and writes what select_indices picks."""
    import yaml

    from dq.scores.file import write_scores
    from stages.select import main
    from tests.test_select import _write_stage_inputs

    params, labels = _write_stage_inputs(tmp_path, False)
    raw = yaml.safe_load(params.read_text())
    raw["select"] |= {"method": method, "strata": 5, "beta": 0.2}
    params.write_text(yaml.safe_dump(raw))
    argv = ["--params", str(params), "--data", str(tmp_path)]
    if METHODS.get(method).needs_scores:
        with pytest.raises(DQError, match=r"scores/scores.h5: file not found; run the scores stage"):
            main(argv)
    aum = np.random.default_rng(0).normal(size=len(labels))
    write_scores(tmp_path / "scores" / "scores.h5", {"aum": aum, "el2n": aum ** 2, "forgetting": np.zeros(len(labels))},
                 labels, {})
    main(argv)
    from dq.features.file import read_features

    x = read_features(tmp_path / "features" / "train.h5").embedding
    _, expected = select_indices(method, x, labels, 0.25, 0, num_bins=4, scores={"aum": aum, "el2n": aum ** 2},
                                 strata=5, beta=0.2)
    assert np.array_equal(np.load(tmp_path / "selection" / "indices.npy"), expected)
