"""The classifier's images, read a batch of rows at a time, and the MAE fill cache of the compact set.

Row sources. A source has `image_shape` (H, W, C), `len()` and `read(rows) -> uint8 [b, H, W, C]`, the
rows in the order asked for; each read touches only those rows, so no caller needs a whole split:

- `ArrayRows`: an array in memory (tests, benchmarks, `dq.train` called on a `Prepared`).
- `StoreRows`: rows of a prepared store (`dq.prepared.Store`); each read decodes just its rows' streams.
- `CompactRows`: images of the compact store, dropped patches zero (`dq.format.CompactFile.read_images`).
- `FilledRows`: the compact set filled by the MAE, read from the fill cache below.
- `SubsetRows`: the rows `rows` of another source (`selected`: the compact file's indices).

Reads sort their rows and put the images back in the order asked for. `batches(source, row_batches,
num_workers)` reads a list of row batches in order, in `num_workers` DataLoader workers (0: in this
process). A source is pickled without file handles: every process opens its own, lazily, on its first
read. A DQError in a worker comes back as that one line, not as the DataLoader's wrapped traceback.

The fill cache `train_fill/` (`DataPaths.train_fill`, owned here). The train stage's `compact` input is
the compact set with its dropped patches filled by the MAE. The fill runs ONCE and its output is kept on
disk, beside the resume checkpoint and like it not a DVC output (DVC would delete it before each run):

    train_fill/images.npy   uint8 [N, H, W, 3], a plain .npy file: image n is the compact file's row n
    train_fill/key.json     {"key": ..., "shape": [N, H, W, 3], "version": 1}

The key is the SHA-256 of the compact file's bytes, the MAE file's bytes, the fill batch size and the kind
of device (CPU, or the CUDA device's name: bf16 fills differ from float32 ones), so a cache from another
compact file or MAE is never used: it is filled again. The folder is written through `dq.io.atomic_path`
(a temporary folder renamed into place once complete), so a killed or failed fill leaves no half-written
cache. Under torchrun every rank fills a disjoint share of the batches into rank 0's temporary folder,
which rank 0 renames once all are done: the work is done once, not once per rank, and the data folder
must be one that every rank sees (as it already is for the prepared and compact stores).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dq import distributed, fill
from dq import format as compact_format
from dq.errors import DQError
from dq.io import atomic_path, check_free_space
from dq.prepared import Store, file_sha256

IMAGES_NAME = "images.npy"
KEY_NAME = "key.json"
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------ row sources

class Rows:
    """A source of uint8 images [H, W, C] read by row; subclasses implement `_read_sorted`."""

    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, rows) -> np.ndarray:
        """uint8 [b, H, W, C]: the images of `rows` (any order, repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must lie in [0, {len(self)}), got {int(rows.min())}..{int(rows.max())}")
        order = np.argsort(rows, kind="stable")
        out = np.empty((rows.size,) + tuple(self.image_shape), np.uint8)
        out[order] = self._read_sorted(rows[order])
        return out

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def identity(self) -> bytes | None:
        """Bytes that change whenever the images do, known without decoding them; None: only the pixels say.

        The resume fingerprint hashes these instead of decoding the whole set once more (an ImageNet pass).
        """
        return None

    def subset(self, rows) -> "SubsetRows":
        return SubsetRows(self, rows)


class ArrayRows(Rows):
    def __init__(self, images):
        images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}")
        self.images = images
        self.image_shape = tuple(int(s) for s in images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        return self.images[rows]


class SubsetRows(Rows):
    def __init__(self, source: Rows, rows):
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64).reshape(-1)
        self.image_shape = source.image_shape

    def __len__(self) -> int:
        return self.rows.size

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        return self.source.read(self.rows[rows])

    def identity(self) -> bytes | None:
        source = self.source.identity()
        return None if source is None else source + b"rows:" + hashlib.sha256(self.rows.tobytes()).digest()


