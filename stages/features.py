"""Stage `features`: embeddings (and logit gradients) of the prepared training set → features/train.h5.

Runs in one process, or under torchrun (`python -m stages.launch features` with runtime.nproc > 1): each
rank embeds a contiguous shard of whole batches, rank 0 gathers the shards, fits the probe and writes the
file. The batches are the ones a single process would run, so the output is the same.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from dq.backbones import (INIT_SEED, Features, create_backbone, embed, fit_probe, logit_gradients,
                          write_features)
from dq.errors import run_cli
from dq.io import read_prepared
from dq.runtime import device_for, seed_everything
from stages.common import parse_args


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Embed the prepared training set with the backbone.", argv)
    fp = params.features
    prepared = read_prepared(args.data / "prepared" / "train.h5")
    rank, world = _init_distributed(params.runtime.device)
    try:
        seed_everything(INIT_SEED)  # results do not depend on `seed`: only deterministic kernels matter
        device = device_for(params.runtime)
        backbone = create_backbone(fp.backbone, fp.weights)
        rows = shard(len(prepared.labels), fp.batch_size, rank, world)
        h = embed(backbone, prepared.images[rows], fp.input_size, fp.batch_size, device, progress=rank == 0)
        h = _gather(h, rank, world)
        if rank == 0:
            write_features(args.data / "features" / "train.h5", _features(h, prepared, fp))
    finally:
        _finish_distributed(world)


def _features(h: np.ndarray, prepared, fp) -> Features:
    """The probe, the logit gradients when asked for, and the file's metadata around embeddings h [N, D]."""
    probe = fit_probe(h, prepared.labels, prepared.num_classes)
    print(f"features: {h.shape[0]} images → {h.shape[1]} features; probe train accuracy "
          f"{probe.train_accuracy:.3f}", file=sys.stderr)
    return Features(
        embedding=h,
        logit_grad=logit_gradients(h, prepared.labels, probe) if fp.kind == "gradient" else None,
        probe_weight=probe.weight,
        probe_bias=probe.bias,
        kind=fp.kind,
        backbone=fp.backbone,
        weights=fp.weights,
        input_size=fp.input_size,
        classes=prepared.classes,
        probe_train_accuracy=probe.train_accuracy,
    )


def shard(n: int, batch_size: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous rows of [0, n): whole batches, so every batch is a single process's batch."""
    batches = -(-n // batch_size)
    per_rank = -(-batches // world)
    start = min(n, rank * per_rank * batch_size)
    return slice(start, min(n, (rank + 1) * per_rank * batch_size))


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), world


def _gather(h: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Every rank's shard [n_r, D], concatenated in rank order on rank 0 (others get theirs back)."""
    if world == 1:
        return h
    import torch.distributed as dist

    shards = [None] * world if rank == 0 else None
    dist.gather_object(h, shards, dst=0)
    return np.concatenate(shards) if rank == 0 else h


def _finish_distributed(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
