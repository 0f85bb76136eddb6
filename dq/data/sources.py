"""Data sources → canonical prepared splits: uint8 images [N, S, S, 3], int64 labels [N], class names.

Sources (`data.source`):
- `fashion-mnist`: gzip (or plain) IDX files, by default Debian's `dataset-fashion-mnist` under
  /usr/share/datasets/fashion-mnist. The 28×28 grey images are zero-padded to 32×32 and repeated to
  3 channels (then resized if `data.image_size` is not 32).
- `cifar10`, `cifar100`: torchvision's layout under `data.root`; downloaded only with `data.download`.
- `imagefolder`: `data.root/train/<class>/*` and `data.root/val/<class>/*` (or `test/`), ImageNet's
  layout. Resize rule: scale the shorter side to `data.image_size` (bicubic, antialiased), then take the
  centre square. Grey, palette, CMYK and 16-bit images are converted to 8-bit RGB (16-bit values are
  scaled by 1/256); an alpha channel is composited onto black.
- `synthetic`: generated class patterns, for tests and demos.

Each source is an entry of the registry `SOURCES` (dq.core.registry): a function `(params, split) -> Source`
that declares whether it needs `data.root` (`needs_root`, checked with the params) and how to estimate
the bytes of its source files (`source_bytes`, `(params, n) -> (bytes or None, how)`, the compact store's
"vs the source" figure). Adding a source is one function:

    @SOURCES.register("noise", source_bytes=lambda params, n: (None, "noise: no source files"))
    def noise(params, split):
        n = params.synthetic_train if split == "train" else params.synthetic_test
        images = np.random.default_rng(0).integers(0, 256, (n, params.image_size, params.image_size, 3), np.uint8)
        return Source(["a", "b"], "noise", np.arange(n) % 2, params.image_size, ArrayItems(images))

`data.train_limit`/`data.test_limit` keep a deterministic class-balanced subset: each class keeps its
first items in the source's order (file order; sorted paths for imagefolder), with the quota split as
evenly as possible (the first `limit % C` classes take one more).
"""
from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

from dq.core.errors import DQError, first_line
from dq.data.prepared import Prepared
from dq.core.registry import Registry

if TYPE_CHECKING:  # dq.params imports this module for SOURCES
    from dq.params import DataParams


def _no_files(params: "DataParams", n: int) -> tuple[int | None, str]:
    return None, f"{params.source}: no source files"


SOURCES = Registry("data source", "data.source", needs_root=False, source_bytes=_no_files)

log = logging.getLogger("dq.data.sources")

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm"}


@dataclass
class LoadReport:
    """What a load skipped, for the stage's log."""

    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- helpers

