"""DVC stage `compress`: GradCAM++ patch scores for the selected images → data/compact/dataset.h5.

Reads data/prepared/train.h5, data/selection/ and data/features/train.h5 (its linear probe gives
GradCAM++ the dataset's classes). Writes the compact file (owned by dq.format), the storage metrics
data/compact_metrics.json and the figure data/compact_plots/patches.png.
"""
from __future__ import annotations

import sys

import torch

from dq import cam
from dq.backbones import classifier_with_probe, create_backbone, normalization
from dq.errors import run_cli
from dq.features import check_made_with, read_features
from dq.format import Header, storage_metrics, write_compact
from dq.io import write_json
from dq.params import Params
from dq.paths import DataPaths
from dq.prepared import read_prepared
from dq.runtime import device_for
from dq.selection import read_selection
from stages.common import parse_args


def provenance(params: Params) -> dict:
    """Exactly the params this stage reads (dvc.yaml lists the same), for the file's `params` attribute."""
    f = params.features
    return {"ratio": params.ratio,
            "features": {"backbone": f.backbone, "weights": f.weights, "input_size": f.input_size},
            "patches": params.section_dict("patches")["patches"],
            "runtime": {"device": params.runtime.device}}


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Score patches with GradCAM++ and write the compact dataset.", argv)
    paths, fp, pp = DataPaths(args.data), params.features, params.patches
    prepared = read_prepared(paths.prepared_split("train"))
    indices, bins = read_selection(paths.selection, len(prepared.labels))
    features = read_features(paths.features, expected_rows=len(prepared.labels))
    check_made_with(paths.features, features, backbone=fp.backbone, weights=fp.weights, input_size=fp.input_size)
    torch.use_deterministic_algorithms(True, warn_only=True)

    images, labels = prepared.images[indices], prepared.labels[indices]
    backbone = create_backbone(fp.backbone, fp.weights)
    model = classifier_with_probe(backbone, features.probe_weight, features.probe_bias)
    layer_name, layer = cam.target_layer(backbone, pp.cam_layer, fp.input_size)
    print(f"compress: GradCAM++ on {fp.backbone}.{layer_name} at {fp.input_size}px for {len(indices)} images",
          file=sys.stderr)
    mean, std = normalization(backbone)
    maps = cam.attention_maps(model, layer, images, labels, fp.input_size, pp.batch_size,
                              device_for(params.runtime), mean=mean, std=std)
    scores = cam.patch_scores(maps, pp.patch_size)
    keep = cam.keep_mask(scores, pp.drop)

    header = Header(image_size=images.shape[1], patch_size=pp.patch_size, channels=images.shape[3], drop=pp.drop,
                    ratio=params.ratio, classes=prepared.classes, source=prepared.source, params=provenance(params))
    write_compact(paths.compact, header, images, keep, labels, indices, bins[indices], scores)
    write_json(paths.compact_metrics, storage_metrics(paths.compact, len(prepared.labels)))
    rows = cam.figure_rows(labels)
    cam.plot_patches(paths.compact_figure, images[rows], maps[rows], keep[rows], pp.patch_size,
                     [prepared.classes[int(y)] for y in labels[rows]])


if __name__ == "__main__":
    run_cli(main)
