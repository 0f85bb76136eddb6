"""The features file `features/train.h5`: its one writer, reader and validator.

The `features` stage writes it (dq.features.backbones computes the rows); `select` and `compress` read it.
Datasets: `embedding` float32 [N, D], `probe_weight` [C, D], `probe_bias` [C], and with
`features.kind: gradient` also `logit_grad` float32 [N, C]; attributes name the backbone, its weights and
input size (compress refuses a file made with another backbone), the classes and the probe's accuracy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.core.errors import DQError, first_line
from dq.core.io import H5_OPEN_ERRORS, atomic_path, check_free_space, h5_file


@dataclass
class Features:
    """The contents of `features/train.h5`."""

    embedding: np.ndarray  # float32 [N, D]
    logit_grad: np.ndarray | None  # float32 [N, C]; kind 'gradient' only
    probe_weight: np.ndarray  # float32 [C, D]
    probe_bias: np.ndarray  # float32 [C]
    kind: str
    backbone: str
    weights: str
    input_size: int
    classes: list[str]
    probe_train_accuracy: float

    @property
    def num_rows(self) -> int:
        return self.embedding.shape[0]


def write_features(path: str | Path, features: Features) -> None:
    """Write the features file atomically; equal inputs give equal bytes."""
    arrays = (features.embedding, features.logit_grad, features.probe_weight, features.probe_bias)
    check_free_space(path, sum(np.asarray(a).nbytes for a in arrays if a is not None))
    with atomic_path(path) as tmp:
        with h5_file(tmp, "w") as f:
            _write_rows(f, "embedding", features.embedding)
            if features.logit_grad is not None:
                _write_rows(f, "logit_grad", features.logit_grad)
            f.create_dataset("probe_weight", data=np.asarray(features.probe_weight, np.float32))
            f.create_dataset("probe_bias", data=np.asarray(features.probe_bias, np.float32))
            f.attrs["kind"] = features.kind
            f.attrs["backbone"] = features.backbone
            f.attrs["weights"] = features.weights
            f.attrs["input_size"] = int(features.input_size)
            f.attrs["num_rows"] = int(features.num_rows)
            f.attrs["classes"] = json.dumps(list(features.classes))
            f.attrs["probe_train_accuracy"] = float(features.probe_train_accuracy)


def _write_rows(f, name: str, array: np.ndarray) -> None:
    """float32 [N, K], chunked along N (~256 KiB a chunk), gzip, with checksums."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    n, k = array.shape
    chunk_n = int(max(1, min(n, (256 * 1024) // (4 * max(k, 1)))))
    f.create_dataset(name, data=array, chunks=(chunk_n, k) if n else None, compression="gzip" if n else None,
                     shuffle=bool(n), fletcher32=bool(n))


def read_features(path: str | Path, expected_rows: int | None = None) -> Features:
    """Read and validate a features file; `expected_rows` is the size of the prepared training set."""
    path = Path(path)
    with h5_file(path) as f:
        for key in ("embedding", "probe_weight", "probe_bias"):
            if key not in f:
                raise DQError(f"{path}: missing dataset '{key}'; is this a file written by the features stage?")
        try:
            kind = str(f.attrs["kind"])
            if kind == "gradient" and "logit_grad" not in f:
                raise DQError(f"{path}: kind is 'gradient' but the dataset 'logit_grad' is missing; "
                              f"rerun the features stage")
            features = Features(
                embedding=f["embedding"][...],
                logit_grad=f["logit_grad"][...] if "logit_grad" in f else None,
                probe_weight=f["probe_weight"][...],
                probe_bias=f["probe_bias"][...],
                kind=kind,
                backbone=str(f.attrs["backbone"]),
                weights=str(f.attrs["weights"]),
                input_size=int(f.attrs["input_size"]),
                classes=json.loads(f.attrs["classes"]),
                probe_train_accuracy=float(f.attrs["probe_train_accuracy"]),
            )
        except H5_OPEN_ERRORS as exc:
            reason = first_line(exc, 160)
            raise DQError(f"{path}: cannot read ({reason}); the file is damaged, rerun the features stage") from None
    _check_shapes(path, features, expected_rows)
    return features


def _check_shapes(path: Path, ft: Features, expected_rows: int | None) -> None:
    n, d = ft.embedding.shape if ft.embedding.ndim == 2 else (-1, -1)
    c = len(ft.classes)
    if n < 0:
        raise DQError(f"{path}: embedding must be float32 [N, D], got shape {ft.embedding.shape}")
    if expected_rows is not None and n != expected_rows:
        raise DQError(f"{path}: has {n} rows but the prepared training set has {expected_rows}; "
                      f"rerun the features stage")
    if ft.probe_weight.shape != (c, d) or ft.probe_bias.shape != (c,):
        raise DQError(f"{path}: probe must be [{c}, {d}] and [{c}] for {c} classes and {d} features, got "
                      f"{ft.probe_weight.shape} and {ft.probe_bias.shape}")
    if ft.logit_grad is not None and ft.logit_grad.shape != (n, c):
        raise DQError(f"{path}: logit_grad must be [{n}, {c}], got {ft.logit_grad.shape}")


def check_made_with(path: str | Path, features: Features, *, backbone: str, weights: str, input_size: int) -> None:
    """The probe only fits the backbone that the features stage ran with: refuse a file made with another."""
    for key, stored, wanted in (("backbone", features.backbone, backbone), ("weights", features.weights, weights),
                                ("input_size", features.input_size, input_size)):
        if stored != wanted:
            raise DQError(f"{path}: made with features.{key} = {stored!r} but params.yaml says {wanted!r}; "
                          f"rerun the features stage")
