"""Per-sample difficulty: the scores file `scores/scores.h5` (its one writer, reader and validator) and
the feature-only scores, which need no training.

The scores stage writes one float per training sample per score, each a named dataset:

    aum              area under the margin (Pleiss et al., NeurIPS 2020): the mean over the times a sample is
                     in a training batch of z_y - max_{j != y} z_j (its logits); low = hard (mislabelled at < 0)
    el2n             error L2 norm (Paul et al., NeurIPS 2021): ||softmax(z) - onehot(y)||_2 early in training,
                     on the un-augmented image; high = hard
    forgetting       forgetting events (Toneva et al., ICLR 2019): how often a sample went from classified
                     right to wrong between two presentations; never learned = its presentations; high = hard
    median_distance  Euclidean distance of the embedding to the element-wise median of its class's embeddings
                     (Moderate-DS, Xia et al., ICLR 2023)
    knn_density      mean of exp(-d) over the `scores.k` nearest members of its class, d the Euclidean distance
                     between unit-norm embeddings (the density D2 pruning passes along its graph); high = dense

The three training-dynamics scores (dq.scores.dynamics) are averaged over `scores.seeds` short runs. The file also
holds `labels` int64 [N], and attributes `format = "dq-scores"`, `schema_version`, `num_rows`, `names` and
`params` (JSON). Values are float32 [N], chunked, gzip, with checksums; equal inputs give equal bytes.

The neighbour search (`class_neighbours`) is one class at a time in blocks of rows: memory grows with
NEIGHBOUR_BLOCK x the largest class, never with N x N. dq.select.difficulty's d2 and moderate use the same
helpers, so the stored scores and the methods agree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dq.core.errors import DQError, first_line
from dq.core.io import H5_OPEN_ERRORS, atomic_path, h5_file
from dq.select.methods import DIFFICULTY_SCORES

FORMAT = "dq-scores"
SCHEMA_VERSION = 1
DYNAMICS_SCORES = DIFFICULTY_SCORES  # from training: aum, el2n, forgetting
FEATURE_SCORES = ("median_distance", "knn_density")
NAMES = DYNAMICS_SCORES + FEATURE_SCORES
# +1 where a higher value is harder, -1 where a lower one is (AUM): `difficulty` turns each into "higher = harder"
HARDER = {"aum": -1.0, "el2n": 1.0, "forgetting": 1.0}
NEIGHBOUR_BLOCK = 1024  # rows of a class whose cosines to the whole class are computed at once


@dataclass
class Scores:
    """The contents of `scores/scores.h5`: float64 [N] per name (read from float32), labels int64 [N]."""

    values: dict[str, np.ndarray]
    labels: np.ndarray
    params: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.values:
            raise DQError(f"scores: no score {name!r}; the file holds {', '.join(self.values)}; rerun the scores stage")
        return self.values[name]

    def __contains__(self, name) -> bool:
        return name in self.values

    def __len__(self) -> int:
        return len(self.labels)


def difficulty(scores, name: str) -> np.ndarray:
    """float64 [N], higher = harder: the score `name` (select.score) of a Scores or a mapping, signed by HARDER."""
    if name not in HARDER:
        raise DQError(f"select.score = {name!r} is not allowed; expected one of {', '.join(HARDER)}")
    values = np.asarray(scores[name], np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise DQError(f"scores: {name} must be finite floats [N]; rerun the scores stage")
    return HARDER[name] * values


# ------------------------------------------------------------------------------------- feature scores

def embedding_of(features) -> np.ndarray:
    """The embedding [N, D] of dense features or of dq.select.cosine.GradientFeatures (its `embedding`)."""
    return np.asarray(getattr(features, "embedding", features))


def median_distance(embedding, labels) -> np.ndarray:
    """float64 [N]: ||e_i - median_c||_2, median_c the element-wise median of class c's embeddings [D]."""
    x, labels = np.asarray(embedding), np.asarray(labels)
    out = np.empty(len(labels), np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rows = x[members].astype(np.float64)  # [n_c, D]: one class at a time
        out[members] = np.linalg.norm(rows - np.median(rows, axis=0), axis=1)
    return out


def unit_rows(rows) -> np.ndarray:
    """rows / ||rows||, float64 [n, D]; zero rows are refused (their direction is undefined)."""
    rows = np.asarray(rows, np.float64)
    norm = np.linalg.norm(rows, axis=1)
    if (norm == 0).any():
        raise DQError(f"features: row {int(np.argmax(norm == 0))} of a class has zero norm; "
                      "neighbours need nonzero feature rows")
    return rows / norm[:, None]


def class_neighbours(unit: np.ndarray, k: int, block: int = NEIGHBOUR_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of each row of one class (k capped at n - 1), nearest first, ties to the lower row.

    unit: float64 [n, D] unit-norm rows. Returns (neighbours int64 [n, k], distances float64 [n, k]) with
    d = ||u_i - u_j|| = sqrt(2 - 2 cos), computed `block` rows at a time ([block, n] cosines).
    """
    n = len(unit)
    k = min(int(k), n - 1)
    nbrs, dist = np.zeros((n, max(k, 0)), np.int64), np.zeros((n, max(k, 0)), np.float64)
    if k <= 0:
        return nbrs, dist
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        cos = unit[rows] @ unit.T  # [b, n]
        cos[np.arange(len(rows)), rows] = -np.inf  # never one's own neighbour
        order = np.argsort(-cos, axis=1, kind="stable")[:, :k]  # largest cosine = nearest; ties: lower row
        nbrs[rows] = order
        dist[rows] = np.sqrt(np.maximum(2.0 - 2.0 * np.take_along_axis(cos, order, axis=1), 0.0))
    return nbrs, dist


def knn_density(embedding, labels, k: int) -> np.ndarray:
    """float64 [N]: mean over the k nearest members of the class of exp(-d), d between unit-norm embeddings."""
    x, labels = np.asarray(embedding), np.asarray(labels)
    out = np.zeros(len(labels), np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        _, dist = class_neighbours(unit_rows(x[members]), k)
        if dist.shape[1]:
            out[members] = np.exp(-dist).mean(axis=1)
    return out


def feature_scores(embedding, labels, k: int) -> dict[str, np.ndarray]:
    """The feature-only scores (FEATURE_SCORES) of embeddings [N, D] and labels [N]: float64 [N] each."""
    return {"median_distance": median_distance(embedding, labels), "knn_density": knn_density(embedding, labels, k)}


# ---------------------------------------------------------------------------------------- the file

def write_scores(path: str | Path, values: dict[str, np.ndarray], labels: np.ndarray, params: dict) -> None:
    """Write `values` (name -> float [N]) and labels as the scores file, atomically; equal inputs, equal bytes."""
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    for name, v in values.items():
        if np.shape(v) != (n,) or not np.isfinite(v).all():
            raise DQError(f"scores: {name} must be {n} finite floats; got shape {np.shape(v)}")
    chunk = (max(1, min(n, 65536)),) if n else None
    with atomic_path(path) as tmp:
        with h5_file(tmp, "w") as f:
            for name in values:
                f.create_dataset(name, data=np.asarray(values[name], np.float32), chunks=chunk,
                                 compression="gzip" if n else None, shuffle=bool(n), fletcher32=bool(n))
            f.create_dataset("labels", data=labels, chunks=chunk, compression="gzip" if n else None,
                             fletcher32=bool(n))
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["num_rows"] = n
            f.attrs["names"] = json.dumps(list(values))
            f.attrs["params"] = json.dumps(params, sort_keys=True)


def read_scores(path: str | Path, labels: np.ndarray | None = None) -> Scores:
    """Read and validate a scores file; with `labels` (the prepared training set's), they must be its labels."""
    path = Path(path)
    if not path.is_file():
        raise DQError(f"{path}: file not found; run the scores stage (dvc repro scores)")
    with h5_file(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise DQError(f"{path}: not a scores file (format {f.attrs.get('format')!r}); rerun the scores stage")
        if int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION:
            raise DQError(f"{path}: schema_version {f.attrs.get('schema_version')} is not {SCHEMA_VERSION}; "
                          "rerun the scores stage")
        try:
            names = json.loads(f.attrs["names"])
            values = {name: f[name][...].astype(np.float64) for name in names}
            stored_labels = f["labels"][...]
            params = json.loads(f.attrs["params"])
        except H5_OPEN_ERRORS as exc:
            raise DQError(f"{path}: cannot read ({first_line(exc, 160)}); the file is damaged, "
                          "rerun the scores stage") from None
    if labels is not None and (len(stored_labels) != len(labels) or not np.array_equal(stored_labels, labels)):
        raise DQError(f"{path}: its {len(stored_labels)} labels are not the prepared training set's "
                      f"{len(labels)}; rerun the scores stage")
    for name, v in values.items():
        if v.shape != stored_labels.shape or not np.isfinite(v).all():
            raise DQError(f"{path}: {name} must be {len(stored_labels)} finite floats; rerun the scores stage")
    return Scores(values, stored_labels.astype(np.int64), params)
