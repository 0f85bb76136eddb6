"""Benchmark of the export stage on 224-px photo-like images: speed, memory flat in N, bytes per format.

    python -m bench.export [--sizes 1000 16000] [--out /tmp/dq-export]

For each N it builds, offline and batch by batch, the inputs the export stage reads at ImageNet's shape:
a prepared train and test store (N and N/10 crops of scikit-image's colour photos, bench.format's
`photo_crops` at 224 px, stored as jpeg q90 as configs/imagenet.yaml does), a compact store of every
image (patch 16, a random quarter dropped: the scorer costs every format the same; jpeg q90 as in
configs/imagenet.yaml) and a small MAE at 224 px with 16-px patches (random weights: what is measured is
the export, not the fill's quality). The MAE fill runs once (timed on its own), then the export stage runs
in its own process for each `export.format`, under a wrapper that reports the peak RSS of its process tree,
and the export is read back through a DataLoader with 0, 1 and 2 workers (torchvision's ImageFolder; the
webdataset package for the shards).

Printed: images/s of the export and of each read, peak RSS against the first N (the issue's target:
within 1.2x, i.e. flat in N), and the bytes of each format against the compact store and against a JPEG
q90 copy of the same images with nothing dropped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench.format import photo_crops  # noqa: E402
from bench.scale import folder_bytes, run_stage  # noqa: E402
from dq.patches import scorers  # noqa: E402
from dq.data import codec as codecs  # noqa: E402
from dq.compact.schema import Header  # noqa: E402
from dq.compact.writer import CompactWriter
from dq.data.prepared_writer import StoreWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, PATCH, BATCH = 224, 16, 250
CLASSES = [f"photo {k}" for k in range(10)]


def build_inputs(data: Path, n: int) -> int:
    """prepared/{train,test}, compact/dataset.h5 and mae/model.pt under `data`; returns the bytes of a JPEG q90
    copy of the training images (nothing dropped)."""
    from dq.mae import model as dq_mae

    jpeg_copy = 0
    for split, count, seed in (("train", n, 0), ("test", max(10, n // 10), 1)):
        writer = StoreWriter(data / "prepared" / split, codec="jpeg", quality=90, image_shape=(SIZE, SIZE, 3),
                             shard_images=10000)
        for start in range(0, count, BATCH):
            images = photo_crops(min(BATCH, count - start), SIZE, seed=seed * 100000 + start)
            labels = (np.arange(start, start + len(images)) % len(CLASSES)).tolist()
            writer.add([codecs.encode(image, "jpeg", 90) for image in images], labels)
        writer.close(CLASSES, "bench photos")
    header = Header(image_size=SIZE, patch_size=PATCH, channels=3, drop=0.25, ratio=1.0, classes=CLASSES,
                    source="bench photos", codec="jpeg", quality=90)
    rng = np.random.default_rng(2)
    with CompactWriter(data / "compact" / "dataset.h5", header, n) as writer:
        for start in range(0, n, BATCH):
            images = photo_crops(min(BATCH, n - start), SIZE, seed=start)
            keep = scorers.keep_mask(rng.random((len(images), (SIZE // PATCH) ** 2), dtype=np.float32), 0.25)
            rows = np.arange(start, start + len(images))
            writer.add(images, keep, rows % len(CLASSES), rows, np.zeros(len(images), np.int32), None)
            jpeg_copy += sum(len(codecs.encode(image, "jpeg", 90)) for image in images)
    torch.manual_seed(0)
    mae = dq_mae.create_mae("mae_vit_micro_patch4", img_size=SIZE, patch_size=PATCH)
    (data / "mae").mkdir(parents=True, exist_ok=True)
    torch.save(dq_mae.checkpoint_dict(mae, "mae_vit_micro_patch4"), data / "mae" / "model.pt")
    return jpeg_copy


def params_file(folder: Path, fmt: str, workers: int) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["export"].update({"format": fmt, "test": "copy", "shard_images": 2000})
    raw["runtime"].update({"num_workers": workers, "device": "cpu"})
    path = folder / f"params-{fmt}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read_rate(fmt: str, export: Path, workers: int) -> float:
    """Images/s reading the train split back as float tensors through a DataLoader (batch 64)."""
    from torchvision import transforms

    if fmt == "imagefolder":
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(export / "train"), transform=transforms.PILToTensor())
        loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
    else:
        import webdataset as wds

        shards = sorted(str(p) for p in export.glob("train-*.tar"))
        ds = wds.WebDataset(shards, shardshuffle=False, nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker, empty_check=False).decode("torchrgb8").to_tuple("png", "cls")
        loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 16000])
    ap.add_argument("--out", type=Path, default=Path("/tmp/dq-export"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for n in args.sizes:
        folder = args.out / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        data = folder / "data"
        t = time.perf_counter()
        jpeg_copy = build_inputs(data, n)
        print(f"N={n}: inputs built in {time.perf_counter() - t:.0f} s", flush=True)
        from dq.mae.rebuilt import RebuildOptions, rebuilt_set

        t = time.perf_counter()
        rebuilt_set(data / "compact" / "dataset.h5", data / "mae" / "model.pt", cache=data / "fill",
                    options=RebuildOptions(progress=False))
        row = {"fill_s": time.perf_counter() - t, "jpeg_copy": jpeg_copy,
               "compact": (data / "compact" / "dataset.h5").stat().st_size}
        for fmt in ("imagefolder", "webdataset"):
            seconds, rss = run_stage("export", params_file(folder, fmt, workers=1), data, OMP_NUM_THREADS="1")
            export = data / "export"
            train_bytes = (folder_bytes(export / "train") if fmt == "imagefolder"
                           else sum(p.stat().st_size for p in export.glob("train-*.tar")))
            reads = {w: read_rate(fmt, export, w) for w in (0, 1, 2)}
            row[fmt] = {"seconds": seconds, "rss": rss, "train_bytes": train_bytes, "reads": reads,
                        "images": n + max(10, n // 10)}
            print(f"  {fmt:11s}: export {row[fmt]['images'] / seconds:7.1f} img/s, peak RSS {rss:6.0f} MB, "
                  f"train split {train_bytes / 1e6:8.1f} MB; read back " +
                  ", ".join(f"{w} workers {r:7.0f} img/s" for w, r in reads.items()), flush=True)
        rows[n] = row
    base = rows[args.sizes[0]]
    print("\n224 px photo crops, patch 16, drop 0.25, compact store jpeg q90; fill (micro MAE, CPU, 1 thread) "
          "and export (1 DataLoader worker) in their own processes")
    print("     N  format        export img/s  peak RSS MB  RSS vs N0  train bytes / compact  / JPEG q90 copy")
    for n in args.sizes:
        r = rows[n]
        for fmt in ("imagefolder", "webdataset"):
            f = r[fmt]
            print(f"{n:6d}  {fmt:12s} {f['images'] / f['seconds']:12.1f} {f['rss']:12.0f} "
                  f"{f['rss'] / base[fmt]['rss']:9.2f}x {f['train_bytes'] / r['compact']:21.2f}x "
                  f"{f['train_bytes'] / r['jpeg_copy']:15.2f}x")
        print(f"{n:6d}  MAE fill of the compact set: {n / r['fill_s']:.1f} img/s; compact store {r['compact']:,} B, "
              f"JPEG q90 copy {r['jpeg_copy']:,} B")


if __name__ == "__main__":
    main()
