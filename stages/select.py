"""The `select` stage: DQ bins and the kept samples, with a summary and a figure of one class.

Reads data/features/train.h5 (`embedding` [N, D], and `logit_grad` [N, C] for gradient features) and
the labels of data/prepared/train.h5; writes data/selection/{bins.npy, indices.npy, summary.json} as
one folder, atomically, and data/selection_plots/bins.png.
"""
from __future__ import annotations

import json

import numpy as np

from dq.backbones import read_features
from dq.errors import run_cli
from dq.figures import pyplot, save_png
from dq.io import atomic_path, read_prepared
from dq.params import Params
from dq.select import GradientFeatures, diversity, select_indices
from stages.common import parse_args


def selection_features(path, expected_rows: int):
    """The features file's embedding [N, D], or GradientFeatures when it holds logit_grad [N, C]."""
    features = read_features(path, expected_rows)
    if features.logit_grad is None:
        return features.embedding
    return GradientFeatures(features.logit_grad, features.embedding)


def summarise(params: Params, features, labels, bins, indices, classes) -> dict:
    """Counts per bin and class, kept counts, and the kept set's spread against the full set's."""
    kept = np.zeros(len(labels), bool)
    kept[indices] = True

    def counts(values, mask=None):
        values = values if mask is None else values[mask]
        keys, n = np.unique(values, return_counts=True)
        return {str(int(k)): int(c) for k, c in zip(keys, n)}

    return {
        "method": params.select.method,
        "params": params.section_dict("ratio", "seed", "select"),
        "kind": "gradient" if isinstance(features, GradientFeatures) else "embedding",
        "classes": list(classes),
        "samples": int(len(labels)),
        "kept": int(len(indices)),
        "kept_share": float(len(indices) / len(labels)),
        "per_bin": counts(bins),
        "per_class": counts(labels),
        "kept_per_bin": counts(bins, kept),
        "kept_per_class": counts(labels, kept),
        "per_bin_class": {f"{b}/{c}": n for (b, c), n in _cells(bins, labels).items()},
        "diversity": {"kept": diversity(features, labels, indices), "full": diversity(features, labels)},
    }


def _cells(bins, labels) -> dict:
    pairs, n = np.unique(np.stack([bins.astype(np.int64), labels]), axis=1, return_counts=True)
    return {(int(b), int(c)): int(k) for (b, c), k in zip(pairs.T, n)}


def plot_bins(path, embedding, labels, bins, indices, classes) -> None:
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


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("DQ selection: bins and the kept samples.", argv)
    features_path = args.data / "features" / "train.h5"
    prepared_path = args.data / "prepared" / "train.h5"
    prepared = read_prepared(prepared_path, images=False)
    features = selection_features(features_path, len(prepared.labels))
    n = len(prepared.labels)
    sel = params.select
    bins, indices = select_indices(sel.method, features, prepared.labels, params.ratio, params.seed,
                                   sel.num_bins, sel.lam, sel.per_class, progress=True)
    summary = summarise(params, features, prepared.labels, bins, indices, prepared.classes)

    with atomic_path(args.data / "selection") as tmp:
        tmp.mkdir()
        np.save(tmp / "bins.npy", bins.astype(np.int32))
        np.save(tmp / "indices.npy", indices.astype(np.int64))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    embedding = features.embedding if isinstance(features, GradientFeatures) else features
    plot_bins(args.data / "selection_plots" / "bins.png", embedding, prepared.labels, bins, indices,
              prepared.classes)
    print(f"select: kept {len(indices)} of {n} samples with method {sel.method}")


if __name__ == "__main__":
    run_cli(main)
