"""Benchmark of the compact format: bytes per codec on natural photos, read and write throughput, CAM.

    python -m bench.format [--photos 400] [--fashion 600] [--read-sizes 2000 8000] [--sizes ...] [--cam-images 64]

Photos (the issue-15 targets): `--photos` crops of the colour photographs shipped inside scikit-image
(astronaut, chelsea, coffee, rocket, motorcycles, retina, hubble, ihc: files in skimage/data), random square crops resized to
224 px and randomly flipped, patch 16, drop 0.25, keep chosen at random (a stand-in for GradCAM++,
which is the same cost for every codec). For every codec it prints the file bytes against a JPEG q90
copy of the same images with nothing dropped (the bare JPEG streams, no container: the smallest
ordinary copy) and against the v1 layout (codec raw: gzip'd raw patches, what version 1 wrote), the
kept-pixel PSNR, and write images/s.

Fashion-MNIST (`--fashion`): the same table on the default run's data (600 images: ratio 0.1 of the
default 6,000), patch 4, the numbers that chose the default codec.

Reads (`--read-sizes`): the photos downscaled to 32 px (patch 4), read through a DataLoader (batch 64,
0/1/2 workers, shuffled) from `dq.compact.CompactDataset` per codec, against the v1 layout at the same
N and worker count, in this process; two N show how cost grows with N. Then JPEG decoding alone:
`dq.data.codec.decode_jpeg_batch` (torchvision, one call per batch) against Pillow one image at a time.
Peak RSS of this process and of its DataLoader workers is printed after each section.

`--sizes` (off by default) runs the older comparison against the prepared HDF5 and a PNG folder;
`--cam-images` the GradCAM++ pass (0: skip).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# run as a script, bench/ heads sys.path: the repository goes there instead, so that `import dq` works
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dq.patches import cam  # noqa: E402

from dq.patches import scorers
from dq.data import codec as codecs  # noqa: E402
from dq.compact.dataset import CompactDataset  # noqa: E402
from dq.compact.reader import read_compact
from dq.compact.schema import Header
from dq.compact.writer import KeptImages, write_compact
from dq.data.prepared import Prepared, read_prepared  # noqa: E402
from dq.data.prepared_writer import write_prepared_v1 as write_prepared  # noqa: E402  the v1 baseline

OUT = Path(__file__).resolve().parent / "out" / "format"
BATCH = 64


class PreparedDataset(Dataset):
    """The baseline: one image per item from a prepared HDF5 file, opened lazily per process, with the
    same care as CompactDataset (cached dataset handle, labels in memory, a large chunk cache)."""

    def __init__(self, path: Path):
        import h5py

        self.path = path
        with h5py.File(path, "r", locking=False) as f:
            self.n = f["labels"].shape[0]
        self._f, self._pid = None, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import h5py

        if self._f is None or self._pid != os.getpid():
            self._f = h5py.File(self.path, "r", locking=False, rdcc_nbytes=64 << 20, rdcc_nslots=100_003)
            self._pid, self._images, self._labels = os.getpid(), self._f["images"], self._f["labels"][:]
        return torch.from_numpy(self._images[i].transpose(2, 0, 1).copy()), torch.tensor(int(self._labels[i]))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_f", "_pid", "_images", "_labels")} | {
            "_f": None, "_pid": None}


def source_images(data: Path, n: int) -> Prepared:
    path = data / "prepared/train"
    if path.is_dir():
        p = read_prepared(path)
        if len(p.labels) >= n:
            return Prepared(p.images[:n], p.labels[:n], p.classes, p.source)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 32.0
    waves = np.sin(rng.uniform(1, 4, (n, 1, 1, 3)) * (6 * xx[None, ..., None] + 3 * yy[None, ..., None])
                   + rng.uniform(0, 6.3, (n, 1, 1, 3)))
    return Prepared((127.5 + 127 * waves).astype(np.uint8), rng.integers(0, 10, n), [str(i) for i in range(10)],
                    "synthetic")


def timed(fn, repeat: int = 2) -> float:
    """Best wall time of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_all(ds, workers: int, shuffle: bool = False) -> int:
    loader = DataLoader(ds, batch_size=BATCH, num_workers=workers, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(0))
    return sum(len(batch[0]) for batch in loader)


