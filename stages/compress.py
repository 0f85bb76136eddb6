"""DVC stage `compress`: patch scores (`patches.scorer`) for the selected images → data/compact/dataset.h5.

Reads data/prepared/train/ (only the selected rows), data/selection/ and data/features/train.h5 (its
linear probe gives GradCAM++ the dataset's classes). Writes the compact file (owned by dq.format; images
stored with `patches.codec`), the storage metrics and the probe's top-1 on the kept images
(dq.cam.ProbeCounts) in data/compact_metrics.json, and the figure data/compact_plots/patches.png.

The images stream: the CAM pass reads the selected rows through a DataLoader over the prepared shards
(`runtime.num_workers` workers, each opening its own shard files) in batches of `patches.batch_size`,
and each batch is scored, counted for the probe metrics, picked from for the figure and, in one
process, handed to the compact writer (dq.format.CompactWriter, which spools the encoded images to
disk), then let go. What stays in memory is per image: scores and keep masks [n, L], labels, rows.
Under torchrun (`python -m stages.launch compress` with runtime.nproc > 1) each rank scores a
contiguous shard of whole batches, the batches one process would run, so the scores are the same;
rank 0 gathers the scores, keep masks, probe counts and figure samples, then reads the selected images
again, batch by batch, to write the file. Neither num_workers nor nproc changes a byte of the outputs.
"""
from __future__ import annotations

from dq.kernels import pin_cpu_kernels

pin_cpu_kernels()  # before torch loads: GradCAM++'s gradients in one order on every x86-64 CPU

import gzip  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dq import cam, distributed  # noqa: E402
from dq.backbones import classifier_with_probe, create_backbone  # noqa: E402
from dq.datasets import FASHION_MNIST_ROOT, IMAGE_EXTENSIONS  # noqa: E402
from dq.errors import run_cli  # noqa: E402
from dq.features import check_made_with, read_features  # noqa: E402
from dq.format import CompactWriter, Header, storage_metrics  # noqa: E402
from dq.io import write_json  # noqa: E402
from dq.params import DataParams, Params  # noqa: E402
from dq.paths import DataPaths  # noqa: E402
from dq.prepared import image_loader, open_store  # noqa: E402
from dq.runtime import device_for  # noqa: E402
from dq.selection import read_selection  # noqa: E402
from stages.common import parse_args  # noqa: E402


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


def selected_batches(store, indices: np.ndarray, part: slice, batch_size: int, num_workers: int, *,
                     desc: str = "", progress: bool = False):
    """(uint8 images [b, H, W, 3], labels [b], positions [b]) of the selected rows `indices[part]`, in
    order; positions are places in `indices`. Read by DataLoader workers over the shards."""
    from tqdm import tqdm

    loader = image_loader(store, indices[part], batch_size=batch_size, num_workers=num_workers)
    start = part.start
    for images, labels, _rows in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        yield images.numpy(), labels.numpy(), np.arange(start, start + len(labels))
        start += len(labels)


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Score patches with GradCAM++ and write the compact dataset.", argv)
    paths, fp, pp, workers = DataPaths(args.data), params.features, params.patches, params.runtime.num_workers
    store = open_store(paths.prepared_split("train"))
    all_labels = store.labels()
    indices, bins = read_selection(paths.selection, len(all_labels))
    features = read_features(paths.features, expected_rows=len(all_labels))
    check_made_with(paths.features, features, backbone=fp.backbone, weights=fp.weights, input_size=fp.input_size)
    torch.use_deterministic_algorithms(True, warn_only=True)

    n, labels, selected_bins = len(indices), all_labels[indices], bins[indices]  # per image: small
    device = device_for(params.runtime)
    with distributed.process_group(device):
        main_rank, world = distributed.is_main(), distributed.world_size()
        backbone = create_backbone(fp.backbone, fp.weights)
        model = classifier_with_probe(backbone, features.probe_weight, features.probe_bias)  # normalises as backbone
        layer_name, layer = "", None
        if pp.scorer.startswith("gradcam++"):
            layer_name, layer = cam.target_layer(backbone, pp.cam_layer, fp.input_size)
        where = f" on {fp.backbone}.{layer_name} at {fp.input_size}px" if layer_name else ""
        if main_rank:
            print(f"compress: {pp.scorer}{where} for {n} images"
                  + (f" on {world} processes" if world > 1 else ""), file=sys.stderr)
        scorer = cam.create_scorer(pp.scorer, pp.patch_size, seed=params.seed, model=model, layer=layer,
                                   input_size=fp.input_size, batch_size=pp.batch_size, device=device,
                                   progress=False)
        header = Header(image_size=store.image_shape[0], patch_size=pp.patch_size, channels=store.image_shape[2],
                        drop=pp.drop, ratio=params.ratio, classes=store.classes, source=store.index.source,
                        params=provenance(params), codec=pp.codec, quality=pp.quality,
                        store_scores=pp.store_scores)
        probe = cam.ProbeCounts(model, pp.patch_size, fp.input_size, pp.drop, device, seed=params.seed)
        figure = cam.FigureSamples(cam.figure_rows(labels))
        part = distributed.shard(n, pp.batch_size, distributed.rank(), world)
        batches = selected_batches(store, indices, part, pp.batch_size, workers, desc=pp.scorer, progress=main_rank)
        sources = source_bytes(params.data, n)

        def score(on_batch=None):
            return cam.score_batches(scorer, batches, pp.drop, header.num_patches, probe=probe, figure=figure,
                                     on_batch=on_batch)

        if world == 1:  # one pass: each scored batch goes straight to the writer
            with CompactWriter(paths.compact, header, n, sources) as writer:
                score(lambda images, y, pos, scores, keep: writer.add(images, keep, y, indices[pos],
                                                                      selected_bins[pos], scores))
        else:  # every collective first: rank 0's write pass may outlast a collective's timeout
            scores, keep = (distributed.gather_rows(a) for a in score())
            counts = torch.from_numpy(probe.counts).to(device)
            probe.counts = distributed.all_reduce_sum(counts).cpu().numpy()
            shown = [distributed.gather_rows(a) for a in figure.arrays(store.image_shape, header.num_patches)]
            if not main_rank:
                return
            figure = cam.FigureSamples(shown[0])
            figure.add(*shown)
            with CompactWriter(paths.compact, header, n, sources) as writer:
                for images, y, pos in selected_batches(store, indices, slice(0, n), pp.batch_size, workers,
                                                       desc="write", progress=True):
                    writer.add(images, keep[pos], y, indices[pos], selected_bins[pos], scores[pos])

    metrics = probe.metrics()
    print(f"compress: probe top-1 full {metrics['probe_top1_full']:.3f}, kept {metrics['probe_top1_kept']:.3f}, "
          f"random masks {metrics['probe_top1_random_keep']:.3f}, "
          f"pixel-std masks {metrics['probe_top1_std_keep']:.3f}", file=sys.stderr)
    write_json(paths.compact_metrics, {**storage_metrics(paths.compact, len(all_labels)), **metrics})
    positions, images, maps, keep = figure.arrays(store.image_shape, header.num_patches)
    cam.plot_patches(paths.compact_figure, images, maps, keep, pp.patch_size,
                     [store.classes[int(y)] for y in labels[positions]], map_name=pp.scorer)


if __name__ == "__main__":
    run_cli(main)
