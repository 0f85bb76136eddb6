"""The compact store's schema: its constants, the `Header` of root attributes, reading and checking them.

The layout is fixed by docs/DESIGN.md and described for readers in other languages in docs/FORMAT.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dq.data import codec as codecs
from dq.core.errors import DQError, first_line
from dq.patches.grid import grid_of, kept_count
from dq.core.io import H5_OPEN_ERRORS
from dq.labels.soft import BITS_DTYPE, SoftSpec, ids_dtype

FORMAT = "dq-compact"
SCHEMA_VERSION = 3  # the newest: version 3 adds soft labels; a store without them is written as version 2
PLAIN_VERSION = 2  # what write_compact writes when the store holds no soft labels
READABLE_VERSIONS = (1, 2, 3)

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
ATTRS_V3 = ATTRS + ("soft_k", "soft_bits", "soft_temperature", "soft_views")  # required in version 3
JPEG_REFERENCE_QUALITY = 90  # the "ordinary JPEG copy" the storage metrics compare against

CHUNK_MIN = 10 * 1024
CHUNK_TARGET = 64 * 1024  # small enough that one random read inflates few neighbours
CHUNK_MAX = 1024 * 1024
GZIP_LEVEL = 9  # the keep masks are the bytes a drop adds: level 9 stores them in 0.7x of level 4's
READ_CACHE_BYTES = 64 * 1024 * 1024  # per dataset: the default run's whole file stays inflated
VALIDATE_BLOCK_BYTES = 4 * 1024 * 1024
SPOOL_BLOCK_BYTES = 4 * 1024 * 1024  # CompactWriter copies the spooled streams in blocks this size
WRITE_BATCH = 256  # write_compact's batches: the file does not depend on them


@dataclass(frozen=True)
class Header:
    """The root attributes of a compact file, plus the number of images N.

    `codec` and `quality` are version 2's attributes (a version 1 file reads as codec raw);
    `store_scores` says whether the file has a `scores` dataset; `soft` how it keeps soft labels (version 3;
    None: hard labels only); `version` is the file's schema_version.
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
    soft: SoftSpec | None = None
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
        out |= {"scores": SCORES_V2} if self.store_scores else {}
        if self.soft is not None:
            out["soft_probs"] = BITS_DTYPE[self.soft.bits]
            if self.soft.has_ids(len(self.classes)):
                out["soft_ids"] = ids_dtype(len(self.classes))
        return out

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        """The shape dataset `name` must have (None for `streams`, whose length is offsets[N])."""
        n, k, l, p, c = self.num_images, self.kept_patches, self.num_patches, self.patch_size, self.channels
        soft = (n, self.soft.views, self.soft.stored_k(len(self.classes))) if self.soft is not None else None
        return {"patches": (n, k, p, p, c), "keep": (n, l), "scores": (n, l), "offsets": (n + 1,),
                "streams": None, "soft_probs": soft, "soft_ids": soft}.get(name, (n,))


def _write_attrs(f, header: Header, stats: dict) -> None:
    values = {
        "format": FORMAT,
        "schema_version": np.int64(header.version),
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
    names = ATTRS
    if header.soft is not None:
        values |= {"soft_k": np.int64(header.soft.k), "soft_bits": np.int64(header.soft.bits),
                   "soft_temperature": np.float64(header.soft.temperature),
                   "soft_views": np.int64(header.soft.views)}
        names = ATTRS_V3
    for name in names + ("stats",):  # one fixed order: the object header's bytes depend on it
        f.attrs[name] = values[name]


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
    version = _read_version(f, path)
    attrs = {1: ATTRS_V1, 2: ATTRS}.get(version, ATTRS_V3)
    missing = [a for a in attrs if a not in f.attrs]
    if missing:
        raise DQError(f"{path}: missing root attribute '{missing[0]}'")
    if "labels" not in f:
        raise DQError(f"{path}: missing dataset 'labels'")
    header = _header_from_attrs(f, path, version)
    _check_attrs(f, path, header)
    _check_datasets(f, path, header)
    return header


def _read_version(f, path: Path) -> int:
    """The schema_version of a dq compact file this reader reads, or one DQError line saying why not."""
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
    return int(version)


def _check_datasets(f, path: Path, header: Header) -> None:
    """Every dataset the header implies is present, with its dtype and shape (`streams`: any length)."""
    missing = [d for d in header.datasets() if d not in f]
    if missing:
        raise DQError(f"{path}: missing dataset '{missing[0]}'")
    for name, dtype in header.datasets().items():
        dset, shape = f[name], header.shape_of(name)
        wrong_shape = dset.shape != shape if shape is not None else dset.ndim != 1
        if dset.dtype != dtype or wrong_shape:
            expected = list(shape) if shape is not None else "[B]"
            raise DQError(f"{path}: dataset '{name}' is {dset.dtype} {list(dset.shape)}; expected {dtype} "
                          f"{expected} (N = {header.num_images} from 'labels')")


def _header_from_attrs(f, path: Path, version: int) -> Header:
    try:
        v2 = {"store_scores": True} if version == 1 else {
            "codec": str(f.attrs["codec"]), "quality": int(f.attrs["quality"]), "store_scores": "scores" in f}
        if version >= 3:
            v2["soft"] = SoftSpec(k=int(f.attrs["soft_k"]), bits=int(f.attrs["soft_bits"]),
                                  temperature=float(f.attrs["soft_temperature"]), views=int(f.attrs["soft_views"]))
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
    try:
        grid_of(header.image_size, header.patch_size)  # the rule's one home
    except DQError:
        raise DQError(f"{path}: patch_size {header.patch_size} does not divide image_size {header.image_size}") from None
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
    soft = header.soft
    if soft is not None:
        for name, ok, expected in (("soft_k", soft.k >= 1, "a positive integer"),
                                   ("soft_bits", soft.bits in BITS_DTYPE, "16 or 8"),
                                   ("soft_temperature", math.isfinite(soft.temperature) and soft.temperature > 0,
                                    "a finite number > 0"),
                                   ("soft_views", soft.views in (1, 2), "1 or 2")):
            if not ok:
                raise DQError(f"{path}: attribute {name} = {np.asarray(f.attrs[name]).item()!r}; expected {expected}")


def read_stats(f) -> dict:
    """The optional `stats` attribute of a version 2 file (written by write_compact), or {}."""
    try:
        return json.loads(f.attrs["stats"]) if "stats" in f.attrs else {}
    except (TypeError, ValueError):
        return {}


def row_bytes(dset) -> int:
    return dset.dtype.itemsize * math.prod(dset.shape[1:])


def check_keep(path: Path, keep: np.ndarray, header: Header, offset: int = 0) -> None:
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.ndim != 2 or keep.shape[1] != header.num_patches:
        raise DQError(f"{path}: keep must be bool [N, {header.num_patches}], got {keep.dtype} {list(keep.shape)}")
    counts = keep.sum(axis=1)
    bad = np.flatnonzero(counts != header.kept_patches)
    if bad.size:
        row = int(bad[0])
        raise DQError(f"{path}: keep row {offset + row} has {int(counts[row])} True values; expected exactly "
                      f"K = {header.kept_patches} ({bad.size} rows are wrong)")