class StoreRows(Rows):
    """Every row of a prepared store; `Store` reopens its shards lazily in each process."""

    def __init__(self, store: Store):
        self.store = store
        self.image_shape = tuple(store.image_shape)

    def __len__(self) -> int:
        return len(self.store)

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size,) + self.image_shape, np.uint8)
        for i, (row, stream) in enumerate(zip(rows, self.store.streams(rows))):
            out[i] = self.store.decode_row(int(row), stream)
        return out

    def identity(self) -> bytes:
        """The store's index: codec, shape and every shard's SHA-256 (stages check shards against it)."""
        return b"store:" + json.dumps(self.store.index.as_json(), sort_keys=True).encode()


class CompactRows(Rows):
    """The compact store's images, dropped patches zero; `keep` bool [N, L] is the file's, read once."""

    def __init__(self, path: str | Path, keep: np.ndarray, image_shape: tuple[int, int, int]):
        self.path, self.keep, self.image_shape = Path(path), keep, tuple(image_shape)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.keep)

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        if self._file is None or self._pid != os.getpid():  # never share an HDF5 handle across a fork
            self._file, self._pid = compact_format.open_compact(self.path), os.getpid()
        return self._file.read_images(rows, self.keep[rows])


class FilledRows(Rows):
    """The fill cache's images.npy, read with one pread per run of consecutive rows."""

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
        """The cache's key: the SHA-256 of the compact and MAE files and the fill settings it was filled from."""
        return b"fill:" + self.key.encode() if self.key else None

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        out = np.empty((rows.size,) + self.image_shape, np.uint8)
        flat = out.reshape(rows.size, self.row_bytes)
        for start, stop in _runs(rows):
            size = (int(rows[stop - 1]) - int(rows[start]) + 1) * self.row_bytes
            data = os.pread(self._fd, size, self.offset + int(rows[start]) * self.row_bytes)
            if len(data) != size:
                raise DQError(f"{self.path}: shorter than its header says; delete {self.path.parent} to fill it again")
            block = np.frombuffer(data, np.uint8).reshape(-1, self.row_bytes)
            flat[start:stop] = block[rows[start:stop] - rows[start]]
        return out


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """[start, stop) of each run of sorted `rows` whose neighbours differ by at most 1."""
    start = 0
    for i in range(1, rows.size + 1):
        if i == rows.size or rows[i] - rows[i - 1] > 1:
            yield start, i
            start = i


def as_rows(images) -> Rows:
    """A row source for a source, a uint8 array [N, H, W, C] or such a tensor."""
    return images if isinstance(images, Rows) else ArrayRows(images)


# -------------------------------------------------------------------------------------------- loading

class _Failure:
    """A DQError raised in a DataLoader worker, carried back as its message."""

    def __init__(self, message: str):
        self.message = message


class _BatchReads(torch.utils.data.Dataset):
    def __init__(self, source: Rows):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, rows):
        try:
            return self.source.read(rows)
        except DQError as exc:
            return _Failure(str(exc))


