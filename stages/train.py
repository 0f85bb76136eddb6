"""DVC stage `train`: a classifier trained on `train.input` and scored on the full prepared test set.

Outputs: data/train/model.pt (weights and normalisation), data/train/evaluation.json (confusion matrix,
per-class accuracy, per-epoch history), data/train_metrics.json (the run's metrics, top level for
`dvc exp show`) and DVCLive's per-epoch plots under data/train_live/. The resumable checkpoint
data/train_ckpt/last.pt is deliberately not a DVC output, so it survives an interrupted run
(`train.resume: true` continues from it; see dq/train/loop.py). Nor is data/fill/, the rebuilt cache of
the compact set reconstructed by the MAE (dq/mae/rebuilt.py): a rerun on the same compact file and MAE, and
the export stage, reuse it.

No split is read whole: the training and test images are read a batch of rows at a time from the
prepared stores (and the rebuilt cache) through DataLoaders of `runtime.num_workers` workers.

Under torchrun (`python -m stages.launch train` with runtime.nproc > 1) every rank trains its part of
each batch with DistributedDataParallel; rank 0 alone logs, checkpoints and writes the outputs.
"""
from __future__ import annotations

import math
import sys

from dq.core import distributed
from dq.train.classifier import save_classifier
from dq.core.errors import DQError, run_cli
from dq.core.io import rounded, write_metrics
from dq.core.live import live_logger
from dq.core.paths import DataPaths
from dq.data.prepared import open_store
from dq.core.runtime import device_for, seed_everything
from dq.train.data import split_images, training_set
from dq.train.loop import TrainHooks, evaluation_record, train_classifier, train_metrics
from stages.common import parse_args

LIVE_METRICS = {"train/loss": "train_loss", "train/acc": "train_acc", "test/loss": "test_loss",
                "test/acc": "test_acc", "lr": "lr"}


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Train and evaluate the classifier.", argv, builds_models=True)
    seed_everything(params.seed, params.runtime)
    device = device_for(params.runtime)
    with distributed.process_group(device):
        _train(DataPaths(args.data), params, device)


def _train(paths: DataPaths, params, device) -> None:
    """Every rank trains; rank 0 alone logs, checkpoints and writes the outputs."""
    tp = params.train
    main_rank = distributed.is_main()
    workers = params.runtime.num_workers
    prepared = open_store(paths.prepared_split("train"))
    test = split_images(open_store(paths.prepared_split("test")))
    train_set = training_set(tp.input, prepared, paths.compact, paths.mae_model, device=device,
                             rebuilt_cache=paths.rebuilt_cache, num_workers=workers)
    if list(train_set.classes) != list(test.classes):
        raise DQError(f"{paths.compact}: its classes differ from the prepared test "
                      "set's; rerun the pipeline from compress")
    if main_rank:
        budget = f"{tp.epochs} epochs" if tp.steps is None else f"{tp.steps} steps"
        print(f"train: {tp.model} on {len(train_set.labels)} {tp.input} images, {budget}, "
              f"{len(test.labels)} test images, device {device}, {distributed.world_size()} process(es)",
              file=sys.stderr)

    live = live_logger(paths.train_live) if main_rank else None
    hooks = TrainHooks(checkpoint=paths.train_resume,
                       on_epoch=(lambda record: _log_epoch(live, record)) if main_rank else None)
    result = train_classifier(train_set, test, tp, seed=params.seed, device=device, num_workers=workers, hooks=hooks)
    if not main_rank:
        return
    live.end()

    save_classifier(paths.classifier, result, tp, test.classes, test.images.image_shape[0])
    write_metrics(paths.evaluation, evaluation_record(result, test.classes))
    full_raw_bytes = len(prepared) * math.prod(prepared.image_shape)  # the whole split as raw uint8
    metrics = train_metrics(result, train_set, tp, full_raw_bytes=full_raw_bytes)
    write_metrics(paths.train_metrics, metrics)
    print(f"train: final-epoch top-1 {metrics['top1']:.4f} on {len(test.labels)} test images", file=sys.stderr)


def _log_epoch(live, record: dict) -> None:
    """A round's record; the test keys only where the round was scored (dq.train.schedule.Schedule)."""
    for name, key in LIVE_METRICS.items():
        if key in record:
            live.log_metric(name, rounded(record[key]))  # DVCLive's files are metrics files too
    live.next_step()
    test = f" test acc {record['test_acc']:.4f}" if "test_acc" in record else ""
    print(f"train: step {record['step']} (epoch {record['epoch']}): loss {record['train_loss']:.4f} "
          f"train acc {record['train_acc']:.4f}{test}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
