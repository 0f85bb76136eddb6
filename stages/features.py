"""DVC stage `features`: embeddings (and logit gradients) of the prepared training set → features/train.h5.

Runs in one process, or under torchrun (`python -m stages.launch features` with runtime.nproc > 1): each
rank embeds a contiguous shard of whole batches, rank 0 gathers the shards, fits the probe and writes the
file (owned by dq.features). The batches are the ones a single process would run, so the output is the
same.
"""
from __future__ import annotations

from dq import distributed
from dq.backbones import INIT_SEED, create_backbone, embed, features_record
from dq.errors import run_cli
from dq.features import write_features
from dq.paths import DataPaths
from dq.prepared import read_prepared
from dq.runtime import device_for, seed_everything
from stages.common import parse_args


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Embed the prepared training set with the backbone.", argv)
    paths, fp = DataPaths(args.data), params.features
    prepared = read_prepared(paths.prepared_split("train"))
    device = device_for(params.runtime)
    with distributed.process_group(device):
        seed_everything(INIT_SEED)  # results do not depend on `seed`: only deterministic kernels matter
        backbone = create_backbone(fp.backbone, fp.weights)
        rows = distributed.shard(len(prepared.labels), fp.batch_size, distributed.rank(), distributed.world_size())
        h = embed(backbone, prepared.images[rows], fp.input_size, fp.batch_size, device,
                  progress=distributed.is_main())
        h = distributed.gather_rows(h)
        if distributed.is_main():
            write_features(paths.features, features_record(h, prepared.labels, prepared.classes, kind=fp.kind,
                                                           backbone=fp.backbone, weights=fp.weights,
                                                           input_size=fp.input_size))


if __name__ == "__main__":
    run_cli(main)
