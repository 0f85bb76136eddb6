"""The compact HDF5 format, version 1: write, read and validate it, and a torch Dataset over it.

A compact file holds the images that selection kept, minus the patches that GradCAM++ scored lowest.
Its layout is fixed by DESIGN.md and described for readers in other languages in docs/FORMAT.md:

    root attrs  format = "dq-compact", schema_version = 1, image_size, patch_size, channels,
                grid [rows, cols], num_patches L, kept_patches K, drop, ratio, classes (JSON),
                source, params (JSON)
    patches     uint8   [N, K, p, p, C]  kept patches, in raster order of their grid positions
    keep        bool    [N, L]           True where a patch was kept; exactly K per row
    labels      int64   [N]
    indices     int64   [N]              row of each image in prepared/train.h5
    bins        int32   [N]
    scores      float32 [N, L]           the patch scores that chose `keep`

Every dataset is chunked along N (10 KiB to 1 MiB a chunk), gzip-compressed after the shuffle filter,
and checksummed (fletcher32). Equal inputs give byte-identical files: no timestamps, attributes and
datasets always written in the same order, the earliest HDF5 file format.

Command line: `python -m dq.format describe FILE` and `python -m dq.format validate FILE`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dq.errors import DQError, first_line, run_cli
from dq.io import H5_OPEN_ERRORS, atomic_path, check_free_space, h5_file

FORMAT = "dq-compact"
SCHEMA_VERSION = 1

# the dtype of every dataset, little-endian; Header.shape_of gives the shapes
DATASETS = {
    "patches": np.dtype(np.uint8),
    "keep": np.dtype(np.bool_),
    "labels": np.dtype("<i8"),
    "indices": np.dtype("<i8"),
    "bins": np.dtype("<i4"),
    "scores": np.dtype("<f4"),
}
ATTRS = ("format", "schema_version", "image_size", "patch_size", "channels", "grid", "num_patches",
         "kept_patches", "drop", "ratio", "classes", "source", "params")

CHUNK_MIN = 10 * 1024
CHUNK_TARGET = 64 * 1024  # small enough that one random read inflates few neighbours
CHUNK_MAX = 1024 * 1024
GZIP_LEVEL = 4
READ_CACHE_BYTES = 64 * 1024 * 1024  # per dataset: the default run's whole file stays inflated
VALIDATE_BLOCK_BYTES = 4 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Patches


def grid_of(image_size: int, patch_size: int) -> tuple[int, int]:
    """The patch grid (rows, cols) of a square image; `patch_size` must divide `image_size`."""
    if patch_size < 1 or image_size % patch_size:
        raise DQError(f"patches.patch_size = {patch_size} is not allowed; expected a divisor of the "
                      f"image size {image_size}")
    return image_size // patch_size, image_size // patch_size


def kept_count(num_patches: int, drop: float) -> int:
    """K = L - round(drop * L), with Python's round (half to even)."""
    return num_patches - round(drop * num_patches)


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
    """[N, H, W, C] → [N, L, p, p, C], patches in raster order (row by row of the grid)."""
    n, h, w, c = images.shape
    p = patch_size
    x = images.reshape(n, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), p, p, c)


