"""The compact HDF5 format, versions 1 and 2: write (version 2), read and validate both, and a torch Dataset.

A compact file holds the images that selection kept, minus the patches that GradCAM++ scored lowest.
Its layout is fixed by docs/DESIGN.md and described for readers in other languages in docs/FORMAT.md:

    root attrs  format = "dq-compact", schema_version, image_size, patch_size, channels,
                grid [rows, cols], num_patches L, kept_patches K, drop, ratio, classes (JSON),
                source, params (JSON); version 2 adds codec, quality and stats (JSON, optional)
    keep        bool    [N, L]           True where a patch was kept; exactly K per row
    labels      int64   [N]
    indices     int64   [N]              row of each image in prepared/train.h5
    bins        int32   [N]
    scores      float32 [N, L]           version 1; version 2: float16, or absent (patches.store_scores)
  codec raw (and every version 1 file):
    patches     uint8   [N, K, p, p, C]  kept patches, in raster order of their grid positions
  codec png | webp-lossless | webp | jpeg (version 2):
    streams     uint8   [B]              the images' codec streams (dq.codec), one after the other
    offsets     int64   [N + 1]          image n is streams[offsets[n]:offsets[n + 1]]
    crc32       uint32  [N]              zlib/PNG CRC-32 of each image's stream

Each stream is a whole image whose dropped patches were filled before encoding (dq.codec.encode_dropped:
the codec's candidate fill that gives the shortest stream); readers set them to zero again, so every codec reads back as the raw layout does.
Every dataset but `streams` is chunked along N (10 KiB to 1 MiB a chunk), gzip-compressed after the
shuffle filter and checksummed (fletcher32); `streams` is contiguous and unfiltered (its bytes are
already compressed, and a C reader takes one image as a plain hyperslab), checked per image by crc32.
Equal inputs give byte-identical files: no timestamps, attributes and datasets always written in the
same order, the earliest HDF5 file format, deterministic encoders.

`CompactWriter` writes a file batch by batch (the compress stage streams its images into it);
`write_compact` is its whole-array form. Both give the same bytes for the same images.

Command line: `python -m dq.format describe FILE` and `python -m dq.format validate FILE`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dq import codec as codecs
from dq.errors import DQError, first_line, run_cli
from dq.grid import assemble, extract_patches, grid_of, kept_count, pixel_keep
from dq.io import H5_OPEN_ERRORS, READ_GAP, atomic_path, check_free_space, h5_file, read_runs

FORMAT = "dq-compact"
SCHEMA_VERSION = 2  # what write_compact writes
READABLE_VERSIONS = (1, 2)

# the dtype of every dataset of a version 1 file, little-endian; Header.shape_of gives the shapes
DATASETS = {
    "patches": np.dtype(np.uint8),
    "keep": np.dtype(np.bool_),
    "labels": np.dtype("<i8"),
    "indices": np.dtype("<i8"),
    "bins": np.dtype("<i4"),
    "scores": np.dtype("<f4"),
}
COMMON_DATASETS = ("keep", "labels", "indices", "bins")
STREAM_DATASETS = {"streams": np.dtype(np.uint8), "offsets": np.dtype("<i8"), "crc32": np.dtype("<u4")}
SCORES_V2 = np.dtype("<f2")  # half the bytes; scores only ever order patches, and 3 digits do that
ATTRS_V1 = ("format", "schema_version", "image_size", "patch_size", "channels", "grid", "num_patches",
            "kept_patches", "drop", "ratio", "classes", "source", "params")
ATTRS = ATTRS_V1 + ("codec", "quality")  # required in version 2; `stats` is optional
JPEG_REFERENCE_QUALITY = 90  # the "ordinary JPEG copy" the storage metrics compare against

CHUNK_MIN = 10 * 1024
CHUNK_TARGET = 64 * 1024  # small enough that one random read inflates few neighbours
CHUNK_MAX = 1024 * 1024
GZIP_LEVEL = 9  # the keep masks are the bytes a drop adds: level 9 stores them in 0.7x of level 4's
READ_CACHE_BYTES = 64 * 1024 * 1024  # per dataset: the default run's whole file stays inflated
VALIDATE_BLOCK_BYTES = 4 * 1024 * 1024
SPOOL_BLOCK_BYTES = 4 * 1024 * 1024  # CompactWriter copies the spooled streams in blocks this size
WRITE_BATCH = 256  # write_compact's batches: the file does not depend on them


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Header:
    """The root attributes of a compact file, plus the number of images N.

    `codec` and `quality` are version 2's attributes (a version 1 file reads as codec raw);
    `store_scores` says whether the file has a `scores` dataset; `version` is the file's schema_version.
    """

    image_size: int
    patch_size: int
    channels: int
    drop: float
    ratio: float
    classes: list[str]
    source: str
    params: dict = field(default_factory=dict)
    num_images: int = 0
    codec: str = "raw"
    quality: int = codecs.DEFAULT_QUALITY
    store_scores: bool = False
    version: int = SCHEMA_VERSION

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.image_size, self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kept_patches(self) -> int:
        return kept_count(self.num_patches, self.drop)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.image_size, self.image_size, self.channels

    @property
    def uses_streams(self) -> bool:
        """True when images are codec streams (`streams`, `offsets`, `crc32`), False for `patches`."""
        return self.codec != "raw"

    def datasets(self) -> dict[str, np.dtype]:
        """The datasets this file must hold, in the order they are written, with their dtypes."""
        if self.version == 1:
            return dict(DATASETS)
        images = dict(STREAM_DATASETS) if self.uses_streams else {"patches": DATASETS["patches"]}
        out = images | {name: DATASETS[name] for name in COMMON_DATASETS}
        return out | ({"scores": SCORES_V2} if self.store_scores else {})

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        """The shape dataset `name` must have (None for `streams`, whose length is offsets[N])."""
        n, k, l, p, c = self.num_images, self.kept_patches, self.num_patches, self.patch_size, self.channels
        return {"patches": (n, k, p, p, c), "keep": (n, l), "scores": (n, l), "offsets": (n + 1,),
                "streams": None}.get(name, (n,))

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


def _create(f, name: str, data: np.ndarray, dtype: np.dtype) -> None:
    data = np.ascontiguousarray(data, dtype=dtype)
    if data.size == 0:
        f.create_dataset(name, shape=data.shape, dtype=data.dtype)
        return
    if name == "streams":  # already compressed; contiguous, so a C reader takes one image as a hyperslab
        f.create_dataset(name, data=data, track_times=False)
        return
    f.create_dataset(name, data=data, chunks=chunk_shape(data.shape, data.dtype.itemsize),
                     compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True, fletcher32=True,
                     track_times=False)


def encode_images(images: np.ndarray, keep: np.ndarray, patch_size: int, codec: str, quality: int) -> list[bytes]:
    """One `codec` stream per image [N, H, W, C], dropped patches filled first (dq.codec.encode_dropped)."""
    masks = pixel_keep(keep, patch_size, images.shape[1])  # bool [N, H, W]
    return [codecs.encode_dropped(image, mask, codec, quality) for image, mask in zip(images, masks)]


def pack_streams(streams: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """streams → (flat uint8 [B], offsets int64 [N + 1], crc32 uint32 [N])."""
    sizes = np.fromiter((len(s) for s in streams), np.int64, len(streams))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.frombuffer(b"".join(streams), np.uint8)
    crcs = np.fromiter((zlib.crc32(s) for s in streams), np.uint32, len(streams))
    return flat, offsets, crcs


def kept_pixel_errors(original: np.ndarray, decoded: np.ndarray, masks: np.ndarray) -> tuple[int, int]:
    """(sum of squared errors, number of values) over the kept pixels (masks bool [N, H, W]) of decoded vs
    original [N, H, W, C]: exact integers, so sums over batches give the PSNR of the whole set."""
    diff = (original[masks].astype(np.int64) - decoded[masks].astype(np.int64)).ravel()
    return int(np.dot(diff, diff)), int(diff.size)


def psnr_from_errors(squared_errors: int, count: int) -> float | None:
    """PSNR in dB for a summed squared error over `count` uint8 values; None when exact."""
    mse = squared_errors / count if count else 0.0
    return None if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse)


def kept_pixel_psnr(original: np.ndarray, decoded: np.ndarray, masks: np.ndarray) -> float | None:
    """PSNR in dB of the kept pixels (masks bool [N, H, W]) of decoded vs original [N, H, W, C]; None: exact."""
    return psnr_from_errors(*kept_pixel_errors(original, decoded, masks))


def jpeg_reference_bytes(images: np.ndarray) -> int:
    """Bytes of an ordinary JPEG q90 copy of `images` [N, H, W, C] with nothing dropped (the stats' yardstick)."""
    return sum(len(codecs.encode(image, "jpeg", JPEG_REFERENCE_QUALITY)) for image in images)


class CompactWriter:
    """Writes a version 2 compact file batch by batch, atomically: the images are never held whole.

        with CompactWriter(path, header, num_images=n, source_bytes=...) as writer:
            for batch in ...:
                writer.add(images, keep, labels, indices, bins, scores)
        writer.stats  # the `stats` attribute written

    Each `add` encodes its images at once (codec streams, or the raw layout's kept patches) and appends
    the bytes to a spool file beside the output (`.<name>.tmp-<pid>.part`, swept like any temporary if
    the process dies). The per-image arrays (keep, labels, indices, bins, float16 scores: a few bytes per
    patch) are held until the end, when the HDF5 file is written exactly as `write_compact` always wrote
    it, the images copied from the spool a few MiB at a time: the file does not depend on the batches,
    and the same arguments give the same bytes. The stats are sums over the batches (the kept-pixel PSNR
    from summed integer squared errors), equal to those of the whole set.

    On any exception, or a number of images other than `num_images`, nothing appears at `path`. The disk
    needs room for the spool and the file at once (about twice the image bytes) at the end.
    """

    def __init__(self, path: str | Path, header: Header, num_images: int,
                 source_bytes: tuple[int | None, str] = (None, "")):
        problem = codecs.codec_problem(header.codec, header.quality)
        if problem:
            raise ValueError(f"header {problem}")
        self.path = Path(path)
        self.header = dataclasses.replace(header, num_images=int(num_images), version=SCHEMA_VERSION)
        self.source_bytes = source_bytes
        n, l = self.header.num_images, self.header.num_patches
        self.keep = np.zeros((n, l), np.bool_)
        self.labels, self.indices = np.zeros(n, DATASETS["labels"]), np.zeros(n, DATASETS["indices"])
        self.bins = np.zeros(n, DATASETS["bins"])
        self.scores = np.zeros((n, l), SCORES_V2) if self.header.store_scores else None
        self.count = 0
        self.stats: dict | None = None
        self._squared_errors = self._values = self._jpeg_bytes = self._spooled = 0
        self._sizes: list[int] = []
        self._crcs: list[int] = []
        self._atomic = self._spool = self._spool_path = None

    # --- the atomic temporary and the spool beside it

    def __enter__(self) -> "CompactWriter":
        self._atomic = atomic_path(self.path)
        self.tmp = self._atomic.__enter__()
        try:
            self._spool_path = self.tmp.with_name(self.tmp.name + ".part")
            self._spool = open(self._spool_path, "wb")
        except BaseException as exc:
            self._abort(exc)
            raise
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            try:
                self._finish()
                self._release()
            except BaseException as error:
                self._abort(error)
                raise
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(None, None, None)
        else:
            self._abort(exc)
        return False

    def _abort(self, exc: BaseException) -> None:
        """Close and remove everything written; a full disk becomes atomic_path's one-line DQError."""
        self._release()
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary; raises only a new error

    def _release(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._spool_path is not None and self._spool_path.exists():
            self._spool_path.unlink()

    # --- batches

    def add(self, images: np.ndarray, keep: np.ndarray, labels: np.ndarray, indices: np.ndarray,
            bins: np.ndarray, scores: np.ndarray | None) -> None:
        """Append the next batch: uint8 images [b, H, W, C], keep bool [b, L] (exactly K True per row),
        labels, indices, bins [b], and scores [b, L] (ignored without `header.store_scores`)."""
        h = self.header
        if self._spool is None:
            raise RuntimeError("CompactWriter.add outside its `with` block")
        images = np.ascontiguousarray(images, np.uint8)
        if images.ndim != 4 or images.shape[1:] != h.image_shape:
            raise ValueError(f"images are {'x'.join(map(str, images.shape[1:]))}, the header says "
                             f"{h.image_size} and {h.channels}")
        b, start = len(images), self.count
        if start + b > h.num_images:
            raise ValueError(f"{start + b} images added, the writer was opened for {h.num_images}")
        _check_keep(self.path, keep, h, offset=start)
        expected = {"keep": (b, h.num_patches), "labels": (b,), "indices": (b,), "bins": (b,)}
        given = {"keep": keep, "labels": labels, "indices": indices, "bins": bins}
        if h.store_scores:
            expected["scores"], given["scores"] = (b, h.num_patches), scores
        for name, shape in expected.items():
            if tuple(np.shape(given[name])) != shape:
                raise ValueError(f"{name} has shape {np.shape(given[name])}, expected {shape}")
        rows = slice(start, start + b)
        self.keep[rows], self.labels[rows], self.indices[rows], self.bins[rows] = keep, labels, indices, bins
        if h.store_scores:
            self.scores[rows] = np.asarray(scores, np.float32)  # then float16, as the whole array converted
        if h.uses_streams:
            self._add_streams(images, keep, rows)
        else:
            self._write_spool(extract_patches(images, keep, h.patch_size).tobytes())
        self._jpeg_bytes += jpeg_reference_bytes(images)
        self.count += b

    def _add_streams(self, images: np.ndarray, keep: np.ndarray, rows: slice) -> None:
        """Encode, decode back as a reader does (a lossless codec that does not read back exactly is a bug
        caught here rather than in training), and spool the streams."""
        h = self.header
        streams = encode_images(images, keep, h.patch_size, h.codec, h.quality)
        decoded = decode_streams(streams, h.codec, h.image_shape, self.path, np.arange(rows.start, rows.stop))
        errors, values = kept_pixel_errors(images, decoded, pixel_keep(keep, h.patch_size, h.image_size))
        if errors and codecs.is_lossless(h.codec):
            raise AssertionError(f"{h.codec} did not read back the kept pixels exactly "
                                 f"(PSNR {psnr_from_errors(errors, values):.1f} dB)")
        self._squared_errors += errors
        self._values += values
        for s in streams:
            self._write_spool(s)
            self._sizes.append(len(s))
            self._crcs.append(zlib.crc32(s))

    def _write_spool(self, data: bytes) -> None:
        self._spool.write(data)
        self._spooled += len(data)

    # --- the end: the HDF5 file, in one go

    def _finish(self) -> None:
        h = self.header
        if self.count != h.num_images:
            raise ValueError(f"{self.count} images added, the writer was opened for {h.num_images}")
        self._spool.close()
        self._spool = None
        arrays = {"keep": self.keep, "labels": self.labels, "indices": self.indices, "bins": self.bins,
                  "scores": self.scores}
        psnr = None
        if h.uses_streams:
            offsets = np.concatenate([[0], np.cumsum(np.asarray(self._sizes, np.int64))]).astype(np.int64)
            arrays |= {"offsets": offsets, "crc32": np.asarray(self._crcs, np.uint32)}
            psnr = psnr_from_errors(self._squared_errors, self._values)
        stats = {"image_bytes": self._spooled, "kept_pixel_psnr": psnr, "jpeg_q90_bytes": self._jpeg_bytes,
                 "source_bytes": self.source_bytes[0], "source_bytes_how": self.source_bytes[1]}
        check_free_space(self.tmp, self._spooled + sum(np.asarray(a).nbytes for a in arrays.values()
                                                       if a is not None))
        with h5_file(self.tmp, "w") as f:
            _write_attrs(f, h, stats)
            for name, dtype in h.datasets().items():
                if name in ("streams", "patches"):
                    self._copy_spool(f, name, dtype)
                else:
                    _create(f, name, arrays[name], dtype)
        self.stats = stats

    def _copy_spool(self, f, name: str, dtype: np.dtype) -> None:
        """`streams` (contiguous, unfiltered) or `patches` (chunked as `_create` chunks it), filled from the
        spool in blocks of whole chunks of a few MiB."""
        shape = self.header.shape_of(name) or (self._spooled,)
        if math.prod(shape) == 0:
            _create(f, name, np.zeros(shape, dtype), dtype)
            return
        if name == "streams":
            dset = f.create_dataset(name, shape=shape, dtype=dtype, track_times=False)
        else:
            dset = f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunk_shape(shape, dtype.itemsize),
                                    compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True,
                                    fletcher32=True, track_times=False)
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        chunk_rows = dset.chunks[0] if dset.chunks else 1
        step = max(1, SPOOL_BLOCK_BYTES // (row_bytes * chunk_rows)) * chunk_rows
        with open(self._spool_path, "rb") as spool:
            for start in range(0, shape[0], step):
                stop = min(start + step, shape[0])
                block = np.frombuffer(spool.read((stop - start) * row_bytes), dtype)
                dset[start:stop] = block.reshape((stop - start,) + shape[1:])


def write_compact(path: str | Path, header: Header, images: np.ndarray, keep: np.ndarray, labels: np.ndarray,
                  indices: np.ndarray, bins: np.ndarray, scores: np.ndarray | None,
                  source_bytes: tuple[int | None, str] = (None, "")) -> dict:
    """Write a version 2 compact file atomically from the full kept images [N, H, W, C] and keep [N, L].

    A thin wrapper over `CompactWriter` (which see), for callers that hold the images anyway.
    `header.codec`, `header.quality` and `header.store_scores` choose the layout; `header.num_images`
    and `header.version` are ignored. `source_bytes` is (bytes of the source files of these images, how
    they were counted), or (None, why not). Returns the `stats` attribute written: the kept-pixel PSNR
    (None when exact), the bytes of the image content, of a JPEG q90 copy, of the source. The same
    arguments give the same bytes.
    """
    n, h, w, c = images.shape
    if (h, w, c) != header.image_shape:
        raise ValueError(f"images are {h}x{w}x{c}, the header says {header.image_size} and {header.channels}")
    for name, array in (("keep", keep), ("labels", labels), ("indices", indices), ("bins", bins)) + (
            (("scores", scores),) if header.store_scores else ()):
        if len(array) != n:
            raise ValueError(f"{name} has shape {np.shape(array)}, expected {n} rows for {n} images")
    with CompactWriter(path, header, n, source_bytes) as writer:
        for start in range(0, n, WRITE_BATCH):
            rows = slice(start, start + WRITE_BATCH)
            writer.add(images[rows], keep[rows], labels[rows], indices[rows], bins[rows],
                       None if scores is None else scores[rows])
    return writer.stats


def _write_attrs(f, header: Header, stats: dict) -> None:
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
        "codec": str(header.codec),
        "quality": np.int64(header.quality),
        "stats": json.dumps(stats, sort_keys=True),
    }
    for name in ATTRS + ("stats",):  # one fixed order: the object header's bytes depend on it
        f.attrs[name] = values[name]


# ---------------------------------------------------------------------------------------------------
# Decoding


def decode_streams(streams: list, codec: str, shape: tuple[int, int, int], path: Path,
                   rows: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, C]: the streams of file rows `rows`, decoded; a bad one is a DQError naming its row.

    dq.codec.decode_batch picks the decoder (torchvision's for JPEG, in one call per batch, and WebP);
    writer and readers both decode here, so the PSNR in `stats` is what readers see.
    """
    try:
        return codecs.decode_batch(streams, codec, shape)
    except codecs.CodecError as exc:
        row = int(rows[exc.index]) if exc.index is not None else int(rows[0])
        raise DQError(f"{path}: image row {row}: {exc}; the file is damaged") from None


def check_crc(path: Path, streams: list, crcs: np.ndarray, rows: np.ndarray) -> None:
    """Each stream's CRC-32 against the stored one; the first mismatch is a DQError naming its row."""
    for stream, crc, row in zip(streams, crcs, rows):
        if zlib.crc32(stream) != int(crc):
            raise DQError(f"{path}: image row {int(row)}: its {len(stream)}-byte stream fails its crc32 check; "
                          "the file is damaged")


def masked(images: np.ndarray, keep: np.ndarray, patch_size: int) -> np.ndarray:
    """images [B, H, W, C] (C-contiguous) with the pixels of dropped patches set to zero, in place, as the
    raw layout reads; a multiply on the patch grid view, several times faster than a boolean mask."""
    b, h, w, c = images.shape
    grid = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    grid *= np.asarray(keep, bool).reshape(b, h // patch_size, 1, w // patch_size, 1, 1)
    return images


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
    if int(version) not in READABLE_VERSIONS:
        raise DQError(f"{path}: schema_version = {int(version)}; expected one of {list(READABLE_VERSIONS)}")
    attrs = ATTRS_V1 if int(version) == 1 else ATTRS
    missing = [a for a in attrs if a not in f.attrs]
    if missing:
        raise DQError(f"{path}: missing root attribute '{missing[0]}'")
    if "labels" not in f:
        raise DQError(f"{path}: missing dataset 'labels'")
    header = _header_from_attrs(f, path, int(version))
    _check_attrs(f, path, header)
    missing = [d for d in header.datasets() if d not in f]
    if missing:
        raise DQError(f"{path}: missing dataset '{missing[0]}'")
    for name, dtype in header.datasets().items():
        dset, shape = f[name], header.shape_of(name)
        wrong_shape = dset.shape != shape if shape is not None else dset.ndim != 1  # streams: any length
        if dset.dtype != dtype or wrong_shape:
            expected = list(shape) if shape is not None else "[B]"
            raise DQError(f"{path}: dataset '{name}' is {dset.dtype} {list(dset.shape)}; expected {dtype} "
                          f"{expected} (N = {header.num_images} from 'labels')")
    return header


def _header_from_attrs(f, path: Path, version: int) -> Header:
    try:
        v2 = {"store_scores": True} if version == 1 else {
            "codec": str(f.attrs["codec"]), "quality": int(f.attrs["quality"]), "store_scores": "scores" in f}
        return Header(image_size=int(f.attrs["image_size"]), patch_size=int(f.attrs["patch_size"]),
                      channels=int(f.attrs["channels"]), drop=float(f.attrs["drop"]),
                      ratio=float(f.attrs["ratio"]), classes=json.loads(f.attrs["classes"]),
                      source=str(f.attrs["source"]), params=json.loads(f.attrs["params"]),
                      num_images=int(f["labels"].shape[0]) if f["labels"].ndim == 1 else -1,
                      version=version, **v2)
    except (TypeError, ValueError) as exc:
        raise DQError(f"{path}: a root attribute has the wrong type ({first_line(exc, 160)})") from None


def _check_attrs(f, path: Path, header: Header) -> None:
    """The derived attributes must agree with image_size, patch_size and drop; codec and quality be known."""
    if header.patch_size < 1 or header.image_size % header.patch_size:
        raise DQError(f"{path}: patch_size {header.patch_size} does not divide image_size {header.image_size}")
    stored = {"grid": [int(v) for v in np.ravel(f.attrs["grid"])], "num_patches": int(f.attrs["num_patches"]),
              "kept_patches": int(f.attrs["kept_patches"])}
    derived = {"grid": list(header.grid), "num_patches": header.num_patches, "kept_patches": header.kept_patches}
    for name, value in stored.items():
        if value != derived[name]:
            raise DQError(f"{path}: attribute {name} = {value} disagrees with image_size, patch_size and "
                          f"drop, which give {derived[name]}")
    problem = codecs.codec_problem(header.codec, header.quality)
    if problem:
        name = problem.split(":")[0]
        raise DQError(f"{path}: attribute {name} = {getattr(header, name)!r}; expected{problem[len(name) + 1:]}")


def read_stats(f) -> dict:
    """The optional `stats` attribute of a version 2 file (written by write_compact), or {}."""
    try:
        return json.loads(f.attrs["stats"]) if "stats" in f.attrs else {}
    except (TypeError, ValueError):
        return {}


@dataclass
class Compact:
    """A whole compact file in memory (codec streams decoded into the raw layout)."""

    header: Header
    patches: np.ndarray  # uint8 [N, K, p, p, C]
    keep: np.ndarray  # bool [N, L]
    labels: np.ndarray  # int64 [N]
    indices: np.ndarray  # int64 [N]
    bins: np.ndarray  # int32 [N]
    scores: np.ndarray | None  # float32 [N, L] (version 1), float16 [N, L] or None (version 2)

    def images(self) -> np.ndarray:
        """uint8 [N, H, W, C], dropped patches zero."""
        return assemble(self.patches, self.keep, self.header.grid)


class CompactFile:
    """An open, header-checked compact file: `with open_compact(path) as cf: cf["keep"][:10]`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = _open(self.path)
        try:
            self.header = read_header(self.file, self.path)
        except BaseException:
            self.file.close()
            raise
        self._offsets = None
        self._datasets: dict = {}

    def __getitem__(self, name: str):
        # looking a dataset up by name costs more than a small read: one lookup per name
        if name not in self._datasets:
            self._datasets[name] = self.file[name]
        return self._datasets[name]

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of a dataset; a checksum or decompression failure is a DQError naming the rows."""
        try:
            return self[name][rows]
        except H5_OPEN_ERRORS as exc:
            where = "" if rows == slice(None) else f" rows {rows.start}..{rows.stop - 1}"
            raise DQError(f"{self.path}: dataset '{name}'{where} fails its checksum or cannot be "
                          f"decompressed; the file is damaged ({first_line(exc, 160)})") from None

    def _read_row(self, name: str, row: int) -> np.ndarray:
        try:
            return self[name][row]
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{self.path}: dataset '{name}' row {row} fails its checksum or cannot be "
                          f"decompressed; the file is damaged ({first_line(exc, 160)})") from None

    def read_keep(self) -> np.ndarray:
        """bool [N, L]: every keep mask, checked (exactly K True per row); a per-image vector, not images."""
        keep = self.read("keep")
        _check_keep(self.path, keep, self.header)
        return keep

    @property
    def offsets(self) -> np.ndarray:
        """int64 [N + 1], checked: starts at 0, never decreases, ends at the length of `streams`."""
        if self._offsets is None:
            offsets = self.read("offsets")
            if offsets.size and (offsets[0] != 0 or (np.diff(offsets) < 0).any()
                                 or offsets[-1] != self.file["streams"].shape[0]):
                raise DQError(f"{self.path}: dataset 'offsets' must start at 0, never decrease and end at the "
                              f"length of 'streams' ({self.file['streams'].shape[0]}); the file is damaged")
            self._offsets = offsets
        return self._offsets

    def read_streams(self, rows: np.ndarray) -> list[np.ndarray]:
        """The CRC-checked stream of each of the sorted `rows`, read in as few HDF5 calls as is cheap.

        Each call costs about as much as reading tens of kilobytes, so rows whose streams lie less than
        READ_GAP bytes apart are read as one span and cut apart in memory.
        """
        offsets, streams = self.offsets, self["streams"]
        starts, stops = offsets[rows], offsets[np.asarray(rows) + 1]
        try:
            out = read_runs(lambda a, b: streams[a:b], starts, stops, READ_GAP)
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{self.path}: dataset 'streams' cannot be read; the file is damaged "
                          f"({first_line(exc, 160)})") from None
        check_crc(self.path, out, self._crcs()[rows], rows)
        return out

    def _crcs(self) -> np.ndarray:
        if getattr(self, "_crc_cache", None) is None:
            self._crc_cache = self.read("crc32")
        return self._crc_cache

    def read_images(self, rows: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """uint8 [B, H, W, C] of the sorted `rows`, dropped patches zero, whatever the layout."""
        h = self.header
        keep = self.read("keep")[rows] if keep is None else keep
        if not h.uses_streams:
            if not len(rows):
                return np.zeros((0,) + h.image_shape, np.uint8)
            if rows[-1] - rows[0] < 2 * len(rows):  # dense: one read of the span
                patches = self.read("patches", slice(int(rows[0]), int(rows[-1]) + 1))[rows - rows[0]]
            else:
                patches = np.stack([self._read_row("patches", int(r)) for r in rows])
            return assemble(patches, keep, h.grid)
        streams = self.read_streams(rows)
        return masked(decode_streams(streams, h.codec, h.image_shape, self.path, rows), keep, h.patch_size)

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
    """Read and fully validate a compact file into memory; codec streams come back as kept patches."""
    with open_compact(path) as cf:
        h = cf.header
        arrays = {name: cf.read(name) for name in COMMON_DATASETS}
        _check_keep(cf.path, arrays["keep"], h)
        arrays["scores"] = cf.read("scores") if h.store_scores else None
        if h.uses_streams:
            images = cf.read_images(np.arange(h.num_images), arrays["keep"])
            patches = extract_patches(images, arrays["keep"], h.patch_size)
        else:
            patches = cf.read("patches")
        return Compact(h, patches=patches, **arrays)


def validate(path: str | Path) -> Header:
    """Check everything: header, dtypes, shapes, every chunk's checksum, K True per keep row, and for a
    codec file every stream's CRC-32 and that it decodes to the image shape.

    Reads the datasets in blocks of about 4 MiB, so memory stays flat however large the file is.
    """
    with open_compact(path) as cf:
        header = cf.header
        for name in header.datasets():
            if name == "streams":
                continue
            dset = cf[name]
            step = max(1, VALIDATE_BLOCK_BYTES // max(1, _row_bytes(dset)))
            for start in range(0, dset.shape[0], step):
                block = cf.read(name, slice(start, min(start + step, dset.shape[0])))
                if name == "keep":
                    _check_keep(cf.path, block, header, offset=start)
        if header.uses_streams:
            keep = cf.read("keep")
            step = max(1, VALIDATE_BLOCK_BYTES // max(1, math.prod(header.image_shape)))
            for start in range(0, header.num_images, step):
                rows = np.arange(start, min(start + step, header.num_images))
                cf.read_images(rows, keep[rows])
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
    """What the compact file costs against raw pixels, a JPEG q90 copy and the source files.

    `full_images` is the size of the whole prepared training set. kept_pixel_share is about
    ratio * (1 - drop): the raw bytes of the kept patches over the full set's raw bytes. The figures
    against JPEG q90 and the source come from the file's `stats` (version 2; None for version 1).
    """
    path = Path(path)
    with open_compact(path) as cf:
        h = cf.header
        image_name = "streams" if h.uses_streams else "patches"
        patches_stored = int(cf[image_name].id.get_storage_size())
        stats = read_stats(cf.file)
    image_bytes = h.image_size * h.image_size * h.channels
    compact_bytes = os.path.getsize(path)
    full_raw = full_images * image_bytes
    kept_patch_raw = h.num_images * h.kept_patches * h.patch_size * h.patch_size * h.channels
    jpeg, source = stats.get("jpeg_q90_bytes"), stats.get("source_bytes")
    return {
        "images": h.num_images,
        "train_images": full_images,
        "selected_share": h.num_images / max(full_images, 1),
        "num_patches": h.num_patches,
        "kept_patches": h.kept_patches,
        "codec": h.codec,
        "quality": h.quality if not codecs.is_lossless(h.codec) else None,
        "compact_bytes": compact_bytes,
        "patches_stored_bytes": patches_stored,
        "bytes_per_image": compact_bytes / max(h.num_images, 1),
        "kept_raw_bytes": h.num_images * image_bytes,
        "kept_patch_raw_bytes": kept_patch_raw,
        "full_raw_bytes": full_raw,
        "compression_ratio": full_raw / max(compact_bytes, 1),  # how many times smaller than the full set
        "compact_share": compact_bytes / max(full_raw, 1),
        "kept_pixel_share": kept_patch_raw / max(full_raw, 1),
        "jpeg_q90_bytes": jpeg,
        "vs_jpeg_q90": compact_bytes / jpeg if jpeg else None,
        "source_bytes": source,
        "source_bytes_how": stats.get("source_bytes_how"),
        "vs_source": compact_bytes / source if source else None,
        "kept_pixel_psnr": stats.get("kept_pixel_psnr"),  # dB; None: the kept pixels read back exactly
        "lossless": codecs.is_lossless(h.codec),
    }


# ---------------------------------------------------------------------------------------------------
# The torch Dataset


class CompactDataset(Dataset):
    """A torch Dataset over a compact file (version 1 or 2): (image [C, H, W], keep [L], label) per image.

    The image is the stored image with its dropped patches zero-filled: uint8 by default, or float32
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
        _check_keep(self.path, self._keep, self.header)
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


# ---------------------------------------------------------------------------------------------------
# Command line


def _figure(value, fmt: str, none: str = "n/a", unit: str = "") -> str:
    return none if value is None else format(value, fmt) + unit


def describe(path: str | Path) -> str:
    """Attributes, codec, counts, bytes (stored vs raw) of each dataset, and the stats, as text."""
    path = Path(path)
    with open_compact(path) as cf:
        h = cf.header
        version = int(cf.file.attrs["schema_version"])
        size = os.path.getsize(path)
        lines = [f"{path}: {FORMAT} version {version}, {size:,} bytes", "attributes:"]
        for name in (ATTRS_V1 if version == 1 else ATTRS):
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
        for name in h.datasets():
            d = cf[name]
            raw, stored = d.dtype.itemsize * math.prod(d.shape), d.id.get_storage_size()
            total_raw, total_stored = total_raw + raw, total_stored + stored
            lines.append(f"{name:10s} {str(d.dtype):8s} {str(list(d.shape)):22s} {str(d.chunks):22s} "
                         f"{raw:12,d} {stored:12,d} {stored / max(raw, 1):10.3f}")
        lines.append(f"{'total':10s} {'':8s} {'':22s} {'':22s} {total_raw:12,d} {total_stored:12,d} "
                     f"{total_stored / max(total_raw, 1):10.3f}")
        full = h.num_images * math.prod(h.image_shape)
        image_name = "streams" if h.uses_streams else "patches"
        lines.append(f"kept images' raw pixels: {full:,} bytes; stored {image_name}: "
                     f"{cf[image_name].id.get_storage_size():,} bytes")
        stats = read_stats(cf.file)
    quality = "" if codecs.is_lossless(h.codec) else f" quality {h.quality}"
    psnr = stats.get("kept_pixel_psnr")
    psnr = "exact (lossless)" if codecs.is_lossless(h.codec) else _figure(psnr, ".2f") + " dB"
    jpeg, source = stats.get("jpeg_q90_bytes"), stats.get("source_bytes")
    lines.append(f"codec: {h.codec}{quality}; {size / max(h.num_images, 1):,.0f} bytes per kept image; "
                 f"kept-pixel PSNR {psnr}")
    lines.append(f"file vs a JPEG q90 copy with nothing dropped ({_figure(jpeg, ',d')} bytes): "
                 f"{_figure(size / jpeg if jpeg else None, '.3f', 'n/a', 'x')}; vs the source files "
                 f"({_figure(source, ',d')} bytes, {stats.get('source_bytes_how') or 'not recorded'}): "
                 f"{_figure(size / source if source else None, '.3f', 'n/a', 'x')}")
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
        print(f"{args.file}: valid {FORMAT} version {header.version} ({header.codec}): {header.num_images} "
              f"images, {header.kept_patches} of {header.num_patches} patches kept")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
