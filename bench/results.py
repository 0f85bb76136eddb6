"""Run the results grid in-process, reusing one workspace's prepare, features and mae outputs.

    python -m bench.results --data data --out bench/out/results [--ratios ...] [--methods ...] [--seeds ...]
    python -m bench.results --full --selected                      # what docs/RESULTS.md reports
    python -m bench.results --full --selected --plot docs/results  # its figures and table
    python -m bench.results --methods dq --ratios 0.1 0.2 --codecs raw jpeg:90 jpeg:75 --hash-codecs webp-lossless png
    python -m bench.results --methods dq --ratios 0.1 --seeds 0 1 2 --scorers gradcam++-flat-first pixel-std

`--codecs` trains each grid point once per compact-store codec (`patches.codec`, `:quality` for the lossy
ones). `--hash-codecs` writes the compact store with each lossless codec for every (ratio, seed) of the
grid, without training, and compares the SHA-256 of its decoded training images with the first codec's:
equal hashes mean equal training pixels, hence the same training run, so there is nothing to retrain.
`--scorers` trains each compact grid point once per `patches.scorer`.

The DVC route (`python -m dq.tools.sweep queue/run/plot`) reruns each experiment in its own copy of the
workspace. On a 2-core machine that is slow, so this script calls the very same stage entry points
(select, compress, train) for each grid point, in a folder per run whose prepared/, features/, mae/
are links to the workspace's outputs. Only the params differ, exactly as `dvc exp run -S` would set
them. Every finished run leaves `train_metrics.json` and `compact_metrics.json` in its folder; runs
already finished are skipped, so the script can be stopped and restarted. `--plot` turns whatever
has finished into docs/results (figures and a Markdown table) with dq.tools.sweep's own writers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dq.compact.reader import read_compact
from dq.params import deep_merge
from dq.select.methods import METHODS
from dq.tools.sweep import Experiment, write_results

ROOT = Path(__file__).resolve().parents[1]

SHARED = ("prepared", "features", "mae", "teacher")  # one teacher labels every run, as one MAE rebuilds it
SCORES = "scores"  # the scores stage's folder: linked from the workspace, or computed once beside the runs


def grid(ratios, methods, seeds, full, selected=False):
    """(name, overrides) of every run, the default ratio first so the headline cells fill first.

    `full` adds the upper bound (the whole training set) per seed; `selected` adds the ablation without
    patch dropping: dq's kept images with their original pixels, at every ratio and seed.
    """
    runs = [(f"{m}-r{r}-s{s}", {"ratio": r, "seed": s, "select": {"method": m}, "train": {"input": "compact"}})
            for r in ratios for s in seeds for m in methods]
    if full:
        runs += [(f"full-s{s}", {"ratio": min(ratios), "seed": s, "select": {"method": "random"},
                                  "train": {"input": "full"}}) for s in seeds]
    if selected:
        runs += [(f"dq-selected-r{r}-s{s}", {"ratio": r, "seed": s, "select": {"method": "dq"},
                                              "train": {"input": "selected"}}) for r in ratios for s in seeds]
    return runs


def codec_overrides(spec: str) -> tuple[str, dict]:
    """'jpeg:75' -> ('jpeg75', {"patches": {"codec": "jpeg", "quality": 75}}); 'raw' -> ('raw', ...)."""
    codec, _, quality = spec.partition(":")
    patches = {"codec": codec} | ({"quality": int(quality)} if quality else {})
    return codec + quality, {"patches": patches}


def with_variants(runs: list, variants: list[tuple[str, dict]]) -> list:
    """Every compact run once per (tag, overrides) variant, named `<run>-<tag>`; other inputs do not read
    the compact images, so they run once as they are."""
    if not variants:
        return runs
    out = []
    for name, overrides in runs:
        if overrides["train"]["input"] != "compact":
            out.append((name, overrides))
            continue
        out += [(f"{name}-{tag}", deep_merge(overrides, extra)) for tag, extra in variants]
    return out


def with_codecs(runs: list, specs: list[str] | None) -> list:
    """Every compact run once per codec spec (`patches.codec`, `:quality`)."""
    return with_variants(runs, [codec_overrides(spec) for spec in specs or []])


def with_scorers(runs: list, scorers: list[str] | None) -> list:
    """Every compact run once per patch scorer (`patches.scorer`)."""
    return with_variants(runs, [(scorer, {"patches": {"scorer": scorer}}) for scorer in scorers or []])


def images_sha256(path: Path) -> str:
    """SHA-256 of a compact store's decoded training images (uint8 [N, H, W, C], dropped pixels zero),
    its keep mask and its labels: what the train stage gives the MAE and the classifier."""
    store = read_compact(path)
    digest = hashlib.sha256()
    for array in (store.images(), store.keep, store.labels):
        digest.update(array.tobytes())
    return digest.hexdigest()


def hash_codecs(workspace: Path, out: Path, base: dict, runs: list, specs: list[str]) -> None:
    """Write each grid point's compact store with every codec in `specs` (no training); print the hashes."""
    for name, overrides in runs:
        if overrides["train"]["input"] != "compact":
            continue
        hashes = {}
        for tag, extra in map(codec_overrides, specs):
            folder = out / f"{name}-{tag}"
            if not (folder / "compact" / "dataset.h5").exists():
                run_one(workspace, folder, deep_merge(deep_merge(base, overrides), extra), train_too=False)
            hashes[tag] = images_sha256(folder / "compact" / "dataset.h5")
        same = len(set(hashes.values())) == 1
        print(f"results: {name} training images sha256 "
              + ", ".join(f"{tag} {h[:16]}" for tag, h in hashes.items()) + ("  (equal)" if same else "  DIFFER"),
              flush=True)


