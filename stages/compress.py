"""Stage `compress`: GradCAM++ patch scores for the selected images → data/compact/dataset.h5.

Reads data/prepared/train.h5, data/selection/{indices,bins}.npy and data/features/train.h5 (its
linear probe gives GradCAM++ the dataset's classes). Writes the compact file, the storage metrics
data/compact_metrics.json and the figure data/compact_plots/patches.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from dq import cam
from dq.backbones import classifier_with_probe, create_backbone, normalization, read_features
from dq.errors import DQError, run_cli
from dq.format import Header, storage_metrics, write_compact
from dq.io import read_prepared, write_json
from dq.params import Params
from dq.runtime import device_for
from stages.common import parse_args


def read_selection(folder: Path, num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """indices int64 [N] (sorted, unique, in range) and bins int32 [num_train] written by `select`."""
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


def provenance(params: Params) -> dict:
    """Exactly the params this stage reads (dvc.yaml lists the same), for the file's `params` attribute."""
    f = params.features
    return {"ratio": params.ratio,
            "features": {"backbone": f.backbone, "weights": f.weights, "input_size": f.input_size},
            "patches": params.section_dict("patches")["patches"],
            "runtime": {"device": params.runtime.device}}


def check_features_match(path: Path, features, params: Params) -> None:
    """The probe only fits the backbone that the features stage ran with."""
    f = params.features
    for key, stored, wanted in (("backbone", features.backbone, f.backbone), ("weights", features.weights, f.weights),
                                ("input_size", features.input_size, f.input_size)):
        if stored != wanted:
            raise DQError(f"{path}: made with features.{key} = {stored!r} but params.yaml says {wanted!r}; "
                          f"rerun the features stage")


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Score patches with GradCAM++ and write the compact dataset.", argv)
    data: Path = args.data
    prepared = read_prepared(data / "prepared/train.h5")
    indices, bins = read_selection(data / "selection", len(prepared.labels))
    features_path = data / "features/train.h5"
    features = read_features(features_path, expected_rows=len(prepared.labels))
    check_features_match(features_path, features, params)
    torch.use_deterministic_algorithms(True, warn_only=True)

    images, labels = prepared.images[indices], prepared.labels[indices]
    size, p = images.shape[1], params.patches.patch_size
    if size % p:
        raise DQError(f"patches.patch_size = {p} is not allowed; expected a divisor of the image size {size}")
    backbone = create_backbone(params.features.backbone, params.features.weights)
    model = classifier_with_probe(backbone, features.probe_weight, features.probe_bias)
    layer_name, layer = cam.target_layer(backbone, params.patches.cam_layer, params.features.input_size)
    print(f"compress: GradCAM++ on {params.features.backbone}.{layer_name} at {params.features.input_size}px "
          f"for {len(indices)} images", file=sys.stderr)
    mean, std = normalization(backbone)
    maps = cam.attention_maps(model, layer, images, labels, params.features.input_size,
                              params.patches.batch_size, device_for(params.runtime), mean=mean, std=std)
    scores = cam.patch_scores(maps, p)
    keep = cam.keep_mask(scores, params.patches.drop)

    header = Header(image_size=size, patch_size=p, channels=images.shape[3], drop=params.patches.drop,
                    ratio=params.ratio, classes=prepared.classes, source=prepared.source, params=provenance(params))
    out = data / "compact/dataset.h5"
    write_compact(out, header, images, keep, labels, indices, bins[indices], scores)
    write_json(data / "compact_metrics.json", storage_metrics(out, len(prepared.labels)))
    rows = cam.figure_rows(labels)
    cam.plot_patches(data / "compact_plots/patches.png", images[rows], maps[rows], keep[rows], p,
                     [prepared.classes[int(y)] for y in labels[rows]])


if __name__ == "__main__":
    run_cli(main)
