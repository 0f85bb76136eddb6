"""DVC stage `compress`: GradCAM++ patch scores for the selected images → data/compact/dataset.h5.

Reads data/prepared/train/ (only the selected rows, streamed through a DataLoader for the CAM pass),
data/selection/ and data/features/train.h5 (its linear probe gives GradCAM++ the dataset's classes). Writes the compact file (owned by dq.format), the storage metrics
data/compact_metrics.json and the figure data/compact_plots/patches.png.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from dq import cam
from dq.backbones import classifier_with_probe, create_backbone, normalization
from dq.errors import run_cli
from dq.features import check_made_with, read_features
from dq.format import Header, storage_metrics, write_compact
from dq.io import write_json
from dq.params import Params
from dq.paths import DataPaths
from dq.prepared import image_loader, open_store
from dq.runtime import device_for
from dq.selection import read_selection
from stages.common import parse_args


def provenance(params: Params) -> dict:
    """Exactly the params this stage reads (dvc.yaml lists the same), for the file's `params` attribute."""
    f = params.features
    return {"ratio": params.ratio,
            "features": {"backbone": f.backbone, "weights": f.weights, "input_size": f.input_size},
            "patches": params.section_dict("patches")["patches"],
            "runtime": {"device": params.runtime.device}}  # num_workers changes no byte of the output


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Score patches with GradCAM++ and write the compact dataset.", argv)
    paths, fp, pp = DataPaths(args.data), params.features, params.patches
    store = open_store(paths.prepared_split("train"))
    all_labels = store.labels()
    indices, bins = read_selection(paths.selection, len(all_labels))
    features = read_features(paths.features, expected_rows=len(all_labels))
    check_made_with(paths.features, features, backbone=fp.backbone, weights=fp.weights, input_size=fp.input_size)
    torch.use_deterministic_algorithms(True, warn_only=True)

    labels = all_labels[indices]
    backbone = create_backbone(fp.backbone, fp.weights)
    model = classifier_with_probe(backbone, features.probe_weight, features.probe_bias)
    layer_name, layer = cam.target_layer(backbone, pp.cam_layer, fp.input_size)
    print(f"compress: GradCAM++ on {fp.backbone}.{layer_name} at {fp.input_size}px for {len(indices)} images",
          file=sys.stderr)
    mean, std = normalization(backbone)
    loader = image_loader(store, indices, batch_size=pp.batch_size, num_workers=params.runtime.num_workers)
    scores, shown, maps = [], cam.figure_rows(labels), []  # keep only the figure's maps, not all of them
    for start, batch_maps in zip(range(0, len(indices), pp.batch_size), cam.attention_map_batches(
            model, layer, loader, fp.input_size, device_for(params.runtime), mean=mean, std=std)):
        scores.append(cam.patch_scores(batch_maps, pp.patch_size))
        mine = shown[(shown >= start) & (shown < start + len(batch_maps))] - start
        maps += list(batch_maps[mine])
    scores = np.concatenate(scores) if scores else np.zeros((0, 0), np.float32)
    keep = cam.keep_mask(scores, pp.drop)
    images = store.read(indices)  # the compact writer takes the selected images whole (dq.format)

    header = Header(image_size=images.shape[1], patch_size=pp.patch_size, channels=images.shape[3], drop=pp.drop,
                    ratio=params.ratio, classes=store.classes, source=store.index.source, params=provenance(params))
    write_compact(paths.compact, header, images, keep, labels, indices, bins[indices], scores)
    write_json(paths.compact_metrics, storage_metrics(paths.compact, len(all_labels)))
    cam.plot_patches(paths.compact_figure, images[shown], np.asarray(maps), keep[shown], pp.patch_size,
                     [store.classes[int(y)] for y in labels[shown]])


if __name__ == "__main__":
    run_cli(main)
