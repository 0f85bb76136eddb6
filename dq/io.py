"""Atomic outputs and the prepared-data HDF5 files that every stage after `prepare` reads.

Every stage writes each output to a temporary name beside it and renames it into place only when the
write finished, so a killed or failing stage never leaves a partial file at a declared output path.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dq.errors import DQError

H5_OPEN_ERRORS = (OSError, KeyError, ValueError, RuntimeError)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it to `path`.

    On any exception the temporary file or folder is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically, with sorted keys so equal inputs give equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def h5_file(path: str | Path, mode: str = "r"):
    """Open an HDF5 file, turning h5py's errors into one DQError line naming the file.

    Reading works on read-only files and folders: HDF5's file locking is off for reads.
    """
    import h5py

    path = Path(path)
    if mode == "r" and not path.is_file():
        raise DQError(f"{path}: file not found")
    try:
        if mode == "r":
            return h5py.File(path, "r", locking=False)
        return h5py.File(path, mode, libver="earliest", track_order=False)
    except H5_OPEN_ERRORS as exc:
        raise DQError(f"{path}: not a readable HDF5 file ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


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
            raise DQError(f"{path}: cannot read ({_short(exc)}); the file is damaged, rerun the prepare stage") from None
    if len(shape) != 4 or shape[3] != 3 or shape[0] != labels.shape[0]:
        raise DQError(f"{path}: images must be uint8 [N, H, W, 3] with one label each, got {shape} "
                      f"and {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DQError(f"{path}: labels must lie in [0, {len(classes) - 1}] for {len(classes)} classes, "
                      f"found {int(labels.min())}..{int(labels.max())}")
    return Prepared(imgs, labels.astype(np.int64), classes, source)
