"""The prepared store `prepared/{train,test}/`: its layout, reader and validator (the writer:
dq.data.prepared_writer).

Version 2 (this one): a split is a folder with `index.json` and shards `shard-NNNNN.h5` of at most
`data.shard_images` images. Each image is one stream of `data.codec` (dq.data.codec), so a shard holds the
streams back to back in `streams` uint8 [B] with `offsets` int64 [n + 1] and `labels` int64 [n].
docs/FORMAT.md spells the layout out for readers in other languages.

Version 1 was one HDF5 file per split (`train.h5`: `images` uint8 [N, H, W, 3]). Stages refuse it with
a line saying to rerun prepare; `read_images` and `read_labels` still read it, for old results.

Readers open shards lazily, one handle per process (a DataLoader worker opens its own), and read only
the rows asked for: nothing here loads a whole split of images unless asked to (`read_prepared`,
which no stage calls for images).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.core.errors import DQError, first_line
from dq.core.io import H5_OPEN_ERRORS, READ_GAP, file_digest, h5_file, read_runs
from dq.data.codec import CODECS, CodecError, decode

FORMAT = "dq-prepared"
SHARD_FORMAT = "dq-prepared-shard"
SCHEMA_VERSION = 2
INDEX_NAME = "index.json"
RERUN = "rerun the prepare stage (dvc repro prepare)"


@dataclass
class Prepared:
    """A prepared split in memory: uint8 images [N, H, W, 3], int64 labels [N], the class names, the source."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the index lists it: its file, first row, image count, file size and SHA-256."""

    file: str
    first: int
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class StoreIndex:
    """The contents of `index.json`."""

    codec: str
    quality: int
    image_shape: tuple[int, int, int]
    num_images: int
    classes: list[str]
    source: str
    shard_images: int
    shards: tuple[ShardInfo, ...]

    def as_json(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "codec": self.codec, "quality": self.quality,
                "image_shape": list(self.image_shape), "num_images": self.num_images, "classes": list(self.classes),
                "source": self.source, "shard_images": self.shard_images,
                "shards": [vars(s) for s in self.shards]}


# ---------------------------------------------------------------------------------------------- shard attributes

def shard_attrs(codec: str, quality: int, image_shape, first: int, count: int) -> dict:
    """The root attributes of a shard: enough to refuse a shard from another store or version."""
    return {"format": SHARD_FORMAT, "schema_version": SCHEMA_VERSION, "codec": codec, "quality": int(quality),
            "image_shape": np.asarray(image_shape, np.int64), "first": int(first), "count": int(count)}


# ---------------------------------------------------------------------------------------------- reading

def is_v1(path: str | Path) -> bool:
    """Does `path` name a version-1 store: a `.h5` file, or a split name with only a `.h5` file beside it?"""
    path = Path(path)
    if path.suffix == ".h5":
        return path.is_file() or not path.with_suffix("").is_dir()
    return not path.exists() and path.with_suffix(".h5").is_file()


def v1_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".h5" else path.with_suffix(".h5")


def v2_folder(path: str | Path) -> Path:
    """The split folder for `data/prepared/train` or its old spelling `data/prepared/train.h5`."""
    path = Path(path)
    return path.with_suffix("") if path.suffix == ".h5" else path


