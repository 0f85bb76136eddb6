"""Classifier training: the last step that tells whether a compact dataset is any good.

A classifier (`train.model`: dq's smallnet by default, or any timm model; dq.train.classifier, which owns the
file `train/model.pt`) is trained on one of three training sets (`train.input`, dq.train.data) for the
steps of its `Schedule` (dq.train.schedule) and scored on the whole prepared test set (dq.train.evaluate).
The default classifier, dq.train.smallnet's, sets its frozen first layer from a sample of the training
images (`data_sample`) before the first step.

The reported accuracy is the FINAL round's top-1 on the test set. The best epoch's test accuracy is
kept only as `best_epoch_test_acc_do_not_use_for_selection`: choosing an epoch by test accuracy is model
selection on test data. On the CPU two runs with the same params give the same metrics and the same
model bytes.

Several processes. Under torchrun (`runtime.nproc` > 1, or several machines) the model is wrapped in
DistributedDataParallel, one process per GPU. `train.batch_size` stays the GLOBAL batch: every rank
draws the same order and augmentation (the same generator) and trains on its contiguous part of each
batch, and the loss is scaled so that the averaged gradient is the whole batch's mean gradient, as in
one process; the recipe (lr, schedule, steps per epoch) does not change with the number of GPUs.
Each rank reads only its part of each batch (the augmentation of the whole batch is drawn on every rank,
then applied to the part), its shard of the rows for the channel statistics and for the evaluation,
and its share of the MAE's reconstruction batches. What does change: BatchNorm normalises each rank's part
with that part's statistics, and sums are reduced in another order. Rank 0's running statistics are copied
to every rank before each evaluation, the test set is scored in shards and the counts summed, and only
rank 0 writes checkpoints (and hashes the data for their fingerprint).
On CUDA the forward pass runs under bf16 autocast.

Resume. After every round the model, optimizer, scheduler, torch RNG state and the per-round history
are written to the checkpoint (`data/train_ckpt/last.pt` in the pipeline). With `train.resume: true`, a
checkpoint whose fingerprint (params, seed, training and test data) matches the run continues where
it stopped; a checkpoint from other params or data, or one that cannot be read, is refused with one
error line (the policy of `dq.core.checkpoint`, shared with the MAE). The fingerprint hashes a data set's
identity where it has one (a prepared store's index with its shards' SHA-256, the rebuilt cache's key, a
subset's rows), so no image is decoded for it; in-memory arrays are hashed batch by batch.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dq.core import distributed
from dq.core.checkpoint import resume_state, save_atomic
from dq.core.errors import DQError
from dq.core.runtime import autocast
from dq.data import rows as row_sources
from dq.data.rows import as_rows
from dq.labels.soft import SoftLabels, distillation_loss
from dq.train import data as train_data
from dq.train.classifier import create_classifier, uses_cifar_stem
from dq.train.data import TrainFeed, TrainingSet, apply_augment, channel_stats, data_sample, normalisation, to_input
from dq.train.evaluate import Evaluation, evaluate
from dq.train.schedule import (MIN_IMAGES_PER_RANK, Schedule, WeightAverage, epoch_batches, optimizer_and_schedule,
                               scheduled_batches, training_schedule)

if TYPE_CHECKING:
    from dq.params import TrainParams
    from dq.scores.dynamics import DynamicsRecorder


@dataclass
class TrainResult:
    model: object  # torch.nn.Module, on the CPU
    history: list[dict]  # one record per round: epoch, step, lr, train_loss, train_acc (, test_loss, test_acc)
    final: Evaluation  # the final round's evaluation on the test set
    mean: list[float]  # per-channel normalisation of the training set, in [0, 1] units
    std: list[float]
    meta: dict = field(default_factory=dict)


@dataclass
class Learner:
    """The network being trained and what steps it: the optimizer, its learning-rate schedule and the
    optional weight average. `model` is what the forward pass runs: the network itself, or the network in
    DistributedDataParallel under torchrun."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # torch.optim.lr_scheduler.LambdaLR, stepped once per batch
    average: WeightAverage | None = None

    @property
    def net(self) -> torch.nn.Module:
        """The plain network (DistributedDataParallel unwrapped): what is saved and loaded."""
        from torch.nn.parallel import DistributedDataParallel

        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    @property
    def scored(self) -> torch.nn.Module:
        """What is scored and returned: the weight average when there is one, else the network."""
        return self.average.model if self.average is not None else self.net


