"""Which patch scorer keeps the patches the features stage's probe needs: the compress stage's metrics,
for every scorer at several drops, in one pass.

    python -m bench.patch_scorers [--data data] [--params params.yaml] [--drops 0.25 0.5]
                                  [--cam-layers auto blocks.4]

Reads what the compress stage reads (`prepared/train.h5`, `selection/`, `features/train.h5` under
--data; run `dvc repro select` first) and the params file. For each scorer (`patches.scorer`; gradcam++
and gradcam++-flat-first once per --cam-layers entry, `auto` being dq.patches.cam's layer rule) and each drop,
it keeps K = L - round(drop * L) patches of every selected image, zeroes the dropped ones, and prints
the probe's top-1 on them: the `probe_top1_kept` the compress stage would write with that scorer.
Random and highest-pixel-std masks of the same K are the compress stage's `probe_top1_random_keep` and
`probe_top1_std_keep` (rows `random` and `pixel-std`, same seed). Nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# run as a script, bench/ heads sys.path: the repository goes there instead, so that `import dq` works
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dq.patches import cam  # noqa: E402
from dq.features.backbones import classifier_with_probe, create_backbone  # noqa: E402
from dq.features.file import read_features  # noqa: E402
from dq.params import load_params  # noqa: E402
from dq.core.paths import DataPaths  # noqa: E402
from dq.data.prepared import read_prepared  # noqa: E402
from dq.core.runtime import device_for  # noqa: E402
from dq.patches.grid import zero_dropped  # noqa: E402
from dq.patches.scorers import SCORERS, ProbedModel, create_scorer, keep_mask  # noqa: E402
from dq.select.folder import read_selection  # noqa: E402


def scorer_scores(name: str, layer_name: str, model, backbone, images, labels, params, device) -> np.ndarray:
    """Patch scores float32 [N, L] of one scorer, as the compress stage computes them."""
    fp, pp = params.features, params.patches
    layer = None
    if SCORERS.get(name).needs_model:
        _, layer = cam.target_layer(backbone, layer_name, fp.input_size)
    probed = ProbedModel(model, layer, fp.input_size, pp.batch_size, device, progress=False)
    scorer = create_scorer(name, pp.patch_size, seed=params.seed, probed=probed)
    return scorer.scores(images, labels)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--drops", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--cam-layers", nargs="+", default=["auto"])
    args = parser.parse_args(argv)

    params = load_params(args.params)
    paths, fp, pp = DataPaths(args.data), params.features, params.patches
    prepared = read_prepared(paths.prepared_split("train"))
    indices, _ = read_selection(paths.selection, len(prepared.labels))
    features = read_features(paths.features, expected_rows=len(prepared.labels))
    images, labels = prepared.images[indices], prepared.labels[indices]
    device = device_for(params.runtime)
    torch.use_deterministic_algorithms(True, warn_only=True)
    backbone = create_backbone(fp.backbone, fp.weights)
    model = classifier_with_probe(backbone, features.probe_weight, features.probe_bias)

    grid_side = images.shape[1] // pp.patch_size
    print(f"{len(images)} kept images {images.shape[1]}px, {pp.patch_size}-px patches ({grid_side}x{grid_side}); "
          f"{fp.backbone} ({fp.weights}) at {fp.input_size}px; seed {params.seed}")
    full = cam.probe_top1(model, images, labels, fp.input_size, pp.batch_size, device)
    print(f"probe top-1 on the full images: {full:.4f}")

    rows = [(name, layer) for name in SCORERS for layer in (args.cam_layers if SCORERS.get(name).needs_model else [""])]
    print(f"\n| scorer | {' | '.join(f'drop {d}' for d in args.drops)} | seconds |")
    print(f"|---|{'---:|' * len(args.drops)}---:|")
    for name, layer_name in rows:
        start = time.perf_counter()
        scores = scorer_scores(name, layer_name, model, backbone, images, labels, params, device)
        label = name
        if layer_name:
            resolved = cam.target_layer(backbone, layer_name, fp.input_size)[0]
            sizes = cam.feature_map_sizes(backbone, [resolved], fp.input_size)[resolved]
            label = f"{name} ({layer_name} → {resolved}, {sizes[0]}x{sizes[1]})"
        top1 = [cam.probe_top1(model, zero_dropped(images, keep_mask(scores, d), pp.patch_size), labels,
                               fp.input_size, pp.batch_size, device) for d in args.drops]
        print(f"| {label} | {' | '.join(f'{t:.4f}' for t in top1)} | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
