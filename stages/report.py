"""DVC stage `report`: the run's accuracy, storage and reconstruction figures, and the earlier stages'
image grids, collected into data/report/ (summary.json, confusion.png, curves.png, index.md, ...)."""
from __future__ import annotations

import sys

from dq.errors import run_cli
from dq.report import build_report
from stages.common import parse_args


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Collect the run's results into data/report/.", argv)
    data = args.data
    s = build_report(
        data / "report",
        train_metrics=data / "train_metrics.json",
        compact_metrics=data / "compact_metrics.json",
        mae_metrics=data / "mae_metrics.json",
        evaluation=data / "train" / "evaluation.json",
        figures={"bins.png": data / "selection_plots" / "bins.png",
                 "patches.png": data / "compact_plots" / "patches.png",
                 "reconstruction.png": data / "mae_plots" / "reconstruction.png"},
        params={"ratio": params.ratio, "seed": params.seed, "method": params.select.method,
                "drop": params.patches.drop},
    )
    print(f"report: top-1 {s['top1']:.4f}, compact {s['compact_bytes']:,} bytes "
          f"({s['compression_ratio']:.1f}x smaller than the full raw set)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