def write_png_folder(folder: Path, p: Prepared) -> None:
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    for c in range(len(p.classes)):
        (folder / f"class_{c:03d}").mkdir(parents=True)
    for i, (image, label) in enumerate(zip(p.images, p.labels)):
        Image.fromarray(image).save(folder / f"class_{int(label):03d}" / f"{i:06d}.png")


def bench_size(data: Path, n: int, drop: float, patch_size: int) -> None:
    from torchvision import datasets, transforms

    p = source_images(data, n)
    folder = OUT / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    size = p.images.shape[1]
    scores = np.random.default_rng(0).random((n, (size // patch_size) ** 2), dtype=np.float32)
    keep = scorers.keep_mask(scores, drop)
    header = Header(image_size=size, patch_size=patch_size, channels=3, drop=drop, ratio=1.0, classes=p.classes,
                    source=p.source)
    compact, prepared, pngs = folder / "compact.h5", folder / "prepared.h5", folder / "png"
    args = (p.images, keep, p.labels, np.arange(n), np.zeros(n, np.int32), scores)

    writes = {
        "prepared HDF5": timed(lambda: write_prepared(prepared, p)),
        "compact": timed(lambda: write_compact(compact, header, KeptImages(*args))),
        "PNG folder": timed(lambda: write_png_folder(pngs, p), repeat=1),
    }
    print(f"\n== N = {n} images {size}x{size}, {p.source}; drop {drop}, patch {patch_size}")
    import h5py

    with h5py.File(compact, "r") as f, h5py.File(prepared, "r") as g:
        stored = {name: f[name].id.get_storage_size() for name in f}
        images_stored = g["images"].id.get_storage_size()
    print(f"bytes: compact file {compact.stat().st_size:,} (patches {stored['patches']:,}, scores "
          f"{stored['scores']:,}, keep {stored['keep']:,}); prepared HDF5 {prepared.stat().st_size:,} (images "
          f"{images_stored:,}); PNG files {sum(f.stat().st_size for f in pngs.rglob('*.png')):,}")
    print("write          images/s   vs prepared HDF5")
    for name, seconds in writes.items():
        print(f"  {name:13s} {n / seconds:9.0f}   {writes['prepared HDF5'] / seconds:6.2f}x")

    readers = {
        "prepared HDF5": PreparedDataset(prepared),
        "compact": CompactDataset(compact),
        "PNG folder": datasets.ImageFolder(str(pngs), transform=transforms.PILToTensor()),
    }
    print("read (batch 64)    " + "  ".join(f"{name:>22s}" for name in readers))
    for workers, shuffle in ((0, False), (1, False), (2, False), (0, True), (2, True)):
        rates = {}
        for name, ds in readers.items():
            seconds = timed(lambda: read_all(ds, workers, shuffle))
            rates[name] = n / seconds
        base = rates["prepared HDF5"]
        label = f"{workers} workers{', shuffled' if shuffle else ''}"
        print(f"  {label:18s}" + "  ".join(f"{r:9.0f}/s ({r / base:5.2f}x)" for r in rates.values()))

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "retina.jpg", "hubble_deep_field.jpg", "ihc.png")  # the colour photos in skimage/data/, no download
CODECS = (("raw", 90), ("png", 90), ("webp-lossless", 90), ("webp", 90), ("jpeg", 90), ("jpeg", 75))


def photo_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: random square crops (side 224 px up to the photo's short side) of
    scikit-image's colour photos, resized to `size` (bicubic) and flipped left-right half the time."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    photos = [np.asarray(Image.open(folder / name).convert("RGB")) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(224, h, w), min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side]))
        crop = np.asarray(crop.resize((size, size), Image.BICUBIC))
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def peak_rss() -> str:
    """Peak resident memory of this process and of its (finished) children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return f"peak RSS: this process {own:.0f} MiB, largest DataLoader worker {kids:.0f} MiB"


def write_codec_file(path: Path, images: np.ndarray, keep: np.ndarray, patch_size: int, drop: float,
                     codec: str, quality: int) -> tuple[float, dict]:
    """(seconds, stats) of writing one compact file of `images` with `codec`."""
    n, size = images.shape[:2]
    header = Header(image_size=size, patch_size=patch_size, channels=3, drop=drop, ratio=1.0,
                    classes=[str(i) for i in range(10)], source="photos", codec=codec, quality=quality)
    labels = np.arange(n, dtype=np.int64) % 10
    start = time.perf_counter()
    stats = write_compact(path, header, KeptImages(images, keep, labels, np.arange(n), np.zeros(n, np.int32),
                                                   np.zeros(keep.shape, np.float32)))
    return time.perf_counter() - start, stats


def bench_photos(n: int, drop: float) -> None:
    """Bytes of every codec on n photo crops at 224 px, against a JPEG q90 copy and the v1 layout."""
    images = photo_crops(n, 224)
    bench_bytes(images, 16, drop, "photos", f"photos: {n} crops of {len(PHOTOS)} scikit-image photos")


def bench_fashion(n: int, drop: float) -> None:
    """The same table on the default run's data: n Fashion-MNIST training images as `prepare` makes them."""
    from dq.data.sources import load_fashion_mnist
    from dq.params import DataParams

    images = load_fashion_mnist(DataParams(train_limit=n), "train").images
    bench_bytes(images, 4, drop, "fashion", f"Fashion-MNIST: {n} training images as the default prepare makes them")


def bench_bytes(images: np.ndarray, patch: int, drop: float, name: str, title: str) -> None:
    """Bytes of every codec on `images` [N, S, S, 3], against a JPEG q90 copy and the v1 layout."""
    n, size = images.shape[:2]
    keep = scorers.keep_mask(np.random.default_rng(1).random((n, (size // patch) ** 2), dtype=np.float32), drop)
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    jpeg_copy = sum(len(codecs.encode(image, "jpeg", 90)) for image in images)
    raw = images.nbytes
    print(f"\n== {title}, {size}x{size}, patch {patch}, drop {drop} (keep at random)")
    print(f"raw pixels {raw:,} bytes; JPEG q90 copy, nothing dropped: {jpeg_copy:,} bytes ({jpeg_copy / raw:.3f} of raw)")
    print(f"  {'codec':16s} {'file bytes':>12s} {'/raw px':>8s} {'vs JPEG q90 copy':>17s} {'vs v1 (raw)':>12s} "
          f"{'PSNR kept dB':>13s} {'write img/s':>12s}  {'sha256 read':16s}")
    v1 = None
    for codec, quality in CODECS:
        path = folder / f"{codec}-q{quality}.h5"
        seconds, stats = write_codec_file(path, images, keep, patch, drop, codec, quality)
        size_bytes = path.stat().st_size
        v1 = v1 or size_bytes  # raw comes first
        psnr = stats["kept_pixel_psnr"]
        name = codec if codecs.is_lossless(codec) else f"{codec} q{quality}"
        digest = hashlib.sha256(read_compact(path).images().tobytes()).hexdigest()[:16]
        print(f"  {name:16s} {size_bytes:12,d} {size_bytes / raw:8.3f} {size_bytes / jpeg_copy:16.3f}x "
              f"{size_bytes / v1:11.3f}x {'exact' if psnr is None else f'{psnr:.2f}':>13s} {n / seconds:12.1f}  "
              f"{digest}")
    print("  (last column: SHA-256 of the decoded images, dropped pixels zero: what training reads)")
    print(peak_rss())


def bench_reads(sizes: list[int], drop: float) -> None:
    """Images/s reading 32-px photo crops per codec and worker count, against the v1 layout (raw)."""
    size, patch = 32, 4
    folder = OUT / "reads"
    folder.mkdir(parents=True, exist_ok=True)
    codecs_read = (("raw", 90), ("png", 90), ("webp-lossless", 90), ("jpeg", 90))
    for n in sizes:
        images = photo_crops(n, size, seed=n)
        keep = scorers.keep_mask(np.random.default_rng(2).random((n, (size // patch) ** 2), dtype=np.float32), drop)
        print(f"\n== reads: N = {n} photo crops at {size}x{size}, patch {patch}, drop {drop}; DataLoader batch "
              f"{BATCH}, shuffled; images/s (vs the v1 layout at the same workers)")
        datasets = {}
        writes = {}
        for codec, quality in codecs_read:
            path = folder / f"n{n}-{codec}.h5"
            writes[codec], _ = write_codec_file(path, images, keep, patch, drop, codec, quality)
            datasets[codec] = CompactDataset(path)
        print("  write img/s     " + "  ".join(f"{c:>20s}" for c in writes))
        print("                  " + "  ".join(f"{n / s:9.0f} ({writes['raw'] / s:5.2f}x)  " for s in writes.values()))
        for workers in (0, 1, 2):
            rates = {c: n / timed(lambda: read_all(ds, workers, shuffle=True)) for c, ds in datasets.items()}
            print(f"  {workers} workers       " + "  ".join(f"{r:9.0f} ({r / rates['raw']:5.2f}x)  "
                                                     for r in rates.values()))
        print(peak_rss())
    bench_jpeg_decode(sizes[0])


def bench_jpeg_decode(n: int) -> None:
    """decode_jpeg_batch (torchvision, batches of 64) against Pillow one by one, at 32 and 224 px."""
    print("\n== JPEG q90 decoding alone, one thread: images/s")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for size, count in ((32, n), (224, min(n, 400))):
        images = photo_crops(count, size, seed=7)
        streams = [codecs.encode(image, "jpeg", 90) for image in images]
        shape = (size, size, 3)
        batched = timed(lambda: [codecs.decode_jpeg_batch(streams[i:i + BATCH], shape)
                                 for i in range(0, count, BATCH)])
        pillow = timed(lambda: [codecs.decode(s, "jpeg", shape) for s in streams])
        print(f"  {size:3d} px: torchvision batch {count / batched:8.0f}/s, Pillow {count / pillow:8.0f}/s "
              f"({pillow / batched:.2f}x)")
    torch.set_num_threads(threads)


def bench_cam(data: Path, n: int) -> None:
    from dq.features.backbones import classifier_with_probe, create_backbone, normalization

    p = source_images(data, n)
    backbone = create_backbone("efficientnet_lite0", "none")
    probe = np.random.default_rng(0).normal(size=(len(p.classes), backbone.num_features)).astype(np.float32) * 0.05
    model = classifier_with_probe(backbone, probe, np.zeros(len(p.classes), np.float32))
    mean, std = normalization(backbone)
    print(f"\n== GradCAM++ pass, efficientnet_lite0 (weights none), {n} images, batch 32")
    for input_size in (32, 128):
        name, layer = cam.target_layer(backbone, "auto", input_size)
        probed = scorers.ProbedModel(model, layer, input_size, 32, progress=False)
        run = lambda: cam.attention_maps(probed, p.images, p.labels, mean=mean, std=std)  # noqa: E731
        run()  # warm-up: first call pays for lazy imports and allocator growth
        seconds = timed(run, repeat=1)
        print(f"  input {input_size:3d}px, layer {name:9s} {n / seconds:8.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--photos", type=int, default=400, help="photo crops at 224 px (0: skip)")
    parser.add_argument("--fashion", type=int, default=600, help="Fashion-MNIST images (0: skip)")
    parser.add_argument("--read-sizes", type=int, nargs="*", default=[2000, 8000])
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="the older prepared/PNG comparison")
    parser.add_argument("--cam-images", type=int, default=0)
    parser.add_argument("--drop", type=float, default=0.25)
    parser.add_argument("--patch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.photos:
        bench_photos(args.photos, args.drop)
    if args.fashion:
        bench_fashion(args.fashion, args.drop)
    if args.read_sizes:
        bench_reads(args.read_sizes, args.drop)
    for n in args.sizes:
        bench_size(args.data, n, args.drop, args.patch_size)
    if args.cam_images:
        bench_cam(args.data, args.cam_images)


if __name__ == "__main__":
    main()
