"""The compress stage's pass: score the selected images, keep their best patches, write the compact store.

One process or a torchrun group. The selected rows stream from the prepared store through a DataLoader
(`runtime.num_workers` workers, each opening its own shard files) in batches of `patches.batch_size`;
each batch is scored (`dq.cam.score_batches`), counted for the probe metrics, picked from for the figure
and, in one process, handed to the compact writer (dq.compact.CompactWriter, which spools the encoded
images to disk), then let go. What stays in memory is per image: scores and keep masks [n, L], labels,
rows. Under torchrun each rank scores a contiguous shard of whole batches, the batches one process
would run, so the scores are the same; rank 0 gathers the scores, keep masks, probe counts and figure
samples, then reads the selected images again, batch by batch, to write the file. Neither num_workers
nor nproc changes a byte of the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dq import cam, distributed
from dq.compact import CompactWriter, Header
from dq.prepared import Store, image_loader
from dq.scorers import PatchScorer


@dataclass
class Selected:
    """The selected rows of the prepared training set and what the compact store keeps of each."""

    store: Store
    indices: np.ndarray  # int64 [n]: rows of the prepared set
    labels: np.ndarray  # int64 [n]
    bins: np.ndarray  # int32 [n]


def selected_batches(store: Store, indices: np.ndarray, part: slice, batch_size: int, num_workers: int, *,
                     desc: str = "", progress: bool = False):
    """(uint8 images [b, H, W, 3], labels [b], positions [b]) of the selected rows `indices[part]`, in
    order; positions are places in `indices`. Read by DataLoader workers over the shards."""
    from tqdm import tqdm

    loader = image_loader(store, indices[part], batch_size=batch_size, num_workers=num_workers)
    start = part.start
    for images, labels, _rows in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        yield images.numpy(), labels.numpy(), np.arange(start, start + len(labels))
        start += len(labels)


def write_compact_store(path: Path, selected: Selected, header: Header, scorer: PatchScorer,
                        probe: cam.ProbeCounts, figure: cam.FigureSamples, *, batch_size: int, num_workers: int,
                        source_bytes: tuple[int | None, str], device,
                        soft: tuple[np.ndarray | None, np.ndarray] | None = None) -> cam.FigureSamples | None:
    """Score every selected image, keep its best patches and write the compact store at `path` (rank 0).

    `probe` and `figure` are filled as the batches pass; under torchrun the counts are summed and the
    figure's samples gathered. `soft`: the selected images' stored soft labels with `header.soft`
    (dq.compact.CompactWriter). Returns the figure's samples on the rank that wrote the file, None elsewhere.
    """
    n = len(selected.indices)
    main_rank, world = distributed.is_main(), distributed.world_size()
    part = distributed.shard(n, batch_size, distributed.rank(), world)
    batches = selected_batches(selected.store, selected.indices, part, batch_size, num_workers, desc=scorer.name,
                               progress=main_rank)

    def score(on_batch=None):
        return cam.score_batches(scorer, batches, header.drop, header.num_patches, probe=probe, figure=figure,
                                 on_batch=on_batch)

    def add(writer, images, y, pos, scores, keep):
        writer.add(images, keep, y, selected.indices[pos], selected.bins[pos], scores)

    if world == 1:  # one pass: each scored batch goes straight to the writer
        with CompactWriter(path, header, n, source_bytes, soft) as writer:
            score(lambda images, y, pos, scores, keep: add(writer, images, y, pos, scores, keep))
        return figure
    # every collective first: rank 0's write pass may outlast a collective's timeout
    scores, keep = (distributed.gather_rows(a) for a in score())
    probe.counts = distributed.all_reduce_sum(torch.from_numpy(probe.counts).to(device)).cpu().numpy()
    shown = [distributed.gather_rows(a) for a in figure.arrays(selected.store.image_shape, header.num_patches)]
    if not main_rank:
        return None
    figure = cam.FigureSamples(shown[0])
    figure.add(*shown)
    with CompactWriter(path, header, n, source_bytes, soft) as writer:
        for images, y, pos in selected_batches(selected.store, selected.indices, slice(0, n), batch_size, num_workers,
                                               desc="write", progress=True):
            add(writer, images, y, pos, scores[pos], keep[pos])
    return figure
