"""DVC stage `select`: DQ bins and the kept samples → data/selection/, with its metrics and figure.

Reads data/features/train.h5 and the labels of data/prepared/train.h5, and data/scores/scores.h5 when the
method ranks by difficulty (`needs_scores`: ccs, d2, dq-ccs); writes data/selection/ (owned by
dq.select.folder), data/selection_metrics.json and data/selection_plots/bins.png.
"""
from __future__ import annotations

from dq.select import difficulty as select_difficulty  # noqa: F401  the difficulty-aware methods, registered in METHODS by path
from dq.select import folder as selection_folder
from dq.scores.file import read_scores
from dq.core.errors import run_cli
from dq.features.file import read_features
from dq.core.io import write_metrics
from dq.core.paths import DataPaths
from dq.data.prepared import read_prepared
from dq.select import METHODS, select_indices
from stages.common import parse_args


RECORDED_PARAMS = ("ratio", "seed", "select")  # in selection/summary.json; all of dvc.yaml's
NOT_RECORDED: tuple[str, ...] = ()


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("DQ selection: bins and the kept samples.", argv)
    paths = DataPaths(args.data)
    prepared = read_prepared(paths.prepared_split("train"), images=False)
    stored = read_features(paths.features, len(prepared.labels))
    features, labels, sel = selection_folder.selection_features(stored), prepared.labels, params.select
    scores = read_scores(paths.scores, labels) if METHODS.get(sel.method).needs_scores else None
    bins, indices = select_indices(sel.method, features, labels, params.ratio, params.seed, scores=scores,
                                   progress=True, **sel.method_params)
    summary = selection_folder.summary(sel.method, params.provenance(*RECORDED_PARAMS), features, labels,
                                       bins, indices, prepared.classes)
    selection_folder.write_selection(paths.selection, bins, indices, summary)
    write_metrics(paths.selection_metrics, selection_folder.metrics(features, labels, indices))
    selection_folder.plot_bins(paths.selection_figure, stored.embedding, labels, bins, indices, prepared.classes)
    print(f"select: kept {len(indices)} of {len(labels)} samples with method {sel.method}")


if __name__ == "__main__":
    run_cli(main)