class Store:
    """A version-2 split opened for reading: the index, checked shards, and lazily opened shard handles.

    Picklable: the handles are dropped and reopened lazily in each process (DataLoader workers).
    """

    def __init__(self, folder: Path, index: StoreIndex):
        self.folder, self.index = folder, index
        self.starts = np.asarray([s.first for s in index.shards] + [index.num_images], np.int64)
        self._handles: dict[int, tuple] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.index.num_images

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.index.image_shape

    def labels(self) -> np.ndarray:
        """int64 [N]: every label, shard by shard (a per-sample vector, not images)."""
        parts = [self._shard(k)[2] for k in range(len(self.index.shards))]
        labels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        check_labels(self.folder, labels, len(self.index.classes))
        return labels

    def _shard(self, k: int):
        """(h5 file, offsets int64 [n + 1], labels int64 [n], streams dataset) of shard k, opened once per process."""
        if self._pid != os.getpid():  # a forked worker must not share its parent's HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = open_shard(self.folder, self.index, k)
        return self._handles[k]

    def read_bytes(self, k: int, start: int, stop: int) -> np.ndarray:
        """uint8 [stop - start]: bytes [start, stop) of shard k's streams (the one place bytes are read)."""
        streams = self._shard(k)[3]
        try:
            return streams[start:stop]
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{self.folder / self.index.shards[k].file}: cannot read ({first_line(exc)}); "
                          f"the shard is damaged, {RERUN}") from None

    def streams(self, rows) -> list[np.ndarray]:
        """The codec streams of `rows` (any order, repeats allowed): uint8 arrays, one per row.

        Rows are read in file order; streams of one shard lying less than READ_GAP bytes apart are read as
        one span (a shuffled batch of small images costs a few reads, not one per image).
        """
        rows = self.check_rows(rows)
        out: list[np.ndarray | None] = [None] * rows.size
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard_of = np.searchsorted(self.starts, sorted_rows, side="right") - 1
        for k in np.unique(shard_of):
            at = np.flatnonzero(shard_of == k)
            offsets = self._shard(int(k))[1]
            local = sorted_rows[at] - self.starts[k]
            starts, stops = offsets[local], offsets[local + 1]
            pieces = read_runs(lambda a, b, k=int(k): self.read_bytes(k, a, b), starts, stops, READ_GAP)
            for pos, piece in zip(order[at], pieces):
                out[pos] = piece
        return out

    def read(self, rows=None) -> np.ndarray:
        """uint8 [n, H, W, C]: the images of `rows` (None: all) in the given order."""
        rows = np.arange(len(self)) if rows is None else self.check_rows(rows)
        out = np.empty((rows.size,) + self.image_shape, np.uint8)
        for start in range(0, rows.size, 1024):  # bounded reads even when a caller asks for everything
            part = rows[start:start + 1024]
            for i, (row, stream) in enumerate(zip(part, self.streams(part))):
                out[start + i] = self.decode_row(int(row), stream)
        return out

    def decode_row(self, row: int, stream: np.ndarray) -> np.ndarray:
        try:
            return decode(stream.tobytes(), self.index.codec, self.image_shape)
        except CodecError as exc:
            k = int(np.searchsorted(self.starts, row, side="right") - 1)
            raise DQError(f"{self.folder / self.index.shards[k].file}: row {row}: {exc}; {RERUN}") from None

    def check_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise DQError(f"{self.folder}: rows must lie in [0, {n}), got {int(rows.min())}..{int(rows.max())}")
        return rows