def run_one(workspace: Path, out: Path, params: dict, train_too: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = out / name
        if not link.exists() and not link.is_symlink():  # a link made before its target existed stays
            link.symlink_to((workspace / name).resolve(), target_is_directory=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["--params", str(out / "params.yaml"), "--data", str(out)]
    scores_folder = shared_scores(workspace, out, params)
    if scores_folder is not None and not (out / SCORES).exists():
        (out / SCORES).symlink_to(scores_folder.resolve(), target_is_directory=True)
    for stage in ("select", "compress", "train") if train_too else ("select", "compress"):
        run_stage(stage, argv)


def run_stage(name: str, argv: list[str]) -> None:
    """Run stage `name` as dvc.yaml's command runs it, in its own process (bench imports no stage)."""
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"].split()
    if subprocess.run([sys.executable, *cmd[1:], *argv], cwd=ROOT).returncode:
        raise SystemExit(f"results: stage {name} failed ({' '.join(argv)})")


def shared_scores(workspace: Path, out: Path, params: dict) -> Path | None:
    """The scores folder the runs share: the workspace's (a `dvc repro` made it), else, for a method that reads
    scores, one the scores stage writes once into `<out's parent>/_scores/` from the workspace's prepared set and
    features (the scores section of `params`; every run of a study shares it). None: no scores and none needed."""
    if (workspace / SCORES / "scores.h5").is_file():
        return workspace / SCORES
    computed = out.parent / "_scores"
    if not (computed / SCORES / "scores.h5").is_file():
        if not METHODS.get(params["select"]["method"]).needs_scores:
            return None
        computed.mkdir(parents=True, exist_ok=True)
        for name in ("prepared", "features"):
            if not (computed / name).exists():
                (computed / name).symlink_to((workspace / name).resolve(), target_is_directory=True)
        (computed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_stage("scores", ["--params", str(computed / "params.yaml"), "--data", str(computed)])
    return computed / SCORES


def experiment(name: str, folder: Path) -> Experiment:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    metrics = json.loads((folder / "train_metrics.json").read_text())
    return Experiment(name=name, rev=name, ratio=params["ratio"], method=params["select"]["method"],
                      seed=params["seed"], input=params["train"]["input"], top1=metrics["top1"],
                      stored_bytes=metrics["compact_bytes"], train_images=metrics.get("train_images"))


def summary_table(finished: list[tuple[str, dict, dict]]) -> str:
    """A Markdown table of finished runs grouped by everything but the seed: top-1 mean, min-max,
    stored bytes and the seeds. `finished` holds (run name, params, train metrics)."""
    groups: dict[str, list] = {}
    for name, params, metrics in finished:
        key = re.sub(r"-s\d+(?=-|$)", "", name)
        groups.setdefault(key, []).append((params["seed"], metrics))
    lines = ["| run | seeds | top-1 mean | min–max | stored bytes (mean) |", "|---|---|---:|---:|---:|"]
    for key, rows in groups.items():
        top1 = [m["top1"] for _, m in rows]
        stored = sum(m["compact_bytes"] for _, m in rows) / len(rows)
        seeds = " ".join(str(seed) for seed, _ in sorted(rows, key=lambda r: r[0]))
        lines.append(f"| {key} | {seeds} | {sum(top1) / len(top1):.4f} | {min(top1):.4f}–{max(top1):.4f} "
                     f"| {stored:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/results"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.05, 0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--full", action="store_true", help="add the full-training-set upper bound")
    parser.add_argument("--selected", action="store_true", help="add dq without patch dropping")
    parser.add_argument("--plot", type=Path, help="write figures and a table of the finished runs here")
    parser.add_argument("--codecs", nargs="+", help="train compact runs once per codec: raw, png, jpeg:90, ...")
    parser.add_argument("--scorers", nargs="+", help="train compact runs once per patches.scorer")
    parser.add_argument("--table", action="store_true", help="print a Markdown table of the finished runs")
    parser.add_argument("--hash-codecs", nargs="+", help="lossless codecs whose training pixels to hash, no training")
    args = parser.parse_args()
    base = yaml.safe_load(args.params.read_text())
    plain = grid(args.ratios, args.methods, args.seeds, args.full, args.selected)
    runs = with_scorers(with_codecs(plain, args.codecs), args.scorers)
    if args.plot is None and not args.table:
        for name, overrides in runs:
            folder = args.out / name
            if (folder / "train_metrics.json").exists():
                continue
            start = time.perf_counter()
            run_one(args.data, folder, deep_merge(base, overrides))
            print(f"results: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
        if args.hash_codecs:
            first = [codec_overrides(args.codecs[0])[0]] if args.codecs else []
            hash_codecs(args.data, args.out, base, plain, ([args.codecs[0]] if first else []) + args.hash_codecs)
    finished = [experiment(name, args.out / name) for name, _ in runs
                if (args.out / name / "train_metrics.json").exists()]
    if args.table:
        print(summary_table([(name, yaml.safe_load((args.out / name / "params.yaml").read_text()),
                              json.loads((args.out / name / "train_metrics.json").read_text()))
                             for name, _ in runs if (args.out / name / "train_metrics.json").exists()]))
    if args.plot is not None:
        for path in write_results(args.plot, finished):
            print(f"results: wrote {path}")


if __name__ == "__main__":
    main()
