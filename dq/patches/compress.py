"""The compress stage's pass: score the selected images, keep their best patches, write the compact store.

One process or a torchrun group. The selected rows stream from the prepared store through a DataLoader
(`runtime.num_workers` workers, each opening its own shard files) in batches of `patches.batch_size`;
each batch is scored (`dq.patches.cam.score_batches`), counted for the probe metrics, picked from for the figure
and, in one process, handed to the compact writer (dq.compact.writer.CompactWriter, which spools the encoded
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

from dq.compact.schema import Header
from dq.compact.writer import CompactWriter
from dq.core import distributed
from dq.data.prepared import Store, image_loader
from dq.patches import cam
from dq.patches.scorers import PatchScorer


@dataclass
class Selected:
    """The selected rows of the prepared training set and what the compact store keeps of each."""

    store: Store
    indices: np.ndarray  # int64 [n]: rows of the prepared set
    labels: np.ndarray  # int64 [n]
    bins: np.ndarray  # int32 [n]
    soft: tuple[np.ndarray | None, np.ndarray] | None = None  # stored soft labels, with header.soft (CompactWriter)
    source_bytes: tuple[int | None, str] = (None, "")  # their source files' bytes, and how counted (or why not)


@dataclass(frozen=True)
class Streaming:
    """How the selected rows stream from the prepared store: images per batch, DataLoader workers."""

    batch_size: int
    num_workers: int


def selected_batches(selected: Selected, part: slice, streaming: Streaming, *, desc: str = "",
                     progress: bool = False):
    """(uint8 images [b, H, W, 3], labels [b], positions [b]) of the selected rows `selected.indices[part]`,
    in order; positions are places in `selected.indices`. Read by DataLoader workers over the shards."""
    from tqdm import tqdm

    loader = image_loader(selected.store, selected.indices[part], batch_size=streaming.batch_size,
                          num_workers=streaming.num_workers)
    start = part.start
    for images, labels, _rows in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        yield images.numpy(), labels.numpy(), np.arange(start, start + len(labels))
        start += len(labels)


def _writer(path: Path, selected: Selected, header: Header) -> CompactWriter:
    return CompactWriter(path, header, len(selected.indices), selected.source_bytes, selected.soft)


def _add(writer: CompactWriter, selected: Selected, positions: np.ndarray, scored: tuple) -> None:
    """Hand one scored batch (images [b, H, W, 3], labels [b], scores [b, L], keep [b, L]) to the writer."""
    images, labels, scores, keep = scored
    writer.add(images, keep, labels, selected.indices[positions], selected.bins[positions], scores)


def write_compact_store(path: Path, selected: Selected, header: Header, scorer: PatchScorer, probe: cam.ProbeCounts,
                        figure: cam.FigureSamples, streaming: Streaming) -> cam.FigureSamples | None:
    """Score every selected image, keep its best patches and write the compact store at `path` (rank 0).

    `probe` and `figure` are filled as the batches pass; under torchrun the counts are summed (on the
    probe's device) and the figure's samples gathered. Returns the figure's samples on the rank that wrote
    the file, None elsewhere.
    """
    n = len(selected.indices)
    part = distributed.shard(n, streaming.batch_size, distributed.rank(), distributed.world_size())
    batches = selected_batches(selected, part, streaming, desc=scorer.name, progress=distributed.is_main())

    def score(on_batch=None):
        return cam.score_batches(scorer, batches, header.drop, header.num_patches, probe=probe, figure=figure,
                                 on_batch=on_batch)

    if distributed.world_size() == 1:  # one pass: each scored batch goes straight to the writer
        with _writer(path, selected, header) as writer:
            score(lambda images, y, pos, scores, keep: _add(writer, selected, pos, (images, y, scores, keep)))
        return figure
    # every collective first: rank 0's write pass may outlast a collective's timeout
    scores, keep = (distributed.gather_rows(a) for a in score())
    figure = _gathered(probe, figure, selected.store.image_shape, header.num_patches)
    if figure is not None:
        _write_scored(path, selected, header, streaming, (scores, keep))
    return figure


def _gathered(probe: cam.ProbeCounts, figure: cam.FigureSamples, image_shape: tuple,
              num_patches: int) -> cam.FigureSamples | None:
    """Sum the probe counts over the ranks and gather the figure's samples: on rank 0 the whole set's figure,
    None elsewhere."""
    probe.counts = distributed.all_reduce_sum(torch.from_numpy(probe.counts).to(probe.device)).cpu().numpy()
    shown = [distributed.gather_rows(a) for a in figure.arrays(image_shape, num_patches)]
    if not distributed.is_main():
        return None
    figure = cam.FigureSamples(shown[0])
    figure.add(*shown)
    return figure


def _write_scored(path: Path, selected: Selected, header: Header, streaming: Streaming, scored: tuple) -> None:
    """Rank 0 after a torchrun pass: read the selected images again, batch by batch, and write them with the
    gathered (scores [n, L], keep [n, L])."""
    scores, keep = scored
    with _writer(path, selected, header) as writer:
        for images, y, pos in selected_batches(selected, slice(0, len(selected.indices)), streaming, desc="write",
                                               progress=True):
            _add(writer, selected, pos, (images, y, scores[pos], keep[pos]))
