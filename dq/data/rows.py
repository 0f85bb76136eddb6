"""The classifier's images, read a batch of rows at a time.

Row sources. A source has `image_shape` (H, W, C), `len()` and `read(rows) -> uint8 [b, H, W, C]`, the
rows in the order asked for; each read touches only those rows, so no caller needs a whole split:

- `ArrayRows`: an array in memory (tests, benchmarks, `dq.train.data.split_images` of a `Prepared`).
- `StoreRows`: rows of a prepared store (`dq.data.prepared.Store`); each read decodes just its rows' streams.
- `CompactRows`: images of the compact store, dropped patches zero (`dq.compact.CompactFile.read_images`).
- `RebuiltRows` (dq.mae.rebuilt): the compact set reconstructed by the MAE, read from the rebuilt cache.
- `SubsetRows`: the rows `rows` of another source (`selected`: the compact file's indices).

Reads sort their rows and put the images back in the order asked for. `batches(source, row_batches,
num_workers)` reads a list of row batches in order, in `num_workers` DataLoader workers (0: in this
process). A source is pickled without file handles: every process opens its own, lazily, on its first
read. A DQError in a worker comes back as that one line, not as the DataLoader's wrapped traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dq.compact import reader as compact_reader
from dq.core.errors import DQError
from dq.data.prepared import Store

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
            self._file, self._pid = compact_reader.open_compact(self.path), os.getpid()
        return self._file.read_images(rows, self.keep[rows])


def runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
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
