"""The teacher of the soft labels: logits for every image of the training set, from one of three teachers.

`teacher.kind`:

    trained     `train.model` trained with train's recipe on the WHOLE prepared training set for
                `teacher.steps` steps (seed `teacher.seed`), scored on the test split like `train`;
                kept as data/teacher/model.pt (dq.train.classifier's format, so it loads as a checkpoint)
    probe       the features stage's linear probe on the backbone's embeddings: no training at all
    checkpoint  a model.pt written by the train or teacher stage (`teacher.checkpoint`, a path)

The output, data/teacher/logits.h5 (LOGITS_FORMAT, version 1):

    logits       float32 [N, C]  the teacher's logits of every prepared training image, in row order
    logits_flip  float32 [N, C]  the same of every mirror image (trained and checkpoint teachers)
    root attrs   format, version, kind, classes (JSON), test_top1 (NaN where not scored)

Logits of all N rows, not of one selection's: one teacher serves every ratio, seed and selection method,
as one MAE rebuilds every run. Both passes stream the images in batches (dq.train.evaluate.predict_logits) and are
written a batch at a time; what is held whole is per image (C floats). Under torchrun the teacher trains on every
rank (dq.train.loop) and rank 0 alone writes the logits.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.core.errors import DQError
from dq.core.io import atomic_path, h5_file
from dq.params import TrainParams
from dq.labels.soft import SoftSpec, quantise, tempered

LOGITS_FORMAT = "dq-teacher-logits"
LOGITS_VERSION = 1


def trained_config(train: TrainParams, steps: int) -> TrainParams:
    """Train's recipe on the whole set for `steps` steps, scored at the end only."""
    return dataclasses.replace(train, input="full", steps=steps, eval_every=None)


def probe_logits(features, batch: int = 4096):
    """float32 [b, C] batches of the linear probe's logits, embedding @ W.T + b, in row order."""
    w, b = features.probe_weight.astype(np.float64), features.probe_bias.astype(np.float64)
    for start in range(0, len(features.embedding), batch):
        e = features.embedding[start:start + batch].astype(np.float64)
        yield (e @ w.T + b).astype(np.float32)


def write_logits(path: str | Path, views: dict, *, num_images: int, classes: list[str], kind: str,
                 test_top1: float | None) -> None:
    """Write logits.h5 atomically from `views` {name: iterator of float32 [b, C] batches}, batch by batch."""
    c = len(classes)
    with atomic_path(path) as tmp, h5_file(tmp, "w") as f:
        for name, value in (("format", LOGITS_FORMAT), ("version", np.int64(LOGITS_VERSION)), ("kind", kind),
                            ("classes", json.dumps(list(classes))),
                            ("test_top1", np.float64(math.nan if test_top1 is None else test_top1))):
            f.attrs[name] = value
        for name, batches in views.items():
            dset = f.create_dataset(name, shape=(num_images, c), dtype="<f4", chunks=(min(max(num_images, 1), 4096), c),
                                    compression="gzip", shuffle=True, fletcher32=True, track_times=False)
            start = 0
            for block in batches:
                dset[start:start + len(block)] = block
                start += len(block)
            if start != num_images:
                raise ValueError(f"{name}: {start} rows written, expected {num_images}")


@dataclass
class TeacherLogits:
    """An open, checked logits.h5."""
    path: Path
    kind: str
    classes: list[str]
    num_images: int
    views: int  # 1: logits only (the probe), 2: logits and logits_flip
    test_top1: float | None

    def read(self, rows: np.ndarray, views: int) -> np.ndarray:
        """float32 [n, views, C]: the logits of the sorted rows `rows`, of the image and (views 2) its mirror."""
        if views > self.views:
            raise DQError(f"labels.views = {views} needs the mirror images' logits, which a {self.kind} teacher "
                          f"({self.path}) does not have; expected labels.views: 1, or teacher.kind trained or "
                          "checkpoint")
        rows = np.asarray(rows, np.int64)
        with h5_file(self.path) as f:
            names = ("logits", "logits_flip")[:views]
            out = np.stack([f[name][rows] if len(rows) else np.zeros((0, len(self.classes)), np.float32)
                            for name in names], axis=1)
        if not np.isfinite(out).all():
            raise DQError(f"{self.path}: the teacher's logits are not all finite; rerun the teacher stage")
        return out.astype(np.float32)


def read_teacher_logits(path: str | Path, *, expected_rows: int, classes: list[str]) -> TeacherLogits:
    """Open and check a logits.h5 against the prepared training set (its rows and classes)."""
    path = Path(path)
    with h5_file(path) as f:
        if f.attrs.get("format") != LOGITS_FORMAT or "logits" not in f:
            raise DQError(f"{path}: not a teacher logits file (format {LOGITS_FORMAT!r}); rerun the teacher stage")
        stored = json.loads(f.attrs["classes"])
        shape = f["logits"].shape
        views = 2 if "logits_flip" in f else 1
        kind, top1 = str(f.attrs["kind"]), float(f.attrs["test_top1"])
    if stored != list(classes) or shape != (expected_rows, len(classes)):
        raise DQError(f"{path}: logits {list(shape)} of classes {stored} do not fit the prepared training set "
                      f"({expected_rows} images of {len(classes)} classes); rerun the teacher stage")
    return TeacherLogits(path, kind, stored, expected_rows, views, None if math.isnan(top1) else top1)


def stored_soft_labels(teacher: TeacherLogits, rows: np.ndarray, spec: SoftSpec) -> tuple[np.ndarray | None, np.ndarray]:
    """What the compact store keeps of the images `rows` (sorted prepared rows): the teacher's
    probabilities at `spec.temperature`, top k, quantised (dq.labels.soft.quantise)."""
    return quantise(tempered(teacher.read(rows, spec.views), spec.temperature), spec)


def agreement(teacher: TeacherLogits, labels: np.ndarray, batch: int = 65536) -> float:
    """Share of the training images whose teacher argmax is their label (the probe's and a trained teacher's
    fit of the images it labels), read in batches."""
    hits = 0
    with h5_file(teacher.path) as f:
        for start in range(0, teacher.num_images, batch):
            hits += int((f["logits"][start:start + batch].argmax(1) == labels[start:start + batch]).sum())
    return hits / max(teacher.num_images, 1)
