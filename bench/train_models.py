"""Time and score classifiers on a `selected`-style subset of the prepared set (no compact file needed).

    python -m bench.train_models --prepared data/prepared --images 600 --epochs 15 resnet10t resnet18

(Run it as a module: `python bench/...` would put bench/ first on sys.path, where bench/select.py
shadows the standard library.)

For every model: seconds per epoch (training pass + scoring the whole test set), wall and CPU time,
and the final-epoch top-1. Ratios are against the first model, run in the same process.
Cost grows linearly with the training images (training pass) and with the test images (scoring).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from dq.prepared import open_store
from dq.params import TrainParams
from dq.train import selected_training_set, split_images, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    prepared = open_store(args.prepared / "train")  # read batch by batch, as the train stage does
    test = split_images(open_store(args.prepared / "test"))
    rows = np.sort(np.random.default_rng(0).permutation(len(prepared))[: args.images])
    train_set = selected_training_set(prepared, rows)
    base = None
    for name in args.models:
        config = dataclasses.replace(TrainParams(), model=name, epochs=args.epochs, batch_size=args.batch_size,
                                     lr=args.lr)
        start, cpu = time.perf_counter(), time.process_time()
        result = train_classifier(train_set, test, config, seed=0, device=torch.device("cpu"),
                                  progress=False)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        per_epoch = total / args.epochs
        base = base or per_epoch
        print(f"{name}: {per_epoch:.2f} s/epoch ({per_epoch / base:.2f}x of {args.models[0]}), "
              f"{total:.1f} s ({cpu:.1f} CPU-s, {torch.get_num_threads()} threads) for {args.epochs} epochs on "
              f"{args.images} images + {len(test.labels)} test; "
              f"final top-1 {result.final.top1:.4f}; best epoch {max(r['test_acc'] for r in result.history):.4f}",
              flush=True)


if __name__ == "__main__":
    main()
