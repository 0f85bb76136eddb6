"""Benchmark of the streaming stages at 224 px: wall time and peak RSS of every stage as N grows, prepare's
speed-up from a second worker, and prepared bytes per source byte for each codec.

    python -m bench.scale [--sizes 1000 4000 16000] [--out /tmp/dq-scale] [--codecs-at 1000]

Builds, offline, a photo-like ImageNet-layout folder: each JPEG (quality 90, 300-500 px on the long
side) is a random crop, flip and brightness change of one of the colour photos shipped inside
scikit-image (`skimage.data`), one class per photo; val/ holds N/10 more. Nothing is downloaded.

Each stage runs as its own process (`python -m stages.<name>`, as DVC runs it) under a small wrapper
that reports `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`: the peak RSS of the largest process of
the stage's tree (DataLoader workers included). Ratios are against baselines of this same run: RSS and
time against N = the first size, prepare with 2 workers against 1 worker, bytes against the source
JPEGs' bytes.

Stages: prepare (jpeg q90, 1 and 2 workers), features (the built-in efficientnet_lite0 at 64 px), select
(dq, ratio 0.1), compress (the default scorer, 16-px patches: the 14x14 grid of configs/imagenet.yaml),
mae (the tiny default MAE at 56 px, whose 14x14 grid matches the stored one; 1 epoch) and train
(resnet10t on the MAE-filled compact set, 1 epoch at the default batch of 32, scored on val/). The models are small and the
epochs few because what is measured is how memory and time per image grow with N, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle_left", "motorcycle_right", "colorwheel")


def photos() -> dict[str, np.ndarray]:
    """uint8 RGB photos by name, all from files inside the scikit-image package."""
    from skimage import data

    out = {}
    left, right, _ = data.stereo_motorcycle()
    for name in PHOTOS:
        img = {"motorcycle_left": left, "motorcycle_right": right}.get(name)
        img = getattr(data, name)() if img is None else img
        out[name] = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    return out


def build_folder(root: Path, n_train: int, seed: int = 0) -> int:
    """Write root/{train,val}/<photo>/*.jpg: n_train and n_train // 10 images; returns the source bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = photos()
    names = sorted(sources)
    total = 0
    for split, n in (("train", n_train), ("val", max(len(names), n_train // 10))):
        for i in range(n):
            name = names[i % len(names)]
            img = sources[name]
            h, w = img.shape[:2]
            share = rng.uniform(0.45, 0.95)  # crop side as a share of the shorter side, random aspect
            ch = int(min(h, w) * share)
            cw = int(min(w, ch * rng.uniform(0.75, 1.33)))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = img[top:top + ch, left:left + cw]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.clip(crop.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
            long_side = int(rng.integers(300, 501))
            scale = long_side / max(crop.shape[:2])
            pil = Image.fromarray(crop).resize((max(1, round(crop.shape[1] * scale)),
                                                max(1, round(crop.shape[0] * scale))), Image.BICUBIC)
            path = root / split / name / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pil.save(path, "JPEG", quality=90)
            total += path.stat().st_size if split == "train" else 0
    return total


def params_file(folder: Path, source_root: Path, *, codec: str, workers: int) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"source": "imagefolder", "root": str(source_root), "image_size": 224, "train_limit": None,
                        "test_limit": None, "codec": codec, "quality": 90})
    raw["features"].update({"input_size": 64, "batch_size": 64})
    raw["patches"].update({"patch_size": 16, "batch_size": 64})
    raw["mae"].update({"input_size": 56, "epochs": 1, "warmup_epochs": 0, "eval_images": 64})
    raw["train"].update({"epochs": 1})  # the default batch (32)
    raw["runtime"].update({"num_workers": workers, "device": "cpu"})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
           "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc.returncode); "
           "sys.stderr.write(rc.stderr.decode()[-2000:] if rc.returncode else '')")


def run_stage(stage: str, params: Path, data: Path, **env: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the largest process) of one stage run in a fresh process tree, with
    `env` added to its environment."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", f"stages.{stage}", "--params", str(params),
           "--data", str(data)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **env))
    seconds, rss_kb, rc = proc.stdout.split()
    if rc != "0":
        raise SystemExit(f"{stage} failed: {proc.stderr}")
    return float(seconds), int(rss_kb) / 1024


LATER_STAGES = ("select", "compress", "mae", "train")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--codecs-at", type=int, default=1000, help="N at which every codec's bytes are measured")
    ap.add_argument("--out", type=Path, default=Path("/tmp/dq-scale"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    rows = {}
    for n in args.sizes:
        src = args.out / f"src-{n}"
        t = time.perf_counter()
        source_bytes = build_folder(src, n)
        print(f"N={n}: built {src} ({source_bytes / 1e6:.1f} MB of train JPEGs) in {time.perf_counter() - t:.0f} s",
              flush=True)
        row = {"source_bytes": source_bytes}
        for workers in (1, 2):
            data = args.out / f"run-{n}-w{workers}"
            row[f"prepare_w{workers}"] = run_stage("prepare", params_file(data, src, codec="jpeg", workers=workers),
                                                   data / "data")
            print(f"  prepare jpeg q90, {workers} worker(s): {row[f'prepare_w{workers}'][0]:.1f} s, "
                  f"{row[f'prepare_w{workers}'][1]:.0f} MB", flush=True)
        data = args.out / f"run-{n}-w1"
        row["prepared_bytes"] = folder_bytes(data / "data" / "prepared" / "train")
        row["features"] = run_stage("features", data / "params.yaml", data / "data")
        print(f"  features (efficientnet_lite0 at 64 px, 1 worker): {row['features'][0]:.1f} s, "
              f"{row['features'][1]:.0f} MB", flush=True)
        for stage in LATER_STAGES:
            row[stage] = run_stage(stage, data / "params.yaml", data / "data")
            print(f"  {stage}: {row[stage][0]:.1f} s, {row[stage][1]:.0f} MB", flush=True)
        if n == args.codecs_at:
            row["codecs"] = {}
            for codec in ("raw", "png", "webp-lossless", "webp"):
                cdata = args.out / f"run-{n}-{codec}"
                run_stage("prepare", params_file(cdata, src, codec=codec, workers=2), cdata / "data")
                row["codecs"][codec] = folder_bytes(cdata / "data" / "prepared" / "train")
                shutil.rmtree(cdata)
            row["codecs"]["jpeg"] = row["prepared_bytes"]
        rows[n] = row
        shutil.rmtree(args.out / f"run-{n}-w2", ignore_errors=True)
    report(rows, args.sizes)
    (args.out / "results.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1))


def report(rows: dict, sizes: list[int]) -> None:
    base = rows[sizes[0]]
    print(f"\n224 px, photo-like JPEG folder; baselines: N = {sizes[0]} (RSS, time per image), 1 worker (speed-up)")
    print("   N  stage               wall s   img/s   peak RSS MB   RSS vs N0   s/img vs N0")
    for n in sizes:
        r = rows[n]
        for key, name in (("prepare_w1", "prepare 1 worker"), ("prepare_w2", "prepare 2 workers"),
                          ("features", "features"), *((k, k) for k in LATER_STAGES)):
            if key not in r or key not in base:
                continue
            sec, rss = r[key]
            b_sec, b_rss = base[key]
            print(f"{n:5d}  {name:18s} {sec:7.1f} {n / sec:7.0f} {rss:12.0f} {rss / b_rss:10.2f}x "
                  f"{(sec / n) / (b_sec / sizes[0]):11.2f}x")
        print(f"{n:5d}  prepare 2 vs 1 worker: {r['prepare_w1'][0] / r['prepare_w2'][0]:.2f}x images/s;  "
              f"prepared jpeg q90 / source JPEG bytes: {r['prepared_bytes'] / r['source_bytes']:.3f}")
    for n in sizes:
        if "codecs" in rows[n]:
            print(f"\nprepared bytes per source JPEG byte at N = {n} (train split, 224 px):")
            for codec, b in rows[n]["codecs"].items():
                print(f"  {codec:14s} {b / 1e6:8.1f} MB   {b / rows[n]['source_bytes']:.3f}")


if __name__ == "__main__":
    main()
