"""The prepared store `prepared/{train,test}.h5`: its one writer, reader and validator.

Version 1 of the store: one HDF5 file per split with `images` uint8 [N, H, W, 3] (gzip, chunked along
N, fletcher32), `labels` int64 [N] and the attributes `classes` (JSON list) and `source`. The `prepare`
stage writes it; every later stage reads it through `read_prepared`, and users through `read_images`
and `read_labels`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.errors import DQError, first_line
from dq.io import H5_OPEN_ERRORS, atomic_path, check_free_space, h5_file


@dataclass
class Prepared:
    """A prepared split: uint8 images [N, H, W, 3], int64 labels [N], the class names, the source."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def write_prepared(path: str | Path, split: Prepared) -> None:
    """Write a prepared split atomically, chunked along N, compressed, byte-identical for equal input."""
    images = np.ascontiguousarray(split.images, dtype=np.uint8)
    labels = np.ascontiguousarray(split.labels, dtype=np.int64)
    n, h, w, c = images.shape
    per_image = h * w * c
    chunk_n = int(max(1, min(n, (256 * 1024) // per_image)))
    check_free_space(path, images.nbytes + labels.nbytes)
    with atomic_path(path) as tmp:
        with h5_file(tmp, "w") as f:
            f.create_dataset("images", data=images, chunks=(chunk_n, h, w, c), compression="gzip",
                             compression_opts=4, shuffle=True, fletcher32=True)
            f.create_dataset("labels", data=labels, chunks=(max(1, min(n, 65536)),), compression="gzip",
                             fletcher32=True)
            f.attrs["classes"] = json.dumps(list(split.classes))
            f.attrs["source"] = split.source


def read_prepared(path: str | Path, *, images: bool = True) -> Prepared:
    """Read and validate a prepared split written by the `prepare` stage."""
    path = Path(path)
    with h5_file(path) as f:
        for key in ("images", "labels"):
            if key not in f:
                raise DQError(f"{path}: missing dataset '{key}'; is this a file written by the prepare stage?")
        try:
            classes = json.loads(f.attrs["classes"])
            source = str(f.attrs.get("source", ""))
            labels = f["labels"][...]
            shape = f["images"].shape
            imgs = f["images"][...] if images else np.empty((0,) + tuple(shape[1:]), np.uint8)
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{path}: cannot read ({first_line(exc)}); the file is damaged, rerun the prepare stage") from None
    if len(shape) != 4 or shape[3] != 3 or shape[0] != labels.shape[0]:
        raise DQError(f"{path}: images must be uint8 [N, H, W, 3] with one label each, got {shape} "
                      f"and {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DQError(f"{path}: labels must lie in [0, {len(classes) - 1}] for {len(classes)} classes, "
                      f"found {int(labels.min())}..{int(labels.max())}")
    return Prepared(imgs, labels.astype(np.int64), classes, source)


def split_file(split: str | Path) -> Path:
    """The store file of `split`: `data/prepared/train` (as docs/DESIGN.md names a split) or its `.h5` file."""
    path = Path(split)
    if path.suffix != ".h5" and not path.is_dir() and path.with_suffix(".h5").is_file():
        return path.with_suffix(".h5")
    return path


def read_images(split: str | Path, rows=None) -> np.ndarray:
    """uint8 [n, H, W, 3]: the images of the prepared `split`, all or `rows` in the given order."""
    path = split_file(split)
    if rows is None:
        return read_prepared(path).images
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    with h5_file(path) as f:
        if "images" not in f:
            raise DQError(f"{path}: missing dataset 'images'; is this a file written by the prepare stage?")
        n = f["images"].shape[0]
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise DQError(f"{path}: rows must lie in [0, {n}), got {int(rows.min())}..{int(rows.max())}")
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing indices only
        try:
            return f["images"][unique][inverse] if unique.size else np.empty((0,) + f["images"].shape[1:], np.uint8)
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{path}: cannot read ({first_line(exc)}); the file is damaged, rerun the prepare stage") from None


def read_labels(split: str | Path) -> np.ndarray:
    """int64 [N]: the labels of the prepared `split`."""
    return read_prepared(split_file(split), images=False).labels
