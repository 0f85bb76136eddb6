"""Scoring a classifier: loss, top-1 and confusion on a labelled split, and its logits of every image.

Both read the images batch by batch through DataLoader workers and never hold a split whole. The reported
accuracy of a run is its FINAL round's top-1 on the test set (dq.train.loop).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dq.core import distributed
from dq.core.runtime import autocast
from dq.data import rows as row_sources
from dq.data.rows import as_rows
from dq.train import data as train_data
from dq.train.data import forward_batch, normalisation, to_input


@dataclass
class Evaluation:
    """Scores of a model on a labelled set."""
    loss: float
    top1: float
    confusion: np.ndarray  # int64 [C, C]: rows are true classes, columns predictions

    def per_class_accuracy(self) -> np.ndarray:
        """float [C]: recall of every class (0 for a class absent from the set)."""
        totals = self.confusion.sum(axis=1)
        return np.diag(self.confusion) / np.maximum(totals, 1)


def evaluate(model, test, mean, std, device, *, num_workers: int = 0, tta: str = "none") -> Evaluation:
    """Loss, top-1 and confusion matrix of `model` on `test` (its `images`, uint8 [N, H, W, C] as a row source
    or an array, `labels` and `classes`: a `LabelledImages` or a `Prepared`), normalised by the channel
    statistics `mean` and `std` and read batch by batch through `num_workers` DataLoader workers. With
    `tta="flip"` an image's logits are the mean of its own and its mirror image's.

    `model` is the plain module, never the DistributedDataParallel wrapper. Under torchrun each rank
    scores a shard of whole batches and the sums are added up, so every rank returns the same numbers.
    """
    model.eval()
    device = torch.device(device)
    source, labels, num_classes = as_rows(test.images), np.asarray(test.labels), len(test.classes)
    batch_size = forward_batch(train_data.EVAL_BATCH_SIZE, source.image_shape, device)  # read now: tests lower it
    norm = normalisation(mean, std, device)
    rows = distributed.shard(len(labels), batch_size, distributed.rank(), distributed.world_size())
    reads = row_sources.consecutive(rows.start, rows.stop, batch_size)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode(), autocast(device):
        for batch_rows, batch in zip(reads, row_sources.batches(source, reads, num_workers)):
            x = to_input(batch, norm, device)
            y = torch.from_numpy(labels[batch_rows]).to(device, non_blocking=True)
            logits = model(x) if tta == "none" else (model(x) + model(x.flip(3))) / 2
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2)
    distributed.all_reduce_sum(confusion)
    distributed.all_reduce_sum(loss_sum)
    confusion = confusion.view(num_classes, num_classes).cpu().numpy()
    n = max(len(labels), 1)
    return Evaluation(loss=float(loss_sum) / n, top1=float(np.trace(confusion)) / n, confusion=confusion)


@torch.no_grad()
def predict_logits(model, images, mean, std, device, *, flip: bool = False, num_workers: int = 0):
    """float32 [b, C] batches of `model`'s logits on uint8 images [N, H, W, C] (a row source or an array), in
    row order, EVAL_BATCH_SIZE images a batch; of the mirror images with `flip`. One process (the teacher's
    logits are written by rank 0)."""
    model.eval()
    device = torch.device(device)
    source = as_rows(images)
    norm = normalisation(mean, std, device)
    reads = row_sources.consecutive(0, len(source), train_data.EVAL_BATCH_SIZE)
    with autocast(device):
        for batch in row_sources.batches(source, reads, num_workers):
            x = to_input(batch, norm, device)
            yield model(x.flip(3) if flip else x).float().cpu().numpy()