def batches(source: Rows, row_batches, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """uint8 tensors [b, H, W, C]: the images of each batch of rows in `row_batches`, in order.

    With `num_workers` > 0 a DataLoader's worker processes read ahead (two batches each); the main
    process's global torch RNG is left alone, so the workers change no result.
    """
    if num_workers == 0:
        for rows in row_batches:
            yield torch.from_numpy(source.read(rows))
        return
    loader = torch.utils.data.DataLoader(_BatchReads(source), batch_size=None, sampler=list(row_batches),
                                         num_workers=num_workers, prefetch_factor=2, persistent_workers=False,
                                         generator=torch.Generator())
    for item in loader:
        if isinstance(item, _Failure):
            raise DQError(item.message)
        yield item


def consecutive(start: int, stop: int, batch_size: int) -> list[np.ndarray]:
    """Rows [start, stop) in batches of `batch_size`."""
    return [np.arange(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]


# ------------------------------------------------------------------------------------------ fill cache

def device_kind(device: torch.device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"cuda {torch.cuda.get_device_name(device)} bf16={torch.cuda.is_bf16_supported()}"


def fill_key(compact_path: Path, mae_path: Path, device, batch_size: int) -> str:
    """SHA-256 of what the filled images depend on: both files' bytes, the batch size, the device kind."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "batch_size": int(batch_size),
                                   "device": device_kind(device)}, sort_keys=True).encode())
    for path in (compact_path, mae_path):
        h.update(file_sha256(Path(path)).encode())
    return h.hexdigest()


def open_cache(folder: Path, key: str, shape: tuple[int, ...]) -> FilledRows | None:
    """The cache in `folder` when it was filled for `key` and holds `shape`; None otherwise."""
    try:
        saved = json.loads((folder / KEY_NAME).read_text())
        layout = _npy_layout(folder / IMAGES_NAME)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or saved.get("version") != CACHE_VERSION:
        return None
    if layout is None or layout[0] != tuple(shape):
        return None
    return FilledRows(folder / IMAGES_NAME, shape, layout[1], key)


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


def filled_images(compact_path: str | Path, mae_path: str | Path, folder: str | Path, *, keep: np.ndarray,
                  image_shape: tuple[int, int, int], patch_size: int, device, batch_size: int,
                  num_workers: int = 0, progress: bool = True) -> FilledRows:
    """The compact set's images with dropped patches filled by the MAE, from the cache in `folder`.

    Filled (and the cache written) only when `folder` holds no cache for these files; see the module
    docstring. Every rank of a torchrun group calls this; rank 0 decides and hashes, all fill a share.
    """
    compact_path, mae_path, folder = Path(compact_path), Path(mae_path), Path(folder)
    shape = (len(keep),) + tuple(image_shape)
    key = distributed.broadcast_from_main(fill_key(compact_path, mae_path, device, batch_size)
                                          if distributed.is_main() else None)
    fresh = distributed.broadcast_from_main(open_cache(folder, key, shape) is not None
                                            if distributed.is_main() else None)
    if not fresh:
        _fill(compact_path, mae_path, folder, key, keep, shape, patch_size, device, batch_size, num_workers,
              progress)
    cache = open_cache(folder, key, shape)
    if cache is None:
        raise DQError(f"{folder}: the MAE fill cache that rank 0 wrote is missing here (rank {distributed.rank()}); "
                      "every process must see the same --data folder")
    return cache


def _fill(compact_path: Path, mae_path: Path, folder: Path, key: str, keep: np.ndarray, shape, patch_size: int,
          device, batch_size: int, num_workers: int, progress: bool) -> None:
    from tqdm import tqdm

    from dq.mae import load_mae

    model = load_mae(mae_path).to(device).eval()
    plan = fill.fill_batches(keep, patch_size, shape[1], model, batch_size)
    mine = plan[distributed.split(len(plan), distributed.rank(), distributed.world_size())]
    source = CompactRows(compact_path, keep, shape[1:])
    row_bytes = int(np.prod(shape[1:]))
    with contextlib.ExitStack() as stack:
        tmp = None
        if distributed.is_main():
            check_free_space(folder, int(np.prod(shape)))  # the disk of folder.parent, the data root
            tmp = stack.enter_context(atomic_path(folder))
            tmp.mkdir()
            _create_npy(tmp / IMAGES_NAME, shape)
        tmp = Path(distributed.broadcast_from_main(str(tmp) if tmp is not None else None))
        layout = _npy_layout(tmp / IMAGES_NAME) if (tmp / IMAGES_NAME).is_file() else None
        if layout is None:
            raise DQError(f"{tmp}: rank 0's temporary fill cache is missing here (rank {distributed.rank()}); "
                          "every process must see the same --data folder")
        offset = layout[1]
        fd = stack.enter_context(_open_fd(tmp / IMAGES_NAME))
        bar = tqdm(mine, desc="train: mae fill", unit="batch", leave=False,
                   disable=not (progress and distributed.is_main()))
        for rows, images in zip(bar, batches(source, mine, num_workers)):
            filled = fill.fill_batch(model, images.numpy(), keep[rows], patch_size, device)
            for start, stop in _runs(rows):
                os.pwrite(fd, np.ascontiguousarray(filled[start:stop]).tobytes(),
                          offset + int(rows[start]) * row_bytes)
        os.fsync(fd)
        distributed.barrier()  # every share written
        if distributed.is_main():
            (tmp / KEY_NAME).write_text(json.dumps({"key": key, "shape": list(shape), "version": CACHE_VERSION},
                                                   sort_keys=True) + "\n")
    distributed.barrier()  # renamed into place


@contextlib.contextmanager
def _open_fd(path: Path):
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)
