"""DVC stage `compress`: patch scores (`patches.scorer`) for the selected images → data/compact/dataset.h5.

Reads data/prepared/train/ (only the selected rows), data/selection/ and data/features/train.h5 (its
linear probe gives GradCAM++ the dataset's classes). Writes the compact file (owned by dq.compact; images
stored with `patches.codec`), the storage metrics and the probe's top-1 on the kept images
(dq.patches.cam.ProbeCounts) in data/compact_metrics.json, and the figure data/compact_plots/patches.png. The pass
itself, streamed, on one process or under torchrun, is dq.patches.compress's.
"""
from __future__ import annotations

from dq.core.kernels import pin_cpu_kernels

pin_cpu_kernels()  # before torch loads: GradCAM++'s gradients in one order on every x86-64 CPU

import sys  # noqa: E402

import torch  # noqa: E402

from dq.patches import cam  # noqa: E402

from dq.core import distributed
from dq.features.backbones import classifier_with_probe, create_backbone  # noqa: E402
from dq.patches.compress import Selected, Streaming, write_compact_store  # noqa: E402
from dq.data.sources import source_bytes  # noqa: E402
from dq.core.errors import run_cli  # noqa: E402
from dq.features.file import check_made_with, read_features  # noqa: E402
from dq.compact.metrics import storage_metrics  # noqa: E402
from dq.compact.schema import Header
from dq.core.io import write_metrics  # noqa: E402
from dq.core.paths import DataPaths  # noqa: E402
from dq.data.prepared import open_store  # noqa: E402
from dq.core.runtime import device_for  # noqa: E402
from dq.patches.scorers import SCORERS, ProbedModel, create_scorer  # noqa: E402
from dq.select.folder import read_selection  # noqa: E402
from dq.labels.soft import SoftSpec  # noqa: E402
from dq.labels.teacher import read_teacher_logits, stored_soft_labels  # noqa: E402
from stages.common import parse_args  # noqa: E402


# In the compact file's `params` attribute. data.source and data.root name the files the store came from
# (and give source_bytes); the process and worker counts change no byte of the output.
RECORDED_PARAMS = ("ratio", "seed", "data.source", "data.root", "features.backbone", "features.weights",
                   "features.input_size", "patches", "labels", "runtime.device")
NOT_RECORDED = ("runtime.nproc", "runtime.num_workers")


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Score patches with GradCAM++ and write the compact dataset.", argv, builds_models=True)
    paths, fp, pp = DataPaths(args.data), params.features, params.patches
    store = open_store(paths.prepared_split("train"))
    all_labels = store.labels()
    indices, bins = read_selection(paths.selection, len(all_labels))
    features = read_features(paths.features, expected_rows=len(all_labels))
    check_made_with(paths.features, features, backbone=fp.backbone, weights=fp.weights, input_size=fp.input_size)
    torch.use_deterministic_algorithms(True, warn_only=True)
    soft_spec, soft = _soft_labels(paths, params, store, indices)
    selected = Selected(store, indices, all_labels[indices], bins[indices], soft,  # per image: small
                        source_bytes(params.data, len(indices)))
    header = Header(image_size=store.image_shape[0], patch_size=pp.patch_size, channels=store.image_shape[2],
                    drop=pp.drop, ratio=params.ratio, classes=store.classes, source=store.index.source,
                    params=params.provenance(*RECORDED_PARAMS), codec=pp.codec, quality=pp.quality,
                    store_scores=pp.store_scores, soft=soft_spec)
    device = device_for(params.runtime)
    with distributed.process_group(device):
        backbone = create_backbone(fp.backbone, fp.weights)
        model = classifier_with_probe(backbone, features.probe_weight, features.probe_bias)  # normalises as backbone
        layer_name, layer = "", None
        if SCORERS.get(pp.scorer).needs_model:
            layer_name, layer = cam.target_layer(backbone, pp.cam_layer, fp.input_size)
        if distributed.is_main():
            where = f" on {fp.backbone}.{layer_name} at {fp.input_size}px" if layer_name else ""
            world = distributed.world_size()
            print(f"compress: {pp.scorer}{where} for {len(indices)} images"
                  + (f" on {world} processes" if world > 1 else ""), file=sys.stderr)
        probed = ProbedModel(model, layer, fp.input_size, pp.batch_size, device, progress=False)
        scorer = create_scorer(pp.scorer, pp.patch_size, seed=params.seed, probed=probed)
        probe = cam.ProbeCounts(model, pp.patch_size, fp.input_size, device, seed=params.seed)
        figure = write_compact_store(paths.compact, selected, header, scorer, probe,
                                     cam.FigureSamples(cam.figure_rows(selected.labels)),
                                     Streaming(pp.batch_size, params.runtime.num_workers))
    if figure is None:  # a torchrun rank that did not write
        return
    metrics = probe.metrics()
    print(f"compress: probe top-1 full {metrics['probe_top1_full']:.3f}, kept {metrics['probe_top1_kept']:.3f}, "
          f"random masks {metrics['probe_top1_random_keep']:.3f}, "
          f"pixel-std masks {metrics['probe_top1_std_keep']:.3f}", file=sys.stderr)
    write_metrics(paths.compact_metrics, {**storage_metrics(paths.compact, len(all_labels)), **metrics})
    positions, images, maps, keep = figure.arrays(store.image_shape, header.num_patches)
    cam.plot_patches(paths.compact_figure, images, maps, keep, pp.patch_size,
                     [store.classes[int(y)] for y in selected.labels[positions]], map_name=pp.scorer)


def _soft_labels(paths: DataPaths, params, store, indices):
    """(SoftSpec, the stored soft labels of the selected rows) with `labels.soft`, else (None, None)."""
    lp = params.labels
    if not lp.soft:
        return None, None
    spec = SoftSpec(k=lp.k, bits=lp.bits, temperature=lp.temperature, views=lp.views)
    teacher = read_teacher_logits(paths.teacher_logits, expected_rows=len(store), classes=store.classes)
    return spec, stored_soft_labels(teacher, indices, spec)


if __name__ == "__main__":
    run_cli(main)
