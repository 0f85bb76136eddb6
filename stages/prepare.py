"""DVC stage `prepare`: the configured source → data/prepared/{train,test}/ (store version 2, dq.data.prepared;
written by dq.data.prepared_writer.write_split).

Items are decoded and encoded by `runtime.num_workers` DataLoader workers, in order, and streamed into
shards of `data.shard_images` images: the stage never holds a split of images. Both split folders are
written inside one temporary folder that is renamed into place at the end, so a killed run leaves no
shard visible and a rerun sweeps its temporary away.
"""
from __future__ import annotations

import sys

from dq.data.prepared_writer import write_split
from dq.data.sources import LoadReport
from dq.core.errors import run_cli
from dq.core.io import atomic_path
from dq.core.paths import DataPaths
from stages.common import parse_args


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Prepare the training and test splits as sharded, encoded image stores.", argv)
    report = LoadReport()
    paths = DataPaths(args.data)
    counts = {}
    with atomic_path(paths.prepared) as tmp:  # both splits appear together, or neither
        tmp.mkdir()
        for split in ("train", "test"):
            source, n = write_split(params.data, split, tmp / paths.prepared_split(split).name, report,
                                    num_workers=params.runtime.num_workers)
            counts[split] = (source, n)
    for split, (source, n) in counts.items():
        size = params.data.image_size
        print(f"prepare: {split}: {n} images ({size}, {size}, 3) in {len(source.classes)} classes from "
              f"{source.source}, stored as {params.data.codec}", file=sys.stderr)
    if report.skipped:
        print(f"prepare: skipped {len(report.skipped)} unreadable file(s) (data.skip_bad: true), "
              f"first: {report.skipped[0]}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
