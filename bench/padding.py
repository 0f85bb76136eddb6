"""What the padding of dropped pixels costs each codec, and whether dropping patches pays for itself.

    python -m bench.padding [--data data] [--photos 400] [--drops 0.25 0.5]

A compact store encodes each kept image whole, its dropped patches padded with something the reader
masks out again (dq.data.codec.encode_dropped). The padding decides the bytes. For every codec this prints the
image streams' bytes under each candidate padding, as a share of the same images' streams with nothing
dropped (drop 0), on two sets:

- the default data: the compact store's own images and keep masks from `--data` (a `dvc repro` of the
  defaults: 600 Fashion-MNIST images, 32 px, patch 4, gradcam++-flat-first at drop 0.25); other drops
  take pixel-std masks of the same images;
- photos: `--photos` crops of scikit-image's colour photos at 224 px (bench/format.py's), patch 16,
  keep at random (as bench/format.py does: the scorer costs every codec the same).

Candidates: `zero` and `block` (the product's, dq.data.codec.PADDINGS), and the ones that lost: the mean kept
colour (the padding before), the nearest kept pixel, left and up runs (the last kept pixel of the row or
column repeated: what a PNG/VP8L left or top predictor turns into zero residuals), and a smooth harmonic
inpainting (Laplace's equation with the kept pixels as the boundary). `product` is what the writer does
(the shortest of the codec's `pads` per image). Then the whole compact FILE (streams, keep
masks, offsets, header: what a user stores) with drop d against drop 0, written by dq.compact.writer.write_compact
with the product's padding and no scores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from dq.patches import scorers  # noqa: E402
from dq.data import codec as codecs  # noqa: E402
from dq.compact.schema import Header  # noqa: E402
from dq.compact.writer import KeptImages, write_compact
from dq.patches.grid import pixel_keep  # noqa: E402

CODECS = (("png", 90), ("webp-lossless", 90), ("webp", 90), ("jpeg", 90), ("jpeg", 50))
OUT = Path(__file__).resolve().parent / "out" / "padding"


def mean_pad(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    kept = image[keep]
    colour = np.rint(kept.mean(axis=0)).astype(np.uint8) if kept.size else np.zeros(image.shape[2], np.uint8)
    return np.where(keep[..., None], image, colour)


def nearest_pad(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if keep.all() or not keep.any():
        return image.copy()
    _, (rows, cols) = ndimage.distance_transform_edt(~keep, return_indices=True)
    return image[rows, cols]


def left_pad(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each dropped pixel repeats the last kept pixel to its left in its row (the first kept one to its right
    at the row's start; the nearest kept pixel in a row with none)."""
    h, w = keep.shape
    cols = np.arange(w)[None, :]
    left = np.maximum.accumulate(np.where(keep, cols, -1), axis=1)
    right = np.minimum.accumulate(np.where(keep, cols, w)[:, ::-1], axis=1)[:, ::-1]
    source = np.where(left >= 0, left, np.where(right < w, right, -1))
    out = nearest_pad(image, keep)
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    ok = ~keep & (source >= 0)
    out[ok] = image[rows[ok], source[ok]]
    return out


