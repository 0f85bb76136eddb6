"""Selection methods (`select.method`): the registry METHODS, its built-in dq, graphcut and random, and select_indices.

A method is a function `(features, labels, ratio, seed, params, **context) -> (bins int32 [N], sorted int64
indices)` in the registry METHODS (dq.core.registry), registered with
- `params`: its own small frozen dataclass (dq.select.method_params), whose fields are its `select.*` keys
  with their defaults and rules; params validation and `select_indices` build it (default: `NoParams`);
- `makes_bins`: whether its bins are real; without, they are -1 everywhere, which `select_indices` checks;
- `needs_scores`: whether it ranks samples by the scores stage's difficulty (ccs, d2, dq-ccs, in
  dq.select.difficulty, registered here by path): the select stage then reads data/scores.
`context` holds `scores` (a mapping name -> float [N], or None) and `progress` (bool). Adding a method is one
function, and one dataclass when it takes params:

    @dataclass(frozen=True)
    class StrideParams(MethodParams):
        stride: int = param(2, Rule(lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"))

    @METHODS.register("every-kth", params=StrideParams)
    def every_kth(features, labels, ratio, seed, params, **context):
        keep = np.arange(0, len(labels), params.stride)[:round(ratio * len(labels))]
        return np.full(len(labels), -1, np.int32), keep.astype(np.int64)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dq.core.errors import DQError
from dq.select.cosine import PRECISION, check_features
from dq.select.engines import dq_bins, graphcut_indices
from dq.select.method_params import (COUNT, FLAG, NON_NEGATIVE, POSITIVE, SHARE, MethodParams, MethodRegistry,
                                     NoParams, one_of, param)
from dq.select.sampling import check_ratio, sample_bins

DIFFICULTY_SCORES = ("aum", "el2n", "forgetting")  # select.score: dq.scores' training-dynamics scores


@dataclass(frozen=True)
class DqParams(MethodParams):
    num_bins: int = param(10, COUNT)  # bins of every class
    lam: float = param(1.0, POSITIVE)  # weight of the pool term in the GraphCut gain
    per_class: bool = param(True, FLAG)  # false: bins of the whole set (the lazy engine)
    precision: str = param("float64", PRECISION)  # float64: bins equal a float64 reference; float32: faster


@dataclass(frozen=True)
class GraphCutParams(MethodParams):
    lam: float = param(1.0, POSITIVE)
    precision: str = param("float64", PRECISION)


@dataclass(frozen=True)
class DifficultyParams(MethodParams):
    score: str = param("aum", one_of(DIFFICULTY_SCORES))  # the difficulty ranked by
    beta: float = param(0.1, SHARE)  # share of each class (dq-ccs: cell) pruned as hardest first


@dataclass(frozen=True)
class CcsParams(DifficultyParams):
    strata: int = param(50, COUNT)  # equal-width difficulty strata


@dataclass(frozen=True)
class D2Params(DifficultyParams):
    k: int = param(10, COUNT)  # neighbours in the kNN graph of each class
    gamma: float = param(1.0, NON_NEGATIVE)  # forward message weight exp(-gamma d)
    gamma_reverse: float = param(1.0, NON_NEGATIVE)  # reverse message weight exp(-gamma_reverse d)


@dataclass(frozen=True)
class DqCcsParams(DqParams, CcsParams):
    """dq's bins, ccs inside every (bin, class) cell."""


METHODS = MethodRegistry("selection method", "select.method", params=NoParams, makes_bins=False, needs_scores=False)


def select_indices(method: str, features, labels, ratio: float, seed: int, **select_params):
    """(bins int32 [N], sorted int64 indices) of the registered method `method` (select.method).

    select_params: keys of params.yaml's `select` section but `method`: the method's params take those they
    declare (their defaults stand for the others) and ignore the keys of other methods; and the context:
    `scores`, the per-sample scores of the scores stage (a mapping name -> float [N], e.g.
    dq.scores.file.read_scores) that methods registered with `needs_scores` rank by, and `progress`.
    """
    entry = METHODS.get(method)
    check_ratio(ratio)
    context = {"scores": select_params.pop("scores", None), "progress": select_params.pop("progress", False)}
    params = METHODS.params_of(method, select_params)
    if entry.needs_scores and context["scores"] is None:
        raise DQError(f"select.method = {method!r} ranks samples by difficulty and needs the scores stage's "
                      "scores (data/scores); run the scores stage first")
    bins, indices = entry.obj(features, np.asarray(labels), ratio, seed, params, **context)
    if not entry.makes_bins and (np.asarray(bins) != -1).any():
        raise DQError(f"select.method = {method!r} returned bins other than -1 but is registered without "
                      "makes_bins; expected -1 everywhere, or register it with makes_bins=True")
    return bins, indices


@METHODS.register("dq", params=DqParams, makes_bins=True)
def _dq(features, labels, ratio, seed, params: DqParams, *, progress=False, **_):
    """DQ: GraphCut bins per class, then the same share of every bin."""
    bins = dq_bins(features, labels, params.num_bins, lam=params.lam, per_class=params.per_class,
                   precision=params.precision, progress=progress)
    return bins, sample_bins(bins, labels, ratio, seed)


@METHODS.register("graphcut", params=GraphCutParams)
def _graphcut(features, labels, ratio, seed, params: GraphCutParams, **_):
    """One-shot GraphCut at each class's quota: no bins."""
    return np.full(check_features(features), -1, np.int32), graphcut_indices(features, labels, ratio, lam=params.lam,
                                                                              precision=params.precision)


@METHODS.register("random")
def _random(features, labels, ratio, seed, params, **_):
    """Class-balanced random sampling: one bin per class."""
    no_bins = np.full(len(labels), -1, np.int32)
    return no_bins, sample_bins(no_bins, labels, ratio, seed)


# The difficulty-aware methods (issue 36) live in dq.select.difficulty and register here by path, with their
# params: their names, keys and traits are known to params validation without loading them, and only the
# select stage imports them.
METHODS.register_lazy("ccs", "dq.select.difficulty:ccs", params=CcsParams, needs_scores=True)
METHODS.register_lazy("d2", "dq.select.difficulty:d2", params=D2Params, needs_scores=True)
METHODS.register_lazy("moderate", "dq.select.difficulty:moderate")
METHODS.register_lazy("dq-ccs", "dq.select.difficulty:dq_ccs", params=DqCcsParams, makes_bins=True,
                      needs_scores=True)
