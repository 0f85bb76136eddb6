"""The select step (stage select): which training samples a compact set keeps.

The public API re-exported here: `METHODS` (the registry of `select.method`), `select_indices`, `dq_bins`
and `sample_bins` (docs/DESIGN.md). Inside: `cosine` (the unit-norm view of the features), `engines` (the
GraphCut greedy and the DQ bins), `sampling` (the ratio rule, budgets and draws), `method_params` (each
method's params and their rules), `methods` (the registry and the built-in methods), `difficulty` (ccs, d2,
moderate, dq-ccs) and `folder` (the selection folder, its metrics and figure).
"""
from dq.select.engines import dq_bins
from dq.select.methods import METHODS, select_indices
from dq.select.sampling import sample_bins

__all__ = ["METHODS", "dq_bins", "sample_bins", "select_indices"]
