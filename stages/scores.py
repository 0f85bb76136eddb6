"""DVC stage `scores`: per-sample difficulty of the whole training set → data/scores/scores.h5.

Writes the scores file (owned by dq.scores.file) and data/scores_metrics.json (the runs' accuracy where there
were runs; no stage reads it), and prints its cost:
- AUM, EL2N and forgetting events (dq.scores.dynamics): under `scores.dynamics: teacher`, those the teacher stage
  recorded while it trained (data/teacher/dynamics.h5), so nothing trains twice; under `runs`, from
  `scores.seeds` short runs of train's recipe on the prepared training set (read in batches, as train does);
- the distance to the class median and the kNN density, from data/features/train.h5.
"""
from __future__ import annotations

import sys
import time

from dq.scores.file import DYNAMICS_SCORES, feature_scores, read_scores, write_scores
from dq.scores.dynamics import training_dynamics
from dq.core.errors import DQError, run_cli
from dq.features.file import read_features
from dq.core.io import write_metrics
from dq.core.paths import DataPaths
from dq.data.prepared import open_store
from dq.data.rows import StoreRows
from dq.core.runtime import device_for, seed_everything
from stages.common import parse_args

RECORDED_PARAMS = ("scores",)  # in the scores file's `params`


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Per-sample difficulty scores of the training set.", argv, builds_models=True)
    seed_everything(0, params.runtime)  # the runs seed themselves (0 .. scores.seeds-1)
    device = device_for(params.runtime)
    paths, config = DataPaths(args.data), params.scores
    store = open_store(paths.prepared_split("train"))
    labels = store.labels()
    start = time.perf_counter()
    if config.dynamics == "teacher":
        if not paths.teacher_dynamics.is_file():
            raise DQError(f"{paths.teacher_dynamics}: not found; scores.dynamics: teacher reads the training dynamics "
                          "a trained teacher recorded: run the teacher stage (dvc repro teacher) or set "
                          "scores.dynamics: runs")
        recorded = read_scores(paths.teacher_dynamics, labels)
        values = {name: recorded[name] for name in DYNAMICS_SCORES}
        runs = {"dynamics": "teacher", "recorded_by": recorded.params}
        how = f"training dynamics of the teacher's run ({paths.teacher_dynamics})"
    else:
        values, runs = training_dynamics(StoreRows(store), labels, len(store.classes), config, device=device,
                                         num_workers=params.runtime.num_workers)
        runs = {"dynamics": "runs"} | runs
        how = f"{config.seeds} run(s) of {config.steps} steps"
    dynamics = time.perf_counter() - start
    embedding = read_features(paths.features, len(labels)).embedding
    values |= feature_scores(embedding, labels, config.k)
    seconds = time.perf_counter() - start
    write_scores(paths.scores, values, labels, params.provenance(*RECORDED_PARAMS))
    # no timings in the metrics: the same params give the same bytes (the cost is printed below)
    write_metrics(paths.scores_metrics, {"images": int(len(labels)), **runs,
                                      "mean": {name: float(v.mean()) for name, v in values.items()}})
    print(f"scores: {len(labels)} samples, {how} in {dynamics:.0f} s, feature scores in {seconds - dynamics:.1f} s; "
          f"{seconds:.0f} s in all on {device}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
