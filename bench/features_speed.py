"""How the features stage's cost grows with input_size and with N, on this machine.

    python -m bench.features_speed [--backbone efficientnet_lite0] [--weights builtin] [--n 256]

Prints images/s of `embed` at several input sizes, as ratios against the smallest size run in the same
process, then the time of embed and of the probe at N and 2N (both are linear in N: one pass over the
images; a fixed number of full-batch L-BFGS steps, each O(N·D·C)). Synthetic uint8 images [N, 32, 32, 3].
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dq.features.backbones import create_backbone, embed, fit_probe  # noqa: E402


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time is the fairer number on a busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="builtin")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sizes", default="64,96,128")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2 * args.n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(2 * args.n) % 10
    model = create_backbone(args.backbone, args.weights)
    print(f"{args.backbone} ({args.weights}), torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    embed(model, images[:args.batch_size], 32, args.batch_size, progress=False)  # warm-up

    baseline = None
    for size in map(int, args.sizes.split(",")):
        _, wall, cpu = _timed(lambda: embed(model, images[:args.n], size, args.batch_size, progress=False))
        rate, cpu_rate = args.n / wall, args.n / cpu
        baseline = baseline or cpu_rate
        print(f"input_size {size:4d}: {rate:7.1f} images/s wall, {cpu_rate:7.1f} images per CPU-second "
              f"({baseline / cpu_rate:.2f}x the CPU time of the first size)")

    size = int(args.sizes.split(",")[-1])
    for n in (args.n, 2 * args.n):
        h, t_embed, c_embed = _timed(lambda: embed(model, images[:n], size, args.batch_size, progress=False))
        _, t_probe, c_probe = _timed(lambda: fit_probe(h, labels[:n], 10))
        print(f"N {n:6d} at {size}px: embed {t_embed:6.2f} s ({c_embed:6.2f} CPU-s), "
              f"probe {t_probe:6.2f} s ({c_probe:6.2f} CPU-s)")


if __name__ == "__main__":
    main()
