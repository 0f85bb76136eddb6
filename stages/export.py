"""DVC stage `export`: the rebuilt compact set (the pixels train trains on) and the test split → data/export/.

Reads data/compact/dataset.h5 and data/mae/model.pt (reconstructed once into data/fill/, the rebuilt cache
the train stage makes or reuses: dq.mae.rebuilt), data/prepared/ (the test split, the training set's size) and
data/train_metrics.json (the top-1 written into dataset.json). Writes data/export/ in the layout of
`export.format` (dq.export.writer). `dvc exp run -S export.format=webdataset` reruns this stage alone.
"""
from __future__ import annotations

import json
import math
import sys

from dq.core.errors import run_cli
from dq.export.writer import md5_of, write_export
from dq.core.paths import DataPaths
from dq.data.prepared import open_store
from dq.mae.rebuilt import RebuildOptions, rebuilt_set
from dq.core.runtime import device_for
from stages.common import parse_args


RECORDED_PARAMS = ("export",)  # in dataset.json, beside the params that made the compact store
NOT_RECORDED = ("runtime.device", "runtime.num_workers")  # the fill's device is in its cache key


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Export the rebuilt compact set and the test split.", argv)
    paths, ep = DataPaths(args.data), params.export
    workers = params.runtime.num_workers
    prepared = open_store(paths.prepared_split("train"))
    rebuilt = rebuilt_set(paths.compact, paths.mae_model, cache=paths.rebuilt_cache,
                          options=RebuildOptions(device=device_for(params.runtime), num_workers=workers),
                          prepared_labels=prepared.labels())
    test = open_store(paths.prepared_split("test")) if ep.test == "copy" else None
    compact_bytes = paths.compact.stat().st_size
    full_raw = len(prepared) * math.prod(prepared.image_shape)
    top1 = json.loads(paths.train_metrics.read_text())["top1"] if paths.train_metrics.is_file() else None
    info = {
        "sources": {"compact": {"path": "compact/dataset.h5", "bytes": compact_bytes, "md5": md5_of(paths.compact)},
                    "mae": {"path": "mae/model.pt", "bytes": paths.mae_model.stat().st_size,
                            "md5": md5_of(paths.mae_model)},
                    "fill_key": rebuilt.images.key},
        "params": {**params.provenance(*RECORDED_PARAMS), "compact": rebuilt.header.params},
        "figures": {"compact_bytes": compact_bytes, "train_images": int(len(rebuilt.labels)),
                    "original_images": len(prepared), "share_of_images": len(rebuilt.labels) / max(len(prepared), 1),
                    "original_raw_bytes": full_raw, "share_of_raw_bytes": compact_bytes / max(full_raw, 1),
                    "train_top1": top1},
    }
    record = write_export(paths.export, rebuilt, test, ep, info=info, num_workers=workers)
    test_note = f", {record['splits']['test']['images']} test" if record["splits"]["test"] else ""
    print(f"export: {record['splits']['train']['images']} train{test_note} images as {ep.format} in {paths.export}",
          file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
