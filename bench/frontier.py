"""What a compact set is worth: test top-1 against stored bytes, dq beside the trivial compressors.

    python -m bench.frontier run [--data data] [--out bench/out/frontier] [--seeds 0 1 2 3 4] [--jobs 2]
    python -m bench.frontier report [--records docs/results/frontier] [--docs docs/results]

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

All train with params.yaml's `train` section: the default trainer (smallnet) under its fixed budget of
optimizer steps (`train.steps`, chosen where the whole set reaches its plateau: docs/RESULTS.md "The
trainer"), scored once, at the final step, on the whole 10,000-image test split. Seeds are paired: seed s
draws the same selection, the same classifier initialisation and the same order in every family. One MAE
(the workspace's, trained with seed 0) fills every run's dropped patches.

Each run folder holds its params.yaml, metrics and a `time.txt`; finished runs are skipped and a run
killed in training continues from its checkpoint (`train.resume: true`), so the study can be stopped
and started again. `--jobs 2` runs two at a time, each on one thread (`runtime.threads: 1`), which on a
2-core machine does more runs an hour than one run on two threads. Every finished run also leaves its
small record (family, ratio, seed, bytes, top-1, minutes, what it must match) as
`<records>/<run>.json` (`--records`, docs/results/frontier by default, committed), so that `report`
redraws the study on any machine without rerunning it, and a study run in parts adds up.

`report` reads every record and writes, through dq.report.frontier: frontier.png (top-1 against bytes on a
log axis, one line per family, mean and seed range, the Pareto front marked), frontier.md (the table, the
paired differences at equal bytes with 95% intervals, the budgets) and frontier.json (the summary the
report stage reads to place a run's own point).
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

RATIOS = (0.05, 0.1, 0.2)
WHOLE = 1.0


def _family(method: str, drop: float, codec: str, quality: int = 90, **labels) -> dict:
    out = {"select": {"method": method}, "patches": {"drop": drop, "codec": codec, "quality": quality}}
    return out | {"labels": {"soft": True, **labels} if labels else {"soft": False}}  # hard labels unless asked


SOFT = {"k": 10, "bits": 16, "views": 1}  # params.yaml's labels defaults, spelled out: records must not drift
TENTH = (0.1,)


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
    # soft labels (labels.soft): the trained teacher's top-k probabilities at T = 4, stored in the compact file
    "dq-soft": (_family("dq", 0.0, "webp-lossless", **SOFT), RATIOS, "dq, whole images, soft labels (k 10, 16 bits)"),
    "random-soft": (_family("random", 0.0, "webp-lossless", **SOFT), RATIOS,
                    "random subset, whole images, soft labels (k 10, 16 bits)"),
    "dq-soft-k3": (_family("dq", 0.0, "webp-lossless", **(SOFT | {"k": 3})), TENTH, "dq, soft labels k 3, 16 bits"),
    "dq-soft-8bit": (_family("dq", 0.0, "webp-lossless", **(SOFT | {"bits": 8})), TENTH, "dq, soft labels k 10, 8 bits"),
    "dq-soft-k3-8bit": (_family("dq", 0.0, "webp-lossless", **(SOFT | {"k": 3, "bits": 8})), TENTH,
                        "dq, soft labels k 3, 8 bits"),
    "dq-soft-flip": (_family("dq", 0.0, "webp-lossless", **(SOFT | {"views": 2})), TENTH,
                     "dq, soft labels per flip view (k 10, 16 bits)"),
    "dq-soft-probe": (_family("dq", 0.0, "webp-lossless", **SOFT), TENTH,
                      "dq, soft labels of the features' linear probe (no trained teacher)"),
    # difficulty-aware selection (issue 36; select.* defaults: AUM, beta 0.1, 50 strata, k 10), whole images, hard labels
    "ccs-webp-lossless": (_family("ccs", 0.0, "webp-lossless"), RATIOS, "CCS (AUM strata), whole images, WebP lossless"),
    "d2-webp-lossless": (_family("d2", 0.0, "webp-lossless"), RATIOS, "D2 pruning (kNN message passing), whole images"),
    "moderate-webp-lossless": (_family("moderate", 0.0, "webp-lossless"), RATIOS,
                               "Moderate-DS (middle distance to the class median), whole images"),
    "dq-ccs-webp-lossless": (_family("dq-ccs", 0.0, "webp-lossless"), RATIOS,
                             "dq bins with CCS difficulty strata inside each, whole images"),
    # the same selections under the default dropping (25% of patches), against dq-drop25 and random-drop25
    "ccs-drop25": (_family("ccs", 0.25, "webp-lossless"), RATIOS, "CCS, 25% patches dropped"),
    "d2-drop25": (_family("d2", 0.25, "webp-lossless"), RATIOS, "D2 pruning, 25% patches dropped"),
    "moderate-drop25": (_family("moderate", 0.25, "webp-lossless"), RATIOS, "Moderate-DS, 25% patches dropped"),
    "dq-ccs-drop25": (_family("dq-ccs", 0.25, "webp-lossless"), RATIOS, "dq bins with CCS strata, 25% patches dropped"),
}
# Families whose run folder links another workspace folder than its own name (the probe teacher's logits)
LINKS = {"dq-soft-probe": {"teacher": "teacher-probe"}}
DEFAULT_FAMILY = "dq-drop25"
# The order a study cut short loses least: every seed of one tier before the next tier. First the pair that
# decides "dq or a random subset" with whole images, and the whole set that sets the budgets; then soft
# labels against hard ones (dq and random); then, at 10%, the cheapest labels and the zero-training teacher,
# the other label variants, and Moderate-DS (features only); then the selections that rank by training
# dynamics (data/scores) at every ratio; then the dq default against random under the same dropping; the JPEG
# subsets (the trivial families of the moonshot); the selections of issue 36 under the default dropping; the
# whole set at the lowest quality and the heavier dropping.
TIERS = (
    (("dq-webp-lossless", RATIOS), ("random-webp-lossless", RATIOS + (WHOLE,))),
    (("dq-soft", RATIOS), ("random-soft", RATIOS)),
    (("dq-soft-k3-8bit", TENTH), ("dq-soft-probe", TENTH)),
    (("dq-soft-k3", TENTH), ("dq-soft-8bit", TENTH), ("dq-soft-flip", TENTH), ("moderate-webp-lossless", RATIOS)),
    (("ccs-webp-lossless", RATIOS), ("dq-ccs-webp-lossless", RATIOS), ("d2-webp-lossless", RATIOS)),
    (("dq-drop25", RATIOS), ("random-drop25", RATIOS)),
    (("random-jpeg90", RATIOS + (WHOLE,)), ("random-jpeg50", RATIOS + (WHOLE,))),
    (("ccs-drop25", RATIOS), ("d2-drop25", RATIOS), ("moderate-drop25", RATIOS), ("dq-ccs-drop25", RATIOS)),
    (("whole-jpeg25", (WHOLE,)), ("dq-drop50", RATIOS)),
)


def runs(seeds: list[int]) -> list[tuple[str, dict]]:
    """(run name, overrides) of the whole study, tier by tier (TIERS), seed by seed inside a tier. Every run
    takes params.yaml's train section as it is (its fixed step budget), scored at the final step only."""
    def run(family: str, ratio: float, seed: int) -> tuple[str, dict]:
        return (f"{family}-r{ratio:g}-s{seed}", deep_merge(FAMILIES[family][0], {
            "ratio": ratio, "seed": seed, "train": {"input": "compact", "eval_every": None, "resume": True},
            "runtime": {"threads": 1}}))

    out = []
    for tier in TIERS:
        out += [run(family, r, s) for s in seeds for family, ratios in tier for r in ratios]
    return out