def balanced_subset(labels: np.ndarray, limit: int | None, num_classes: int) -> np.ndarray:
    """Indices (sorted) of a deterministic class-balanced subset of at most `limit` items."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    quota = np.full(num_classes, limit // num_classes)
    quota[: limit % num_classes] += 1
    keep = [np.flatnonzero(labels == c)[: quota[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(keep))


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize square uint8 images [N, s, s, 3] to [N, size, size, 3] (bicubic, antialiased)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return out


# ---------------------------------------------------------------------------------------- fashion-mnist

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) of unsigned bytes into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DQError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4:
        raise DQError(f"{path}: not an IDX file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim < 1:
        raise DQError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DQError(f"{path}: IDX header declares {dims} but holds {body.size} bytes; the file is truncated")
    return body.reshape(dims)


def _idx_path(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DQError(f"data.root: {root} has no {stem}.gz (Fashion-MNIST IDX files); install Debian's "
                  f"dataset-fashion-mnist or point data.root at the folder")


def _fashion_mnist_bytes(params: "DataParams", n: int) -> tuple[int | None, str]:
    """n x the mean bytes per image of the training IDX file (gzip'd or not): its size over its image count."""
    root = Path(params.root) if params.root else FASHION_MNIST_ROOT
    for name, opener in (("train-images-idx3-ubyte.gz", gzip.open), ("train-images-idx3-ubyte", open)):
        path = root / name
        if path.is_file():
            with opener(path, "rb") as fh:
                count = int.from_bytes(fh.read(8)[4:8], "big")  # IDX header: magic, then the image count
            return round(n * path.stat().st_size / max(count, 1)), f"{n} x mean bytes per image of {path}"
    return None, f"no Fashion-MNIST IDX file under {root}"


@SOURCES.register("fashion-mnist", source_bytes=_fashion_mnist_bytes)
def fashion_mnist_source(params: "DataParams", split: str) -> "Source":
    """The IDX arrays are small (47 MB for all 60,000), so they are read whole; each item is padded,
    repeated to 3 channels and resized on its own (in a DataLoader worker)."""
    root = Path(params.root) if params.root else FASHION_MNIST_ROOT
    if not root.is_dir():
        raise DQError(f"data.root: {root} does not exist; install Debian's dataset-fashion-mnist "
                      f"(apt-get install dataset-fashion-mnist) or set data.root")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DQError(f"data.root: {root}: {prefix} images {images.shape} and labels {labels.shape} disagree")
    keep = balanced_subset(labels, _limit(params, split), len(FASHION_MNIST_CLASSES))
    return Source(list(FASHION_MNIST_CLASSES), "fashion-mnist", labels[keep], params.image_size,
                  ArrayItems(images[keep], pad_to=32))


def _limit(params: "DataParams", split: str) -> int | None:
    return params.train_limit if split == "train" else params.test_limit


# ---------------------------------------------------------------------------------------------- cifar

def _cifar_bytes(params: "DataParams", n: int) -> tuple[int | None, str]:
    return n * 32 * 32 * 3, f"{n} x 3072 raw bytes per image (torchvision's CIFAR pickles)"


@SOURCES.register("cifar100", source_bytes=_cifar_bytes)
@SOURCES.register("cifar10", source_bytes=_cifar_bytes)
def cifar_source(params: "DataParams", split: str) -> "Source":
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if params.source == "cifar10" else CIFAR100
    if not params.root:
        raise DQError(f"data.root: null is not allowed for {params.source}; expected the folder that holds "
                      f"(or will hold, with data.download: true) torchvision's {params.source} files")
    try:
        ds = cls(params.root, train=(split == "train"), download=params.download)
    except RuntimeError as exc:
        raise DQError(f"data.root: {params.root}: {exc} (set data.download: true to fetch it)") from None
    labels = np.asarray(ds.targets, np.int64)
    keep = balanced_subset(labels, _limit(params, split), len(ds.classes))
    return Source(list(ds.classes), params.source, labels[keep], params.image_size,
                  ArrayItems(np.asarray(ds.data, np.uint8)[keep]))


# ---------------------------------------------------------------------------------------- imagefolder

def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode any image file to uint8 [size, size, 3] by the module's resize rule; DQError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DQError(f"{path}: not a readable image ({first_line(exc)})") from None
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dir(root: Path, split: str) -> Path:
    names = ["train"] if split == "train" else ["val", "test"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DQError(f"data.root: {root} has no {' or '.join(n + '/' for n in names)} folder; expected "
                  f"{root}/train/<class>/* and {root}/val/<class>/* (ImageNet's layout)")


def _imagefolder_bytes(params: "DataParams", n: int) -> tuple[int | None, str]:
    files = [p for p in (Path(params.root) / "train").glob("*/*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if files:
        mean = sum(p.stat().st_size for p in files) / len(files)
        return round(n * mean), f"{n} x mean bytes of the {len(files)} image files under {params.root}/train"
    return None, f"no image files under {params.root}/train"


@SOURCES.register("imagefolder", needs_root=True, source_bytes=_imagefolder_bytes)
def imagefolder_source(params: "DataParams", split: str) -> "Source":
    """Only the sorted file list is held; files are decoded one by one as the loader asks for them."""
    root = Path(params.root)
    if not root.is_dir():
        raise DQError(f"data.root: {root} does not exist; expected a folder with train/ and val/ class folders")
    classes = [p.name for p in _class_folders(_split_dir(root, "train"))]
    if len(classes) < 2:
        raise DQError(f"data.root: {root}/train has {len(classes)} class folder(s); expected at least 2 classes")
    base = _split_dir(root, split)
    files, labels = [], []
    for c, name in enumerate(classes):
        folder = base / name
        if not folder.is_dir():
            if split == "train":
                raise DQError(f"{folder}: class folder missing")
            continue
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not entries:
            raise DQError(f"{folder}: empty class folder; expected at least one image")
        files += entries
        labels += [c] * len(entries)
    unknown = sorted(p.name for p in _class_folders(base) if p.name not in classes)
    if unknown:
        raise DQError(f"{base}: class folder {unknown[0]!r} does not exist in {root}/train")
    labels = np.asarray(labels, np.int64)
    keep = balanced_subset(labels, _limit(params, split), len(classes))
    return Source(classes, "imagefolder", labels[keep], params.image_size, FileItems([files[i] for i in keep]))


def image_file(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3] of one source file; DQError naming the file if it is not a readable image."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DQError(f"{path}: not an image file (extension {path.suffix or 'none'!r}); expected one "
                      f"of {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return decode_image(path, size)


# ------------------------------------------------------------------------------------------ synthetic

def synthetic_split(params: "DataParams", split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class c: a bright square of class colour at a class-specific place, jittered, on noise.

    Learnable but not trivial, with within-class variety (position, size, brightness) so that
    selection has structure to find. Fixed seeds: the same params give the same pixels.
    """
    n = params.synthetic_train if split == "train" else params.synthetic_test
    n = min(n, _limit(params, split) or n)
    c, s = params.synthetic_classes, params.image_size
    rng = np.random.default_rng(1234 if split == "train" else 5678)
    labels = np.arange(n, dtype=np.int64) % c
    palette = np.random.default_rng(42).integers(60, 256, size=(c, 3))
    images = rng.normal(40, 20, size=(n, s, s, 3))
    angles = 2 * np.pi * np.arange(c) / c
    for i, y in enumerate(labels):
        side = int(rng.integers(s // 5, s // 3 + 1))
        cy = s / 2 + s / 4 * np.sin(angles[y]) + rng.normal(0, s / 16)
        cx = s / 2 + s / 4 * np.cos(angles[y]) + rng.normal(0, s / 16)
        y0 = int(np.clip(cy - side / 2, 0, s - side))
        x0 = int(np.clip(cx - side / 2, 0, s - side))
        images[i, y0:y0 + side, x0:x0 + side] += palette[y] * rng.uniform(0.6, 1.0)
    images = np.clip(images, 0, 255).astype(np.uint8)
    return images, labels, [f"class_{k}" for k in range(c)]


@SOURCES.register("synthetic")
def synthetic_source(params: "DataParams", split: str) -> "Source":
    images, labels, classes = synthetic_split(params, split)
    return Source(classes, "synthetic", labels, params.image_size, ArrayItems(images))


# ------------------------------------------------------------------------------------------- items

@dataclass
class ArrayItems:
    """Items of an in-memory uint8 array [N, h, w] or [N, h, w, 3] (small sources: Fashion-MNIST, CIFAR)."""

    images: np.ndarray
    pad_to: int = 0  # zero-pad grey images to this side (Fashion-MNIST's 28 → 32)

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return f"row {i}"

    def image(self, i: int, size: int) -> np.ndarray:
        img = self.images[i]
        if img.ndim == 2:
            pad = max(0, (self.pad_to - img.shape[0]) // 2)
            img = np.repeat(np.pad(img, ((pad, pad), (pad, pad)))[..., None], 3, axis=2)
        return resize_square(img[None], size)[0]


@dataclass
class FileItems:
    """Items that are image files, decoded when asked for (image folders: never all in memory)."""

    files: list[Path]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.files[i])

    def image(self, i: int, size: int) -> np.ndarray:
        return image_file(self.files[i], size)


@dataclass
class Source:
    """One split of a source before decoding: class names, labels int64 [n], and the items to decode."""

    classes: list[str]
    source: str
    labels: np.ndarray
    image_size: int
    items: ArrayItems | FileItems

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> np.ndarray:
        """uint8 [S, S, 3] of item i, or a DQError naming it."""
        return self.items.image(i, self.image_size)


def check_classes(params: "DataParams", split: str, labels: np.ndarray) -> None:
    present = np.unique(labels)
    if split == "train" and len(present) < 2:
        raise DQError(f"data.source: {params.source} gave {len(present)} class(es) in the training set; "
                      f"expected at least 2 classes")


# ------------------------------------------------------------------------------------------- dispatch

def split_source(params: DataParams, split: str) -> Source:
    """The `train` or `test` split of the configured source, before decoding."""
    if split not in ("train", "test"):
        raise ValueError(split)
    return SOURCES.get(params.source).obj(params, split)


def source_bytes(params: "DataParams", n: int) -> tuple[int | None, str]:
    """(bytes of the source files of `n` training images, how they were counted), an estimate.

    The prepared store keeps no file names, so this is `n` times the mean bytes per source image, as the
    source's `source_bytes` trait counts it (Fashion-MNIST: its gzip IDX file over its image count; an image
    folder: its train files over their number; CIFAR: 3072 raw bytes, torchvision's pickles are raw).
    """
    return SOURCES.get(params.source).source_bytes(params, n)


def load_split(params: DataParams, split: str, report: LoadReport | None = None) -> Prepared:
    """The whole split decoded in memory (tests and small sources; the prepare stage streams instead)."""
    report = report if report is not None else LoadReport()
    source = split_source(params, split)
    images, labels = [], []
    for i in range(len(source)):
        try:
            images.append(source.image(i))
        except DQError:
            if not params.skip_bad or source.source != "imagefolder":
                raise
            report.skipped.append(source.items.name(i))
            continue
        labels.append(int(source.labels[i]))
    if not images:
        raise DQError(f"{source.source}: no readable images")
    labels = np.asarray(labels, np.int64)
    check_classes(params, split, labels)
    return Prepared(np.stack(images), labels, source.classes, source.source)
