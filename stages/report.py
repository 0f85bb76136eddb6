"""DVC stage `report`: the run's accuracy, storage and reconstruction figures, and the earlier stages'
image grids, collected into data/report/ (summary.json, confusion.png, curves.png, index.md, ...)."""
from __future__ import annotations

import sys
from pathlib import Path

from dq.core.errors import run_cli
from dq.core.paths import DataPaths
from dq.report.summary import ReportInputs, build_report
from stages.common import parse_args

STUDY = Path("docs/results/frontier.json")  # bench/frontier.py's summary (dq.report.frontier), a dep in dvc.yaml


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Collect the run's results into data/report/.", argv,
                              extra=lambda p: p.add_argument("--study", type=Path, default=STUDY,
                                                             help="the frontier study's summary (default: %(default)s)"))
    paths = DataPaths(args.data)
    inputs = ReportInputs(
        train_metrics=paths.train_metrics,
        compact_metrics=paths.compact_metrics,
        mae_metrics=paths.mae_metrics,
        evaluation=paths.evaluation,
        figures={"bins.png": paths.selection_figure, "patches.png": paths.compact_figure,
                 "reconstruction.png": paths.mae_figure},
        study=args.study,
    )
    s = build_report(paths.report, inputs, params={"ratio": params.ratio, "seed": params.seed,
                                                   "method": params.select.method, "drop": params.patches.drop})
    point = s["frontier"]
    where = (f"; frontier: {point['why']}" if not point["comparable"] else
             f"; {point['share_of_whole_set']:.3f} of the whole set's lossless bytes (study)"
             if point["share_of_whole_set"] is not None else "; frontier: the study has no whole-set run yet")
    print(f"report: top-1 {s['top1']:.4f}, compact {s['compact_bytes']:,} bytes "
          f"({s['compression_ratio']:.1f}x smaller than the full raw set){where}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