def check_labels(where, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DQError(f"{where}: labels must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                      f"found {int(labels.min())}..{int(labels.max())}")


def open_shard(folder: Path, index: StoreIndex, k: int):
    """(h5 file, offsets, labels, streams dataset) of shard k, after checking it is the shard the index lists."""
    info = index.shards[k]
    path = folder / info.file
    check_shard_file(path, info)
    f = h5_file(path)
    try:
        attrs = {key: f.attrs.get(key) for key in ("format", "schema_version", "codec", "quality", "count")}
        expected = shard_attrs(index.codec, index.quality, index.image_shape, info.first, info.count)
        for key in attrs:
            value = attrs[key].decode() if isinstance(attrs[key], bytes) else attrs[key]
            if value is None or str(value) != str(expected[key]):
                raise DQError(f"{path}: {key} is {value!r} but the store's index says {expected[key]!r}; the shard "
                              f"belongs to another store or version, {RERUN}")
        offsets, labels = f["offsets"][...], f["labels"][...]
    except H5_OPEN_ERRORS as exc:
        f.close()
        raise DQError(f"{path}: cannot read ({first_line(exc)}); the shard is damaged, {RERUN}") from None
    except DQError:
        f.close()
        raise
    if offsets.shape != (info.count + 1,) or labels.shape != (info.count,) or offsets[-1] != f["streams"].shape[0]:
        f.close()
        raise DQError(f"{path}: offsets and labels do not match its {info.count} images; {RERUN}")
    return f, offsets.astype(np.int64), labels.astype(np.int64), f["streams"]


def check_shard_file(path: Path, info: ShardInfo) -> None:
    """Missing or truncated shard → one line naming it (a size check: cheap; checksums: `verify_store`)."""
    if not path.is_file():
        raise DQError(f"{path}: shard missing from the prepared store; {RERUN}")
    size = path.stat().st_size
    if size != info.bytes:
        raise DQError(f"{path}: shard is {size:,} bytes but the index says {info.bytes:,}; it is truncated or "
                      f"replaced, {RERUN}")


def read_index(folder: Path) -> StoreIndex:
    path = folder / INDEX_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DQError(f"{folder}: not a prepared store (no {INDEX_NAME}); {RERUN}") from None
    except (OSError, ValueError) as exc:
        raise DQError(f"{path}: not readable JSON ({first_line(exc)}); {RERUN}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DQError(f"{path}: not a dq prepared-store index (format {raw.get('format') if isinstance(raw, dict) else None!r}); {RERUN}")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise DQError(f"{path}: schema_version {raw.get('schema_version')!r}, this version reads "
                      f"{SCHEMA_VERSION}; {RERUN}")
    try:
        shards = tuple(ShardInfo(str(s["file"]), int(s["first"]), int(s["count"]), int(s["bytes"]), str(s["sha256"]))
                       for s in raw["shards"])
        index = StoreIndex(str(raw["codec"]), int(raw["quality"]), tuple(int(v) for v in raw["image_shape"]),
                           int(raw["num_images"]), [str(c) for c in raw["classes"]], str(raw["source"]),
                           int(raw["shard_images"]), shards)
    except (KeyError, TypeError, ValueError) as exc:
        raise DQError(f"{path}: index is missing or has a bad field ({first_line(exc)}); {RERUN}") from None
    if index.codec not in CODECS or len(index.image_shape) != 3 or index.image_shape[2] != 3:
        raise DQError(f"{path}: codec {index.codec!r} and image_shape {list(index.image_shape)} are not a prepared "
                      f"store's (one of {', '.join(CODECS)}; [H, W, 3]); {RERUN}")
    firsts = np.cumsum([0] + [s.count for s in shards])
    if [s.first for s in shards] != firsts[:-1].tolist() or firsts[-1] != index.num_images:
        raise DQError(f"{path}: shard counts do not add up to num_images {index.num_images}; {RERUN}")
    return index


def open_store(path: str | Path) -> Store:
    """A version-2 split for a stage: refuses version 1 and any missing, truncated or foreign shard.

    Every shard is checked before any work starts (its size, and its attributes against the index),
    so a damaged store stops the stage at once with one line naming the shard.
    """
    folder = Path(path)
    if is_v1(folder):
        raise DQError(f"{v1_file(folder)}: a version 1 prepared store (one HDF5 file of raw pixels); this dq reads "
                      f"version 2 folders: {RERUN}")
    folder = v2_folder(folder)
    if not folder.is_dir():
        raise DQError(f"{folder}: prepared store not found; run the prepare stage (dvc repro prepare)")
    store = Store(folder, read_index(folder))
    for k in range(len(store.index.shards)):
        store._shard(k)
    return store


def verify_store(path: str | Path) -> StoreIndex:
    """Open the store and check every shard's SHA-256 against the index (reads every byte once)."""
    store = open_store(path)
    for info in store.index.shards:
        if file_digest(store.folder / info.file) != info.sha256:
            raise DQError(f"{store.folder / info.file}: SHA-256 differs from the index; the shard is damaged, {RERUN}")
    return store.index


def read_prepared(path: str | Path, *, images: bool = True) -> Prepared:
    """A whole version-2 split in memory (images decoded; `images=False`: labels only). No stage reads
    images this way: they stream (`image_loader`, `dq.data.rows`); tests and benchmarks do."""
    store = open_store(path)
    labels = store.labels()
    imgs = store.read() if images else np.empty((0,) + store.image_shape, np.uint8)
    return Prepared(imgs, labels, store.classes, store.index.source)


# ----------------------------------------------------------------------------------- DataLoader datasets

class RowBatches:
    """A map-style dataset for `torch.utils.data.DataLoader(ds, batch_size=None, sampler=...)`.

    `ds[rows]` with a list of rows → (uint8 [b, H, W, C], int64 labels [b], int64 rows [b]). The store is
    pickled without handles, so each worker opens its own shard files on first use.
    """

    def __init__(self, store: Store, rows=None, batch_size: int = 64):
        self.store = store
        self.rows = np.arange(len(store), dtype=np.int64) if rows is None else store.check_rows(rows)
        self.batch_size = int(batch_size)
        self._labels = None

    def batches(self) -> list[list[int]]:
        """Positions into `self.rows`, in batches of `batch_size`, in order."""
        n = self.rows.size
        return [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]

    def __len__(self) -> int:
        return len(self.batches())

    def __getitem__(self, positions):
        rows = self.rows[np.asarray(positions, np.int64)]
        images = np.empty((rows.size,) + self.store.image_shape, np.uint8)
        for i, (row, stream) in enumerate(zip(rows, self.store.streams(rows))):
            images[i] = self.store.decode_row(int(row), stream)
        return images, self.row_labels(rows), rows

    def row_labels(self, rows: np.ndarray) -> np.ndarray:
        shard_of = np.searchsorted(self.store.starts, rows, side="right") - 1
        out = np.empty(rows.size, np.int64)
        for i, (k, r) in enumerate(zip(shard_of, rows)):
            out[i] = self.store._shard(int(k))[2][r - self.store.starts[k]]
        return out


def image_loader(store: Store, rows=None, *, batch_size: int, num_workers: int = 0):
    """A DataLoader of (uint8 tensor [b, H, W, C], int64 labels [b], int64 rows [b]) over `rows`, in order."""
    import torch

    ds = RowBatches(store, rows, batch_size)
    return torch.utils.data.DataLoader(ds, batch_size=None, sampler=ds.batches(), num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)


# ------------------------------------------------------------------------------------------ public API

def read_images(split: str | Path, rows=None) -> np.ndarray:
    """uint8 [n, H, W, 3]: the images of the prepared `split` (a version-2 folder or a version-1 `.h5`)."""
    if is_v1(split):
        return _read_v1_images(v1_file(split), rows)
    return open_store(split).read(rows)


def read_labels(split: str | Path) -> np.ndarray:
    """int64 [N]: the labels of the prepared `split` (a version-2 folder or a version-1 `.h5`)."""
    if is_v1(split):
        path = v1_file(split)
        with h5_file(path) as f:
            if "labels" not in f:
                raise DQError(f"{path}: missing dataset 'labels'; is this a file written by the prepare stage?")
            try:
                labels, classes = f["labels"][...], json.loads(f.attrs["classes"])
            except H5_OPEN_ERRORS as exc:
                raise DQError(f"{path}: cannot read ({first_line(exc)}); the file is damaged, {RERUN}") from None
        check_labels(path, labels, len(classes))
        return labels.astype(np.int64)
    return open_store(split).labels()


def _read_v1_images(path: Path, rows) -> np.ndarray:
    with h5_file(path) as f:
        if "images" not in f:
            raise DQError(f"{path}: missing dataset 'images'; is this a file written by the prepare stage?")
        ds = f["images"]
        n = ds.shape[0]
        rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise DQError(f"{path}: rows must lie in [0, {n}), got {int(rows.min())}..{int(rows.max())}")
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing indices only
        try:
            return ds[unique][inverse] if unique.size else np.empty((0,) + ds.shape[1:], np.uint8)
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{path}: cannot read ({first_line(exc)}); the file is damaged, {RERUN}") from None
