"""DVC stage `compress`: GradCAM++ patch scores for the selected images → data/compact/dataset.h5.

Reads data/prepared/train.h5, data/selection/ and data/features/train.h5 (its linear probe gives
GradCAM++ the dataset's classes). Writes the compact file (owned by dq.format; images stored with
`patches.codec`), the storage metrics data/compact_metrics.json and the figure data/compact_plots/patches.png.
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import torch

from dq import cam
from dq.backbones import classifier_with_probe, create_backbone, normalization
from dq.datasets import FASHION_MNIST_ROOT, IMAGE_EXTENSIONS
from dq.errors import run_cli
from dq.features import check_made_with, read_features
from dq.format import Header, storage_metrics, write_compact
from dq.io import write_json
from dq.params import DataParams, Params
from dq.paths import DataPaths
from dq.prepared import read_prepared
from dq.runtime import device_for
from dq.selection import read_selection
from stages.common import parse_args


def provenance(params: Params) -> dict:
    """Exactly the params this stage reads (dvc.yaml lists the same), for the file's `params` attribute."""
    f = params.features
    return {"ratio": params.ratio,
            "data": {"source": params.data.source, "root": params.data.root},
            "features": {"backbone": f.backbone, "weights": f.weights, "input_size": f.input_size},
            "patches": params.section_dict("patches")["patches"],
            "runtime": {"device": params.runtime.device}}


def source_bytes(data: DataParams, n: int) -> tuple[int | None, str]:
    """(bytes of the source files of `n` training images, how they were counted), an estimate.

    The prepared store keeps no file names, so this is `n` times the mean bytes per source image:
    Fashion-MNIST's gzip IDX file over its image count, an image folder's train files over their number,
    CIFAR's 3072 raw bytes per image (torchvision's pickles are uncompressed); synthetic data has no files.
    """
    if data.source == "fashion-mnist":
        root = Path(data.root) if data.root else FASHION_MNIST_ROOT
        for name, opener in (("train-images-idx3-ubyte.gz", gzip.open), ("train-images-idx3-ubyte", open)):
            path = root / name
            if path.is_file():
                with opener(path, "rb") as fh:
                    count = int.from_bytes(fh.read(8)[4:8], "big")  # IDX header: magic, then the image count
                return round(n * path.stat().st_size / max(count, 1)), f"{n} x mean bytes per image of {path}"
        return None, f"no Fashion-MNIST IDX file under {root}"
    if data.source == "imagefolder" and data.root:
        files = [p for p in (Path(data.root) / "train").glob("*/*")
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if files:
            mean = sum(p.stat().st_size for p in files) / len(files)
            return round(n * mean), f"{n} x mean bytes of the {len(files)} image files under {data.root}/train"
        return None, f"no image files under {data.root}/train"
    if data.source in ("cifar10", "cifar100"):
        return n * 32 * 32 * 3, f"{n} x 3072 raw bytes per image (torchvision's CIFAR pickles)"
    return None, f"{data.source}: no source files"


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
                    ratio=params.ratio, classes=prepared.classes, source=prepared.source, params=provenance(params),
                    codec=pp.codec, quality=pp.quality, store_scores=pp.store_scores)
    write_compact(paths.compact, header, images, keep, labels, indices, bins[indices], scores,
                  source_bytes=source_bytes(params.data, len(indices)))
    write_json(paths.compact_metrics, storage_metrics(paths.compact, len(prepared.labels)))
    rows = cam.figure_rows(labels)
    cam.plot_patches(paths.compact_figure, images[rows], maps[rows], keep[rows], pp.patch_size,
                     [prepared.classes[int(y)] for y in labels[rows]])


if __name__ == "__main__":
    run_cli(main)
