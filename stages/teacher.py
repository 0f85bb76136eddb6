"""DVC stage `teacher`: the soft labels' teacher (`teacher.kind`) and its logits of every training image.

Outputs: data/teacher/logits.h5 (dq.labels.teacher's format: logits, and the mirror images' logits, of every
prepared training image), data/teacher/model.pt for a trained teacher (dq.train.classifier's format) with
data/teacher/dynamics.h5 (every sample's AUM, EL2N and forgetting events recorded while it trained,
dq.scores.dynamics, in dq.scores.file's scores format: the scores stage reads it under `scores.dynamics: teacher`), and
data/teacher_metrics.json (the teacher's test top-1 where it was scored, its agreement with the training
labels, its kind). The compress stage stores what `labels.*` asks of these logits for the
selected images. The resumable checkpoint data/teacher_ckpt/last.pt is not a DVC output (`train.resume`).

Under torchrun (`python -m stages.launch teacher` with runtime.nproc > 1) a trained teacher trains on
every rank; rank 0 alone writes the outputs.
"""
from __future__ import annotations

import sys
import time

from dq.core import distributed
from dq.train.classifier import read_classifier, save_classifier
from dq.scores.file import write_scores
from dq.scores.dynamics import recorder_for, teacher_el2n_step
from dq.core.errors import DQError, run_cli
from dq.features.file import read_features
from dq.core.io import write_metrics
from dq.core.paths import DataPaths
from dq.data.prepared import open_store
from dq.core.runtime import device_for, seed_everything
from dq.labels.teacher import agreement, probe_logits, read_teacher_logits, trained_config, write_logits
from dq.train.data import full_training_set, split_images
from dq.train.evaluate import evaluate, predict_logits
from dq.train.loop import TrainHooks, train_classifier
from stages.common import parse_args

DYNAMICS_PARAMS = ("teacher",)  # in dynamics.h5's `params`: the run that recorded them


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Train (or load) the teacher and write its logits of every training image.", argv, builds_models=True)
    seed_everything(params.teacher.seed, params.runtime)
    device = device_for(params.runtime)
    with distributed.process_group(device):
        _teacher(DataPaths(args.data), params, device)


def _teacher(paths: DataPaths, params, device) -> None:
    tp, workers = params.teacher, params.runtime.num_workers
    start = time.perf_counter()
    prepared = open_store(paths.prepared_split("train"))
    test = split_images(open_store(paths.prepared_split("test")))
    views, test_top1 = _logits(paths, params, prepared, test, full_training_set(prepared), device, workers)
    if views is None:  # a torchrun rank that does not write
        return
    write_logits(paths.teacher_logits, views, num_images=len(prepared), classes=prepared.classes, kind=tp.kind,
                 test_top1=test_top1)
    teacher = read_teacher_logits(paths.teacher_logits, expected_rows=len(prepared), classes=prepared.classes)
    metrics = {"kind": tp.kind, "test_top1": test_top1, "train_agreement": agreement(teacher, prepared.labels()),
               "views": teacher.views}  # no timing: the same params give the same bytes
    write_metrics(paths.teacher_metrics, metrics)
    top1 = "n/a" if test_top1 is None else f"{test_top1:.4f}"
    print(f"teacher: {tp.kind}, test top-1 {top1}, agrees with {metrics['train_agreement']:.4f} of the training "
          f"labels, {time.perf_counter() - start:.0f} s", file=sys.stderr)


def _logits(paths: DataPaths, params, prepared, test, train_set, device, workers):
    """({view name: batches of logits}, test top-1) on rank 0; (None, None) on the other ranks."""
    tp = params.teacher
    if tp.kind != "trained" and distributed.is_main():
        paths.teacher_dynamics.unlink(missing_ok=True)  # only a trained teacher records dynamics: none stale
    if tp.kind == "probe":
        features = read_features(paths.features, expected_rows=len(prepared))
        if list(features.classes) != list(prepared.classes):
            raise DQError(f"{paths.features}: its classes differ from the prepared training set's; rerun features")
        return ({"logits": probe_logits(features)}, None) if distributed.is_main() else (None, None)
    if tp.kind == "trained":
        config = trained_config(params.train, tp.steps)
        print(f"teacher: {config.model} on all {len(prepared)} training images, {tp.steps} steps", file=sys.stderr)
        recorder = recorder_for(train_set.images, train_set.labels, len(test.classes),
                                teacher_el2n_step(len(train_set.labels), config), device=device, num_workers=workers)
        result = train_classifier(train_set, test, config, seed=tp.seed, device=device, num_workers=workers,
                                  hooks=TrainHooks(checkpoint=paths.teacher_resume, recorder=recorder,
                                                   progress=distributed.is_main()))
        if not distributed.is_main():
            return None, None
        save_classifier(paths.teacher_model, result, config, test.classes, test.images.image_shape[0])
        write_scores(paths.teacher_dynamics, recorder.scores(), train_set.labels,
                     params.provenance(*DYNAMICS_PARAMS))
        model, mean, std, top1 = result.model, result.mean, result.std, result.final.top1
    else:
        if not distributed.is_main():
            return None, None
        clf = read_classifier(tp.checkpoint)
        if list(clf.classes) != list(prepared.classes) or clf.image_size != prepared.image_shape[0]:
            raise DQError(f"teacher.checkpoint = {tp.checkpoint!r}: a classifier of {len(clf.classes)} classes at "
                          f"{clf.image_size} px; expected the prepared set's {len(prepared.classes)} classes at "
                          f"{prepared.image_shape[0]} px")
        model, mean, std = clf.model, clf.mean, clf.std
        top1 = evaluate(model, test, mean, std, device, num_workers=workers, tta=params.train.tta).top1
    model = model.to(device)
    return ({"logits": predict_logits(model, train_set.images, mean, std, device, num_workers=workers),
             "logits_flip": predict_logits(model, train_set.images, mean, std, device, flip=True,
                                           num_workers=workers)}, top1)


if __name__ == "__main__":
    run_cli(main)
