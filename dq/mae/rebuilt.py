"""The compact set rebuilt: the MAE's reconstruction of a compact store, made once, read by `train`, `export` and users.

A compact store holds kept patches with holes; the images a classifier trains on are the same images with
the dropped patches reconstructed by the MAE (kept pixels exact). One reconstruction, one owner: this module
reconstructs a compact store once per (compact file, MAE file) into the rebuilt cache, and everything that
needs the rebuilt images reads them from there: the train stage's `compact` input, the export stage
(data/export/, dq.export.writer), and `RebuiltDataset`, the public torch Dataset (`dq.rebuilt_dataset`). So
the pixels a model trains on, the exported PNGs and what a user's DataLoader gets are the same bytes.

The rebuilt cache, folder `fill/` (`DataPaths.rebuilt_cache`, owned here), lies beside the resume checkpoints
and like them is not a DVC output: DVC deletes a stage's outputs before it runs, and a rerun of train (another
lr) or export (another format) on the same compact file and MAE must find the rebuilt images again.

    fill/images.npy   uint8 [N, H, W, 3], a plain .npy file: image n is the compact file's row n
    fill/key.json     {"key": ..., "shape": [N, H, W, 3], "version": 1}

The key is the SHA-256 of the compact file's bytes, the MAE file's bytes, the reconstruction's batch size and
the kind of device (CPU, or the CUDA device's name: bf16 reconstructions differ from float32 ones), so a cache
from another compact file or MAE is never used: it is made again. The folder is written through
`dq.core.io.atomic_path` (a temporary folder renamed into place once complete), so a killed or failed
reconstruction leaves no half-written cache. Under torchrun every rank reconstructs a disjoint share of the
batches into rank 0's temporary folder, which rank 0 renames once all are done: the work is done once, not once
per rank, and the data folder must be one that every rank sees (as it already is for the prepared and compact
stores).

A compact store and an MAE fit when an MAE patch, seen on the stored image, is no larger than a stored
patch (`check_fit`): otherwise a dropped patch hides every MAE patch that overlaps it and the MAE has
nothing to reconstruct it from. An MAE on another grid works (dq.mae.reconstruct maps the masks), e.g.
CIFAR's 4-px patches at 32 px and the reference MAE's 16-px patches at 224 px.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dq.compact import reader as compact_reader
from dq.core import distributed
from dq.core.errors import DQError
from dq.core.io import atomic_path, check_free_space, file_digest
from dq.data.rows import CompactRows, Rows, batches, runs
from dq.labels.soft import SoftLabels
from dq.mae import reconstruct

IMAGES_NAME = "images.npy"
KEY_NAME = "key.json"
CACHE_VERSION = 1
RECONSTRUCT_BATCH_SIZE = 256  # images per MAE forward pass (at most; on the CPU fewer for large images)
CPU_RECONSTRUCT_PIXELS = 500 * 32 * 32  # on the CPU, pixels per MAE forward pass (as dq.train.evaluate scores)


class RebuiltRows(Rows):
    """The rebuilt cache's images.npy, read with one pread per run of consecutive rows."""

    def __init__(self, path: Path, shape: tuple[int, ...], offset: int, key: str = ""):
        self.path, self.offset, self.key = Path(path), int(offset), key
        self.count, self.image_shape = int(shape[0]), tuple(int(s) for s in shape[1:])
        self.row_bytes = int(np.prod(self.image_shape))
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def identity(self) -> bytes | None:
        """The cache's key: the SHA-256 of the compact and MAE files and the settings it was reconstructed with.
        The prefix is the folder's name; it is hashed into the train checkpoint's fingerprint."""
        return b"fill:" + self.key.encode() if self.key else None

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        out = np.empty((rows.size,) + self.image_shape, np.uint8)
        flat = out.reshape(rows.size, self.row_bytes)
        for start, stop in runs(rows):
            size = (int(rows[stop - 1]) - int(rows[start]) + 1) * self.row_bytes
            data = os.pread(self._fd, size, self.offset + int(rows[start]) * self.row_bytes)
            if len(data) != size:
                raise DQError(f"{self.path}: shorter than its header says; delete {self.path.parent} to rebuild it")
            block = np.frombuffer(data, np.uint8).reshape(-1, self.row_bytes)
            flat[start:stop] = block[rows[start:stop] - rows[start]]
        return out



