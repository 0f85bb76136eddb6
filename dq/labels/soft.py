"""Soft labels: a teacher's probabilities per image, pruned to the top k and quantised, and the
distillation loss that trains on them.

What the compact store keeps (format version 3, docs/FORMAT.md) of each image and view v (v = 0 the
image, v = 1 its mirror image when `labels.views` is 2):

    soft_probs  [N, V, k]  the k largest of p = softmax(teacher logits / T), in decreasing order:
                           float16 (`labels.bits` 16) or uint8 round(255 p) (bits 8)
    soft_ids    [N, V, k]  their class ids (uint8, or uint16 beyond 256 classes); absent when k >= C,
                           where soft_probs holds every class in class order

Read back (`dense`), the k stored probabilities go to their classes and the rest of the mass, 1 minus
their sum, is shared evenly by the C - k classes not stored (the label pruning of Xiao & He, "Are Large-scale
Soft Labels Necessary for Large-scale Dataset Distillation?", 2024, keeps the top k the same way); the row
is then renormalised to sum to 1, which also undoes the quantisation's drift.

The loss (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015):

    L = (1 - w) · CE(y, softmax(z)) + w · T² · KL(p_T ‖ softmax(z / T))

with z the student's logits, y the hard label (smoothed by `train.label_smoothing`), p_T the stored
probabilities at temperature T (`labels.temperature`, a root attribute of the store) and w
`train.distill_weight`. T² keeps the soft term's gradient on the scale of the hard term's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BITS_DTYPE = {16: np.dtype("<f2"), 8: np.dtype(np.uint8)}
UINT8_STEPS = 255


@dataclass(frozen=True)
class SoftSpec:
    """How a store keeps soft labels: the compact file's `soft_*` root attributes."""
    k: int
    bits: int
    temperature: float
    views: int

    def stored_k(self, num_classes: int) -> int:
        return min(self.k, num_classes)

    def has_ids(self, num_classes: int) -> bool:
        """Whether class ids are stored: only when fewer than all classes are kept."""
        return self.k < num_classes


def ids_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype("<u2") if num_classes <= 65536 else np.dtype("<i4")


def tempered(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64 along the last axis: [..., C] → [..., C]."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def quantise(probs: np.ndarray, spec: SoftSpec) -> tuple[np.ndarray | None, np.ndarray]:
    """Probabilities [n, V, C] → (class ids [n, V, k] or None when every class is kept, values [n, V, k]).

    The top k in decreasing order, ties to the lower class id; with k >= C the values are every class's,
    in class order. bits 16: float16; bits 8: uint8 round(255 p).
    """
    probs = np.asarray(probs, np.float64)
    c = probs.shape[-1]
    if spec.has_ids(c):
        ids = np.argsort(-probs, axis=-1, kind="stable")[..., :spec.k]
        values = np.take_along_axis(probs, ids, axis=-1)
        ids = ids.astype(ids_dtype(c))
    else:
        ids, values = None, probs
    if spec.bits == 8:
        return ids, np.rint(values * UINT8_STEPS).astype(np.uint8)
    return ids, values.astype(BITS_DTYPE[16])


def dequantise(values: np.ndarray) -> np.ndarray:
    """Stored values (float16 or uint8) → float32 probabilities, same shape."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / UINT8_STEPS
    return values.astype(np.float32)


def dense(ids: np.ndarray | None, values: np.ndarray, num_classes: int) -> np.ndarray:
    """Stored (ids [..., k] or None, values [..., k]) → float32 probabilities [..., C] that sum to 1.

    The mass not stored is shared evenly by the classes not stored; every row is renormalised.
    """
    p = dequantise(values)
    if ids is None:
        out = p
    else:
        k = p.shape[-1]
        rest = np.clip(1.0 - p.sum(axis=-1, keepdims=True), 0.0, None) / max(num_classes - k, 1)
        out = np.repeat(rest, num_classes, axis=-1).astype(np.float32)
        np.put_along_axis(out, ids.astype(np.int64), p, axis=-1)
    total = out.sum(axis=-1, keepdims=True)
    return (out / np.where(total > 0, total, 1.0)).astype(np.float32)


@dataclass
class SoftLabels:
    """The soft labels of a training set, held as stored (a few bytes per image), made dense per batch."""
    ids: np.ndarray | None  # [N, V, k] or None
    values: np.ndarray  # [N, V, k] float16 or uint8
    num_classes: int
    temperature: float

    @property
    def views(self) -> int:
        return self.values.shape[1]

    def targets(self, rows: np.ndarray, flipped: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [b, C]: the probabilities of training rows `rows` [b]; with two views, the mirror image's
        where `flipped` [b] (the augmentation's flips) is True."""
        view = np.zeros(len(rows), np.int64)
        if self.views > 1 and flipped is not None:
            view = np.asarray(flipped, bool).astype(np.int64)
        ids = None if self.ids is None else self.ids[rows, view]
        return torch.from_numpy(dense(ids, self.values[rows, view], self.num_classes))


def distillation_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor, *, temperature: float,
                      weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The SUM over the batch of (1 - w) · CE(y, softmax(z)) + w · T² · KL(p_T ‖ softmax(z / T)).

    logits z [b, C], hard labels y [b], target probabilities p_T [b, C] (rows sum to 1).
    """
    hard = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    target = target.to(log_q.dtype)
    kl = (torch.special.xlogy(target, target) - target * log_q).sum()
    return (1.0 - weight) * hard + weight * temperature ** 2 * kl
