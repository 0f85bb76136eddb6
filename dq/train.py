"""Classifier training and evaluation: the last step that tells whether a compact dataset is any good.

A classifier (`train.model`: dq's smallnet by default, or any timm model) is trained on one of three
training sets (`train.input`) and scored on the whole prepared test set:

- `compact`: the compact HDF5 store, its dropped patches filled in by the MAE (`dq.rebuilt`). The fill
  happens ONCE, before the first epoch, in batches streamed from the compact store, and its output is
  cached on disk (`data/fill/`, keyed by the compact file's and the MAE's bytes), so a rerun with the same
  inputs, and the export stage, do not fill again; kept pixels are the stored ones.
- `selected`: the selected rows (the compact file's `indices`) with all their original pixels, the
  ablation without patch dropping.
- `full`: the whole prepared training set, the upper bound.

Streaming. No split's images are ever held whole: the training set and the test set are row sources
(`dq.row_sources`), and every step reads only its batch's rows (sorted for the read, then put back in the
batch's order) through a DataLoader of `runtime.num_workers` workers, each opening its own file handles.
What is held whole is per image: labels, the compact rows' indices and keep masks. The channel
statistics are exact integer sums over batches (the result does not depend on the order or the number
of processes). The resume fingerprint hashes a data set's identity where it has one (a prepared store's
index with its shards' SHA-256, the fill cache's key, a subset's rows), so no image is decoded for it;
in-memory arrays are hashed batch by batch.

The model (a timm classifier, ResNets with a CIFAR stem on small images) and its file `train/model.pt`
are dq.classifier's; the names are re-exported here.

Training budget (`Schedule`). By default an epoch is one pass over the chosen training set, so
`train.epochs` fixes the number of times each image is seen, whatever the set's size: the same budget per
image seen for `compact`, `selected` and `full` alike (the `full` run simply takes more steps), and a
10% subset gets a tenth of the full run's optimizer steps. `train.steps` fixes the number of optimizer
steps instead, whatever the set's size (the fixed-iteration protocol of CCS, Zheng et al. 2023): epochs
follow one another, each with its own shuffled order, until the steps are done, and the cosine
schedule spans them. The run is scored and checkpointed after every round: an epoch, or
`train.eval_every` steps (a tenth of `train.steps` by default). `train_metrics.json` records the
steps taken and the passes over the set they made.

Recipe (`train.*`). SGD with momentum (Nesterov's by default), weight decay on weights only (never on
biases or normalisation parameters), a schedule stepped per batch (`onecycle`: linear warm-up over
`train.warmup` of the steps, then linear decay to zero, as airbench and Smith's one-cycle policy;
`cosine`), label smoothing, an optional exponential average of the weights (`train.ema`, `WeightAverage`:
what is scored and saved), and flip test-time augmentation (`train.tta`). The default classifier is
dq.smallnet's (`train.model: smallnet`), which sets its frozen first layer from a sample of the training
images (`data_sample`) before the first step. configs/paper.yaml keeps the paper's protocol (ResNet-18,
200 epochs, plain SGD, cosine).

The reported accuracy is the FINAL round's top-1 on the test set. The best epoch's test accuracy is
kept only as `best_epoch_test_acc_do_not_use_for_selection`: choosing an epoch by test accuracy is model
selection on test data.

Determinism. Augmentation (random crop with zero padding, horizontal flip) works on uint8 tensors and
draws from a generator seeded by (seed, epoch), so epoch e sees the same crops whether or not the run
was resumed. On the CPU two runs with the same params give the same metrics and the same model bytes.

Several processes. Under torchrun (`runtime.nproc` > 1, or several machines) the model is wrapped in
DistributedDataParallel, one process per GPU. `train.batch_size` stays the GLOBAL batch: every rank
draws the same order and augmentation (the same generator) and trains on its contiguous part of each
batch, and the loss is scaled so that the averaged gradient is the whole batch's mean gradient, as in
one process; the recipe (lr, schedule, steps per epoch) does not change with the number of GPUs.
Each rank reads only its part of each batch (the augmentation of the whole batch is drawn on every rank,
then applied to the part), its shard of the rows for the channel statistics and for the evaluation,
and its share of the MAE fill's batches. What does change: BatchNorm normalises each rank's part with
that part's statistics, and sums are reduced in another order. Rank 0's running statistics are copied
to every rank before each evaluation, the test set is scored in shards and the counts summed, and only
rank 0 writes checkpoints (and hashes the data for their fingerprint).
On CUDA the forward pass runs under bf16 autocast.

Resume. After every epoch the model, optimizer, scheduler, torch RNG state and the per-epoch history
are written to the checkpoint (`data/train_ckpt/last.pt` in the pipeline). With `train.resume: true`, a
checkpoint whose fingerprint (params, seed, training and test data) matches the run continues where
it stopped; a checkpoint from other params or data, or one that cannot be read, is refused with one
error line (the policy of `dq.checkpoint`, shared with the MAE).
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

from dq import distributed
from dq import compact as compact_format
from dq import row_sources
from dq.rebuilt import rebuilt_set
from dq.checkpoint import resume_state, save_atomic
from dq.classifier import (Classifier, create_classifier, read_classifier, replace_stem_with_cifar,  # noqa: F401
                           save_classifier, uses_cifar_stem)
from dq.errors import DQError
from dq.prepared import Prepared, Store
from dq.params import TrainParams
from dq.runtime import autocast
from dq.row_sources import Rows, as_rows
from dq.soft_labels import SoftLabels, distillation_loss

if TYPE_CHECKING:
    from dq.dynamics import DynamicsRecorder

EVAL_BATCH_SIZE = 500  # also the batch of the channel statistics and of the fingerprint's array reads
CPU_BATCH_PIXELS = EVAL_BATCH_SIZE * 32 * 32  # on the CPU, pixels per forward pass when scoring
MIN_IMAGES_PER_RANK = 2  # BatchNorm cannot train on a single sample


@dataclass
class TrainingSet:
    """The images a classifier is trained on, and what storing them costs.

    `images` is a row source (`dq.row_sources`): it reads the rows a batch asks for, never the whole set.
    `kept_pixels` counts pixel positions (H×W, not ×C) that come from storage; `stored_bytes` is what
    the set occupies on disk (the compact file) or as raw uint8 arrays (`selected`, `full`).
    """
    images: Rows  # uint8 [N, H, W, 3], read by row
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    input: str
    kept_pixels: int
    stored_bytes: int
    indices: np.ndarray | None = None  # int64 [N]: rows in the prepared training set (None: all rows)
    soft: SoftLabels | None = None  # a compact store's soft labels: train distils from them (dq.soft_labels)


@dataclass
class LabelledImages:
    """A labelled split to score on: `images` a row source or a uint8 array [N, H, W, 3]."""
    images: object
    labels: np.ndarray  # int64 [N]
    classes: list[str]


@dataclass
class Evaluation:
    """Scores of a model on a labelled set."""
    loss: float
    top1: float
    confusion: np.ndarray  # int64 [C, C]: rows are true classes, columns predictions

    def per_class_accuracy(self) -> np.ndarray:
        """float [C]: recall of every class (0 for a class absent from the set)."""
        totals = self.confusion.sum(axis=1)
        return np.diag(self.confusion) / np.maximum(totals, 1)


@dataclass
class TrainResult:
    model: object  # torch.nn.Module, on the CPU
    history: list[dict]  # one record per epoch: epoch, lr, train_loss, train_acc, test_loss, test_acc
    final: Evaluation  # the final epoch's evaluation on the test set
    mean: list[float]  # per-channel normalisation of the training set, in [0, 1] units
    std: list[float]
    meta: dict = field(default_factory=dict)


def forward_batch(base: int, image_shape, device) -> int:
    """Images per inference forward pass: `base` on CUDA; on the CPU at most CPU_BATCH_PIXELS pixels.

    On the CPU a batch's activations live in host memory: 500 images at 224 px through a ResNet take
    several GB, which would make the train stage's peak memory grow with the test set up to that cap
    (bench/scale.py). At 32 px the batch stays `base`, so the default run's numbers do not move.
    """
    if torch.device(device).type == "cuda":
        return base
    h, w = image_shape[:2]
    return max(1, min(base, CPU_BATCH_PIXELS // (h * w)))


# --- training sets ----------------------------------------------------------------------------------

PreparedSplit = Prepared | Store  # a split in memory (tests, benchmarks) or an opened version-2 store


def split_images(split: PreparedSplit) -> LabelledImages:
    """A prepared split as a labelled row source (a store is read by row; its labels are read whole)."""
    if isinstance(split, Store):
        return LabelledImages(row_sources.StoreRows(split), split.labels(), split.classes)
    return LabelledImages(row_sources.ArrayRows(split.images), np.asarray(split.labels, np.int64),
                          list(split.classes))


def _raw_bytes(n: int, image_shape) -> int:
    return int(n) * int(np.prod(image_shape))


def full_training_set(prepared: PreparedSplit) -> TrainingSet:
    split = split_images(prepared)
    n, (h, w, _) = len(split.labels), split.images.image_shape
    return TrainingSet(split.images, split.labels, split.classes, "full", kept_pixels=n * h * w,
                       stored_bytes=_raw_bytes(n, split.images.image_shape))


def selected_training_set(prepared: PreparedSplit, indices: np.ndarray) -> TrainingSet:
    """The rows `indices` of the prepared set with their original pixels."""
    split = split_images(prepared)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(split.labels)):
        raise DQError(f"selected indices must lie in [0, {len(split.labels) - 1}], "
                      f"found {int(indices.min())}..{int(indices.max())}; rerun select and compress")
    n, (h, w, _) = indices.size, split.images.image_shape
    return TrainingSet(split.images.subset(indices), split.labels[indices], split.classes, "selected",
                       kept_pixels=n * h * w, stored_bytes=_raw_bytes(n, split.images.image_shape),
                       indices=indices)


def compact_training_set(compact_path: str | Path, mae_path: str | Path, *, device, fill_cache: str | Path,
                         batch_size: int | None = None, num_workers: int = 0,
                         prepared_labels: np.ndarray | None = None) -> TrainingSet:
    """The compact store with its dropped patches filled by the MAE: once, into the cache `fill_cache`
    (dq.rebuilt, shared with the export stage). With `prepared_labels` (the prepared training set's labels),
    the compact file's indices and labels are checked against them before anything is filled."""
    rebuilt = rebuilt_set(compact_path, mae_path, cache=fill_cache, device=device, num_workers=num_workers,
                          prepared_labels=prepared_labels, batch_size=batch_size)
    patch = rebuilt.header.patch_size
    return TrainingSet(rebuilt.images, rebuilt.labels, list(rebuilt.header.classes), "compact",
                       kept_pixels=int(rebuilt.keep.sum()) * patch * patch,
                       stored_bytes=Path(compact_path).stat().st_size, indices=rebuilt.indices, soft=rebuilt.soft)


def compact_indices(compact_path: str | Path) -> np.ndarray:
    """int64 [N]: the prepared-set rows of the compact store's images (the selection it was built from)."""
    with compact_format.open_compact(compact_path) as cf:
        return np.asarray(cf.read("indices"), dtype=np.int64)


def training_set(kind: str, prepared: PreparedSplit, compact_path: str | Path, mae_path: str | Path, *,
                 device, fill_cache: str | Path | None = None, num_workers: int = 0) -> TrainingSet:
    """The training set `train.input` names: compact, selected or full (`fill_cache`: for compact)."""
    if kind == "full":
        return full_training_set(prepared)
    if kind == "selected":
        return selected_training_set(prepared, compact_indices(compact_path))
    if kind != "compact":
        raise DQError(f"train.input = {kind!r} is not allowed; expected one of compact, selected, full")
    if fill_cache is None:
        raise ValueError("train.input = compact needs a fill_cache folder")
    labels = prepared.labels() if isinstance(prepared, Store) else np.asarray(prepared.labels, np.int64)
    return compact_training_set(compact_path, mae_path, device=device, fill_cache=fill_cache,
                                num_workers=num_workers, prepared_labels=labels)


# --- tensors ------------------------------------------------------------------------------------------


def channel_stats(images, *, batch_size: int | None = None, num_workers: int = 0,
                  device=None) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images [N, H, W, C], in [0, 1] units.

    `images` is a row source or an array, read in batches. Each channel's histogram of values is summed
    exactly in integers and the moments come from it in integer arithmetic (the mean rounded once, the
    std twice: the variance, then its square root), so the result does not depend on the batches, their
    order or the number of processes. It may differ from float64 sums over a whole array in the last
    bits. Under torchrun each rank counts its shard of the rows and the histograms are summed (on `device`).
    """
    source = as_rows(images)
    batch_size = batch_size or EVAL_BATCH_SIZE
    channels = source.image_shape[-1]
    rows = distributed.shard(len(source), batch_size, distributed.rank(), distributed.world_size())
    hist = np.zeros((channels, 256), np.int64)
    for batch in row_sources.batches(source, row_sources.consecutive(rows.start, rows.stop, batch_size), num_workers):
        x = batch.numpy()
        for c in range(channels):
            hist[c] += np.bincount(x[..., c].reshape(-1), minlength=256)
    hist = distributed.all_reduce_sum(torch.from_numpy(hist).to(device or "cpu")).cpu().numpy()
    values = np.arange(256, dtype=object)
    mean, std = [], []
    for c in range(channels):
        counts = hist[c].astype(object)
        n, s1, s2 = int(counts.sum()), int((counts * values).sum()), int((counts * values * values).sum())
        n = max(n, 1)
        mean.append(s1 / (n * 255))  # Python int / int: correctly rounded
        var = (n * s2 - s1 * s1) / (n * n * 255 * 255)
        std.append(max(math.sqrt(var), 1e-3))  # a constant channel must not divide by zero
    return mean, std


DATA_SAMPLE_IMAGES = 2048  # what a classifier's `init_from_data` sees: enough for a 12×12 patch covariance


def data_sample(images, mean, std, seed: int, device) -> torch.Tensor:
    """Normalised float [n, C, H, W] on `device`: up to DATA_SAMPLE_IMAGES rows of `images` drawn by `seed`
    (every rank draws the same), for a classifier that sets layers from data (dq.smallnet's whitening)."""
    source = as_rows(images)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    rows = np.sort(order[:DATA_SAMPLE_IMAGES].numpy())
    return to_input(torch.from_numpy(source.read(rows)), normalisation(mean, std, device), torch.device(device))


def augment_draws(b: int, generator, padding: int, hflip: bool):
    """The random numbers `augment` draws for a batch of b images, in its order: (dy, dx, flip), None where
    the augmentation is off. Every rank draws them for the whole batch, and applies its part."""
    dy = dx = flip = None
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
    return dy, dx, flip


def apply_augment(images, draws, padding: int, part: slice = slice(None)):
    """Random crop with zero padding and horizontal flip of uint8 [b, H, W, C], the images `part` of the
    batch `draws` were drawn for; each image's result depends only on it and its own draws."""
    dy, dx, flip = draws
    b, h, w, _ = images.shape
    if dy is not None:
        padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
        rows = (dy[part][:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
        cols = (dx[part][:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
        images = padded[torch.arange(b)[:, None, None], rows, cols]  # [B, H, W, C]
    if flip is not None:
        images = torch.where(flip[part][:, None, None, None], images.flip(2), images)
    return images


def augment(images, generator, padding: int, hflip: bool):
    """Random crop with zero padding and random horizontal flip, on uint8 [B, H, W, C] → same shape."""
    return apply_augment(images, augment_draws(len(images), generator, padding, hflip), padding)


def normalisation(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as [1, C, 1, 1] tensors on `device`, made once rather than per batch."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1),
            torch.tensor(std, device=device).view(1, -1, 1, 1))


def to_input(images, norm: tuple[torch.Tensor, torch.Tensor], device):
    """uint8 [B, H, W, C] on the CPU → normalised float [B, C, H, W] on `device`, channels-last memory.

    On CUDA the batch goes through pinned memory and is copied without blocking the host.
    """
    if device.type == "cuda":
        images = images.pin_memory()
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = norm
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# --- training -----------------------------------------------------------------------------------------


def classifier_epoch_generator(seed: int, epoch: int):
    """The generator of epoch `epoch`'s order and augmentation; independent of any resume.

    Not the MAE's `dq.mae_training.mae_epoch_generator`: the two derive their seeds differently, and
    either one changing would change its trained model's bytes.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_batches(n: int, config: TrainParams, generator, world: int = 1) -> list[tuple[torch.Tensor, tuple]]:
    """(rows [b], augmentation draws) of every optimizer step of one epoch, drawn from the epoch's generator:
    first the shuffled order, then each step's draws in turn (`augment_draws`). A last batch too small to
    give every rank 2 images is skipped, without draws: BatchNorm cannot train on one sample."""
    order = torch.randperm(n, generator=generator)
    steps = [order[start:start + config.batch_size] for start in range(0, n, config.batch_size)]
    return [(idx, augment_draws(len(idx), generator, config.crop_padding, config.hflip))
            for idx in steps if len(idx) >= MIN_IMAGES_PER_RANK * world]


def train_classifier_epoch(model, optimizer, scheduler, images, labels, mean, std, config: TrainParams,
                           generator, device, num_workers: int = 0) -> tuple[float, float]:
    """One pass over the shuffled training set (`epoch_batches` of `generator`); (mean loss, accuracy)."""
    batches = epoch_batches(len(labels), config, generator, distributed.world_size())
    return train_batches(model, optimizer, scheduler, images, labels, mean, std, config, batches, device,
                         num_workers=num_workers)


def train_batches(model, optimizer, scheduler, images, labels, mean, std, config: TrainParams, batches,
                  device, num_workers: int = 0, average: "WeightAverage | None" = None,
                  soft: SoftLabels | None = None, recorder: "DynamicsRecorder | None" = None) -> tuple[float, float]:
    """One optimizer step per (rows, draws) of `batches`; returns (mean loss, accuracy) on the augmented batches.
    `average`, when given, is updated after every step. With `soft` labels the loss is dq.soft_labels'
    distillation loss (weight `train.distill_weight`), each image's target the view its flip gave it.
    A `recorder` (dq.dynamics) sees every step's logits after the step: the samples' training dynamics.

    `images` is a row source (or a uint8 array or tensor [N, H, W, C]); labels int64 [N]. Each step reads
    only its batch's rows (this rank's part of them), through `num_workers` DataLoader workers. Under
    torchrun each rank trains on its part of every batch (see the module docstring). Loss and accuracy
    are summed on the device and read once, at the end: a read per step would make the host wait for the
    GPU every step.
    """
    model.train()
    device = torch.device(device)
    world, rank = distributed.world_size(), distributed.rank()
    source = as_rows(images)
    labels = torch.as_tensor(np.asarray(labels))
    norm = normalisation(mean, std, device)
    parts = [distributed.split(len(idx), rank, world) for idx, _ in batches]
    reads = [idx[part].numpy() for (idx, _), part in zip(batches, parts)]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for (idx, draws), part, rows, raw in zip(batches, parts, reads, row_sources.batches(source, reads, num_workers)):
        x = to_input(apply_augment(raw, draws, config.crop_padding, part), norm, device)
        y = labels[rows].to(device, non_blocking=True)
        target = None
        if soft is not None:
            flipped = draws[2][part] if draws[2] is not None else None
            target = soft.targets(rows, flipped).to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)
            loss, batch_loss_sum = _batch_loss(logits, y, len(idx), world, config.label_smoothing,
                                               target, soft.temperature if soft is not None else 1.0,
                                               config.distill_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update()
        if recorder is not None:
            recorder.record(idx.numpy(), part, logits, y, model)
        loss_sum += batch_loss_sum
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, correct.double()])).tolist()
    return totals[0] / max(seen, 1), int(totals[1]) / max(seen, 1)


def _batch_loss(logits, y, batch_images: int, world: int, label_smoothing: float = 0.0,
                target: torch.Tensor | None = None, temperature: float = 1.0,
                distill_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to backpropagate, the batch part's summed loss in float64, detached); the cross-entropy
    is against labels smoothed by `label_smoothing` (Szegedy et al. 2016). With soft `target`
    probabilities [b, C], the loss is dq.soft_labels.distillation_loss at `temperature`, `distill_weight`.

    With several ranks each part's summed loss is divided by the whole batch's size and multiplied by
    the world size, because DistributedDataParallel averages gradients over ranks: the result is the
    gradient of the whole batch's mean loss, even when the parts differ in size by one image.
    """
    if target is not None:
        summed = distillation_loss(logits, y, target, temperature=temperature, weight=distill_weight,
                                   label_smoothing=label_smoothing)
        return summed * (world / batch_images), summed.detach().double()
    if world == 1:
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, loss.detach().double() * len(y)
    summed = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    return summed * (world / batch_images), summed.detach().double()


def evaluate(model, images, labels: np.ndarray, mean, std, num_classes: int, device,
             batch_size: int | None = None, num_workers: int = 0, tta: str = "none") -> Evaluation:
    """Loss, top-1 and confusion matrix of `model` on uint8 images [N, H, W, C] (a row source or an array),
    read batch by batch through `num_workers` DataLoader workers. With `tta="flip"` an image's logits are
    the mean of its own and its mirror image's.

    `model` is the plain module, never the DistributedDataParallel wrapper. Under torchrun each rank
    scores a shard of whole batches and the sums are added up, so every rank returns the same numbers.
    """
    model.eval()
    device = torch.device(device)
    source, labels = as_rows(images), np.asarray(labels)
    batch_size = batch_size or forward_batch(EVAL_BATCH_SIZE, source.image_shape, device)
    norm = normalisation(mean, std, device)
    rows = distributed.shard(len(labels), batch_size, distributed.rank(), distributed.world_size())
    reads = row_sources.consecutive(rows.start, rows.stop, batch_size)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode(), autocast(device):
        for batch_rows, batch in zip(reads, row_sources.batches(source, reads, num_workers)):
            x = to_input(batch, norm, device)
            y = torch.from_numpy(labels[batch_rows]).to(device, non_blocking=True)
            logits = model(x) if tta == "none" else (model(x) + model(x.flip(3))) / 2
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2)
    distributed.all_reduce_sum(confusion)
    distributed.all_reduce_sum(loss_sum)
    confusion = confusion.view(num_classes, num_classes).cpu().numpy()
    n = max(len(labels), 1)
    return Evaluation(loss=float(loss_sum) / n, top1=float(np.trace(confusion)) / n, confusion=confusion)


@torch.no_grad()
def predict_logits(model, images, mean, std, device, *, flip: bool = False, num_workers: int = 0,
                   batch_size: int = EVAL_BATCH_SIZE):
    """float32 [b, C] batches of `model`'s logits on uint8 images [N, H, W, C] (a row source or an array), in
    row order; of the mirror images with `flip`. One process (the teacher's logits are written by rank 0)."""
    model.eval()
    device = torch.device(device)
    source = as_rows(images)
    norm = normalisation(mean, std, device)
    reads = row_sources.consecutive(0, len(source), batch_size)
    with autocast(device):
        for batch in row_sources.batches(source, reads, num_workers):
            x = to_input(batch, norm, device)
            yield model(x.flip(3) if flip else x).float().cpu().numpy()


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging; airbench's EMA), updated after
    every optimizer step: w_avg <- decay * w_avg + (1 - decay) * w. Buffers (BatchNorm's running
    statistics) are copied, not averaged. The average is what is scored and saved."""

    def __init__(self, model, decay: float):
        import copy

        self.decay = decay
        self.source = model
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for avg, new in zip(self.model.parameters(), self.source.parameters()):
            avg.lerp_(new, 1.0 - self.decay)
        for avg, new in zip(self.model.buffers(), self.source.buffers()):
            avg.copy_(new)


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch: the full batches, and the last one if every rank gets 2 images."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= MIN_IMAGES_PER_RANK * world else 0)


DEFAULT_STEP_ROUNDS = 10  # with train.steps and no train.eval_every: rounds of a tenth of the steps


@dataclass(frozen=True)
class Schedule:
    """The optimizer steps of a run, in rounds: each round ends with a log line and a checkpoint, and the
    rounds that `scored` says end with a test evaluation too.

    `train.steps: null`: `train.epochs` epochs, one round per epoch, each scored. `train.steps: S`: exactly S
    steps whatever the training set's size, in rounds of `train.eval_every` steps, each scored; with no
    `train.eval_every`, rounds of a tenth of S of which only the last is scored (scoring 10,000 test images
    costs a fast trainer as much as a tenth of its run). Epochs follow one another as usual (each its own
    shuffled order), a round may end inside one.
    """

    steps_per_epoch: int
    total: int
    round_steps: int
    score_every_round: bool = True

    def scored(self, r: int) -> bool:
        """Whether round r (0-based) ends with a test evaluation: every round, or the last one only."""
        return self.score_every_round or r == self.rounds - 1

    @property
    def rounds(self) -> int:
        return -(-self.total // self.round_steps)

    def round_end(self, r: int) -> int:
        """Steps done after round r (0-based)."""
        return min((r + 1) * self.round_steps, self.total)

    def epochs_seen(self, step: int) -> float | int:
        """Passes over the training set after `step` steps: an int when whole (every epoch run), else a float."""
        whole, rest = divmod(step, self.steps_per_epoch)
        return whole if rest == 0 else round(step / self.steps_per_epoch, 4)


def training_schedule(n: int, config: TrainParams, world: int = 1) -> Schedule:
    """The run's `Schedule` for `n` training images on `world` processes."""
    per_epoch = steps_per_epoch(n, config.batch_size, world)
    if per_epoch == 0:
        raise DQError(f"train.batch_size = {config.batch_size}: {n} training images give no batch of "
                      f"{MIN_IMAGES_PER_RANK} images per process on {world} processes; raise ratio")
    total = config.epochs * per_epoch if config.steps is None else config.steps
    every = config.eval_every or (per_epoch if config.steps is None else -(-total // DEFAULT_STEP_ROUNDS))
    return Schedule(per_epoch, total, min(every, total),
                    score_every_round=config.steps is None or config.eval_every is not None)


def scheduled_batches(schedule: Schedule, n: int, config: TrainParams, seed: int, first: int, last: int,
                      world: int = 1) -> list[tuple[torch.Tensor, tuple]]:
    """(rows, draws) of global steps [first, last): epoch e's steps come from `classifier_epoch_generator(seed,
    e)`, so a run resumed at any step draws what the uninterrupted run drew."""
    out = []
    per_epoch = schedule.steps_per_epoch
    for epoch in range(first // per_epoch, (last - 1) // per_epoch + 1):
        steps = epoch_batches(n, config, classifier_epoch_generator(seed, epoch), world)
        start = epoch * per_epoch
        out += steps[max(first - start, 0):last - start]
    return out


def optimizer_and_schedule(model, config: TrainParams, total_steps: int):
    """SGD (Nesterov when `train.nesterov`) with weight decay on the weights only, not on biases or
    normalisation parameters (1-D tensors), and the learning-rate schedule stepped once per batch."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov)
    total = max(total_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total, config.schedule, config.warmup))
    return optimizer, scheduler


def learning_rate_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """The share of `train.lr` used at optimizer step `step` (0-based) of `total`.

    cosine: 0.5 (1 + cos(pi step / total)), from 1 down to 0 (SGDR without restarts, Loshchilov & Hutter 2017).
    onecycle: linear from 1/w up to 1 over the first w = round(warmup * total) steps, then linear down to 0 at
    `total` (the triangular schedule of airbench and of Smith's one-cycle policy).
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    up = round(warmup * total)
    if step < up:
        return (step + 1) / up
    return max(0.0, (total - step) / max(total - up, 1))


def run_fingerprint(train_set: TrainingSet, test, config: TrainParams, seed: int, *,
                    num_workers: int = 0) -> str:
    """What a checkpoint must match to be resumed: the params (but `resume`), seed and both data sets.

    A data set is hashed by its identity where it has one (a prepared store's index with its shards'
    SHA-256, the fill cache's key, the rows of a subset): no image is decoded for it. Other images (arrays)
    are hashed batch by batch: the bytes (and so the digest) of hashing whole arrays.
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
            for batch in row_sources.batches(source, row_sources.consecutive(0, len(source), EVAL_BATCH_SIZE),
                                            num_workers):
                h.update(batch.numpy().tobytes())
        labels = np.ascontiguousarray(labels)
        h.update(str(labels.shape).encode())
        h.update(labels.tobytes())
    soft = getattr(train_set, "soft", None)
    if soft is not None:  # a fill cache's key already covers its store's bytes; arrays are hashed here too
        h.update(f"soft T={soft.temperature}".encode())
        h.update(soft.values.tobytes())
        h.update(b"" if soft.ids is None else soft.ids.tobytes())
    return h.hexdigest()


def train_classifier(train_set: TrainingSet, test, config: TrainParams, *, seed: int, device,
                     checkpoint: str | Path | None = None,
                     on_epoch: Callable[[dict], None] | None = None, progress: bool = True,
                     num_workers: int = 0, recorder: "DynamicsRecorder | None" = None) -> TrainResult:
    """Train `config.model` on `train_set` for the `training_schedule` of `config`, scoring on `test` after
    every round (an epoch, or `train.eval_every` steps under `train.steps`).

    `test` has `images` (a row source or a uint8 array), `labels` and `classes`: a `LabelledImages` or a
    `Prepared`. Images are read batch by batch through `num_workers` DataLoader workers.
    `on_epoch` receives each round's record, including the rounds replayed from a resumed checkpoint,
    so a logger sees the same sequence as in an uninterrupted run. The returned model is on the CPU.
    A `recorder` (dq.dynamics) records every sample's training dynamics; its state travels with the checkpoint.
    Under torchrun every rank calls this and gets the same result; only rank 0 reads and writes
    `checkpoint`.
    """
    device, world = torch.device(device), distributed.world_size()
    if config.batch_size < MIN_IMAGES_PER_RANK * world:
        raise DQError(f"train.batch_size = {config.batch_size} is too small for {world} processes "
                      f"(runtime.nproc); expected at least {MIN_IMAGES_PER_RANK * world}, "
                      f"{MIN_IMAGES_PER_RANK} images per process")
    if len(train_set.labels) < 2:
        raise DQError(f"train.input = {train_set.input!r}: {len(train_set.labels)} training image(s); "
                      "at least 2 are needed (raise ratio)")
    train_images, test_images = as_rows(train_set.images), as_rows(test.images)
    if tuple(train_images.image_shape) != tuple(test_images.image_shape):
        raise DQError(f"training images {tuple(train_images.image_shape)} and test images "
                      f"{tuple(test_images.image_shape)} differ in size; rerun the pipeline from prepare")
    num_classes = len(test.classes)
    image_size = train_images.image_shape[0]
    n = len(train_set.labels)
    schedule = training_schedule(n, config, world)
    mean, std = channel_stats(train_images, num_workers=num_workers, device=device)
    torch.manual_seed(seed)
    net = create_classifier(config.model, num_classes, image_size)
    net = net.to(device).to(memory_format=torch.channels_last)
    if hasattr(net, "init_from_data"):
        net.init_from_data(data_sample(train_images, mean, std, seed, device))
    optimizer, scheduler = optimizer_and_schedule(net, config, schedule.total)
    average = WeightAverage(net, config.ema) if config.ema > 0 else None
    scored_net = average.model if average is not None else net
    fingerprint = None  # only rank 0 reads or writes the checkpoint, so only it hashes the data
    if checkpoint is not None and distributed.is_main():
        fingerprint = run_fingerprint(train_set, test, config, seed, num_workers=num_workers)

    history: list[dict] = []
    if config.resume and checkpoint is not None:
        history = _resume(checkpoint, fingerprint, net, optimizer, scheduler, average, recorder)
    model = _data_parallel(net, device)  # after the resume: DDP starts every rank from rank 0's weights
    for record in history:
        if on_epoch:
            on_epoch(record)

    labels = np.ascontiguousarray(train_set.labels)
    final = None
    rounds = range(len(history), schedule.rounds)
    unit = "epoch" if config.steps is None and config.eval_every is None else "round"
    for r in tqdm(rounds, desc="train", unit=unit, disable=not (progress and distributed.is_main()), leave=False):
        first, last = (schedule.round_end(r - 1) if r else 0), schedule.round_end(r)
        batches = scheduled_batches(schedule, n, config, seed, first, last, world)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_batches(model, optimizer, scheduler, train_images, labels, mean, std, config,
                                              batches, device, num_workers=num_workers, average=average,
                                              soft=train_set.soft, recorder=recorder)
        record = {"epoch": schedule.epochs_seen(last), "step": last, "lr": lr, "train_loss": train_loss,
                  "train_acc": train_acc}
        if schedule.scored(r):
            distributed.broadcast_buffers(scored_net)
            final = evaluate(scored_net, test_images, test.labels, mean, std, num_classes, device,
                             num_workers=num_workers, tta=config.tta)
            record |= {"test_loss": final.loss, "test_acc": final.top1}
        history.append(record)
        _check_finite(history)
        if checkpoint is not None and distributed.is_main():
            _save_checkpoint(checkpoint, fingerprint, net, optimizer, scheduler, history, average, recorder)
        if on_epoch:
            on_epoch(record)
    if final is None:  # every round came from the checkpoint: score the restored model once more
        final = evaluate(scored_net, test_images, test.labels, mean, std, num_classes, device,
                         num_workers=num_workers, tta=config.tta)
    return TrainResult(scored_net.cpu(), history, final, mean, std,
                       meta={"cifar_stem": uses_cifar_stem(net, image_size), "steps": schedule.total,
                             "epochs": schedule.epochs_seen(schedule.total)})


def _data_parallel(model, device):
    """`model` in DistributedDataParallel under torchrun (gradients averaged over ranks), else as it is."""
    if distributed.world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _save_checkpoint(path, fingerprint, model, optimizer, scheduler, history, average=None, recorder=None) -> None:
    save_atomic(path, {"fingerprint": fingerprint, "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "torch_rng": torch.get_rng_state(), "history": history,
                       "average": average.model.state_dict() if average is not None else None,
                       "dynamics": recorder.state_dict() if recorder is not None else None})


def _resume(path, fingerprint, model, optimizer, scheduler, average=None, recorder=None) -> list[dict]:
    """Load a matching checkpoint into model/optimizer/scheduler; return its history ([] if none).

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
    model.load_state_dict(state["model"])
    if recorder is not None:
        recorder.load_state_dict(state["dynamics"])
    if average is not None:
        average.model.load_state_dict(state["average"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
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
