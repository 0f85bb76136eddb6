"""DVC stage `scores`: per-sample difficulty of the whole training set → data/scores/scores.h5.

Reads the prepared training set (in batches, as train does) and data/features/train.h5; writes the scores file
(owned by dq.difficulty: AUM, EL2N and forgetting events from `scores.seeds` short runs of train's recipe,
dq.dynamics; the distance to the class median and the kNN density from the embeddings) and
data/scores_metrics.json (the cost and the runs' accuracy; no stage reads it). Prints its cost.
"""
from __future__ import annotations

import sys
import time

from dq.difficulty import feature_scores, write_scores
from dq.dynamics import training_dynamics
from dq.errors import run_cli
from dq.features import read_features
from dq.io import write_json
from dq.paths import DataPaths
from dq.prepared import open_store
from dq.row_sources import StoreRows
from dq.runtime import device_for, seed_everything
from stages.common import parse_args

RECORDED_PARAMS = ("scores",)  # in the scores file's `params`


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Per-sample difficulty scores of the training set.", argv)
    seed_everything(0, params.runtime)  # the runs seed themselves (0 .. scores.seeds-1)
    device = device_for(params.runtime)
    paths, config = DataPaths(args.data), params.scores
    store = open_store(paths.prepared_split("train"))
    labels = store.labels()
    start = time.perf_counter()
    values, runs = training_dynamics(StoreRows(store), labels, len(store.classes), config, device=device,
                                     num_workers=params.runtime.num_workers)
    trained = time.perf_counter() - start
    embedding = read_features(paths.features, len(labels)).embedding
    values |= feature_scores(embedding, labels, config.k)
    seconds = time.perf_counter() - start
    write_scores(paths.scores, values, labels, params.provenance(*RECORDED_PARAMS))
    # no timings in the metrics: the same params give the same bytes (the cost is printed below)
    write_json(paths.scores_metrics, {"images": int(len(labels)), **runs,
                                      "mean": {name: float(v.mean()) for name, v in values.items()}})
    print(f"scores: {len(labels)} samples, {config.seeds} run(s) of {config.steps} steps in {trained:.0f} s, "
          f"feature scores in {seconds - trained:.1f} s; {seconds:.0f} s in all on {device}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