@dataclass(frozen=True)
class TrainHooks:
    """What a training run keeps and reports besides its result. Only rank 0 reads and writes `checkpoint`."""

    checkpoint: str | Path | None = None  # the resume checkpoint, written after every round; None: none
    on_epoch: Callable[[dict], None] | None = None  # receives every round's record, replayed ones included
    recorder: DynamicsRecorder | None = None  # records every sample's training dynamics (dq.scores.dynamics)
    progress: bool = True


@dataclass(frozen=True)
class DistillTarget:
    """A batch's soft targets: the teacher's probabilities [b, C] at `temperature`, weighted by `weight`."""

    probs: torch.Tensor
    temperature: float
    weight: float


def new_learner(config: TrainParams, feed: TrainFeed, num_classes: int, seed: int, device,
                total_steps: int) -> Learner:
    """A randomly initialised `config.model` (torch seeded with `seed`) on `device`, channels-last, set from a
    sample of `feed`'s images when it asks for one, with its optimizer and schedule over `total_steps`."""
    torch.manual_seed(seed)
    net = create_classifier(config.model, num_classes, as_rows(feed.images).image_shape[0])
    net = net.to(device).to(memory_format=torch.channels_last)
    if hasattr(net, "init_from_data"):
        net.init_from_data(data_sample(feed.images, feed.mean, feed.std, seed, device))
    optimizer, scheduler = optimizer_and_schedule(net, config, total_steps)
    average = WeightAverage(net, config.ema) if config.ema > 0 else None
    return Learner(net, optimizer, scheduler, average)


def train_classifier_epoch(learner: Learner, feed: TrainFeed, config: TrainParams, generator,
                           device) -> tuple[float, float]:
    """One pass over the shuffled training set (`epoch_batches` of `generator`); (mean loss, accuracy)."""
    batches = epoch_batches(len(feed.labels), config, generator, distributed.world_size())
    return train_batches(learner, feed, batches, config, device)


def train_batches(learner: Learner, feed: TrainFeed, batches, config: TrainParams, device,
                  recorder: DynamicsRecorder | None = None) -> tuple[float, float]:
    """One optimizer step per (rows, draws) of `batches`; (mean loss, accuracy) on the augmented batches.

    Each step reads only this rank's part of its batch's rows (see the module docstring for torchrun), through
    the feed's DataLoader workers; with the feed's soft labels the loss is dq.labels.soft's distillation loss,
    each image's target the view its flip gave it. The weight average is updated and the `recorder`
    (dq.scores.dynamics) sees the logits after every step. Loss and accuracy are summed on the device and read
    once, at the end: a read per step would make the host wait for the GPU every step.
    """
    learner.model.train()
    device = torch.device(device)
    labels = torch.as_tensor(np.asarray(feed.labels))
    norm = normalisation(feed.mean, feed.std, device)
    parts, reads = _rank_parts(batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = sum(len(idx) for idx, _ in batches)
    raw_batches = row_sources.batches(as_rows(feed.images), reads, feed.num_workers)
    for (idx, draws), part, rows, raw in zip(batches, parts, reads, raw_batches):
        x = to_input(apply_augment(raw, draws, config.crop_padding, part), norm, device)
        y = labels[rows].to(device, non_blocking=True)
        distill = _distill_target(feed.soft, rows, draws[2], part, config, device)
        logits, batch_loss_sum = _optimizer_step(learner, x, y, len(idx), config, distill, device)
        if recorder is not None:
            recorder.record(idx.numpy(), part, logits, y, learner.model)
        loss_sum += batch_loss_sum
        correct += (logits.argmax(1) == y).sum()
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, correct.double()])).tolist()
    return totals[0] / max(seen, 1), int(totals[1]) / max(seen, 1)


def _rank_parts(batches) -> tuple[list[slice], list[np.ndarray]]:
    """This rank's part of every batch of (rows, draws): (its slice of the batch, the rows it reads)."""
    world, rank = distributed.world_size(), distributed.rank()
    parts = [distributed.split(len(idx), rank, world) for idx, _ in batches]
    return parts, [idx[part].numpy() for (idx, _), part in zip(batches, parts)]


