"""Speed of the GraphCut engines behind DQ's bins on synthetic clustered features: time, peak RSS, speed-up
over the naive greedy, agreement with the float64 reference.

    python -m bench.graphcut_speed [--quick] [--only per-class|imagenet|whole|scaling ...]

Every case runs in its own subprocess so that its peak RSS (ru_maxrss) is its own. The naive greedy is
the textbook one (every gain recomputed from a dense kernel at every step, as the paper's code does);
it is run in the same process on the same data for its first steps and extrapolated by its cost,
sum over steps of (|pool| + |S|) * |candidates|, because running it to the end would take hours.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dq.select import dq_bins
from dq.select.cosine import unit_features
from dq.select.engines import greedy_bins
from dq.select.sampling import bin_budgets

ROOT = Path(__file__).resolve().parents[1]


def clustered(n: int, dim: int, rng, clusters: int = 8, offset=None) -> np.ndarray:
    """[n, dim] float32: points around a few centres, like embeddings of one class."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    if offset is not None:
        centres += offset
    x = centres[rng.integers(0, clusters, n)]
    x += 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
    return x


def dataset(classes: int, per_class: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([clustered(per_class, dim, rng, offset=rng.standard_normal(dim, dtype=np.float32))
                        for _ in range(classes)])
    return x, np.repeat(np.arange(classes), per_class)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------- naive greedy

def naive_rate(x: np.ndarray, steps: int, lam: float = 1.0):
    """Run the textbook greedy on one pool for `steps` picks; return (element-ops per second, picks)."""
    unit = unit_features(x)
    kernel = 0.5 + 0.5 * unit.block(np.float32)
    pool = np.arange(len(x))
    chosen: list[int] = []
    ops = 0
    start = time.perf_counter()
    for _ in range(steps):
        cand = np.setdiff1d(pool, chosen)
        gains = lam * kernel[np.ix_(pool, cand)].sum(axis=0, dtype=np.float64)
        if chosen:
            gains -= 2 * kernel[np.ix_(chosen, cand)].sum(axis=0, dtype=np.float64)
        chosen.append(int(cand[np.argmax(gains)]))
        ops += (len(pool) + len(chosen) - 1) * len(cand)
    return ops / (time.perf_counter() - start), chosen


def naive_ops(pool_sizes_per_bin) -> float:
    """Element-ops of the naive greedy over bins with budgets b from pools of size p."""
    total = 0.0
    for p, b in pool_sizes_per_bin:
        s = np.arange(b, dtype=np.float64)
        total += float(((p + s) * (p - s)).sum())
    return total


def pools(class_sizes, num_bins):
    """(pool size, budget) of every bin of every class under the DQ recursion."""
    budgets = bin_budgets(class_sizes, num_bins)
    out = []
    for c, n in enumerate(class_sizes):
        left = n
        for b in budgets[:, c]:
            out.append((left, int(b)))
            left -= int(b)
    return out


# ------------------------------------------------------------------------------------------ cases

def case_cifar(args) -> dict:
    x, labels = dataset(10, args.n // 10, 512)
    t0 = time.perf_counter()
    bins = dq_bins(x, labels, 10)  # the default, select.precision: float64
    took = time.perf_counter() - t0
    rss = peak_rss_mb()
    t1 = time.perf_counter()
    bins32 = dq_bins(x, labels, 10, precision="float32")
    took32 = time.perf_counter() - t1
    # The reference: each class on its own, its float32 features cast to float64 first, through the
    # dense float64 engine (equal to the exact brute force in tests/test_select.py).
    ref = np.empty_like(bins)
    budgets = bin_budgets(np.bincount(labels), 10)
    for c in range(10):
        m = labels == c
        ref[m] = greedy_bins(unit_features(x[m].astype(np.float64)), budgets[:, c], engine="dense",
                             precision="float64")
    rate, naive_first = naive_rate(x[labels == 0], args.naive_steps)
    ours_bin0 = set(np.flatnonzero(bins[labels == 0] == 0).tolist())
    kernel_s = _kernel_seconds(x[labels == 0]) * 10
    naive_s = naive_ops(pools(np.bincount(labels), 10)) / rate + kernel_s
    return {"seconds": took, "peak_rss_mb": rss, "agreement_vs_float64": float((bins == ref).mean()),
            "float32_seconds": took32, "float32_agreement_vs_float64": float((bins32 == ref).mean()),
            "naive_seconds_extrapolated": naive_s, "speedup": naive_s / took,
            "naive_steps_run": args.naive_steps, "naive_first_picks_match": set(naive_first) <= ours_bin0}


def _kernel_seconds(x) -> float:
    t = time.perf_counter()
    unit_features(x).block(np.float32)
    return time.perf_counter() - t


def case_imagenet(args) -> dict:
    """Classes are generated and selected one at a time: the [N, 768] float32 array alone is 4 GB."""
    classes, per_class, dim = args.classes, 1300, 768
    budgets = bin_budgets([per_class] * classes, 10)
    rng = np.random.default_rng(0)
    gen = sel_s = 0.0
    counts = np.zeros(10, np.int64)
    for c in range(classes):
        t = time.perf_counter()
        x = clustered(per_class, dim, rng, offset=rng.standard_normal(dim, dtype=np.float32))
        gen += time.perf_counter() - t
        t = time.perf_counter()
        bins = greedy_bins(unit_features(x), budgets[:, c])
        sel_s += time.perf_counter() - t
        counts += np.bincount(bins, minlength=10)
    return {"classes": classes, "select_seconds": sel_s, "generate_seconds": gen,
            "select_seconds_for_1000_classes": sel_s * 1000 / classes, "peak_rss_mb": peak_rss_mb(),
            "bin_counts": counts.tolist()}


def _whole_run(x: np.ndarray) -> tuple[np.ndarray, dict]:
    """What dq_bins(x, labels, 10, per_class=False) runs (less its input checks), with the lazy
    engine's counts: bins [N], and stats (seconds, picks, recomputed, epochs)."""
    stats: dict = {}
    t0 = time.perf_counter()
    bins = greedy_bins(unit_features(x), bin_budgets([len(x)], 10)[:, 0], engine="lazy", stats=stats)
    stats["seconds"] = time.perf_counter() - t0
    stats["recomputed_per_pick"] = stats["recomputed"] / stats["picks"]
    return bins, stats


def case_whole(args) -> dict:
    x, _ = dataset(10, args.n // 10, 512)
    bins, stats = _whole_run(x)
    took, rss = stats["seconds"], peak_rss_mb()
    # The naive whole-dataset greedy would need the dense N x N kernel (N^2 * 4 bytes); measure its
    # rate on 5,000 items and extrapolate by its cost.
    rate, _ = naive_rate(x[:5000], args.naive_steps)
    naive_s = naive_ops(pools([len(x)], 10)) / rate
    # Exactness at a size where the dense engine fits: float64 kernel of 4,000 items (128 MB), all classes.
    small = x[::len(x) // 4000][:4000]
    lazy_small, _ = _whole_run(small)
    dense_small = greedy_bins(unit_features(small), bin_budgets([4000], 10)[:, 0], engine="dense",
                              precision="float64")
    return {"n": len(x), "seconds": took, "peak_rss_mb": rss, "bin_counts": np.bincount(bins).tolist(),
            "stats": stats,
            "agreement_vs_dense_4000": float((lazy_small == dense_small).mean()),
            "naive_seconds_extrapolated": naive_s, "speedup": naive_s / took,
            "naive_kernel_gb": len(x) ** 2 * 4 / 1e9}


def case_scale(args) -> dict:
    x, labels = dataset(10, args.n // 10, 512)
    if args.whole:
        _, stats = _whole_run(x)
        return {"n": len(x), "peak_rss_mb": peak_rss_mb(), **stats}
    t0 = time.perf_counter()
    dq_bins(x, labels, 10)
    return {"n": len(x), "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


CASES = {"cifar": case_cifar, "imagenet": case_imagenet, "whole": case_whole, "scale": case_scale}


def run_case(name: str, **kw) -> dict:
    cmd = [sys.executable, "-m", "bench.graphcut_speed", "--case", name]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(rows, key="seconds") -> str:
    """Exponent a of seconds ~ N^a between the smallest and the largest size."""
    (n0, t0), (n1, t1) = (rows[0]["n"], rows[0][key]), (rows[-1]["n"], rows[-1][key])
    return f"{math.log(t1 / t0) / math.log(n1 / n0):.2f}"


def section_per_class(quick: bool) -> None:
    r = run_case("cifar", n=50_000)
    print(f"\nCIFAR-10 scale, per class: 50,000 x 512, 10 classes, 10 bins (target <= 5 s, >= 50x naive)\n"
          f"  dq_bins {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB\n"
          f"  naive greedy (recompute every gain): {r['naive_steps_run']} steps run on class 0, extrapolated "
          f"to {r['naive_seconds_extrapolated'] / 3600:.1f} h -> speed-up {r['speedup']:.0f}x; "
          f"its picks are in our bin 0: {r['naive_first_picks_match']}\n"
          f"  agreement with the float64 reference: {100 * r['agreement_vs_float64']:.2f}% (the default, "
          f"select.precision: float64)\n"
          f"  select.precision: float32: {r['float32_seconds']:.2f} s = {r['seconds'] / r['float32_seconds']:.2f}x "
          f"faster, agreement {100 * r['float32_agreement_vs_float64']:.2f}%")


def section_imagenet(quick: bool) -> None:
    classes = 100 if quick else 1000
    r = run_case("imagenet", classes=classes)
    note = "" if classes == 1000 else f" (ran {classes} classes, extrapolated linearly)"
    print(f"\nImageNet scale, per class: 1000 classes x 1300 x 768, 10 bins (target <= 3 min, <= 4 GB)\n"
          f"  selection {r['select_seconds_for_1000_classes']:.1f} s for 1000 classes{note}, peak RSS "
          f"{r['peak_rss_mb']:.0f} MB (classes streamed; generating them took "
          f"{r['generate_seconds']:.1f} s more)")


def section_whole(quick: bool) -> dict:
    r = run_case("whole", n=50_000)
    st = r["stats"]
    print(f"\nWhole-dataset mode, lazy engine: N = {r['n']:,} x 512, 10 bins (target <= 2 min, <= 2 GB)\n"
          f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB; bins {r['bin_counts']}\n"
          f"  {st['picks']:,} picks, {st['recomputed_per_pick']:.0f} candidates recomputed per pick "
          f"(of up to {r['n']:,}), {st['epochs']} epochs (projections of every candidate)\n"
          f"  the naive greedy would need a {r['naive_kernel_gb']:.1f} GB kernel and "
          f"~{r['naive_seconds_extrapolated'] / 3600:.1f} h (extrapolated) -> {r['speedup']:.0f}x\n"
          f"  same bins as the dense float64 engine at N = 4,000: {100 * r['agreement_vs_dense_4000']:.2f}%")
    return {"n": r["n"], "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], **st}


def section_scaling(quick: bool, whole_50k: dict | None) -> None:
    sizes = [2_500, 5_000, 10_000, 20_000] if quick else [6_250, 12_500, 25_000, 50_000]
    print("\nScaling, per class (10 classes, 512 dims, 10 bins): kernel O(n^2 D) per class, picks O(n^2)")
    print(f"  {'N':>8} {'seconds':>8} {'RSS MB':>8}")
    rows = [run_case("scale", n=n, whole=0) for n in sizes]
    for r in rows:
        print(f"  {r['n']:>8,} {r['seconds']:>8.2f} {r['peak_rss_mb']:>8.0f}")
    print(f"  time grows like N^{_slope(rows)}")
    print("\nScaling, whole-dataset mode (lazy engine): per pick, the candidates near the top, O(D) each")
    print(f"  {'N':>8} {'seconds':>8} {'RSS MB':>8} {'recomputed/pick':>16} {'epochs':>7}")
    rows = [whole_50k if n == 50_000 and whole_50k else run_case("scale", n=n, whole=1) for n in sizes]
    for r in rows:
        print(f"  {r['n']:>8,} {r['seconds']:>8.2f} {r['peak_rss_mb']:>8.0f} "
              f"{r['recomputed_per_pick']:>16.0f} {r['epochs']:>7}")
    print(f"  time grows like N^{_slope(rows)}; "
          f"recomputed per pick like N^{_slope(rows, 'recomputed_per_pick')}")


SECTIONS = ("per-class", "imagenet", "whole", "scaling")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller cases (ImageNet: 100 classes, extrapolated; scaling up to 20,000)")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    p.add_argument("--case", choices=sorted(CASES))
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--whole", type=int, default=0)
    p.add_argument("--naive-steps", type=int, default=20)
    args = p.parse_args()
    if args.case:
        print(json.dumps(CASES[args.case](args)))
        return
    only = set(args.only or SECTIONS)
    print(f"DQ selection benchmark ({os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}){' --quick' if args.quick else ''}")
    if "per-class" in only:
        section_per_class(args.quick)
    if "imagenet" in only:
        section_imagenet(args.quick)
    whole = section_whole(args.quick) if "whole" in only else None
    if "scaling" in only:
        section_scaling(args.quick, whole)
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