def family_of(name: str) -> tuple[str, float, int]:
    """'dq-drop25-r0.1-s2' -> ('dq-drop25', 0.1, 2)."""
    stem, seed = name.rsplit("-s", 1)
    family, ratio = stem.rsplit("-r", 1)
    return family, float(ratio), int(seed)


def run_one_timed(workspace: Path, folder: Path, params: dict, records: Path) -> None:
    from bench.results import run_one

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in LINKS.get(family_of(folder.name)[0], {}).items():
        if not (folder / name).exists():
            (folder / name).symlink_to((workspace / target).resolve(), target_is_directory=True)
    run_one(workspace, folder, params)
    seconds = time.perf_counter() - start
    (folder / "time.txt").write_text(f"{seconds:.1f}\n")
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{folder.name}.json").write_text(json.dumps(record_of(folder), indent=1) + "\n")
    print(f"frontier: {folder.name} done in {seconds / 60:.1f} min", flush=True)


def run_all(workspace: Path, out: Path, params: Path, seeds: list[int], jobs: int, job: int | None,
            records: Path) -> None:
    """Every run without a record; with `jobs` > 1, `jobs` worker processes take every jobs-th run each."""
    if jobs > 1 and job is None:
        workers = [subprocess.Popen([sys.executable, "-m", "bench.frontier", "run", "--data", str(workspace),
                                     "--out", str(out), "--params", str(params), "--jobs", str(jobs),
                                     "--records", str(records), "--job", str(k), "--seeds", *map(str, seeds)],
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
        if (records / f"{name}.json").exists():
            continue
        print(f"frontier: {name} ({i + 1} of {len(todo)})", flush=True)
        run_one_timed(workspace, folder, deep_merge(base, overrides), records)


def record_of(folder: Path) -> dict:
    """A finished run's record: family, ratio, seed, bytes, top-1, steps, epochs, quality, minutes, match."""
    family, ratio, seed = family_of(folder.name)
    metrics = json.loads((folder / "train_metrics.json").read_text())
    params = yaml.safe_load((folder / "params.yaml").read_text())
    timing = folder / "time.txt"
    evaluation = json.loads((folder / "train" / "evaluation.json").read_text())
    return {"family": family, "ratio": ratio, "seed": seed, "bytes": metrics["compact_bytes"],
            "top1": metrics["top1"], "steps": metrics.get("steps"), "epochs": metrics.get("epochs"),
            "quality": params["patches"]["quality"], "train_images": metrics["train_images"],
            "minutes": round(float(timing.read_text()) / 60, 2) if timing.exists() else None,
            "train": {k: params["train"][k] for k in ("model", "steps", "batch_size", "lr")},
            "match": match_of(metrics, evaluation)}


def finished(records: Path) -> list[dict]:
    """Every record under `records` (one JSON per finished run)."""
    return [json.loads(p.read_text()) for p in sorted(records.glob("*-s*.json"))]


def match_of(metrics: dict, evaluation: dict) -> dict:
    """What a run must share with the study to be placed on its frontier (dq.report.summary): the classes, the whole
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
    parser.add_argument("--records", type=Path, default=Path("docs/results/frontier"),
                        help="one small JSON per finished run (committed): what report reads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "run":
        run_all(args.data, args.out, args.params, args.seeds, args.jobs, args.job, args.records)
    else:
        from dq.report import frontier

        records = finished(args.records)
        matches = {json.dumps(r["match"], sort_keys=True) for r in records}
        if len(matches) > 1:
            raise SystemExit(f"frontier: the runs under {args.out} come from {len(matches)} different data sets")
        descriptions = {name: text for name, (_, _, text) in FAMILIES.items()}
        descriptions |= {frontier.WHOLE_JPEG: "whole set, JPEG q90 / q50 / q25"}
        trains = {json.dumps(r["train"], sort_keys=True) for r in records}
        if len(trains) > 1:
            raise SystemExit(f"frontier: the records under {args.records} come from {len(trains)} train settings")
        budget = records[0]["train"] if records else {}
        for path in frontier.write_study(args.docs, records, descriptions, records[0]["match"] if records else {},
                                         budget):
            print(f"frontier: wrote {path}")


if __name__ == "__main__":
    main()
