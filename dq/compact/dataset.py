"""`CompactDataset`: a torch Dataset over a compact store, opened lazily in each DataLoader worker."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dq.compact.reader import CompactFile, open_compact
from dq.compact.schema import check_keep


class CompactDataset(Dataset):
    """A torch Dataset over a compact file (version 1 or 2): (image [C, H, W], keep [L], label) per image.

    The image is the stored image with its dropped patches zeroed: uint8 by default, or float32
    in [0, 1] with `as_float=True`. keep is a bool tensor [L], label an int64 scalar tensor.

    `__init__` reads and checks the header (format and schema_version first) and closes the file again;
    the handle that reads samples is opened lazily in each process, and reopened after a fork, because
    an HDF5 handle must never cross a fork. Codec streams are decoded where the batch is read, i.e. in
    the DataLoader workers; JPEG a whole batch per call. Reads take no file lock, so read-only data works.
    """

    def __init__(self, path: str | Path, *, as_float: bool = False):
        self.path = Path(path)
        self.as_float = as_float
        with open_compact(self.path) as cf:
            self.header = cf.header
        self._cf: CompactFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.header.num_images

    def _open(self) -> None:
        """Open this process's handle once; keep, labels and offsets (small) are read whole."""
        if self._cf is not None and self._pid == os.getpid():
            return
        self._cf, self._pid = open_compact(self.path), os.getpid()
        self._keep = self._cf.read("keep")
        self._labels = self._cf.read("labels")
        check_keep(self.path, self._keep, self.header)
        if self.header.uses_streams:
            self._cf.offsets  # noqa: B018 - read and checked once per process

    def _samples(self, rows: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._open()
        order = np.argsort(rows, kind="stable")
        images = np.empty((len(rows),) + self.header.image_shape, np.uint8)
        images[order] = self._cf.read_images(rows[order], self._keep[rows[order]])
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # [B, C, H, W]
        if self.as_float:
            x = x.float().div_(255.0)
        keep, labels = torch.from_numpy(self._keep[rows]), torch.from_numpy(self._labels[rows])
        return [(x[i], keep[i], labels[i]) for i in range(len(rows))]

    def _rows(self, indices) -> np.ndarray:
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if ((rows < -len(self)) | (rows >= len(self))).any():
            raise IndexError(f"index out of range for {len(self)} images: {indices}")
        return rows % max(len(self), 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._samples(self._rows([index]))[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """A DataLoader batch in one go: one HDF5 read and one decode call for the batch."""
        return self._samples(self._rows(indices))

    def __getstate__(self) -> dict:
        # a DataLoader with spawn pickles the dataset: the handle stays behind
        state = {k: v for k, v in self.__dict__.items() if k not in ("_keep", "_labels")}
        return {**state, "_cf": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_cf", None) is not None and self._pid == os.getpid():
            self._cf.close()
