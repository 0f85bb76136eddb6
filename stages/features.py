"""Stage `features`: embeddings (and logit gradients) of the prepared training set → features/train.h5.

Runs in one process, or under torchrun (`python -m stages.launch features` with runtime.nproc > 1): each
rank embeds a contiguous shard of whole batches, rank 0 gathers the shards, fits the probe and writes the
file. The batches are the ones a single process would run, so the output is the same.
"""
from __future__ import annotations

import sys

import numpy as np

from dq import distributed
from dq.backbones import (INIT_SEED, Features, create_backbone, embed, fit_probe, logit_gradients,
                          write_features)
from dq.distributed import shard
from dq.errors import run_cli
from dq.io import read_prepared
from dq.runtime import device_for, seed_everything
from stages.common import parse_args


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Embed the prepared training set with the backbone.", argv)
    fp = params.features
    prepared = read_prepared(args.data / "prepared" / "train.h5")
    device = device_for(params.runtime)
    with distributed.process_group(device):
        seed_everything(INIT_SEED)  # results do not depend on `seed`: only deterministic kernels matter
        backbone = create_backbone(fp.backbone, fp.weights)
        rows = shard(len(prepared.labels), fp.batch_size, distributed.rank(), distributed.world_size())
        h = embed(backbone, prepared.images[rows], fp.input_size, fp.batch_size, device,
                  progress=distributed.is_main())
        h = distributed.gather_rows(h)
        if distributed.is_main():
            write_features(args.data / "features" / "train.h5", _features(h, prepared, fp))


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


if __name__ == "__main__":
    run_cli(main)
