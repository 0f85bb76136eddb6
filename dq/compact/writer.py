"""Writing a compact store (version 2, or 3 with soft labels): `CompactWriter` batch by batch, `write_compact` from whole arrays.

Both give the same bytes for the same images: no timestamps, attributes and datasets always written in the
same order, the earliest HDF5 file format, deterministic encoders.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.data import codec as codecs
from dq.compact.metrics import jpeg_reference_bytes, kept_pixel_errors, psnr_from_errors
from dq.compact.reader import decode_streams
from dq.compact.schema import (
    CHUNK_MAX,
    CHUNK_MIN,
    CHUNK_TARGET,
    DATASETS,
    GZIP_LEVEL,
    PLAIN_VERSION,
    SCHEMA_VERSION,
    SCORES_V2,
    SPOOL_BLOCK_BYTES,
    WRITE_BATCH,
    Header,
    _write_attrs,
    check_keep,
)
from dq.patches.grid import extract_patches, pixel_keep
from dq.core.io import atomic_path, check_free_space, h5_file


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
    """One `codec` stream per image [N, H, W, C], dropped patches padded first (dq.data.codec.encode_dropped)."""
    masks = pixel_keep(keep, patch_size, images.shape[1])  # bool [N, H, W]
    return [codecs.encode_dropped(image, mask, codec, quality) for image, mask in zip(images, masks)]


def pack_streams(streams: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """streams → (flat uint8 [B], offsets int64 [N + 1], crc32 uint32 [N])."""
    sizes = np.fromiter((len(s) for s in streams), np.int64, len(streams))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.frombuffer(b"".join(streams), np.uint8)
    crcs = np.fromiter((zlib.crc32(s) for s in streams), np.uint32, len(streams))
    return flat, offsets, crcs


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
                 source_bytes: tuple[int | None, str] = (None, ""),
                 soft: tuple[np.ndarray | None, np.ndarray] | None = None):
        """`soft`: with `header.soft`, the stored soft labels of all `num_images` images (ids [N, V, k] or
        None, values [N, V, k], as dq.labels.soft.quantise gives them), a few bytes per image."""
        problem = codecs.codec_problem(header.codec, header.quality)
        if problem:
            raise ValueError(f"header {problem}")
        if (header.soft is None) != (soft is None):
            raise ValueError("soft labels and header.soft go together")
        self.path = Path(path)
        version = SCHEMA_VERSION if header.soft is not None else PLAIN_VERSION
        self.header = dataclasses.replace(header, num_images=int(num_images), version=version)
        self.soft = _soft_datasets(self.header, soft)
        self.source_bytes = source_bytes
        self._hold_per_image()

    def _hold_per_image(self) -> None:
        """The per-image arrays, filled batch by batch, and the running sums of the stats."""
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
        self._check_batch(images, {"keep": keep, "labels": labels, "indices": indices, "bins": bins,
                                   "scores": scores})
        b, start = len(images), self.count
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

    def _check_batch(self, images: np.ndarray, given: dict) -> None:
        """The batch's images [b, H, W, C] fit the header and the room left; its keep masks, labels, indices,
        bins (and scores, when stored) have b rows."""
        h, b, start = self.header, len(images), self.count
        if images.ndim != 4 or images.shape[1:] != h.image_shape:
            raise ValueError(f"images are {'x'.join(map(str, images.shape[1:]))}, the header says "
                             f"{h.image_size} and {h.channels}")
        if start + b > h.num_images:
            raise ValueError(f"{start + b} images added, the writer was opened for {h.num_images}")
        check_keep(self.path, given["keep"], h, offset=start)
        expected = {"keep": (b, h.num_patches), "labels": (b,), "indices": (b,), "bins": (b,)}
        if h.store_scores:
            expected["scores"] = (b, h.num_patches)
        for name, shape in expected.items():
            if tuple(np.shape(given[name])) != shape:
                raise ValueError(f"{name} has shape {np.shape(given[name])}, expected {shape}")

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
                  "scores": self.scores} | self.soft
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
        """`streams` (contiguous, unfiltered) or `patches` (chunked as `_create` chunks it), copied from the
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


def _soft_datasets(header: Header, soft: tuple | None) -> dict:
    """{"soft_ids": ids [N, V, k] or None, "soft_probs": values [N, V, k]} checked against `header`, or {}."""
    if soft is None:
        return {}
    arrays = {"soft_ids": soft[0], "soft_probs": soft[1]}
    for name, dtype in header.datasets().items():
        if name in arrays and (np.shape(arrays[name]) != header.shape_of(name)
                               or np.asarray(arrays[name]).dtype != dtype):
            raise ValueError(f"{name} is {np.asarray(arrays[name]).dtype} {np.shape(arrays[name])}, "
                             f"expected {dtype} {header.shape_of(name)}")
    return arrays


@dataclass(frozen=True)
class KeptImages:
    """What a compact store keeps of N images, whole: uint8 images [N, H, W, C], keep bool [N, L] (exactly K
    True per row), labels int64 [N], indices int64 [N] (rows of the prepared set), bins int32 [N], and the
    patch scores [N, L] (None, or ignored, without `header.store_scores`)."""

    images: np.ndarray
    keep: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    bins: np.ndarray
    scores: np.ndarray | None = None

    def rows(self, rows: slice) -> tuple:
        """`CompactWriter.add`'s arguments for `rows`: (images, keep, labels, indices, bins, scores)."""
        return (self.images[rows], self.keep[rows], self.labels[rows], self.indices[rows], self.bins[rows],
                None if self.scores is None else self.scores[rows])


def write_compact(path: str | Path, header: Header, kept: KeptImages, source_bytes: tuple[int | None, str] = (None, ""),
                  soft: tuple[np.ndarray | None, np.ndarray] | None = None) -> dict:
    """Write a version 2 compact file (3 with `soft` labels, see CompactWriter) atomically from the full kept images.

    A thin wrapper over `CompactWriter` (which see), for callers that hold the images anyway.
    `header.codec`, `header.quality` and `header.store_scores` choose the layout; `header.num_images`
    and `header.version` are ignored. `source_bytes` is (bytes of the source files of these images, how
    they were counted), or (None, why not). Returns the `stats` attribute written: the kept-pixel PSNR
    (None when exact), the bytes of the image content, of a JPEG q90 copy, of the source. The same
    arguments give the same bytes.
    """
    n, h, w, c = kept.images.shape
    if (h, w, c) != header.image_shape:
        raise ValueError(f"images are {h}x{w}x{c}, the header says {header.image_size} and {header.channels}")
    for name in ("keep", "labels", "indices", "bins") + (("scores",) if header.store_scores else ()):
        array = getattr(kept, name)
        if len(array) != n:
            raise ValueError(f"{name} has shape {np.shape(array)}, expected {n} rows for {n} images")
    with CompactWriter(path, header, n, source_bytes, soft) as writer:
        for start in range(0, n, WRITE_BATCH):
            writer.add(*kept.rows(slice(start, start + WRITE_BATCH)))
    return writer.stats