def _distill_target(soft: SoftLabels | None, rows: np.ndarray, flips, part: slice, config: TrainParams,
                    device) -> DistillTarget | None:
    """The soft targets of this rank's `rows` of a batch, each the view its flip (`flips` [b] or None) gave it."""
    if soft is None:
        return None
    flipped = flips[part] if flips is not None else None
    return DistillTarget(soft.targets(rows, flipped).to(device, non_blocking=True), soft.temperature,
                         config.distill_weight)


def _optimizer_step(learner: Learner, x, y, batch_images: int, config: TrainParams,
                    distill: DistillTarget | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward x [b, C, H, W] (this rank's part of a batch of `batch_images` images), backward, one optimizer
    and schedule step, the weight average; (logits [b, classes], the part's summed loss in float64, detached)."""
    with autocast(device):
        logits = learner.model(x)
        loss, batch_loss_sum = _batch_loss(logits, y, batch_images, distributed.world_size(),
                                           config.label_smoothing, distill)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()
    learner.scheduler.step()
    if learner.average is not None:
        learner.average.update()
    return logits, batch_loss_sum


def _batch_loss(logits, y, batch_images: int, world: int, label_smoothing: float = 0.0,
                distill: DistillTarget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to backpropagate, the batch part's summed loss in float64, detached); the cross-entropy
    is against labels smoothed by `label_smoothing` (Szegedy et al. 2016). With `distill`'s soft targets
    [b, C], the loss is dq.labels.soft.distillation_loss at its temperature and weight.

    With several ranks each part's summed loss is divided by the whole batch's size and multiplied by
    the world size, because DistributedDataParallel averages gradients over ranks: the result is the
    gradient of the whole batch's mean loss, even when the parts differ in size by one image.
    """
    if distill is not None:
        summed = distillation_loss(logits, y, distill.probs, temperature=distill.temperature, weight=distill.weight,
                                   label_smoothing=label_smoothing)
        return summed * (world / batch_images), summed.detach().double()
    if world == 1:
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, loss.detach().double() * len(y)
    summed = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    return summed * (world / batch_images), summed.detach().double()


def run_fingerprint(train_set: TrainingSet, test, config: TrainParams, seed: int, *,
                    num_workers: int = 0) -> str:
    """What a checkpoint must match to be resumed: the params (but `resume`), seed and both data sets.

    A data set is hashed by its identity where it has one (a prepared store's index with its shards'
    SHA-256, the rebuilt cache's key, the rows of a subset): no image is decoded for it. Other images
    (arrays) are hashed batch by batch: the bytes (and so the digest) of hashing whole arrays.
    """
    h = hashlib.sha256()
    settings = {k: v for k, v in vars(config).items() if k != "resume"}
    h.update(json.dumps({"train": settings, "seed": seed}, sort_keys=True).encode())
    for images, labels in ((train_set.images, train_set.labels), (test.images, test.labels)):
        source = as_rows(images)
        h.update(str((len(source),) + tuple(source.image_shape)).encode())
        identity = source.identity()
        if identity is not None:
            h.update(identity)
        else:
            reads = row_sources.consecutive(0, len(source), train_data.EVAL_BATCH_SIZE)  # read now: tests lower it
            for batch in row_sources.batches(source, reads, num_workers):
                h.update(batch.numpy().tobytes())
        labels = np.ascontiguousarray(labels)
        h.update(str(labels.shape).encode())
        h.update(labels.tobytes())
    soft = getattr(train_set, "soft", None)
    if soft is not None:  # a rebuilt cache's key already covers its store's bytes; arrays are hashed here too
        h.update(f"soft T={soft.temperature}".encode())
        h.update(soft.values.tobytes())
        h.update(b"" if soft.ids is None else soft.ids.tobytes())
    return h.hexdigest()


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One `train_classifier` call's context, shared by its steps."""

    config: TrainParams
    test: object
    feed: TrainFeed
    schedule: Schedule
    learner: Learner
    seed: int
    device: torch.device
    hooks: TrainHooks
    fingerprint: str | None = None  # only rank 0 reads or writes the checkpoint, so only it hashes the data


def train_classifier(train_set: TrainingSet, test, config: TrainParams, *, seed: int, device,
                     num_workers: int = 0, hooks: TrainHooks = TrainHooks()) -> TrainResult:
    """Train `config.model` on `train_set` for the `training_schedule` of `config`, scoring on `test` after
    every round (an epoch, or `train.eval_every` steps under `train.steps`).

    `test` has `images` (a row source or a uint8 array), `labels` and `classes`: a `LabelledImages` or a
    `Prepared`. Images are read batch by batch through `num_workers` DataLoader workers. `hooks` name the
    resume checkpoint, a callback that receives each round's record (including the rounds replayed from a
    resumed checkpoint, so a logger sees the same sequence as in an uninterrupted run) and a recorder of the
    samples' training dynamics, whose state travels with the checkpoint. The returned model is on the CPU.
    Under torchrun every rank calls this and gets the same result; only rank 0 reads and writes the checkpoint.
    """
    device, world = torch.device(device), distributed.world_size()
    _check_sets(train_set, test, config, world)
    train_images = as_rows(train_set.images)
    schedule = training_schedule(len(train_set.labels), config, world)
    mean, std = channel_stats(train_images, num_workers=num_workers, device=device)
    feed = TrainFeed(train_images, np.ascontiguousarray(train_set.labels), mean, std, train_set.soft, num_workers)
    learner = new_learner(config, feed, len(test.classes), seed, device, schedule.total)
    run = _Run(config, test, feed, schedule, learner, seed, device, hooks)
    history = _restored_history(run, train_set)
    final = _train_rounds(run, history)
    if final is None:  # every round came from the checkpoint: score the restored model once more
        final = _evaluate(run)
    return TrainResult(learner.scored.cpu(), history, final, mean, std,
                       meta={"cifar_stem": uses_cifar_stem(learner.net, train_images.image_shape[0]),
                             "steps": schedule.total, "epochs": schedule.epochs_seen(schedule.total)})


def _check_sets(train_set: TrainingSet, test, config: TrainParams, world: int) -> None:
    """One DQError line when the batch cannot be split over `world` processes or the sets cannot be trained on."""
    if config.batch_size < MIN_IMAGES_PER_RANK * world:
        raise DQError(f"train.batch_size = {config.batch_size} is too small for {world} processes "
                      f"(runtime.nproc); expected at least {MIN_IMAGES_PER_RANK * world}, "
                      f"{MIN_IMAGES_PER_RANK} images per process")
    if len(train_set.labels) < 2:
        raise DQError(f"train.input = {train_set.input!r}: {len(train_set.labels)} training image(s); "
                      "at least 2 are needed (raise ratio)")
    train_shape, test_shape = tuple(as_rows(train_set.images).image_shape), tuple(as_rows(test.images).image_shape)
    if train_shape != test_shape:
        raise DQError(f"training images {train_shape} and test images {test_shape} differ in size; "
                      "rerun the pipeline from prepare")


def _restored_history(run: _Run, train_set: TrainingSet) -> list[dict]:
    """The rounds a matching checkpoint holds, loaded into the learner (with `train.resume`; else []), replayed
    to `on_epoch`; the learner's model is then wrapped for torchrun."""
    hooks = run.hooks
    if hooks.checkpoint is not None and distributed.is_main():
        run.fingerprint = run_fingerprint(train_set, run.test, run.config, run.seed, num_workers=run.feed.num_workers)
    history: list[dict] = []
    if run.config.resume and hooks.checkpoint is not None:
        history = _resume(hooks.checkpoint, run.fingerprint, run.learner, hooks.recorder)
    # after the resume: DistributedDataParallel starts every rank from rank 0's weights
    run.learner.model = _data_parallel(run.learner.model, run.device)
    for record in history:
        if hooks.on_epoch:
            hooks.on_epoch(record)
    return history


def _train_rounds(run: _Run, history: list[dict]) -> Evaluation | None:
    """Train the rounds after `history`'s, appending their records; the last scored round's evaluation
    (None when no round was left)."""
    final = None
    unit = "epoch" if run.config.steps is None and run.config.eval_every is None else "round"
    shown = run.hooks.progress and distributed.is_main()
    for r in tqdm(range(len(history), run.schedule.rounds), desc="train", unit=unit, disable=not shown, leave=False):
        record, evaluation = _train_round(run, r)
        final = evaluation if evaluation is not None else final
        history.append(record)
        _check_finite(history)
        if run.hooks.checkpoint is not None and distributed.is_main():
            _save_checkpoint(run.hooks.checkpoint, run.fingerprint, run.learner, history, run.hooks.recorder)
        if run.hooks.on_epoch:
            run.hooks.on_epoch(record)
    return final


def _train_round(run: _Run, r: int) -> tuple[dict, Evaluation | None]:
    """Train round r (0-based); (its record, its evaluation on the test set when the round is scored)."""
    first, last = (run.schedule.round_end(r - 1) if r else 0), run.schedule.round_end(r)
    batches = scheduled_batches(run.schedule, len(run.feed.labels), run.config, run.seed, first, last,
                                distributed.world_size())
    lr = run.learner.optimizer.param_groups[0]["lr"]
    train_loss, train_acc = train_batches(run.learner, run.feed, batches, run.config, run.device, run.hooks.recorder)
    record = {"epoch": run.schedule.epochs_seen(last), "step": last, "lr": lr, "train_loss": train_loss,
              "train_acc": train_acc}
    if not run.schedule.scored(r):
        return record, None
    distributed.broadcast_buffers(run.learner.scored)
    evaluation = _evaluate(run)
    return record | {"test_loss": evaluation.loss, "test_acc": evaluation.top1}, evaluation


def _evaluate(run: _Run) -> Evaluation:
    return evaluate(run.learner.scored, run.test, run.feed.mean, run.feed.std, run.device,
                    num_workers=run.feed.num_workers, tta=run.config.tta)


def _data_parallel(model, device):
    """`model` in DistributedDataParallel under torchrun (gradients averaged over ranks), else as it is."""
    if distributed.world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _save_checkpoint(path, fingerprint, learner: Learner, history, recorder=None) -> None:
    average = learner.average
    save_atomic(path, {"fingerprint": fingerprint, "model": learner.net.state_dict(),
                       "optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict(),
                       "torch_rng": torch.get_rng_state(), "history": history,
                       "average": average.model.state_dict() if average is not None else None,
                       "dynamics": recorder.state_dict() if recorder is not None else None})


def _resume(path, fingerprint, learner: Learner, recorder=None) -> list[dict]:
    """Load a matching checkpoint into the learner (and the recorder); return its history ([] if none).

    Rank 0 reads the file and sends it to the other ranks, which need not see the same disk; a refusal
    travels the same way, so that every rank stops with the same error instead of waiting for rank 0.
    """
    state = None
    if distributed.is_main():
        try:
            state = resume_state(path, fingerprint, section="train", what="classifier")
        except DQError as exc:
            state = str(exc)
    state = distributed.broadcast_from_main(state)
    if isinstance(state, str):
        raise DQError(state)
    if state is None:
        return []
    if recorder is not None and state.get("dynamics") is None:
        raise DQError(f"{path}: was saved by a run that did not record training dynamics; delete it or set "
                      "train.resume: false")
    learner.net.load_state_dict(state["model"])
    if recorder is not None:
        recorder.load_state_dict(state["dynamics"])
    if learner.average is not None:
        learner.average.model.load_state_dict(state["average"])
    learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return list(state["history"])


# --- outputs ------------------------------------------------------------------------------------------


def train_metrics(result: TrainResult, train_set: TrainingSet, config: TrainParams,
                  full_raw_bytes: int) -> dict:
    """The run's metrics: accuracy and storage at the top level, where `dvc exp show` lists them."""
    last = result.history[-1]
    per_class = result.final.per_class_accuracy()
    return {
        "top1": result.final.top1,
        "test_loss": result.final.loss,
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "best_epoch_test_acc_do_not_use_for_selection": max(r["test_acc"] for r in result.history
                                                            if "test_acc" in r),
        "per_class_acc": {name: float(a) for name, a in zip(train_set.classes, per_class)},
        "train_images": int(len(train_set.labels)),
        "kept_pixels": int(train_set.kept_pixels),
        "compact_bytes": int(train_set.stored_bytes),
        "full_raw_bytes": int(full_raw_bytes),
        "input": train_set.input,
        "soft_labels": train_set.soft is not None,
        "budget": "epochs" if config.steps is None else "steps",
        "epochs": result.meta["epochs"],  # passes over the training set: train.epochs, or what the steps made
        "steps": result.meta["steps"],
        "model": config.model,
    }


def evaluation_record(result: TrainResult, classes: list[str]) -> dict:
    """The final evaluation in full (confusion matrix, per-class accuracy) and the per-epoch history."""
    return {"classes": list(classes), "confusion": result.final.confusion.tolist(),
            "per_class_acc": [float(a) for a in result.final.per_class_accuracy()],
            "top1": result.final.top1, "history": result.history}


def _check_finite(history: list[dict]) -> None:
    if history and not math.isfinite(history[-1]["train_loss"]):
        raise DQError("train: the training loss became NaN or infinite; lower train.lr")
