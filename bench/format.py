"""Benchmark of the compact format: read and write throughput, and the GradCAM++ pass.

    python -m bench.format [--data data] [--sizes 1000 4000] [--cam-images 64]

Reads: the same N images through a DataLoader (batch 64, 0/1/2 workers) from
  - the compact file (`dq.format.CompactDataset`),
  - the prepared HDF5 file (`prepared/train.h5` layout, one image per __getitem__: the baseline),
  - PNG files in a torchvision ImageFolder.
Writes: `dq.format.write_compact` (patch extraction + gzip + checksums, no CAM) against
`dq.prepared.write_prepared_v1` (the version 1 single-file layout) and against writing the PNG folder. CAM: `dq.cam.attention_maps` on
efficientnet_lite0 (weights none) with a random probe, at input 32 and 128 (the default).

Images come from `<data>/prepared/train` when it exists (the default run's Fashion-MNIST), else
from a synthetic generator. Every ratio is against the prepared-HDF5 baseline measured in this run at
the same N and the same worker count. Throughput at two N shows how cost grows with N.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# run as a script, bench/ heads sys.path and a sibling bench/select.py would shadow the stdlib module
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dq import cam  # noqa: E402
from dq.format import CompactDataset, Header, write_compact  # noqa: E402
from dq.prepared import Prepared, read_prepared, write_prepared_v1  # noqa: E402

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
    keep = cam.keep_mask(scores, drop)
    header = Header(image_size=size, patch_size=patch_size, channels=3, drop=drop, ratio=1.0, classes=p.classes,
                    source=p.source)
    compact, prepared, pngs = folder / "compact.h5", folder / "prepared.h5", folder / "png"
    args = (p.images, keep, p.labels, np.arange(n), np.zeros(n, np.int32), scores)

    writes = {
        "prepared HDF5": timed(lambda: write_prepared_v1(prepared, p)),
        "compact": timed(lambda: write_compact(compact, header, *args)),
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


def bench_cam(data: Path, n: int) -> None:
    from dq.backbones import classifier_with_probe, create_backbone, normalization

    p = source_images(data, n)
    backbone = create_backbone("efficientnet_lite0", "none")
    probe = np.random.default_rng(0).normal(size=(len(p.classes), backbone.num_features)).astype(np.float32) * 0.05
    model = classifier_with_probe(backbone, probe, np.zeros(len(p.classes), np.float32))
    mean, std = normalization(backbone)
    print(f"\n== GradCAM++ pass, efficientnet_lite0 (weights none), {n} images, batch 32")
    for input_size in (32, 128):
        name, layer = cam.target_layer(backbone, "auto", input_size)
        run = lambda: cam.attention_maps(model, layer, p.images, p.labels, input_size, 32,  # noqa: E731
                                         mean=mean, std=std, progress=False)
        run()  # warm-up: first call pays for lazy imports and allocator growth
        seconds = timed(run, repeat=1)
        print(f"  input {input_size:3d}px, layer {name:9s} {n / seconds:8.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--cam-images", type=int, default=64)
    parser.add_argument("--drop", type=float, default=0.25)
    parser.add_argument("--patch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for n in args.sizes:
        bench_size(args.data, n, args.drop, args.patch_size)
    bench_cam(args.data, args.cam_images)


if __name__ == "__main__":
    main()
