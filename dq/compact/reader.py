"""Reading a compact store (versions 1, 2 and 3): `open_compact`, `CompactFile`, `read_compact`, `validate`."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.data import codec as codecs
from dq.compact.schema import (
    COMMON_DATASETS,
    VALIDATE_BLOCK_BYTES,
    Header,
    _open,
    check_keep,
    read_header,
    row_bytes,
)
from dq.core.errors import DQError, first_line
from dq.patches.grid import assemble, extract_patches, zero_dropped
from dq.core.io import H5_OPEN_ERRORS, READ_GAP, read_runs
from dq.labels.soft import SoftLabels, dequantise


def decode_streams(streams: list, codec: str, shape: tuple[int, int, int], path: Path,
                   rows: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, C]: the streams of file rows `rows`, decoded; a bad one is a DQError naming its row.

    dq.data.codec.decode_batch picks the decoder (torchvision's for JPEG, in one call per batch, and WebP);
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
    soft: SoftLabels | None = None  # version 3: the teacher's soft labels as stored

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

    def read_soft_labels(self) -> SoftLabels | None:
        """The soft labels as stored (version 3), checked: finite probabilities in [0, 1] and class ids below
        C, a few bytes per image; None when the store holds hard labels only."""
        h = self.header
        if h.soft is None:
            return None
        c = len(h.classes)
        values = self.read("soft_probs")
        ids = self.read("soft_ids") if h.soft.has_ids(c) else None
        p = dequantise(values)
        if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise DQError(f"{self.path}: dataset 'soft_probs' holds values outside [0, 1]; the file is damaged")
        if ids is not None and ids.size and int(ids.max()) >= c:
            raise DQError(f"{self.path}: dataset 'soft_ids' holds class {int(ids.max())}; expected ids below {c}")
        return SoftLabels(ids, values, c, h.soft.temperature)

    def read_keep(self) -> np.ndarray:
        """bool [N, L]: every keep mask, checked (exactly K True per row); a per-image vector, not images."""
        keep = self.read("keep")
        check_keep(self.path, keep, self.header)
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
        return zero_dropped(decode_streams(streams, h.codec, h.image_shape, self.path, rows), keep, h.patch_size,
                            in_place=True)

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
        check_keep(cf.path, arrays["keep"], h)
        arrays["scores"] = cf.read("scores") if h.store_scores else None
        if h.uses_streams:
            images = cf.read_images(np.arange(h.num_images), arrays["keep"])
            patches = extract_patches(images, arrays["keep"], h.patch_size)
        else:
            patches = cf.read("patches")
        return Compact(h, patches=patches, soft=cf.read_soft_labels(), **arrays)


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
            step = max(1, VALIDATE_BLOCK_BYTES // max(1, row_bytes(dset)))
            for start in range(0, dset.shape[0], step):
                block = cf.read(name, slice(start, min(start + step, dset.shape[0])))
                if name == "keep":
                    check_keep(cf.path, block, header, offset=start)
        cf.read_soft_labels()
        if header.uses_streams:
            keep = cf.read("keep")
            step = max(1, VALIDATE_BLOCK_BYTES // max(1, math.prod(header.image_shape)))
            for start in range(0, header.num_images, step):
                rows = np.arange(start, min(start + step, header.num_images))
                cf.read_images(rows, keep[rows])
    return header


