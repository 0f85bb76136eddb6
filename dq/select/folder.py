"""The selection folder `selection/`: its one writer, reader and validator; the select stage's metrics and figure.

    bins.npy       int32 [N]: the bin of every training sample (-1 where a method has no bins)
    indices.npy    int64 [n], sorted and unique: the kept samples
    summary.json   method, params, counts per bin and class: integers and exact ratios only

compress depends on this folder, so its bytes must be the same on every machine. Float statistics that
move in their last bits with the BLAS build or thread count (the diversity of the kept set) therefore go
to `selection_metrics.json` beside it, which no stage reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dq.core.errors import DQError
from dq.core.figures import pyplot, save_png
from dq.core.io import atomic_path
from dq.select.cosine import GradientFeatures, check_features, check_labels, class_unit


def selection_features(features) -> "np.ndarray | GradientFeatures":
    """What selection ranks, from a features file (dq.features.file.Features): the embedding [N, D], or
    GradientFeatures when the file holds logit gradients [N, C]."""
    if features.logit_grad is None:
        return features.embedding
    return GradientFeatures(features.logit_grad, features.embedding)


def summary(method: str, params: dict, features, labels: np.ndarray, bins: np.ndarray, indices: np.ndarray,
            classes: list[str]) -> dict:
    """Counts per bin and class and the kept counts: exact numbers, the same on every machine."""
    kept = np.zeros(len(labels), bool)
    kept[indices] = True
    return {
        "method": method,
        "params": params,
        "kind": "gradient" if isinstance(features, GradientFeatures) else "embedding",
        "classes": list(classes),
        "samples": int(len(labels)),
        "kept": int(len(indices)),
        "kept_share": float(len(indices) / len(labels)),
        "per_bin": _counts(bins),
        "per_class": _counts(labels),
        "kept_per_bin": _counts(bins, kept),
        "kept_per_class": _counts(labels, kept),
        "per_bin_class": {f"{b}/{c}": n for (b, c), n in _cells(bins, labels).items()},
    }


def metrics(features, labels: np.ndarray, indices: np.ndarray) -> dict:
    """The kept set's spread within its classes against the full set's (floats: a metrics file only)."""
    return {"diversity": {"kept": diversity(features, labels, indices), "full": diversity(features, labels)}}


def diversity(features, labels, subset: np.ndarray | None = None, chunk: int = 2048) -> dict:
    """Spread of a set within its classes, in cosine distance (1 - cos).

    Returns mean_distance_to_class_centre and mean_nn_distance (nearest other member of the same
    class in the set), averaged over the samples of the set; `subset`: indices, None for all.
    """
    labels = check_labels(labels, check_features(features))
    idx = np.arange(len(labels)) if subset is None else np.asarray(subset, np.int64)
    centre_d, nn_d = [], []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        part = class_unit(features, members)
        sigma = part.total()
        centre_d.append(1.0 - part.project(sigma) / max(np.linalg.norm(sigma), 1e-300))
        if len(members) < 2:
            continue
        best = np.full(len(members), -np.inf)
        for s in range(0, len(members), chunk):
            rows = np.arange(s, min(s + chunk, len(members)))
            cos = part.block(np.float32, rows).astype(np.float64)  # [chunk, n]
            cos[np.arange(len(rows)), rows] = -np.inf
            best[rows] = cos.max(axis=1)
        nn_d.append(1.0 - best)
    centre = np.concatenate(centre_d) if centre_d else np.zeros(0)
    nn = np.concatenate(nn_d) if nn_d else np.zeros(0)
    return {"samples": int(len(idx)),
            "mean_distance_to_class_centre": float(centre.mean()) if centre.size else None,
            "mean_nn_distance": float(nn.mean()) if nn.size else None}


def _counts(values: np.ndarray, mask: np.ndarray | None = None) -> dict[str, int]:
    values = values if mask is None else values[mask]
    keys, n = np.unique(values, return_counts=True)
    return {str(int(k)): int(c) for k, c in zip(keys, n)}


def _cells(bins: np.ndarray, labels: np.ndarray) -> dict:
    pairs, n = np.unique(np.stack([bins.astype(np.int64), labels]), axis=1, return_counts=True)
    return {(int(b), int(c)): int(k) for (b, c), k in zip(pairs.T, n)}


def write_selection(folder: str | Path, bins: np.ndarray, indices: np.ndarray, summary_: dict) -> None:
    """Write the three files as one folder, atomically; equal inputs give equal bytes."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        np.save(tmp / "bins.npy", np.asarray(bins, np.int32))
        np.save(tmp / "indices.npy", np.asarray(indices, np.int64))
        (tmp / "summary.json").write_text(json.dumps(summary_, indent=2, sort_keys=True) + "\n")


def read_selection(folder: str | Path, num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """indices int64 [n] (sorted, unique, in range) and bins int32 [num_train], validated."""
    folder = Path(folder)
    arrays = {}
    for name in ("indices", "bins"):
        path = folder / f"{name}.npy"
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DQError(f"{path}: cannot read the selection ({type(exc).__name__}); rerun the select stage") from None
    indices, bins = arrays["indices"], arrays["bins"]
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or (np.diff(indices) <= 0).any() \
            or (indices.size and (indices[0] < 0 or indices[-1] >= num_train)):
        raise DQError(f"{folder / 'indices.npy'}: expected sorted unique int64 rows in [0, {num_train})")
    if indices.size == 0:
        raise DQError(f"{folder / 'indices.npy'}: selection kept no images; expected at least one (raise ratio)")
    if bins.shape != (num_train,):
        raise DQError(f"{folder / 'bins.npy'}: expected int32 [{num_train}], one bin per training image, "
                      f"got shape {bins.shape}")
    return indices.astype(np.int64), bins.astype(np.int32)


def plot_bins(path: str | Path, embedding: np.ndarray, labels: np.ndarray, bins: np.ndarray,
              indices: np.ndarray, classes: list[str]) -> None:
    """2-D PCA of the first class, coloured by bin, kept samples ringed."""
    plt = pyplot()
    c = int(np.unique(labels)[0])
    members = np.flatnonzero(labels == c)
    x = np.asarray(embedding[members], np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T if vt.shape[0] >= 2 else np.c_[x @ vt[:1].T, np.zeros(len(x))]
    kept = np.isin(members, indices)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    has_bins = bins[members].min() >= 0
    points = ax.scatter(xy[:, 0], xy[:, 1], c=bins[members] if has_bins else "0.6", cmap="tab20", s=8)
    ax.scatter(xy[kept, 0], xy[kept, 1], facecolors="none", edgecolors="black", s=40, linewidths=0.8,
               label=f"kept ({int(kept.sum())} of {len(members)})")
    if has_bins:
        fig.colorbar(points, ax=ax, label="bin")
    name = classes[c] if 0 <= c < len(classes) else str(c)
    ax.set_title(f"class {name}: PCA of the features")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
