"""Throughput of the pipeline's GPU work on synthetic data: images/s and peak GPU memory per step.

    bash bench/gpu_check.sh            # about 5 minutes on one H100
    bash bench/gpu_check.sh --quick    # tiny sizes, small models: a minute on 2 CPU cores

Runs the library's own code paths (nothing is re-implemented here), with random weights and random
uint8 images, so nothing is downloaded:

    features   dq.features.backbones.embed: ResNet-18 at 224 px, bf16 + channels_last on CUDA; 32-px stored
               images resized on the device (the CIFAR-10 config's path), then 224-px stored images
               (ImageNet's). Baseline in the same process: the same model in float32, NCHW, a plain loop.
    cam        dq.patches.cam.attention_maps: GradCAM++ on ResNet-18 + a linear probe at 224 px (float32).
    mae        dq.mae.reconstruct.reconstruct: mae_vit_large_patch16 at 224 px, bf16, 25% of the patches dropped
               (224-px images with 16-px patches, then 32-px images with 4-px patches, CIFAR-10's).
    train      dq.train.loop.train_classifier_epoch: one epoch of ResNet-18 (CIFAR stem) on a synthetic 32-px
               set, batch 128, SGD, bf16 on CUDA.

Every step is one pass over its N images, so its cost grows linearly with N (the first batch, timed
apart as warm-up, carries the one-off costs: cuDNN plans, allocator growth).
Targets on one H100: features >= 3,000 images/s, MAE-L reconstruction >= 500 images/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dq.patches import cam  # noqa: E402
from dq.patches.scorers import ProbedModel  # noqa: E402

from dq.mae import model as dq_mae  # noqa: E402
from dq.mae import reconstruct  # noqa: E402
from dq.train.classifier import create_classifier  # noqa: E402
from dq.train.data import TrainFeed, channel_stats  # noqa: E402
from dq.train.loop import Learner, train_classifier_epoch  # noqa: E402
from dq.train.schedule import classifier_epoch_generator, optimizer_and_schedule, steps_per_epoch  # noqa: E402
from dq.features.backbones import (classifier_with_probe, create_backbone, embed, normalization,  # noqa: E402
                          pooled_features, preprocess)
from dq.params import TrainParams  # noqa: E402

TARGETS = {"features 32->224": 3000.0, "features 224": 3000.0, "mae 224/16": 500.0}


@dataclass
class Sizes:
    features_n: int
    features_size: int
    features_batch: int
    cam_n: int
    cam_size: int
    cam_batch: int
    mae_arch: str
    mae_n: int
    mae_size: int
    mae_batch: int
    train_model: str
    train_n: int
    train_batch: int


FULL = Sizes(features_n=16384, features_size=224, features_batch=256, cam_n=2048, cam_size=224, cam_batch=128,
             mae_arch="mae_vit_large_patch16", mae_n=4096, mae_size=224, mae_batch=256,
             train_model="resnet18", train_n=50000, train_batch=128)
QUICK = Sizes(features_n=64, features_size=64, features_batch=32, cam_n=16, cam_size=64, cam_batch=8,
              mae_arch="mae_vit_tiny_patch4", mae_n=64, mae_size=32, mae_batch=32,
              train_model="resnet10t", train_n=256, train_batch=64)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, n: int, device: torch.device, run, warmup) -> float:
    """Run `warmup()` then time `run()` (one pass over n images); print and return images/s."""
    warmup()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    rate = n / seconds
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:6.2f} GiB" if device.type == "cuda" else "   n/a"
    target = TARGETS.get(name)
    verdict = ""
    if target is not None:
        verdict = ("  target n/a on CPU" if device.type != "cuda"
                   else f"  target {target:,.0f}: {'PASS' if rate >= target else 'FAIL'}")
    print(f"{name:18s} {n:7d} images {seconds:8.2f} s {rate:10.1f} images/s   peak GPU memory {peak}{verdict}",
          flush=True)
    return rate


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def check_features(sizes: Sizes, device: torch.device) -> None:
    model = create_backbone("resnet18", "none")
    s, b = sizes.features_size, sizes.features_batch
    for name, stored in ((f"features 32->{s}", 32), (f"features {s}", s)):
        x = images(sizes.features_n if stored == 32 else max(b, sizes.features_n // 4), stored)
        rate = measure(name, len(x), device, lambda: embed(model, x, s, b, device, progress=False),
                       lambda: embed(model, x[:b], s, b, device, progress=False))
    # baseline: float32, NCHW, the host waiting for every batch
    model = create_backbone("resnet18", "none").to(device, memory_format=torch.contiguous_format)
    mean, std = normalization(model)
    x = images(max(b, sizes.features_n // 8), s)

    @torch.no_grad()
    def plain():
        for start in range(0, len(x), b):
            pooled_features(model, preprocess(x[start:start + b], s, mean=mean, std=std, device=device)).cpu()

    base = measure("  fp32 NCHW base", len(x), device, plain, lambda: None)
    how = "bf16 + channels_last + async copies" if device.type == "cuda" else "the same float32 path on the CPU"
    print(f"{'':18s} {how}: {rate / base:.2f}x the float32 baseline", flush=True)


def check_cam(sizes: Sizes, device: torch.device) -> None:
    backbone = create_backbone("resnet18", "none")
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (10, backbone.num_features)).astype(np.float32)
    model = classifier_with_probe(backbone, weight, np.zeros(10, np.float32))
    _, layer = cam.target_layer(backbone, "auto", sizes.cam_size)
    mean, std = normalization(backbone)
    x, labels = images(sizes.cam_n, 32), np.arange(sizes.cam_n) % 10

    def run(rows):
        probed = ProbedModel(model, layer, sizes.cam_size, sizes.cam_batch, device, progress=False)
        return lambda: cam.attention_maps(probed, x[rows], labels[rows], mean=mean, std=std)

    measure(f"cam 32->{sizes.cam_size}", sizes.cam_n, device, run(slice(None)), run(slice(0, sizes.cam_batch)))


def check_mae(sizes: Sizes, device: torch.device) -> None:
    torch.manual_seed(0)
    model = dq_mae.create_mae(sizes.mae_arch, img_size=sizes.mae_size).to(device)
    p = model.config.patch_size
    layouts = {(sizes.mae_size, p): f"mae {sizes.mae_size}/{p}", (32, 4): f"mae 32/4->{sizes.mae_size}"}
    for (stored, patch), name in layouts.items():
        num_patches = (stored // patch) ** 2
        keep = reconstruct.eval_keep(sizes.mae_n, num_patches, 0.25, seed=0)
        x = images(sizes.mae_n, stored)
        b = sizes.mae_batch
        measure(name, sizes.mae_n, device,
                lambda: reconstruct.reconstruct(model, x, keep, patch, batch_size=b, device=device, progress=False),
                lambda: reconstruct.reconstruct(model, x[:b], keep[:b], patch, batch_size=b, device=device,
                                                progress=False))


def check_train(sizes: Sizes, device: torch.device) -> None:
    config = TrainParams(model=sizes.train_model, input="full", epochs=1, batch_size=sizes.train_batch, lr=0.1)
    x = torch.from_numpy(images(sizes.train_n, 32))
    y = torch.from_numpy(np.arange(sizes.train_n) % 10)
    mean, std = channel_stats(x[:1000].numpy())
    torch.manual_seed(0)
    model = create_classifier(config.model, 10, 32).to(device).to(memory_format=torch.channels_last)
    learner = Learner(model, *optimizer_and_schedule(model, config, steps_per_epoch(sizes.train_n, config.batch_size)))

    def epoch(rows):
        feed = TrainFeed(x[rows], y[rows], mean, std)
        return lambda: train_classifier_epoch(learner, feed, config, classifier_epoch_generator(0, 0), device)

    measure(f"train {config.model} 32", sizes.train_n, device, epoch(slice(None)),
            epoch(slice(0, 4 * config.batch_size)))


CHECKS = {"features": check_features, "cam": check_cam, "mae": check_mae, "train": check_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and small models (CPU smoke run)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    sizes = QUICK if args.quick else FULL
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the stages run
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check: {what}; torch {torch.__version__}; bf16 "
          f"{'yes' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'no'}; "
          f"{'quick' if args.quick else 'full'} sizes", flush=True)
    started = time.perf_counter()
    for name in args.only.split(","):
        CHECKS[name.strip()](sizes, device)
    print(f"gpu_check: done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