def unpatchify(patches: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[N, L, p, p, C] → [N, H, W, C]; the inverse of `patchify`."""
    n, _, p, _, c = patches.shape
    rows, cols = grid
    x = patches.reshape(n, rows, cols, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, rows * p, cols * p, c)


def pixel_keep(keep: np.ndarray, patch_size: int, image_size: int | tuple[int, int]) -> np.ndarray:
    """keep bool [N, L] -> bool [N, H, W]: True on the pixels of kept patches (`image_size`: S or (H, W))."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid = np.asarray(keep, dtype=bool).reshape(-1, h // patch_size, w // patch_size)
    return grid.repeat(patch_size, axis=1).repeat(patch_size, axis=2)


def extract_patches(images: np.ndarray, keep: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 images [N, H, W, C] and keep [N, L] (K True per row) → kept patches [N, K, p, p, C]."""
    n = images.shape[0]
    counts = keep.sum(axis=1)
    if n and (counts != counts[0]).any():
        raise ValueError("every row of keep must hold the same number of True values")
    k = int(counts[0]) if n else 0
    everything = patchify(images, patch_size)
    # boolean indexing walks rows then grid positions: raster order within each image
    return np.ascontiguousarray(everything[keep].reshape(n, k, patch_size, patch_size, images.shape[3]))


def assemble(patches: np.ndarray, keep: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Kept patches [N, K, p, p, C] and keep [N, L] → images [N, H, W, C], dropped patches zero."""
    n, k, p, _, c = patches.shape
    full = np.zeros((n, keep.shape[1], p, p, c), dtype=patches.dtype)
    full[keep] = patches.reshape(n * k, p, p, c)
    return unpatchify(full, grid)


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Header:
    """The root attributes of a compact file, plus the number of images N."""

    image_size: int
    patch_size: int
    channels: int
    drop: float
    ratio: float
    classes: list[str]
    source: str
    params: dict = field(default_factory=dict)
    num_images: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kept_patches(self) -> int:
        return kept_count(self.num_patches, self.drop)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape dataset `name` must have."""
        n, k, l, p, c = self.num_images, self.kept_patches, self.num_patches, self.patch_size, self.channels
        return {"patches": (n, k, p, p, c), "keep": (n, l), "scores": (n, l)}.get(name, (n,))


def chunk_shape(shape: tuple[int, ...], itemsize: int, target: int = CHUNK_TARGET) -> tuple[int, ...]:
    """Chunks along the first axis of about `target` bytes, within [CHUNK_MIN, CHUNK_MAX].

    A dataset smaller than CHUNK_MIN is one chunk. Should one row exceed CHUNK_MAX (huge images),
    the chunk holds one row and splits the next axis the same way.
    """
    chunk = list(shape)
    for axis, size in enumerate(shape):
        inner = itemsize * math.prod(shape[axis + 1:])  # bytes of one index along `axis`
        if inner <= CHUNK_MAX:
            chunk[axis] = max(1, min(size, max(target // inner, -(-CHUNK_MIN // inner))))
            break
        chunk[axis] = 1
    return tuple(chunk)


def _create(f, name: str, data: np.ndarray) -> None:
    data = np.ascontiguousarray(data, dtype=DATASETS[name])
    if data.size == 0:
        f.create_dataset(name, shape=data.shape, dtype=data.dtype)
        return
    f.create_dataset(name, data=data, chunks=chunk_shape(data.shape, data.dtype.itemsize),
                     compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True, fletcher32=True,
                     track_times=False)


def write_compact(path: str | Path, header: Header, images: np.ndarray, keep: np.ndarray, labels: np.ndarray,
                  indices: np.ndarray, bins: np.ndarray, scores: np.ndarray) -> None:
    """Write a compact file atomically from the full kept images [N, H, W, C] and keep [N, L].

    `header.num_images` is ignored (taken from `images`). The same arguments give the same bytes.
    """
    n, h, w, c = images.shape
    header = dataclasses.replace(header, num_images=n)
    if (h, w, c) != (header.image_size, header.image_size, header.channels):
        raise ValueError(f"images are {h}x{w}x{c}, the header says {header.image_size} and {header.channels}")
    _check_keep(Path(path), keep, header)
    arrays = {
        "patches": extract_patches(np.asarray(images, np.uint8), keep, header.patch_size),
        "keep": keep, "labels": labels, "indices": indices, "bins": bins, "scores": scores,
    }
    for name, array in arrays.items():
        if tuple(np.shape(array)) != header.shape_of(name):
            raise ValueError(f"{name} has shape {np.shape(array)}, expected {header.shape_of(name)}")
    check_free_space(path, sum(np.asarray(a).nbytes for a in arrays.values()))
    with atomic_path(path) as tmp:
        with h5_file(tmp, "w") as f:
            _write_attrs(f, header)
            for name, array in arrays.items():
                _create(f, name, array)


def _write_attrs(f, header: Header) -> None:
    values = {
        "format": FORMAT,
        "schema_version": np.int64(SCHEMA_VERSION),
        "image_size": np.int64(header.image_size),
        "patch_size": np.int64(header.patch_size),
        "channels": np.int64(header.channels),
        "grid": np.asarray(header.grid, dtype="<i8"),
        "num_patches": np.int64(header.num_patches),
        "kept_patches": np.int64(header.kept_patches),
        "drop": np.float64(header.drop),
        "ratio": np.float64(header.ratio),
        "classes": json.dumps(list(header.classes)),
        "source": str(header.source),
        "params": json.dumps(header.params, sort_keys=True),
    }
    for name in ATTRS:  # one fixed order: the object header's bytes depend on it
        f.attrs[name] = values[name]


# ---------------------------------------------------------------------------------------------------
# Reading and validation


def _open(path: Path):
    """A read handle with a chunk cache large enough that each chunk is inflated once."""
    import h5py

    if not path.is_file():
        raise DQError(f"{path}: file not found")
    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=READ_CACHE_BYTES, rdcc_nslots=100_003)
    except H5_OPEN_ERRORS as exc:
        raise DQError(f"{path}: not a readable HDF5 file, truncated or damaged ({first_line(exc, 160)})") from None


def read_header(f, path: Path) -> Header:
    """Check the attributes (format and schema_version first) and every dataset's dtype and shape."""
    fmt = f.attrs.get("format")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt != FORMAT:
        raise DQError(f"{path}: format = {fmt!r}; expected {FORMAT!r} (not a dq compact file)")
    version = f.attrs.get("schema_version")
    if version is None or not np.issubdtype(np.asarray(version).dtype, np.integer):
        raise DQError(f"{path}: schema_version = {version!r}; expected an integer")
    if int(version) > SCHEMA_VERSION:
        raise DQError(f"{path}: schema_version {int(version)} is newer than this reader "
                      f"(version {SCHEMA_VERSION}); update dq to read it")
    missing = [a for a in ATTRS if a not in f.attrs]
    if missing:
        raise DQError(f"{path}: missing root attribute '{missing[0]}'")
    missing = [d for d in DATASETS if d not in f]
    if missing:
        raise DQError(f"{path}: missing dataset '{missing[0]}'")
    header = _header_from_attrs(f, path)
    _check_attrs(f, path, header)
    for name, dtype in DATASETS.items():
        dset = f[name]
        if dset.dtype != dtype or dset.shape != header.shape_of(name):
            raise DQError(f"{path}: dataset '{name}' is {dset.dtype} {list(dset.shape)}; expected {dtype} "
                          f"{list(header.shape_of(name))} (N = {header.num_images} from 'labels')")
    return header


def _header_from_attrs(f, path: Path) -> Header:
    try:
        return Header(image_size=int(f.attrs["image_size"]), patch_size=int(f.attrs["patch_size"]),
                      channels=int(f.attrs["channels"]), drop=float(f.attrs["drop"]),
                      ratio=float(f.attrs["ratio"]), classes=json.loads(f.attrs["classes"]),
                      source=str(f.attrs["source"]), params=json.loads(f.attrs["params"]),
                      num_images=int(f["labels"].shape[0]) if f["labels"].ndim == 1 else -1)
    except (TypeError, ValueError) as exc:
        raise DQError(f"{path}: a root attribute has the wrong type ({first_line(exc, 160)})") from None


def _check_attrs(f, path: Path, header: Header) -> None:
    """The derived attributes must agree with image_size, patch_size and drop."""
    if header.patch_size < 1 or header.image_size % header.patch_size:
        raise DQError(f"{path}: patch_size {header.patch_size} does not divide image_size {header.image_size}")
    stored = {"grid": [int(v) for v in np.ravel(f.attrs["grid"])], "num_patches": int(f.attrs["num_patches"]),
              "kept_patches": int(f.attrs["kept_patches"])}
    derived = {"grid": list(header.grid), "num_patches": header.num_patches, "kept_patches": header.kept_patches}
    for name, value in stored.items():
        if value != derived[name]:
            raise DQError(f"{path}: attribute {name} = {value} disagrees with image_size, patch_size and "
                          f"drop, which give {derived[name]}")


@dataclass
class Compact:
    """A whole compact file in memory."""

    header: Header
    patches: np.ndarray  # uint8 [N, K, p, p, C]
    keep: np.ndarray  # bool [N, L]
    labels: np.ndarray  # int64 [N]
    indices: np.ndarray  # int64 [N]
    bins: np.ndarray  # int32 [N]
    scores: np.ndarray  # float32 [N, L]

    def images(self) -> np.ndarray:
        """uint8 [N, H, W, C], dropped patches zero."""
        return assemble(self.patches, self.keep, self.header.grid)


class CompactFile:
    """An open, header-checked compact file: `with open_compact(path) as cf: cf["patches"][:10]`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = _open(self.path)
        try:
            self.header = read_header(self.file, self.path)
        except BaseException:
            self.file.close()
            raise

    def __getitem__(self, name: str):
        return self.file[name]

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of a dataset; a checksum or decompression failure is a DQError naming the rows."""
        try:
            return self.file[name][rows]
        except H5_OPEN_ERRORS as exc:
            where = "" if rows == slice(None) else f" rows {rows.start}..{rows.stop - 1}"
            raise DQError(f"{self.path}: dataset '{name}'{where} fails its checksum or cannot be "
                          f"decompressed; the file is damaged ({first_line(exc, 160)})") from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "CompactFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_compact(path: str | Path) -> CompactFile:
    """Open a compact file and check its header; datasets are read on demand."""
    return CompactFile(path)


def read_compact(path: str | Path) -> Compact:
    """Read and fully validate a compact file into memory."""
    with open_compact(path) as cf:
        arrays = {name: cf.read(name) for name in DATASETS}
        compact = Compact(cf.header, **arrays)
    _check_keep(cf.path, compact.keep, compact.header)
    return compact


def validate(path: str | Path) -> Header:
    """Check everything: header, dtypes, shapes, every chunk's checksum, K True per keep row.

    Reads the datasets in blocks of about 4 MiB, so memory stays flat however large the file is.
    """
    with open_compact(path) as cf:
        header = cf.header
        for name in DATASETS:
            dset = cf[name]
            step = max(1, VALIDATE_BLOCK_BYTES // max(1, _row_bytes(dset)))
            for start in range(0, header.num_images, step):
                block = cf.read(name, slice(start, min(start + step, header.num_images)))
                if name == "keep":
                    _check_keep(cf.path, block, header, offset=start)
    return header


def _row_bytes(dset) -> int:
    return dset.dtype.itemsize * math.prod(dset.shape[1:])


def _check_keep(path: Path, keep: np.ndarray, header: Header, offset: int = 0) -> None:
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.ndim != 2 or keep.shape[1] != header.num_patches:
        raise DQError(f"{path}: keep must be bool [N, {header.num_patches}], got {keep.dtype} {list(keep.shape)}")
    counts = keep.sum(axis=1)
    bad = np.flatnonzero(counts != header.kept_patches)
    if bad.size:
        row = int(bad[0])
        raise DQError(f"{path}: keep row {offset + row} has {int(counts[row])} True values; expected exactly "
                      f"K = {header.kept_patches} ({bad.size} rows are wrong)")


def storage_metrics(path: str | Path, full_images: int) -> dict:
    """What the compact file costs against raw pixels: bytes, ratios, the share of pixels kept.

    `full_images` is the size of the whole prepared training set. kept_pixel_share is about
    ratio * (1 - drop): the raw bytes of the kept patches over the full set's raw bytes.
    """
    path = Path(path)
    with open_compact(path) as cf:
        h = cf.header
        patches_stored = int(cf["patches"].id.get_storage_size())
    image_bytes = h.image_size * h.image_size * h.channels
    compact_bytes = os.path.getsize(path)
    full_raw = full_images * image_bytes
    kept_patch_raw = h.num_images * h.kept_patches * h.patch_size * h.patch_size * h.channels
    return {
        "images": h.num_images,
        "train_images": full_images,
        "selected_share": h.num_images / max(full_images, 1),
        "num_patches": h.num_patches,
        "kept_patches": h.kept_patches,
        "compact_bytes": compact_bytes,
        "patches_stored_bytes": patches_stored,
        "kept_raw_bytes": h.num_images * image_bytes,
        "kept_patch_raw_bytes": kept_patch_raw,
        "full_raw_bytes": full_raw,
        "compression_ratio": full_raw / max(compact_bytes, 1),  # how many times smaller than the full set
        "compact_share": compact_bytes / max(full_raw, 1),
        "kept_pixel_share": kept_patch_raw / max(full_raw, 1),
    }


# ---------------------------------------------------------------------------------------------------
# The torch Dataset


class CompactDataset(Dataset):
    """A torch Dataset over a compact file: (image [C, H, W], keep [L], label) per stored image.

    The image is the stored image with its dropped patches zero-filled: uint8 by default, or float32
    in [0, 1] with `as_float=True`. keep is a bool tensor [L], label an int64 scalar tensor.

    `__init__` reads and checks the header (format and schema_version first) and closes the file again;
    the handle that reads samples is opened lazily in each process, and reopened after a fork, because
    an HDF5 handle must never cross a fork. Reads take no file lock, so read-only data works.
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
        """Open this process's handle once; keep and labels (small) are read whole, patches per batch."""
        if self._cf is not None and self._pid == os.getpid():
            return
        self._cf, self._pid = open_compact(self.path), os.getpid()
        self._patches = self._cf["patches"]  # looking a dataset up by name costs more than a small read
        self._keep = self._cf.read("keep")
        self._labels = self._cf.read("labels")
        _check_keep(self.path, self._keep, self.header)

    def _read_patches(self, rows: np.ndarray) -> np.ndarray:
        """Kept patches [B, K, p, p, C] of sorted rows: one read of their span when dense, else row by row."""
        try:
            if rows[-1] - rows[0] < 2 * len(rows):
                return self._patches[int(rows[0]):int(rows[-1]) + 1][rows - rows[0]]
            return np.stack([self._patches[int(r)] for r in rows])
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{self.path}: dataset 'patches' rows {int(rows[0])}..{int(rows[-1])} fail their "
                          f"checksum or cannot be decompressed; the file is damaged ({first_line(exc, 160)})") from None

    def _samples(self, rows: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._open()
        order = np.argsort(rows, kind="stable")
        patches = np.empty((len(rows),) + self._patches.shape[1:], np.uint8)
        patches[order] = self._read_patches(rows[order])
        images = assemble(patches, self._keep[rows], self.header.grid).transpose(0, 3, 1, 2)  # [B, C, H, W]
        x = torch.from_numpy(np.ascontiguousarray(images))
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
        """A DataLoader batch in one go: one HDF5 read for the batch instead of one per image."""
        return self._samples(self._rows(indices))

    def __getstate__(self) -> dict:
        # a DataLoader with spawn pickles the dataset: the handle stays behind
        state = {k: v for k, v in self.__dict__.items() if k not in ("_patches", "_keep", "_labels")}
        return {**state, "_cf": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_cf", None) is not None and self._pid == os.getpid():
            self._cf.close()


# ---------------------------------------------------------------------------------------------------
# Command line


def describe(path: str | Path) -> str:
    """Attributes, counts and bytes (stored vs raw) of each dataset, as text."""
    path = Path(path)
    with open_compact(path) as cf:
        h = cf.header
        lines = [f"{path}: {FORMAT} version {int(cf.file.attrs['schema_version'])}, "
                 f"{os.path.getsize(path):,} bytes", "attributes:"]
        for name in ATTRS:
            value = cf.file.attrs[name]
            lines.append(f"  {name:15s} {value.tolist() if isinstance(value, np.ndarray) else value}")
        labels = cf.read("labels")
        per_class = np.bincount(labels, minlength=len(h.classes)) if labels.size else []
        lines.append(f"counts: {h.num_images} images, {h.num_patches} patches each ({h.grid[0]}x{h.grid[1]} of "
                     f"{h.patch_size}x{h.patch_size}), {h.kept_patches} kept; per class: "
                     + ", ".join(f"{c}={int(k)}" for c, k in zip(h.classes, per_class)))
        lines.append(f"{'dataset':10s} {'dtype':8s} {'shape':22s} {'chunks':22s} {'raw bytes':>12s} "
                     f"{'stored':>12s} {'stored/raw':>10s}")
        total_raw = total_stored = 0
        for name in DATASETS:
            d = cf[name]
            raw, stored = d.dtype.itemsize * math.prod(d.shape), d.id.get_storage_size()
            total_raw, total_stored = total_raw + raw, total_stored + stored
            lines.append(f"{name:10s} {str(d.dtype):8s} {str(list(d.shape)):22s} {str(d.chunks):22s} "
                         f"{raw:12,d} {stored:12,d} {stored / max(raw, 1):10.3f}")
        lines.append(f"{'total':10s} {'':8s} {'':22s} {'':22s} {total_raw:12,d} {total_stored:12,d} "
                     f"{total_stored / max(total_raw, 1):10.3f}")
        full = h.num_images * h.image_size * h.image_size * h.channels
        lines.append(f"kept images' raw pixels: {full:,} bytes; stored patches: "
                     f"{cf['patches'].id.get_storage_size():,} bytes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dq.format", description="Inspect a dq compact HDF5 file.")
    parser.add_argument("command", choices=("describe", "validate"))
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "describe":
        print(describe(args.file))
    else:
        header = validate(args.file)
        print(f"{args.file}: valid {FORMAT} version {SCHEMA_VERSION}: {header.num_images} images, "
              f"{header.kept_patches} of {header.num_patches} patches kept")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
