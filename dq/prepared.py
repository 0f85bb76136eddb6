"""The prepared store `prepared/{train,test}/`: its one writer, reader and validator.

Version 2 (this one): a split is a folder with `index.json` and shards `shard-NNNNN.h5` of at most
`data.shard_images` images. Each image is one stream of `data.codec` (dq.codec), so a shard holds the
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
from typing import Iterable

import numpy as np

from dq.codec import CODECS, CodecError, codec_problem, decode, encode, is_lossless
from dq.errors import DQError, first_line
from dq.io import H5_OPEN_ERRORS, READ_GAP, atomic_path, check_free_space, file_digest, h5_file, read_runs

FORMAT = "dq-prepared"
SHARD_FORMAT = "dq-prepared-shard"
SCHEMA_VERSION = 2
INDEX_NAME = "index.json"
DEFAULT_CODEC = "png"  # lossless; on 32-px Fashion-MNIST 13% larger than webp-lossless but decodes 1.9x faster
DEFAULT_QUALITY = 90
DEFAULT_SHARD_IMAGES = 10000
STREAM_CHUNK = 256 * 1024  # bytes per HDF5 chunk of `streams`: what one checksum covers
RERUN = "rerun the prepare stage (dvc repro prepare)"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.h5"


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


# ---------------------------------------------------------------------------------------------- writing

class StoreWriter:
    """Streams encoded images into the shards of one split folder; `close` writes `index.json`.

    Holds only the open shard's offsets and labels: streams go to disk as they come. The folder is the
    caller's temporary (prepare renames it into place), so shards are written in place, not renamed.
    Equal streams in equal `add` calls give byte-identical shards.
    """

    def __init__(self, folder: str | Path, *, codec: str, quality: int, image_shape: tuple[int, int, int],
                 shard_images: int = DEFAULT_SHARD_IMAGES, expected_images: int | None = None):
        problem = codec_problem(codec, quality)
        if problem:
            raise DQError(f"data.{problem} (got codec {codec!r}, quality {quality!r})")
        self.folder, self.codec, self.quality = Path(folder), codec, int(quality)
        self.image_shape, self.shard_images = tuple(int(s) for s in image_shape), int(shard_images)
        self.expected_images = expected_images
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._file = None
        self._offsets: list[int] = [0]
        self._labels: list[int] = []

    @property
    def num_images(self) -> int:
        return sum(s.count for s in self.shards) + len(self._labels)

    def add(self, streams: list[bytes], labels: Iterable[int]) -> None:
        """Append images (their codec streams) and their labels, in order."""
        labels = [int(y) for y in labels]
        i = 0
        while i < len(streams):
            if self._file is None:
                self._open_shard()
            take = min(len(streams) - i, self.shard_images - len(self._labels))
            self._append(streams[i:i + take], labels[i:i + take])
            i += take
            if len(self._labels) == self.shard_images:
                self._close_shard()

    def _open_shard(self) -> None:
        path = self.folder / shard_name(len(self.shards))
        check_free_space(path, self._shard_bytes_bound())
        self._file = h5_file(path, "w")
        self._file.create_dataset("streams", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(STREAM_CHUNK,),
                                  fletcher32=True)
        self._offsets, self._labels = [0], []

    def _shard_bytes_bound(self) -> int:
        """About the most the next shard can take: HDF5 may crash rather than fail on a full disk mid-write.

        Raw pixels bound the lossless codecs; the lossy ones at quality <= 100 stay well under a third.
        """
        count = self.shard_images
        if self.expected_images is not None:
            count = max(1, min(count, self.expected_images - self.num_images))
        per_image = int(np.prod(self.image_shape))
        return count * (per_image if is_lossless(self.codec) else per_image // 3)

    def _append(self, streams: list[bytes], labels: list[int]) -> None:
        body = np.frombuffer(b"".join(streams), np.uint8)
        ds = self._file["streams"]
        start = ds.shape[0]
        ds.resize((start + body.size,))
        ds[start:] = body
        for s in streams:
            self._offsets.append(self._offsets[-1] + len(s))
        self._labels += labels

    def _close_shard(self) -> None:
        f, n = self._file, len(self._labels)
        f.create_dataset("offsets", data=np.asarray(self._offsets, np.int64), fletcher32=True, chunks=(n + 1,))
        f.create_dataset("labels", data=np.asarray(self._labels, np.int64), fletcher32=True, chunks=(n,))
        first = sum(s.count for s in self.shards)
        for key, value in shard_attrs(self.codec, self.quality, self.image_shape, first, n).items():
            f.attrs[key] = value
        path = Path(f.filename)
        f.close()
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        self.shards.append(ShardInfo(path.name, first, n, path.stat().st_size, file_digest(path)))
        self._file, self._offsets, self._labels = None, [0], []

    def close(self, classes: list[str], source: str) -> StoreIndex:
        """Finish the last shard and write `index.json`; the split's labels must lie in [0, len(classes))."""
        if self._file is not None:
            self._close_shard()
        index = StoreIndex(self.codec, self.quality, self.image_shape, self.num_images, list(classes), source,
                           self.shard_images, tuple(self.shards))
        (self.folder / INDEX_NAME).write_text(json.dumps(index.as_json(), indent=1) + "\n")
        return index

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def shard_attrs(codec: str, quality: int, image_shape, first: int, count: int) -> dict:
    """The root attributes of a shard: enough to refuse a shard from another store or version."""
    return {"format": SHARD_FORMAT, "schema_version": SCHEMA_VERSION, "codec": codec, "quality": int(quality),
            "image_shape": np.asarray(image_shape, np.int64), "first": int(first), "count": int(count)}


def write_prepared(path: str | Path, split: Prepared, *, codec: str = DEFAULT_CODEC, quality: int = DEFAULT_QUALITY,
                   shard_images: int = DEFAULT_SHARD_IMAGES) -> StoreIndex:
    """Write an in-memory split as a version-2 store folder `path`, atomically (tests, benchmarks)."""
    images = np.ascontiguousarray(split.images, dtype=np.uint8)
    check_free_space(Path(path) / INDEX_NAME, images.nbytes)
    with atomic_path(path) as tmp:
        writer = StoreWriter(tmp, codec=codec, quality=quality, image_shape=images.shape[1:],
                             shard_images=shard_images)
        for start in range(0, len(images), 256):
            writer.add([encode(im, codec, quality) for im in images[start:start + 256]],
                       split.labels[start:start + 256])
        index = writer.close(split.classes, split.source)
    return index


def write_prepared_v1(path: str | Path, split: Prepared) -> None:
    """Version 1 (one HDF5 file of raw uint8 images): kept to make old stores in tests, never by stages."""
    images = np.ascontiguousarray(split.images, dtype=np.uint8)
    labels = np.ascontiguousarray(split.labels, dtype=np.int64)
    n, h, w, c = images.shape
    chunk_n = int(max(1, min(n, (256 * 1024) // (h * w * c))))
    with atomic_path(path) as tmp:
        with h5_file(tmp, "w") as f:
            f.create_dataset("images", data=images, chunks=(chunk_n, h, w, c), compression="gzip",
                             compression_opts=4, shuffle=True, fletcher32=True)
            f.create_dataset("labels", data=labels, chunks=(max(1, min(n, 65536)),), compression="gzip",
                             fletcher32=True)
            f.attrs["classes"] = json.dumps(list(split.classes))
            f.attrs["source"] = split.source


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
    images this way: they stream (`image_loader`, `dq.row_sources`); tests and benchmarks do."""
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
