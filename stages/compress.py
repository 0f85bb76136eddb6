"""DVC stage `compress`: patch scores (`patches.scorer`) for the selected images → data/compact/dataset.h5.

Reads data/prepared/train/ (only the selected rows), data/selection/ and data/features/train.h5 (its
linear probe gives GradCAM++ the dataset's classes). Writes the compact file (owned by dq.format; images
stored with `patches.codec`), the storage metrics and the probe's top-1 on the kept images
(dq.cam.probe_metrics) in data/compact_metrics.json, and the figure data/compact_plots/patches.png.
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import torch

from dq import cam
from dq.backbones import classifier_with_probe, create_backbone
from dq.datasets import FASHION_MNIST_ROOT, IMAGE_EXTENSIONS
from dq.errors import run_cli
from dq.features import check_made_with, read_features
from dq.format import Header, storage_metrics, write_compact
from dq.io import write_json
from dq.params import DataParams, Params
from dq.paths import DataPaths
from dq.prepared import open_store
from dq.runtime import device_for
from dq.selection import read_selection
from stages.common import parse_args


def provenance(params: Params) -> dict:
    """Exactly the params this stage reads (dvc.yaml lists the same), for the file's `params` attribute."""
    f = params.features
    return {"ratio": params.ratio, "seed": params.seed,
            "data": {"source": params.data.source, "root": params.data.root},
            "features": {"backbone": f.backbone, "weights": f.weights, "input_size": f.input_size},
            "patches": params.section_dict("patches")["patches"],
            "runtime": {"device": params.runtime.device}}  # num_workers changes no byte of the output


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
    store = open_store(paths.prepared_split("train"))
    all_labels = store.labels()
    indices, bins = read_selection(paths.selection, len(all_labels))
    features = read_features(paths.features, expected_rows=len(all_labels))
    check_made_with(paths.features, features, backbone=fp.backbone, weights=fp.weights, input_size=fp.input_size)
    torch.use_deterministic_algorithms(True, warn_only=True)

    images, labels = store.read(indices), all_labels[indices]  # the selected rows only
    device = device_for(params.runtime)
    backbone = create_backbone(fp.backbone, fp.weights)
    model = classifier_with_probe(backbone, features.probe_weight, features.probe_bias)  # normalises as backbone
    layer_name, layer = "", None
    if pp.scorer.startswith("gradcam++"):
        layer_name, layer = cam.target_layer(backbone, pp.cam_layer, fp.input_size)
    where = f" on {fp.backbone}.{layer_name} at {fp.input_size}px" if layer_name else ""
    print(f"compress: {pp.scorer}{where} for {len(indices)} images", file=sys.stderr)
    scorer = cam.create_scorer(pp.scorer, pp.patch_size, seed=params.seed, model=model, layer=layer,
                               input_size=fp.input_size, batch_size=pp.batch_size, device=device)
    maps, scores = scorer.scores(images, labels)
    keep = cam.keep_mask(scores, pp.drop)

    header = Header(image_size=images.shape[1], patch_size=pp.patch_size, channels=images.shape[3], drop=pp.drop,
                    ratio=params.ratio, classes=store.classes, source=store.index.source, params=provenance(params),
                    codec=pp.codec, quality=pp.quality, store_scores=pp.store_scores)
    write_compact(paths.compact, header, images, keep, labels, indices, bins[indices], scores,
                  source_bytes=source_bytes(params.data, len(indices)))
    probe = cam.probe_metrics(model, images, labels, keep, pp.patch_size, fp.input_size, pp.batch_size, device,
                              seed=params.seed)
    print(f"compress: probe top-1 full {probe['probe_top1_full']:.3f}, kept {probe['probe_top1_kept']:.3f}, "
          f"random masks {probe['probe_top1_random_keep']:.3f}, pixel-std masks {probe['probe_top1_std_keep']:.3f}",
          file=sys.stderr)
    write_json(paths.compact_metrics, {**storage_metrics(paths.compact, len(all_labels)), **probe})
    rows = cam.figure_rows(labels)
    cam.plot_patches(paths.compact_figure, images[rows], maps[rows], keep[rows], pp.patch_size,
                     [store.classes[int(y)] for y in labels[rows]], map_name=pp.scorer)


if __name__ == "__main__":
    run_cli(main)