def up_pad(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(left_pad(image.transpose(1, 0, 2), keep.T).transpose(1, 0, 2))


def smooth_pad(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Harmonic inpainting: the dropped pixels solve Laplace's equation, the kept ones are the boundary."""
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    if keep.all() or not keep.any():
        return image.copy()
    h, w = keep.shape
    unknown = ~keep
    n = int(unknown.sum())
    ids = np.full((h, w), -1, np.int64)
    ids[unknown] = np.arange(n)
    ys, xs = np.nonzero(unknown)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    degree = np.zeros(n)
    rhs = np.zeros((n, image.shape[2]))
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        ny, nx = ys + dy, xs + dx
        inside = np.flatnonzero((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w))
        degree[inside] += 1
        free = unknown[ny[inside], nx[inside]]
        rows.append(inside[free])
        cols.append(ids[ny[inside[free]], nx[inside[free]]])
        vals.append(-np.ones(int(free.sum())))
        fixed = inside[~free]
        np.add.at(rhs, fixed, image[ny[fixed], nx[fixed]].astype(np.float64))
    a = sparse.csc_matrix((np.concatenate([degree] + vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, n))
    out = image.copy()
    out[unknown] = np.clip(np.rint(spsolve(a, rhs).reshape(n, -1)), 0, 255).astype(np.uint8)
    return out


CANDIDATES = {**codecs.PADDINGS, "mean": mean_pad, "nearest": nearest_pad, "left": left_pad, "up": up_pad,
              "smooth": smooth_pad}


def padding_table(images: np.ndarray, masks: dict[float, np.ndarray], patch: int, title: str) -> None:
    """Stream bytes per codec and padding, as a share of the drop-0 streams; `masks` maps drop -> keep [N, L]."""
    n, size = images.shape[:2]
    print(f"\n== {title}: {n} images, {size} px, patch {patch}; image streams vs drop 0 (lower is better)")
    padded = {}
    for drop, keep in masks.items():
        pixels = pixel_keep(keep, patch, size)
        for name, pad in CANDIDATES.items():
            start = time.perf_counter()
            padded[drop, name] = [pad(image, mask) for image, mask in zip(images, pixels)]
            print(f"  padding {name:8s} drop {drop}: {(time.perf_counter() - start) / n * 1e3:6.2f} ms/image")
    for codec, quality in CODECS:
        label = codec if codecs.is_lossless(codec) else f"{codec} q{quality}"
        base = sum(len(codecs.encode(image, codec, quality)) for image in images)
        line = f"  {label:14s} drop 0 {base:11,d} B"
        for drop, keep in masks.items():
            pixels = pixel_keep(keep, patch, size)
            sizes = {name: sum(len(codecs.encode(f, codec, quality)) for f in padded[drop, name])
                     for name in CANDIDATES}
            product = sum(len(codecs.encode_dropped(image, mask, codec, quality))
                          for image, mask in zip(images, pixels))
            line += f" | drop {drop}: " + " ".join(f"{k} {v / base:.3f}" for k, v in sizes.items())
            line += f" product {product / base:.3f}"
        print(line, flush=True)


def file_table(images: np.ndarray, masks: dict[float, np.ndarray], patch: int, title: str) -> None:
    """Whole compact files (the product's padding, no scores) with drop d against drop 0, every codec."""
    n, size = images.shape[:2]
    OUT.mkdir(parents=True, exist_ok=True)
    labels, rows = np.arange(n, dtype=np.int64) % 10, np.arange(n, dtype=np.int64)
    print(f"\n== {title}: whole compact files, drop d / drop 0")
    for codec, quality in (("raw", 90),) + CODECS:
        label = codec if codecs.is_lossless(codec) else f"{codec} q{quality}"
        sizes = {}
        for drop, keep in {0.0: np.ones_like(next(iter(masks.values()))), **masks}.items():
            header = Header(image_size=size, patch_size=patch, channels=3, drop=drop, ratio=1.0,
                            classes=[str(i) for i in range(10)], source="bench", codec=codec, quality=quality)
            path = OUT / f"{title.split(':')[0]}-{codec}{quality}-d{drop}.h5"
            write_compact(path, header, KeptImages(images, keep, labels, rows, np.zeros(n, np.int32)))
            sizes[drop] = path.stat().st_size
        print(f"  {label:14s} drop 0 {sizes[0.0]:11,d} B | "
              + " | ".join(f"drop {d}: {s:11,d} B = {s / sizes[0.0]:.4f}x" for d, s in sizes.items() if d),
              flush=True)


def default_data(data: Path, drops: list[float]) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """The default run's compact images (original pixels) and keep masks; pixel-std masks for other drops."""
    from dq.compact.reader import read_compact
    from dq.data.prepared import read_images

    compact = read_compact(data / "compact" / "dataset.h5")
    images = read_images(data / "prepared" / "train", compact.indices)
    std = scorers.pixel_std_scores(images, compact.header.patch_size)
    masks = {d: compact.keep if d == compact.header.drop else scorers.keep_mask(std, d) for d in drops}
    return images, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--photos", type=int, default=400, help="photo crops at 224 px (0: skip)")
    parser.add_argument("--drops", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args()
    from bench.format import photo_crops

    images, masks = default_data(args.data, args.drops)
    padding_table(images, masks, 4, "default data")
    file_table(images, masks, 4, "default data")
    if args.photos:
        photos = photo_crops(args.photos, 224)
        draw = np.random.default_rng(1).random((args.photos, (224 // 16) ** 2), dtype=np.float32)
        photo_masks = {d: scorers.keep_mask(draw, d) for d in args.drops}
        padding_table(photos, photo_masks, 16, "photos")
        file_table(photos, photo_masks, 16, "photos")


if __name__ == "__main__":
    main()
