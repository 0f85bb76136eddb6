"""What a compact set is worth: test top-1 against stored bytes, dq beside the trivial compressors.

    python -m bench.frontier run [--data data] [--out bench/out/frontier] [--seeds 0 1 2] [--jobs 2]
    python -m bench.frontier report [--out bench/out/frontier] [--docs docs/results]

Every point of the study is one run of the same stage entry points `dvc exp run` uses (select, compress,
train: bench.results.run_one), in a folder of its own whose prepared/, features/ and mae/ are links to
one workspace's outputs (`--data`, a `dvc repro` of the defaults). Every family is stored through the
product's own compact store, so bytes are counted the same way for all: whole-image families are a
compact store with `patches.drop: 0` (nothing is dropped, the MAE fill is a no-op), and the bytes are the
compact file's size (`train_metrics.json`: `compact_bytes`).

Families (FAMILIES): a selection method, a drop share and a codec, at ratios 0.05, 0.1, 0.2, and 1.0
where it applies (at 1.0 the selection keeps every image, so the method does not matter):

    random-webp-lossless   class-balanced random subset, whole images, lossless WebP (and the whole set)
    random-jpeg90          ... as JPEG q90 (and the whole set)
    random-jpeg50          ... as JPEG q50 (and the whole set)
    whole-jpeg             the whole set at JPEG q90, q50, q25: no selection, lower quality
    dq-webp-lossless       DQ selection, whole images, lossless WebP
    dq-drop25              the dq default: DQ selection, 25% of patches dropped, lossless WebP
    dq-drop50              ... 50% dropped
    random-drop25          random selection, 25% dropped: separates selection from dropping

All train under one fixed budget of optimizer steps (`train.steps`, STEPS: 800 steps of 32 images, 4.3
passes over the whole 6,000-image default set, 2.8 times the 281 steps that the epoch budget gives a
ratio-0.1 run; what fits the study into about 4 hours of a 2-core machine), scored on the test set at
steps 400 and 800; the default family is also
run under the epoch budget (`train.steps: null`, 15 passes over each run's own set) so that both
protocols are on record. Seeds are paired: seed s draws the same selection, the same classifier
initialisation and the same order in every family. One MAE (the workspace's, trained with seed 0)
fills every run's dropped patches.

Each run folder holds its params.yaml, metrics and a `time.txt`; finished runs are skipped and a run
killed in training continues from its checkpoint (`train.resume: true`), so the study can be stopped
and started again. `--jobs 2` runs two at a time, each on one thread (`runtime.threads: 1`), which on a
2-core machine does more runs an hour than one run on two threads.

`report` reads every finished run and writes, through dq.frontier: frontier.png (top-1 against bytes on a
log axis, one line per family, mean and seed range, the Pareto front marked), frontier.md (the table, the
paired differences at equal bytes, the budgets) and frontier.json (the summary the report stage reads to
place a run's own point).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import yaml  # noqa: E402

from dq.params import deep_merge  # noqa: E402

STEPS = 800
EVAL_EVERY = 400
BATCH_SIZE = 32  # params.yaml's train.batch_size, which the study keeps
RATIOS = (0.05, 0.1, 0.2)
WHOLE = 1.0


def _family(method: str, drop: float, codec: str, quality: int = 90) -> dict:
    return {"select": {"method": method}, "patches": {"drop": drop, "codec": codec, "quality": quality}}


# name -> (overrides, ratios, description)
FAMILIES = {
    "random-webp-lossless": (_family("random", 0.0, "webp-lossless"), RATIOS + (WHOLE,), "random subset, WebP lossless"),
    "random-jpeg90": (_family("random", 0.0, "jpeg", 90), RATIOS + (WHOLE,), "random subset, JPEG q90"),
    "random-jpeg50": (_family("random", 0.0, "jpeg", 50), RATIOS + (WHOLE,), "random subset, JPEG q50"),
    "whole-jpeg25": (_family("random", 0.0, "jpeg", 25), (WHOLE,), "whole set, JPEG q25"),
    "dq-webp-lossless": (_family("dq", 0.0, "webp-lossless"), RATIOS, "dq, whole images, WebP lossless"),
    "dq-drop25": (_family("dq", 0.25, "webp-lossless"), RATIOS, "dq, 25% patches dropped (default)"),
    "dq-drop50": (_family("dq", 0.5, "webp-lossless"), RATIOS, "dq, 50% patches dropped"),
    "random-drop25": (_family("random", 0.25, "webp-lossless"), RATIOS, "random subset, 25% patches dropped"),
}
DEFAULT_FAMILY = "dq-drop25"
LATER_FAMILIES = ("dq-drop50",)  # on the grid, but not what a user's choice hinges on
EPOCH_BUDGET = "dq-drop25-epochs"  # the default family under train.steps: null


def runs(seeds: list[int]) -> list[tuple[str, dict]]:
    """(run name, overrides) of the whole study, in the order a study cut short loses least: seed by seed,
    the sub-whole points of the families that decide "dq or a trivial compressor" (so every family has
    points early) and the epoch-budget repeat of the default family (cheap); then the whole-set points (the
    lower-quality whole set is a trivial compressor, and its lossless bytes set the budgets); then the
    remaining families."""
    def fixed_steps(family: str, ratio: float, seed: int) -> tuple[str, dict]:
        return (f"{family}-r{ratio:g}-s{seed}", deep_merge(FAMILIES[family][0], {
            "ratio": ratio, "seed": seed,
            "train": {"input": "compact", "steps": STEPS, "eval_every": EVAL_EVERY, "resume": True},
            "runtime": {"threads": 1}}))

    def epoch_budget(ratio: float, seed: int) -> tuple[str, dict]:
        return (f"{EPOCH_BUDGET}-r{ratio:g}-s{seed}", deep_merge(FAMILIES[DEFAULT_FAMILY][0], {
            "ratio": ratio, "seed": seed, "train": {"input": "compact", "steps": None, "resume": True},
            "runtime": {"threads": 1}}))

    deciding = [f for f in FAMILIES if f not in LATER_FAMILIES]
    out = []
    for s in seeds:
        out += [fixed_steps(f, r, s) for r in RATIOS for f in deciding if r in FAMILIES[f][1]]
        out += [epoch_budget(r, s) for r in RATIOS]
    out += [fixed_steps(f, WHOLE, s) for s in seeds for f in FAMILIES if WHOLE in FAMILIES[f][1]]
    out += [fixed_steps(f, r, s) for s in seeds for r in RATIOS for f in LATER_FAMILIES if r in FAMILIES[f][1]]
    return out


def family_of(name: str) -> tuple[str, float, int]:
    """'dq-drop25-r0.1-s2' -> ('dq-drop25', 0.1, 2)."""
    stem, seed = name.rsplit("-s", 1)
    family, ratio = stem.rsplit("-r", 1)
    return family, float(ratio), int(seed)


def run_one_timed(workspace: Path, folder: Path, params: dict) -> None:
    from bench.results import run_one

    start = time.perf_counter()
    run_one(workspace, folder, params)
    seconds = time.perf_counter() - start
    (folder / "time.txt").write_text(f"{seconds:.1f}\n")
    print(f"frontier: {folder.name} done in {seconds / 60:.1f} min", flush=True)


def run_all(workspace: Path, out: Path, params: Path, seeds: list[int], jobs: int, job: int | None) -> None:
    """Every unfinished run; with `jobs` > 1, `jobs` worker processes take every jobs-th run each."""
    if jobs > 1 and job is None:
        workers = [subprocess.Popen([sys.executable, "-m", "bench.frontier", "run", "--data", str(workspace),
                                     "--out", str(out), "--params", str(params), "--jobs", str(jobs),
                                     "--job", str(k), "--seeds", *map(str, seeds)],
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
                   for k in range(jobs)]
        codes = [w.wait() for w in workers]
        if any(codes):
            raise SystemExit(f"frontier: a worker failed ({codes})")
        return
    base = yaml.safe_load(params.read_text())
    todo = runs(seeds)
    for i, (name, overrides) in enumerate(todo):
        if job is not None and i % jobs != job:
            continue
        folder = out / name
        if (folder / "train_metrics.json").exists():
            continue
        print(f"frontier: {name} ({i + 1} of {len(todo)})", flush=True)
        run_one_timed(workspace, folder, deep_merge(base, overrides))


def finished(out: Path) -> list[dict]:
    """One record per finished run: family, ratio, seed, bytes, top-1, steps, epochs, minutes."""
    records = []
    for folder in sorted(out.glob("*-s*")):
        metrics_path = folder / "train_metrics.json"
        if not metrics_path.exists():
            continue
        family, ratio, seed = family_of(folder.name)
        metrics = json.loads(metrics_path.read_text())
        params = yaml.safe_load((folder / "params.yaml").read_text())
        timing = folder / "time.txt"
        evaluation = json.loads((folder / "train" / "evaluation.json").read_text())
        records.append({"family": family, "ratio": ratio, "seed": seed, "bytes": metrics["compact_bytes"],
                        "top1": metrics["top1"], "steps": metrics.get("steps"), "epochs": metrics.get("epochs"),
                        "quality": params["patches"]["quality"], "train_images": metrics["train_images"],
                        "minutes": float(timing.read_text()) / 60 if timing.exists() else None,
                        "match": match_of(metrics, evaluation)})
    return records


def match_of(metrics: dict, evaluation: dict) -> dict:
    """What a run must share with the study to be placed on its frontier (dq.report): the classes, the whole
    training set's raw bytes, the test set's size and the classifier."""
    return {"classes": evaluation["classes"], "full_raw_bytes": metrics["full_raw_bytes"],
            "test_images": int(sum(map(sum, evaluation["confusion"]))), "model": metrics["model"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/frontier"))
    parser.add_argument("--docs", type=Path, default=Path("docs/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "run":
        run_all(args.data, args.out, args.params, args.seeds, args.jobs, args.job)
    else:
        from dq import frontier

        records = finished(args.out)
        matches = {json.dumps(r["match"], sort_keys=True) for r in records}
        if len(matches) > 1:
            raise SystemExit(f"frontier: the runs under {args.out} come from {len(matches)} different data sets")
        descriptions = {name: text for name, (_, _, text) in FAMILIES.items()}
        descriptions |= {frontier.WHOLE_JPEG: "whole set, JPEG q90 / q50 / q25",
                         EPOCH_BUDGET: "dq default under the epoch budget (15 passes)"}
        budget = {"steps": STEPS, "eval_every": EVAL_EVERY, "batch_size": BATCH_SIZE}
        for path in frontier.write_study(args.docs, records, descriptions, records[0]["match"] if records else {},
                                         budget):
            print(f"frontier: wrote {path}")


if __name__ == "__main__":
    main()
