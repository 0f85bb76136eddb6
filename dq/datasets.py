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

from dq.errors import DQError, first_line
from dq.prepared import Prepared
from dq.params import DataParams

log = logging.getLogger("dq.datasets")

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


def load_fashion_mnist(params: DataParams, split: str) -> Prepared:
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
    images, labels = images[keep], labels[keep]
    pad = max(0, (32 - images.shape[1]) // 2)
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    images = np.repeat(images[..., None], 3, axis=3)
    return Prepared(resize_square(images, params.image_size), labels, list(FASHION_MNIST_CLASSES),
                    "fashion-mnist")


def _limit(params: DataParams, split: str) -> int | None:
    return params.train_limit if split == "train" else params.test_limit


# ---------------------------------------------------------------------------------------------- cifar

def load_cifar(params: DataParams, split: str) -> Prepared:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if params.source == "cifar10" else CIFAR100
    if not params.root:
        raise DQError(f"data.root: null is not allowed for {params.source}; expected the folder that holds "
                      f"(or will hold, with data.download: true) torchvision's {params.source} files")
    try:
        ds = cls(params.root, train=(split == "train"), download=params.download)
    except RuntimeError as exc:
        raise DQError(f"data.root: {params.root}: {exc} (set data.download: true to fetch it)") from None
    images = np.asarray(ds.data, np.uint8)
    labels = np.asarray(ds.targets, np.int64)
    keep = balanced_subset(labels, _limit(params, split), len(ds.classes))
    return Prepared(resize_square(images[keep], params.image_size), labels[keep], list(ds.classes),
                    params.source)


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


def load_imagefolder(params: DataParams, split: str, report: LoadReport) -> Prepared:
    from tqdm import tqdm

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
    images, kept_labels = [], []
    for i in tqdm(keep, desc=f"decode {split}", unit="img", mininterval=1.0):
        path = files[i]
        try:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DQError(f"{path}: not an image file (extension {path.suffix or 'none'!r}); expected one "
                              f"of {', '.join(sorted(IMAGE_EXTENSIONS))}")
            images.append(decode_image(path, params.image_size))
        except DQError:
            if not params.skip_bad:
                raise
            report.skipped.append(str(path))
            continue
        kept_labels.append(labels[i])
    if not images:
        raise DQError(f"{base}: no readable images")
    return Prepared(np.stack(images), np.asarray(kept_labels, np.int64), classes, "imagefolder")


# ------------------------------------------------------------------------------------------ synthetic

def load_synthetic(params: DataParams, split: str) -> Prepared:
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
    return Prepared(images, labels, [f"class_{k}" for k in range(c)], "synthetic")


# ------------------------------------------------------------------------------------------- dispatch

def load_split(params: DataParams, split: str, report: LoadReport | None = None) -> Prepared:
    """Load the `train` or `test` split of the configured source as a Prepared split."""
    report = report if report is not None else LoadReport()
    if split not in ("train", "test"):
        raise ValueError(split)
    if params.source == "fashion-mnist":
        out = load_fashion_mnist(params, split)
    elif params.source in ("cifar10", "cifar100"):
        out = load_cifar(params, split)
    elif params.source == "imagefolder":
        out = load_imagefolder(params, split, report)
    else:
        out = load_synthetic(params, split)
    present = np.unique(out.labels)
    if split == "train" and len(present) < 2:
        raise DQError(f"data.source: {params.source} gave {len(present)} class(es) in the training set; "
                      f"expected at least 2 classes")
    return out
