"""DVC stage `prepare`: the configured source → data/prepared/{train,test}.h5 (owned by dq.prepared)."""
from __future__ import annotations

import sys

from dq.datasets import LoadReport, load_split
from dq.errors import run_cli
from dq.io import atomic_path
from dq.paths import DataPaths
from dq.prepared import write_prepared
from stages.common import parse_args


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Prepare the training and test splits as uint8 HDF5 arrays.", argv)
    report = LoadReport()
    splits = {split: load_split(params.data, split, report) for split in ("train", "test")}
    paths = DataPaths(args.data)
    with atomic_path(paths.prepared) as tmp:  # both splits appear together, or neither
        tmp.mkdir()
        for split, prepared in splits.items():
            write_prepared(tmp / paths.prepared_split(split).name, prepared)
    for split, prepared in splits.items():
        print(f"prepare: {split}: {len(prepared.labels)} images {prepared.images.shape[1:]} in "
              f"{prepared.num_classes} classes from {prepared.source}", file=sys.stderr)
    if report.skipped:
        print(f"prepare: skipped {len(report.skipped)} unreadable file(s) (data.skip_bad: true), "
              f"first: {report.skipped[0]}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
