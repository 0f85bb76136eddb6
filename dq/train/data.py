"""What a classifier trains and is scored on: the three training sets, and images made into model input.

The training set (`train.input`) is one of three, all scored on the whole prepared test set:

- `compact`: the compact HDF5 store, its dropped patches reconstructed by the MAE (`dq.mae.rebuilt`). The
  reconstruction happens ONCE, before the first epoch, in batches streamed from the compact store, and its
  output is kept in the rebuilt cache (`data/fill/`, keyed by the compact file's and the MAE's bytes), so a
  rerun with the same inputs, and the export stage, do not reconstruct again; kept pixels are the stored ones.
- `selected`: the selected rows (the compact file's `indices`) with all their original pixels, the
  ablation without patch dropping.
- `full`: the whole prepared training set, the upper bound.

Streaming. No split's images are ever held whole: the training set and the test set are row sources
(`dq.data.rows`), and every step reads only its batch's rows (sorted for the read, then put back in the
batch's order) through a DataLoader of `runtime.num_workers` workers, each opening its own file handles.
What is held whole is per image: labels, the compact rows' indices and keep masks. The channel
statistics are exact integer sums over batches (the result does not depend on the order or the number
of processes).

Augmentation (random crop with zero padding, horizontal flip) works on uint8 tensors, from draws made for
the whole batch (`augment_draws`, from the epoch's generator: dq.train.schedule), so each rank applies its
part of the batch and epoch e sees the same crops whether or not the run was resumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dq.compact import reader as compact_reader
from dq.core import distributed
from dq.core.errors import DQError
from dq.data import rows as row_sources
from dq.data.prepared import Prepared, Store
from dq.data.rows import Rows, as_rows
from dq.labels.soft import SoftLabels
from dq.mae.rebuilt import RebuildOptions, rebuilt_set

EVAL_BATCH_SIZE = 500  # also the batch of the channel statistics and of the fingerprint's array reads
CPU_BATCH_PIXELS = EVAL_BATCH_SIZE * 32 * 32  # on the CPU, pixels per forward pass when scoring
DATA_SAMPLE_IMAGES = 2048  # what a classifier's `init_from_data` sees: enough for a 12×12 patch covariance


@dataclass
class TrainingSet:
    """The images a classifier is trained on, and what storing them costs.

    `images` is a row source (`dq.data.rows`): it reads the rows a batch asks for, never the whole set.
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
    soft: SoftLabels | None = None  # a compact store's soft labels: train distils from them (dq.labels.soft)


@dataclass
class LabelledImages:
    """A labelled split to score on: `images` a row source or a uint8 array [N, H, W, 3]."""
    images: object
    labels: np.ndarray  # int64 [N]
    classes: list[str]


@dataclass(frozen=True)
class TrainFeed:
    """What the optimizer steps read: the training images (a row source, or a uint8 array or tensor
    [N, H, W, C]), their labels, the channel statistics that normalise them, the soft labels to distil from
    (or None) and the DataLoader workers that read them."""

    images: object
    labels: np.ndarray  # int64 [N]
    mean: list[float]  # per channel, in [0, 1] units
    std: list[float]
    soft: SoftLabels | None = None
    num_workers: int = 0


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


def compact_training_set(compact_path: str | Path, mae_path: str | Path, *, rebuilt_cache: str | Path,
                         options: RebuildOptions = RebuildOptions(),
                         prepared_labels: np.ndarray | None = None) -> TrainingSet:
    """The compact store with its dropped patches reconstructed by the MAE: once, into the rebuilt cache
    `rebuilt_cache` (dq.mae.rebuilt, shared with the export stage). With `prepared_labels` (the prepared
    training set's labels), the compact file's indices and labels are checked against them before anything
    is reconstructed."""
    rebuilt = rebuilt_set(compact_path, mae_path, cache=rebuilt_cache, options=options,
                          prepared_labels=prepared_labels)
    patch = rebuilt.header.patch_size
    return TrainingSet(rebuilt.images, rebuilt.labels, list(rebuilt.header.classes), "compact",
                       kept_pixels=int(rebuilt.keep.sum()) * patch * patch,
                       stored_bytes=Path(compact_path).stat().st_size, indices=rebuilt.indices, soft=rebuilt.soft)


def compact_indices(compact_path: str | Path) -> np.ndarray:
    """int64 [N]: the prepared-set rows of the compact store's images (the selection it was built from)."""
    with compact_reader.open_compact(compact_path) as cf:
        return np.asarray(cf.read("indices"), dtype=np.int64)


def training_set(kind: str, prepared: PreparedSplit, compact_path: str | Path, mae_path: str | Path, *,
                 device, rebuilt_cache: str | Path | None = None, num_workers: int = 0) -> TrainingSet:
    """The training set `train.input` names: compact, selected or full (`rebuilt_cache`: for compact)."""
    if kind == "full":
        return full_training_set(prepared)
    if kind == "selected":
        return selected_training_set(prepared, compact_indices(compact_path))
    if kind != "compact":
        raise DQError(f"train.input = {kind!r} is not allowed; expected one of compact, selected, full")
    if rebuilt_cache is None:
        raise ValueError("train.input = compact needs a rebuilt_cache folder")
    labels = prepared.labels() if isinstance(prepared, Store) else np.asarray(prepared.labels, np.int64)
    return compact_training_set(compact_path, mae_path, rebuilt_cache=rebuilt_cache,
                                options=RebuildOptions(device=device, num_workers=num_workers),
                                prepared_labels=labels)


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
    return _moments(hist)


def _moments(hist: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std, in [0, 1] units, of the value histograms int64 [C, 256], in exact integers."""
    values = np.arange(256, dtype=object)
    mean, std = [], []
    for counts in hist.astype(object):
        n, s1, s2 = int(counts.sum()), int((counts * values).sum()), int((counts * values * values).sum())
        n = max(n, 1)
        mean.append(s1 / (n * 255))  # Python int / int: correctly rounded
        var = (n * s2 - s1 * s1) / (n * n * 255 * 255)
        std.append(max(math.sqrt(var), 1e-3))  # a constant channel must not divide by zero
    return mean, std


def data_sample(images, mean, std, seed: int, device) -> torch.Tensor:
    """Normalised float [n, C, H, W] on `device`: up to DATA_SAMPLE_IMAGES rows of `images` drawn by `seed`
    (every rank draws the same), for a classifier that sets layers from data (dq.train.smallnet's whitening)."""
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
