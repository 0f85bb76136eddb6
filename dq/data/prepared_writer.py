"""Writing the prepared store `prepared/{train,test}/` (the layout: dq.data.prepared, docs/FORMAT.md).

`StoreWriter` streams one split's encoded images into shard files and writes `index.json` last.
`write_split` is the prepare stage's pass: a source's split (dq.data.sources) decoded and encoded by
DataLoader workers (`encoded_items`) and streamed into a `StoreWriter`. `write_prepared` writes an
in-memory split, and `write_prepared_v1` the old one-file layout that stages refuse: both for tests and
benchmarks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from dq.core.errors import DQError
from dq.core.io import atomic_path, check_free_space, file_digest, h5_file
from dq.data.codec import codec_problem, encode, is_lossless
from dq.data.prepared import INDEX_NAME, Prepared, ShardInfo, StoreIndex, shard_attrs
from dq.data.sources import LoadReport, Source, check_classes, split_source

if TYPE_CHECKING:
    from dq.params import DataParams

DEFAULT_CODEC = "png"  # lossless; on 32-px Fashion-MNIST 13% larger than webp-lossless but decodes 1.9x faster
DEFAULT_QUALITY = 90
DEFAULT_SHARD_IMAGES = 10000
STREAM_CHUNK = 256 * 1024  # bytes per HDF5 chunk of `streams`: what one checksum covers


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.h5"


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


# ---------------------------------------------------------------------------------------------- the prepare pass

class EncodedBatches:
    """`ds[positions]` → [(stream bytes or None, error line or None)] per item, for a DataLoader.

    Decoding and encoding both happen here, in the workers; the main process only writes.
    """

    def __init__(self, source: Source, codec: str, quality: int):
        self.source, self.codec, self.quality = source, codec, quality

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, positions):
        from dq.data.codec import encode

        out = []
        for i in positions:
            try:
                out.append((encode(self.source.image(int(i)), self.codec, self.quality), None))
            except DQError as exc:
                out.append((None, str(exc)))
        return out


ENCODE_BATCH = 32  # items per worker call: small enough to keep workers busy, large enough to amortise IPC


def encoded_items(source: Source, codec: str, quality: int, num_workers: int):
    """Yield (position, stream bytes or None, error or None) for every item, in order, decoded by
    `num_workers` DataLoader worker processes (0: in this process)."""
    import torch

    ds = EncodedBatches(source, codec, quality)
    batches = [list(range(s, min(s + ENCODE_BATCH, len(ds)))) for s in range(0, len(ds), ENCODE_BATCH)]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=batches, num_workers=num_workers,
                                         collate_fn=_as_is, prefetch_factor=4 if num_workers else None)
    for positions, results in zip(batches, loader):
        for i, (stream, error) in zip(positions, results):
            yield i, stream, error


def _as_is(batch):
    return batch


def write_split(params: "DataParams", split: str, folder: Path, report: LoadReport | None = None,
                num_workers: int = 0) -> tuple[Source, int]:
    """Decode and encode one split into the store folder `folder` (dq.data.prepared), streaming shard by shard.

    Returns the source and the number of images written. A bad item stops with its one-line error, or is
    skipped and counted in `report` with `data.skip_bad`.
    """
    report = report if report is not None else LoadReport()
    source = split_source(params, split)
    size = params.image_size
    writer = StoreWriter(folder, codec=params.codec, quality=params.quality, image_shape=(size, size, 3),
                         shard_images=params.shard_images, expected_images=len(source))
    try:
        written = _write_items(writer, params, source, report, _progress(params, split, source, num_workers))
    except BaseException:
        writer.abort()
        raise
    if not written:
        raise DQError(f"data.source: {source.source} gave no readable images for the {split} split")
    check_classes(params, split, np.asarray(written))
    writer.close(source.classes, source.source)
    return source, len(written)


def _progress(params: "DataParams", split: str, source: Source, num_workers: int):
    """`encoded_items` of the split's source under a progress bar."""
    from tqdm import tqdm

    return tqdm(encoded_items(source, params.codec, params.quality, num_workers), total=len(source),
                desc=f"prepare {split}", unit="img", mininterval=1.0)


def _write_items(writer, params: "DataParams", source: Source, report: LoadReport, items) -> list[int]:
    """Add the (row, stream, error) `items` to `writer` ENCODE_BATCH at a time; return the labels written.
    A bad item stops with its error, or with `data.skip_bad` (imagefolder only) is skipped and counted."""
    streams, labels, written = [], [], []
    for i, stream, error in items:
        if error is not None:
            if not params.skip_bad or source.source != "imagefolder":
                raise DQError(error)
            report.skipped.append(source.items.name(i))
            continue
        streams.append(stream)
        labels.append(int(source.labels[i]))
        if len(streams) == ENCODE_BATCH:
            writer.add(streams, labels)
            written += labels
            streams, labels = [], []
    writer.add(streams, labels)
    written += labels
    return written
