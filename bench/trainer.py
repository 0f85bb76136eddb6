"""The trainer's budget and recipe, measured: top-1 and wall time of the train stage's own code.

    python -m bench.trainer run --variants default --shares 1.0 0.1 --steps 250 500 1000 2000 --seeds 0 1 2
    python -m bench.trainer run --variants default no-whiten no-identity no-smoothing no-tta cosine ... --seeds 0 1 2
    python -m bench.trainer report [--docs docs/results/trainer]

Every run is `dq.train.loop.train_classifier` (what `dvc repro`'s train stage calls) on the workspace's prepared
store (`--data`, a `dvc repro` of the defaults): the whole training set (share 1.0) or a class-balanced random
`share` of it drawn by the seed, scored at the final step on the whole prepared test split. A variant is
params.yaml's `train` section with a few keys changed (VARIANTS), or a smallnet built another way (registered
in `dq.train.classifier.CLASSIFIERS` by this script: adding a classifier is one registration). Each run writes one
small JSON (top-1, wall seconds, threads, the train params) under `--out`; finished runs are skipped, so the
sweep can be stopped and run again. `report` tabulates mean, seed standard deviation and seconds per
(variant, share, steps): the plateau is where doubling the steps no longer moves the mean by more than the
seeds' spread.

Wall time is the run alone (data already prepared), on `--threads` threads: 2 on the developers' 2-core machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import yaml  # noqa: E402


def _smallnet(**config):
    def build(num_classes: int, image_size: int):
        from dq.train.smallnet import SmallNet, SmallNetConfig

        return SmallNet(num_classes, 3, SmallNetConfig(**config))
    return build


def _no_identity(num_classes: int, image_size: int):
    from torch import nn

    from dq.train.smallnet import SmallNet

    net = SmallNet(num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m is not net.whiten:
            m.reset_parameters()
    return net


# name -> (train overrides, extra classifiers to register {name: factory})
VARIANTS = {
    "default": ({}, {}),
    "no-whiten": ({"model": "smallnet-no-whiten"}, {"smallnet-no-whiten": _smallnet(whiten=False)}),
    "no-identity": ({"model": "smallnet-no-identity"}, {"smallnet-no-identity": _no_identity}),
    "narrow": ({"model": "smallnet-24"}, {"smallnet-24": _smallnet(widths=(24, 48, 96))}),
    "wide": ({"model": "smallnet-48"}, {"smallnet-48": _smallnet(widths=(48, 96, 192))}),
    "no-smoothing": ({"label_smoothing": 0.0}, {}),
    "no-tta": ({"tta": "none"}, {}),
    "cosine": ({"schedule": "cosine", "warmup": 0.0}, {}),
    "no-nesterov": ({"nesterov": False}, {}),
    "ema": ({"ema": 0.99}, {}),
    "batch-64": ({"batch_size": 64, "lr": 0.1}, {}),
    "resnet10t": ({"model": "resnet10t", "batch_size": 32, "lr": 0.05, "nesterov": False, "schedule": "cosine",
                   "warmup": 0.0, "label_smoothing": 0.0, "tta": "none", "crop_padding": 4}, {}),
}


def run_name(variant: str, share: float, steps: int, seed: int) -> str:
    return f"{variant}-p{share:g}-t{steps}-s{seed}"


def balanced_rows(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Sorted rows: round(share * n_c) of every class c, drawn by `seed` (all rows at share 1.0)."""
    if share >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(labels == c), round(share * np.sum(labels == c)), replace=False)
            for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def run(args) -> None:
    import torch

    from dq.train.classifier import CLASSIFIERS
    from dq.params import load_params
    from dq.data.prepared import open_store
    from dq.train.data import full_training_set, selected_training_set, split_images
    from dq.train.loop import TrainHooks, train_classifier

    torch.set_num_threads(args.threads)
    base = load_params(args.params).train
    prepared = open_store(args.data / "prepared" / "train")
    test = split_images(open_store(args.data / "prepared" / "test"))
    labels = prepared.labels()
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        overrides, classifiers = VARIANTS[variant]
        for name, factory in classifiers.items():
            if name not in CLASSIFIERS:
                CLASSIFIERS.register(name, max_image_size=64)(factory)
        for share in args.shares:
            for steps in args.steps:
                for seed in args.seeds:
                    path = args.out / f"{run_name(variant, share, steps, seed)}.json"
                    if path.exists():
                        continue
                    config = dataclasses.replace(base, **{"input": "full", "steps": steps, "eval_every": None,
                                                          "resume": False, **overrides})
                    rows = balanced_rows(labels, share, seed)
                    train_set = full_training_set(prepared) if share >= 1.0 else selected_training_set(prepared, rows)
                    start = time.perf_counter()
                    result = train_classifier(train_set, test, config, seed=seed, device=torch.device("cpu"),
                                              hooks=TrainHooks(progress=False))
                    seconds = time.perf_counter() - start
                    record = {"variant": variant, "share": share, "steps": steps, "seed": seed,
                              "top1": result.final.top1, "seconds": round(seconds, 1), "threads": args.threads,
                              "train_images": int(len(rows)), "test_images": int(len(test.labels)),
                              "train": dataclasses.asdict(config)}
                    path.write_text(json.dumps(record, indent=1) + "\n")
                    print(f"trainer: {path.stem}: top-1 {record['top1']:.4f} in {seconds:.0f} s", flush=True)


def table(records: list[dict]) -> str:
    """Markdown: one row per (variant, share, steps): seeds, top-1 mean and standard deviation, seconds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["share"], r["steps"]), []).append(r)
    lines = ["| variant | share | steps | seeds | top-1 mean | seed sd (points) | seconds (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    order = list(VARIANTS)
    for (variant, share, steps), rows in sorted(groups.items(),
                                                key=lambda kv: (order.index(kv[0][0]), -kv[0][1], kv[0][2])):
        top1 = [r["top1"] for r in rows]
        sd = statistics.stdev(top1) * 100 if len(top1) > 1 else float("nan")
        lines.append(f"| {variant} | {share:g} | {steps} | {len(rows)} | {statistics.fmean(top1):.4f} | {sd:.2f} "
                     f"| {statistics.fmean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/trainer"))
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[None])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "run":
        if args.steps == [None]:
            args.steps = [yaml.safe_load(args.params.read_text())["train"]["steps"]]
        run(args)
    else:
        records = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
        print(table(records))


if __name__ == "__main__":
    main()
