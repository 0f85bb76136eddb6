"""DVC stage `features`: embeddings (and logit gradients) of the prepared training set → features/train.h5.

Runs in one process, or under torchrun (`python -m stages.launch features` with runtime.nproc > 1): each
rank embeds a contiguous shard of whole batches, read from the prepared store through a DataLoader
(`runtime.num_workers` workers, each opening its own shard files), so no process holds the split's
images. Rank 0 gathers the embeddings, fits the probe and writes the file (owned by dq.features.file). The
batches are the ones a single process would run, so the output is the same.
"""
from __future__ import annotations

from dq.core.kernels import pin_cpu_kernels

pin_cpu_kernels()  # before torch loads: the probe's float64 sums in one order on every x86-64 CPU

import numpy as np  # noqa: E402

from dq.core import distributed  # noqa: E402
from dq.features.backbones import INIT_SEED, create_backbone, embed_batches, features_record  # noqa: E402
from dq.core.errors import run_cli  # noqa: E402
from dq.features.file import write_features  # noqa: E402
from dq.core.paths import DataPaths  # noqa: E402
from dq.data.prepared import image_loader, open_store  # noqa: E402
from dq.core.runtime import device_for, seed_everything  # noqa: E402
from stages.common import parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Embed the prepared training set with the backbone.", argv, builds_models=True)
    paths, fp = DataPaths(args.data), params.features
    store = open_store(paths.prepared_split("train"))
    labels = store.labels()
    device = device_for(params.runtime)
    with distributed.process_group(device):
        seed_everything(INIT_SEED)  # results do not depend on `seed`: only deterministic kernels matter
        backbone = create_backbone(fp.backbone, fp.weights)
        rows = np.arange(len(store))[distributed.shard(len(store), fp.batch_size, distributed.rank(),
                                                       distributed.world_size())]
        loader = image_loader(store, rows, batch_size=fp.batch_size, num_workers=params.runtime.num_workers)
        h = embed_batches(backbone, loader, rows.size, fp.input_size, device, progress=distributed.is_main())
        h = distributed.gather_rows(h)
        if distributed.is_main():
            write_features(paths.features, features_record(h, labels, store.classes, kind=fp.kind,
                                                           backbone=fp.backbone, weights=fp.weights,
                                                           input_size=fp.input_size))


if __name__ == "__main__":
    run_cli(main)