def device_kind(device: torch.device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"cuda {torch.cuda.get_device_name(device)} bf16={torch.cuda.is_bf16_supported()}"


def cache_key(compact_path: Path, mae_path: Path, device, batch_size: int) -> str:
    """SHA-256 of what the rebuilt images depend on: both files' bytes, the batch size, the device kind."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "batch_size": int(batch_size),
                                   "device": device_kind(device)}, sort_keys=True).encode())
    for path in (compact_path, mae_path):
        h.update(file_digest(path).encode())
    return h.hexdigest()


def open_cache(folder: Path, key: str, shape: tuple[int, ...]) -> RebuiltRows | None:
    """The cache in `folder` when it was made for `key` and holds `shape`; None otherwise."""
    try:
        saved = json.loads((folder / KEY_NAME).read_text())
        layout = _npy_layout(folder / IMAGES_NAME)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or saved.get("version") != CACHE_VERSION:
        return None
    if layout is None or layout[0] != tuple(shape):
        return None
    return RebuiltRows(folder / IMAGES_NAME, shape, layout[1], key)


def _npy_layout(path: Path) -> tuple[tuple[int, ...], int] | None:
    """(shape, data offset) of a C-order uint8 .npy file whose size matches its header; else None."""
    with open(path, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
        if read is None:
            return None
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if fortran or dtype != np.uint8 or path.stat().st_size != offset + int(np.prod(shape)):
        return None
    return tuple(int(s) for s in shape), offset


def _create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """An all-zero uint8 .npy of `shape` (sparse until written); the data offset."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                  "fortran_order": False, "shape": tuple(shape)})
        offset = fh.tell()
        fh.truncate(offset + int(np.prod(shape)))
    return offset


@dataclass(frozen=True)
class RebuildOptions:
    """How the reconstruction runs. `device` and `batch_size` change its bytes, so they are in the cache key."""

    device: torch.device | str = "cpu"
    batch_size: int | None = None  # images per MAE forward pass; None: reconstruct_batch_size's
    num_workers: int = 0  # DataLoader workers reading the compact store
    progress: bool = True


@dataclass(frozen=True)
class CacheJob:
    """One compact store to rebuild into the cache `folder`: its files and what its images are."""

    compact_path: Path
    mae_path: Path
    folder: Path
    keep: np.ndarray  # bool [N, L]
    shape: tuple[int, ...]  # (N, H, W, 3)
    patch_size: int


def rebuilt_images(job: CacheJob, options: RebuildOptions) -> RebuiltRows:
    """The compact set's images with dropped patches reconstructed by the MAE, from the cache in `job.folder`.

    Reconstructed (and the cache written) only when the folder holds no cache for these files; see the module
    docstring. `options` has its device and batch size set. Every rank of a torchrun group calls this; rank 0
    decides and hashes, all reconstruct a share.
    """
    key = distributed.broadcast_from_main(cache_key(job.compact_path, job.mae_path, options.device, options.batch_size)
                                          if distributed.is_main() else None)
    fresh = distributed.broadcast_from_main(open_cache(job.folder, key, job.shape) is not None
                                            if distributed.is_main() else None)
    if not fresh:
        _rebuild(job, key, options)
    cache = open_cache(job.folder, key, job.shape)
    if cache is None:
        raise DQError(f"{job.folder}: the rebuilt cache that rank 0 wrote is missing here (rank {distributed.rank()}); "
                      "every process must see the same --data folder")
    return cache


def _rebuild(job: CacheJob, key: str, options: RebuildOptions) -> None:
    """Reconstruct this rank's share of the batches into rank 0's temporary folder, renamed into place."""
    from dq.mae.model import load_mae

    model = load_mae(job.mae_path).to(options.device).eval()
    check_fit(job.compact_path, job.patch_size, job.shape[1], job.mae_path, model.config)
    plan = reconstruct.reconstruction_batches(job.keep, job.patch_size, job.shape[1], model, options.batch_size)
    mine = plan[distributed.split(len(plan), distributed.rank(), distributed.world_size())]
    with contextlib.ExitStack() as stack:
        tmp, offset = _temporary_cache(stack, job)
        fd = stack.enter_context(_open_fd(tmp / IMAGES_NAME))
        _write_share(fd, offset, model, mine, job, options)
        os.fsync(fd)
        distributed.barrier()  # every share written
        if distributed.is_main():
            (tmp / KEY_NAME).write_text(json.dumps({"key": key, "shape": list(job.shape), "version": CACHE_VERSION},
                                                   sort_keys=True) + "\n")
    distributed.barrier()  # renamed into place


def _temporary_cache(stack: contextlib.ExitStack, job: CacheJob) -> tuple[Path, int]:
    """(rank 0's temporary cache folder, its images.npy's data offset): made by rank 0 and renamed into place
    when `stack` closes; every rank checks that it sees the folder."""
    tmp = None
    if distributed.is_main():
        check_free_space(job.folder, int(np.prod(job.shape)))  # the disk of folder.parent, the data root
        tmp = stack.enter_context(atomic_path(job.folder))
        tmp.mkdir()
        _create_npy(tmp / IMAGES_NAME, job.shape)
    tmp = Path(distributed.broadcast_from_main(str(tmp) if tmp is not None else None))
    layout = _npy_layout(tmp / IMAGES_NAME) if (tmp / IMAGES_NAME).is_file() else None
    if layout is None:
        raise DQError(f"{tmp}: rank 0's temporary rebuilt cache is missing here (rank {distributed.rank()}); "
                      "every process must see the same --data folder")
    return tmp, layout[1]


def _write_share(fd: int, offset: int, model, plan: list[np.ndarray], job: CacheJob,
                 options: RebuildOptions) -> None:
    """Reconstruct the batches `plan` (rows of the compact store) and write each image at its row of images.npy."""
    from tqdm import tqdm

    source = CompactRows(job.compact_path, job.keep, job.shape[1:])
    row_bytes = int(np.prod(job.shape[1:]))
    bar = tqdm(plan, desc="mae reconstruct", unit="batch", leave=False,
               disable=not (options.progress and distributed.is_main()))
    for rows, images in zip(bar, batches(source, plan, options.num_workers)):
        rebuilt = reconstruct.reconstruct_batch(model, images.numpy(), job.keep[rows], job.patch_size, options.device)
        for start, stop in runs(rows):
            os.pwrite(fd, np.ascontiguousarray(rebuilt[start:stop]).tobytes(), offset + int(rows[start]) * row_bytes)


@contextlib.contextmanager
def _open_fd(path: Path):
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


def reconstruct_batch_size(image_shape, device) -> int:
    """Images per MAE forward pass: RECONSTRUCT_BATCH_SIZE on CUDA; on the CPU at most CPU_RECONSTRUCT_PIXELS
    pixels, so the reconstruction's host memory does not grow with the image size."""
    if torch.device(device).type == "cuda":
        return RECONSTRUCT_BATCH_SIZE
    h, w = image_shape[:2]
    return max(1, min(RECONSTRUCT_BATCH_SIZE, CPU_RECONSTRUCT_PIXELS // (h * w)))


def check_fit(compact_path: Path, patch_size: int, image_size: int, mae_path: Path, mae_config) -> None:
    """One DQError line naming both files when an MAE patch, seen on the stored image, is larger than a stored
    patch (the MAE could not reconstruct a dropped patch from its neighbours)."""
    footprint = mae_config.patch_size * image_size / mae_config.img_size  # stored pixels a side
    if footprint > patch_size + 1e-9:
        raise DQError(f"{compact_path} ({patch_size}-px patches on {image_size}-px images) and {mae_path} "
                      f"({mae_config.patch_size}-px patches on {mae_config.img_size}-px images) do not fit: an MAE "
                      f"patch covers {footprint:g} stored pixels a side, more than a stored patch; use an MAE whose "
                      f"patch covers at most {patch_size} (its patch size x {image_size} / mae.input_size)")


@dataclass
class RebuiltSet:
    """A compact store's images with the dropped patches reconstructed (`images`, read by row from the rebuilt
    cache), and the per-image arrays of the store."""

    images: RebuiltRows  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    indices: np.ndarray  # int64 [N]: rows of the prepared training set
    bins: np.ndarray  # int32 [N]
    keep: np.ndarray  # bool [N, L]
    header: object  # dq.compact.schema.Header
    compact_path: Path
    mae_path: Path
    soft: SoftLabels | None = None  # the store's soft labels (format version 3), as stored


def rebuilt_set(compact_path: str | Path, mae_path: str | Path, *, cache: str | Path,
                options: RebuildOptions = RebuildOptions(), prepared_labels: np.ndarray | None = None) -> RebuiltSet:
    """The compact store rebuilt by the MAE, reconstructed into the rebuilt cache `cache` unless it holds
    these images already.

    With `prepared_labels` (the prepared training set's labels), the compact file's indices and labels are
    checked against them before anything is reconstructed.
    """
    compact_path, mae_path = Path(compact_path), Path(mae_path)
    with compact_reader.open_compact(compact_path) as cf:
        header = cf.header
        keep = cf.read_keep()
        labels = np.asarray(cf.read("labels"), dtype=np.int64)
        indices = np.asarray(cf.read("indices"), dtype=np.int64)
        bins = np.asarray(cf.read("bins"), dtype=np.int32)
        soft = cf.read_soft_labels()
    if prepared_labels is not None and indices.size and (
            indices.min() < 0 or indices.max() >= len(prepared_labels)
            or not np.array_equal(prepared_labels[indices], labels)):
        raise DQError(f"{compact_path}: its indices and labels do not match the prepared training set; "
                      "rerun the pipeline from compress")
    device = torch.device(options.device)
    options = dataclasses.replace(options, device=device, batch_size=options.batch_size
                                  or reconstruct_batch_size(header.image_shape, device))
    job = CacheJob(compact_path, mae_path, Path(cache), keep, (len(keep),) + tuple(header.image_shape),
                   header.patch_size)
    return RebuiltSet(rebuilt_images(job, options), labels, indices, bins, keep, header, compact_path, mae_path, soft)


class RebuiltDataset(torch.utils.data.Dataset):
    """The rebuilt compact set as a torch Dataset: (image, label) per compact row, or (image, label, soft)
    with `soft_labels=True`: soft float32 [C], the teacher's probabilities at the store's temperature
    (`temperature`), of the image as stored (view 0). `soft_labels` [N, C] holds them all, or is None for a
    store of hard labels.

    The image is a uint8 tensor [3, H, W] (what `torchvision.io.decode_png` gives for the exported PNG),
    or `transform(image)`; the label an int, the index of `classes`. Rows are read one at a time from the
    rebuilt cache (a pread each; no whole-set array), and the dataset pickles without file handles, so
    DataLoader workers each open their own. Its pixels are the cache's: the exported images' and the ones
    the train stage trains on.
    """

    def __init__(self, rebuilt: RebuiltSet, transform=None, soft_labels: bool = False):
        self.images, self.labels, self.transform = rebuilt.images, rebuilt.labels, transform
        self.classes = list(rebuilt.header.classes)
        self.indices = rebuilt.indices
        soft = rebuilt.soft
        if soft_labels and soft is None:
            raise DQError(f"{rebuilt.compact_path}: holds no soft labels (compact format version "
                          f"{rebuilt.header.version}); build it with labels.soft: true")
        self.with_soft, self.soft = soft_labels, soft
        self.temperature = soft.temperature if soft is not None else None

    @property
    def soft_labels(self) -> np.ndarray | None:
        """float32 [N, C], every row's soft label (view 0), made dense on demand; None without soft labels."""
        return None if self.soft is None else self.soft.targets(np.arange(len(self.labels))).numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        row = index % len(self)
        image = torch.from_numpy(self.images.read([row])[0]).permute(2, 0, 1).contiguous()
        image = self.transform(image) if self.transform else image
        if self.with_soft:
            return image, int(self.labels[row]), self.soft.targets(np.array([row]))[0]
        return image, int(self.labels[row])


def rebuilt_dataset(compact: str | Path, mae: str | Path, *, cache: str | Path | None = None, device="cpu",
                    transform=None, soft_labels: bool = False) -> RebuiltDataset:
    """The compact set `compact` (a compact store file) rebuilt by the MAE `mae` (an mae/model.pt) as a torch
    Dataset of (uint8 image [3, H, W] or transform(image), label), or with `soft_labels` (a store with soft
    labels only) of (image, label, float32 probabilities [C]).

    The reconstruction runs once into `cache` (default: the pipeline's own rebuilt cache, `fill/` beside the
    compact store's folder, i.e. data/fill/ for data/compact/dataset.h5) and is reused by every later call,
    the train stage and the export stage alike.
    """
    compact = Path(compact)
    cache = Path(cache) if cache is not None else compact.resolve().parent.parent / "fill"
    return RebuiltDataset(rebuilt_set(compact, mae, cache=cache, options=RebuildOptions(device=device)), transform,
                          soft_labels)
