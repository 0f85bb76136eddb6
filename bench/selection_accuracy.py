"""Accuracy of selection candidates against class-balanced random selection: does DQ beat random? A cheap-proxy
study on the full Fashion-MNIST.

    python -m bench.selection_accuracy embed            # cache embeddings of all 60,000 + 10,000 images
    python -m bench.selection_accuracy study [--ratios 0.005 0.01 ...] [--seeds 10] [--candidates ...]

`embed` computes the features stage's own embeddings (the built-in backbone, `features.input_size`, CPU,
INIT_SEED) of the full training and test sets in chunks under --cache (default /work/cache/fmnist-full);
chunks already there are kept, so the step can be split over several short runs (--max-chunks).

`study` screens selection candidates with a linear probe (dq.features.backbones.fit_probe, the features stage's
own probe) trained on the selected training embeddings and scored on all 10,000 test embeddings. Every
candidate draws with the same seeds as class-balanced random (`select.method: random`), so differences
are paired by seed; it prints the mean top-1, the mean paired difference against random and its 95%
t-interval over seeds, the cost of the DQ bins as N grows, and the peak RSS.

Candidates (bins are computed once per feature kind; only the draw depends on the seed):
- random: class-balanced random (sample_bins with no bins), the baseline;
- dq: GraphCut bins of the embeddings + the same share of every (bin, class) cell (select.method dq);
- dq-gradient: bins of the features.kind gradient features (logit gradients of the full-train probe);
- dq-zscore: bins of the per-dimension standardised embeddings (cosine then measures in-domain spread);
- dq-logits: bins of the full-train probe's logits (in-domain: the data's own linear classifier);
- dq-w{beta}: dq bins, bin-weighted sampling (tried as a select.bin_weighting option, not shipped): class quotas split over bins in proportion to
  size * exp(beta * k / (K - 1)) (sample_bins_weighted below);
  beta < 0 favours the early (central) bins, beta > 0 the late (peripheral) ones (Sorscher et al. 2022);
- graphcut: one-shot GraphCut per class at the ratio's quota (select.method graphcut; no seed);
- dq-early / dq-late: fill the class quota from bin 0 upwards / from the last bin downwards;
- dq-adaptive: per-cell rates in proportion to the cell's spread (mean cosine distance to its centre),
  a simplified Adaptive Dataset Quantization.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dq.core.errors import DQError
from dq.select import dq_bins, sample_bins
from dq.select.cosine import GradientFeatures, check_labels
from dq.select.engines import graphcut_indices
from dq.select.methods import DqParams
from dq.select.sampling import apportion, check_ratio

SPLITS = {"train": 60000, "test": 10000}
CHUNK = 5000
RATIOS = (0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_CANDIDATES = ("dq", "graphcut", "dq-gradient", "dq-zscore", "dq-logits", "dq-w-2", "dq-w-1", "dq-w1", "dq-w2",
                      "dq-adaptive")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ embed

def chunk_path(cache: str, split: str, size: int, start: int) -> str:
    return os.path.join(cache, f"{split}_{size}_{start:05d}.npy")


def embed_cmd(args) -> None:
    from dq.features.backbones import INIT_SEED, create_backbone, embed
    from dq.data.sources import load_split
    from dq.params import DataParams, FeaturesParams
    from dq.core.runtime import seed_everything

    size = args.input_size or FeaturesParams().input_size
    os.makedirs(args.cache, exist_ok=True)
    done = 0
    for split, n in SPLITS.items():
        todo = [s for s in range(0, n, CHUNK) if not os.path.exists(chunk_path(args.cache, split, size, s))]
        if not todo:
            continue
        images = load_split(DataParams(train_limit=None, test_limit=None), split).images
        seed_everything(INIT_SEED)
        model = create_backbone("efficientnet_lite0", "builtin")
        for s in todo:
            if args.max_chunks and done >= args.max_chunks:
                return
            t = time.perf_counter()
            h = embed(model, images[s:s + CHUNK], size, 64, "cpu", progress=False)
            tmp = chunk_path(args.cache, split, size, s) + ".tmp.npy"
            np.save(tmp, h)
            os.replace(tmp, chunk_path(args.cache, split, size, s))
            done += 1
            print(f"embed: {split} rows {s}-{s + len(h)} in {time.perf_counter() - t:.0f} s", flush=True)


def load_split_features(cache: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The cached embeddings of a split [n, D] and its labels int64 [n], in the order `embed` embedded them."""
    from dq.data.sources import split_source
    from dq.params import DataParams

    n = SPLITS[split]
    paths = [chunk_path(cache, split, size, s) for s in range(0, n, CHUNK)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        sys.exit(f"selection_accuracy: {len(missing)} embedding chunks missing under {cache} (first {missing[0]}); "
                 f"run `python -m bench.selection_accuracy embed` first")
    h = np.concatenate([np.load(p) for p in paths])
    labels = split_source(DataParams(train_limit=None, test_limit=None), split).labels.astype(np.int64)
    return h, labels


# ---------------------------------------------------------------------------------------- sampling

def bin_weights(num_bins: int, bin_weighting: float) -> np.ndarray:
    """Sampling weight of every bin, [num_bins]: exp(bin_weighting * k / (num_bins - 1)).

    Negative values favour the early (central) bins, positive ones the late (peripheral) ones; 0 weights
    every bin the same."""
    return np.exp(bin_weighting * np.arange(num_bins) / max(num_bins - 1, 1))


def _split_weighted(total: int, sizes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Split `total` (at most sizes.sum()) over cells in proportion to sizes * weights, each capped at its
    size: cells whose share reaches their size are filled and the rest is shared again over the others;
    then integer quotas by largest remainder (equal remainders to the earlier cell)."""
    sizes = np.asarray(sizes, np.int64)
    mass = sizes * np.asarray(weights, np.float64)
    quotas = np.zeros(len(sizes), np.int64)
    open_ = sizes > 0
    while True:
        left = total - int(quotas.sum())
        share = np.where(open_, left * mass / max(mass[open_].sum(), 1e-300), 0.0)
        full = open_ & (share >= sizes)
        if not full.any():
            break
        quotas[full] = sizes[full]
        open_ &= ~full
    add = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - add), kind="stable")
    add[order[:left - int(add.sum())]] += 1
    return quotas + add


def sample_bins_weighted(bins, labels, ratio: float, seed: int, weights) -> np.ndarray:
    """Keep round(ratio * N) samples, favouring bins by `weights` [num_bins]: sorted int64 indices.

    Class quotas are those of class-balanced random (largest remainder over the classes); each class
    quota is split over the class's bins in proportion to bin size * weight, capped at the bin's size
    (`_split_weighted`); each cell's quota is drawn uniformly with np.random.default_rng(seed), classes
    in order, bins in order within a class.
    """
    bins = np.asarray(bins).astype(np.int64)
    labels = check_labels(labels, bins.shape[0] if bins.ndim == 1 else -1)
    check_ratio(ratio)
    weights = np.asarray(weights, np.float64)
    if bins.min(initial=0) < 0 or bins.max(initial=0) >= len(weights):
        raise DQError(f"bins: expected bin ids in 0..{len(weights) - 1}, one weight per bin")
    if not (np.isfinite(weights).all() and (weights > 0).all()):
        raise DQError("bin weights: expected finite numbers > 0")
    classes, inverse = np.unique(labels, return_inverse=True)
    class_quota = apportion(np.bincount(inverse), round(ratio * len(labels)))
    rng = np.random.default_rng(seed)
    kept = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        cells = [members[bins[members] == k] for k in range(len(weights))]
        quotas = _split_weighted(int(class_quota[c]), np.array([len(m) for m in cells]), weights)
        kept += [rng.choice(m, size=int(q), replace=False) for m, q in zip(cells, quotas) if q]
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.zeros(0, np.int64)


def fill_in_order(total: int, sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    quotas = np.zeros(len(sizes), np.int64)
    left = int(total)
    for k in order:
        quotas[k] = min(int(sizes[k]), left)
        left -= quotas[k]
    return quotas


def weighted_sample(bins, labels, ratio, seed, cell_weight) -> np.ndarray:
    """As sample_bins_weighted, with the split chosen per class: class quotas as class-balanced random
    draws them (largest remainder over classes, total round(ratio * N)); each class quota split over its
    bins by cell_weight(c, sizes [K], quota) -> quotas [K]; each cell drawn uniformly, in (class, bin) order."""
    bins = np.asarray(bins, np.int64)
    classes, inverse = np.unique(labels, return_inverse=True)
    class_quota = apportion(np.bincount(inverse), round(ratio * len(labels)))
    k_bins = int(bins.max()) + 1
    rng = np.random.default_rng(seed)
    kept = []
    for c in range(len(classes)):
        members = [np.flatnonzero((inverse == c) & (bins == k)) for k in range(k_bins)]
        sizes = np.array([len(m) for m in members])
        quotas = cell_weight(c, sizes, int(class_quota[c]))
        assert quotas.sum() == class_quota[c] and (quotas <= sizes).all()
        kept += [rng.choice(m, size=q, replace=False) for m, q in zip(members, quotas) if q]
    return np.sort(np.concatenate(kept)).astype(np.int64)


def cell_spread(unit: np.ndarray, bins: np.ndarray, labels: np.ndarray) -> dict:
    """Mean cosine distance to the cell's centre, per (class, bin)."""
    out = {}
    for c in np.unique(labels):
        for k in np.unique(bins):
            m = unit[(labels == c) & (bins == k)]
            centre = m.mean(0)
            out[int(c), int(k)] = float(1.0 - (m @ centre).mean() / max(np.linalg.norm(centre), 1e-12))
    return out


# ------------------------------------------------------------------------------------------- study

def pca_basis(h: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and the top `dims` principal directions [D, dims] of h (no labels)."""
    mu = h.mean(0, dtype=np.float64)
    cov = np.cov((h - mu).T.astype(np.float64))
    vals, vecs = np.linalg.eigh(cov)
    return mu, vecs[:, ::-1][:, :dims]


def probe_top1(z_train, y_train, z_test, y_test, num_classes: int) -> float:
    """The features stage's probe (dq.features.backbones.fit_probe) fit on the selected rows, top-1 on the test set."""
    from dq.features.backbones import fit_probe

    probe = fit_probe(z_train, y_train, num_classes)
    return float((probe.logits(z_test).argmax(1) == y_test).mean())


_PROXY: dict = {}  # the proxy's data, inherited by the forked workers


def _proxy_top1(idx: np.ndarray) -> float:
    import torch

    torch.set_num_threads(1)  # one fit per core: the fits are small, threads would mostly wait
    p = _PROXY
    return probe_top1(p["z"][idx], p["y"][idx], p["z_test"], p["y_test"], p["num_classes"])


def _pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def t_interval(d: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


@dataclass
class StudyData:
    """The cached embeddings of both splits, their labels, and the features stage's probe fit on all 60,000."""

    h: np.ndarray  # train embeddings [N, D]
    y: np.ndarray  # train labels int64 [N]
    h_test: np.ndarray  # [N_test, D]
    y_test: np.ndarray  # [N_test]
    num_classes: int
    probe: Any  # dq.features.backbones.Probe


def load_study_data(cache: str, size: int, dq: DqParams, args) -> StudyData:
    h, y = load_split_features(cache, "train", size)
    h_test, y_test = load_split_features(cache, "test", size)
    num_classes = int(y.max()) + 1
    print(f"study: train {h.shape}, test {h_test.shape}, input_size {size}, {dq.num_bins} bins, "
          f"seeds {args.seeds}, ratios {args.ratios}", flush=True)
    t = time.perf_counter()
    probe = full_probe(cache, size, h, y, num_classes)
    full_top1 = float((probe.logits(h_test).argmax(1) == y_test).mean())
    print(f"study: probe on all 60,000: test top-1 {full_top1:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return StudyData(h, y, h_test, y_test, num_classes, probe)


def full_probe(cache: str, size: int, h: np.ndarray, y: np.ndarray, num_classes: int):
    """The features stage's probe on all 60,000 (slow to fit on 2 cores: cached under `cache`)."""
    from dq.features.backbones import Probe, fit_probe

    probe_file = os.path.join(cache, f"probe_{size}.npz")
    if os.path.exists(probe_file):
        z = np.load(probe_file)
        return Probe(z["weight"], z["bias"], float(z["train_accuracy"]))
    probe = fit_probe(h, y, num_classes)
    np.savez(probe_file, weight=probe.weight, bias=probe.bias, train_accuracy=probe.train_accuracy)
    return probe


def candidate_features(candidates, data: StudyData) -> dict:
    """The features of every kind the candidates bin: embedding, gradient, zscore, logits."""
    from dq.features.backbones import logit_gradients

    kinds = {feature_kind(c) for c in candidates}
    h, feats = data.h, {}
    if "embedding" in kinds:
        feats["embedding"] = h
    if "gradient" in kinds:
        feats["gradient"] = GradientFeatures(logit_gradients(h, data.y, data.probe), h)
    if "zscore" in kinds:
        feats["zscore"] = (h - h.mean(0)) / np.maximum(h.std(0), 1e-6)
    if "logits" in kinds:
        feats["logits"] = data.probe.logits(h).astype(np.float64)
    return feats


def candidate_bins(cache: str, size: int, candidates, data: StudyData, dq: DqParams) -> dict:
    """The DQ bins of every feature kind, int32 [N] (cached under `cache`: only the draw depends on the seed)."""
    bins = {}
    for kind, f in candidate_features(candidates, data).items():
        cached = os.path.join(cache, f"bins_{kind}_{size}_{dq.num_bins}.npy")
        if os.path.exists(cached):
            bins[kind] = np.load(cached)
            continue
        t = time.perf_counter()
        bins[kind] = dq_bins(f, data.y, dq.num_bins, lam=dq.lam, per_class=dq.per_class, precision=dq.precision)
        np.save(cached, bins[kind])
        print(f"study: dq bins of {kind} features in {time.perf_counter() - t:.1f} s "
              f"(peak RSS so far {peak_rss_mb():.0f} MB)", flush=True)
    return bins


class Draws:
    """The kept indices of every candidate at a ratio and a seed; graphcut's (no seed) computed once per ratio."""

    def __init__(self, data: StudyData, bins: dict, dq: DqParams, spread: dict | None):
        self.data, self.bins, self.dq, self.spread = data, bins, dq, spread
        self.graphcut: dict = {}

    def __call__(self, cand: str, ratio: float, seed: int) -> np.ndarray:
        y, b = self.data.y, self.bins.get("embedding")
        if cand == "random":
            return sample_bins(np.full(len(y), -1), y, ratio, seed)
        if cand == "graphcut":  # deterministic: the same set for every seed
            if ratio not in self.graphcut:
                self.graphcut[ratio] = graphcut_indices(self.data.h, y, ratio, lam=self.dq.lam,
                                                        precision=self.dq.precision)
            return self.graphcut[ratio]
        if cand in ("dq", "dq-gradient", "dq-zscore", "dq-logits"):
            return sample_bins(self.bins[feature_kind(cand)], y, ratio, seed)
        if cand.startswith("dq-w"):  # a candidate select.bin_weighting (not shipped: it never helped)
            return sample_bins_weighted(b, y, ratio, seed, bin_weights(self.dq.num_bins, float(cand[4:])))
        if cand == "dq-early":
            return weighted_sample(b, y, ratio, seed, lambda c, s, q: fill_in_order(q, s, np.arange(len(s))))
        if cand == "dq-late":
            return weighted_sample(b, y, ratio, seed, lambda c, s, q: fill_in_order(q, s, np.arange(len(s))[::-1]))
        if cand == "dq-adaptive":
            return weighted_sample(b, y, ratio, seed, lambda c, s, q: _split_weighted(
                q, s, np.array([self.spread[c, k] for k in range(len(s))])))
        raise SystemExit(f"unknown candidate {cand!r}")


def proxy_data(data: StudyData, dims: int) -> dict:
    """The proxy probe's inputs: the embeddings' top principal components (PCA of the training embeddings, no
    labels), a linear classifier of the embeddings about 5x cheaper to fit than on all 1280 dims."""
    mu, basis = pca_basis(data.h, dims)
    z, z_test = ((data.h - mu) @ basis).astype(np.float32), ((data.h_test - mu) @ basis).astype(np.float32)
    t = time.perf_counter()
    print(f"study: proxy probe on all 60,000 ({dims} PCA dims): test top-1 "
          f"{probe_top1(z, data.y, z_test, data.y_test, data.num_classes):.4f} ({time.perf_counter() - t:.0f} s)",
          flush=True)
    return {"z": z, "y": data.y, "z_test": z_test, "y_test": data.y_test, "num_classes": data.num_classes}


def ratio_rows(args, draw: Draws, cands: list[str], ratio: float) -> list[tuple]:
    """One row per candidate at `ratio`: (candidate, ratio, top-1 %, mean paired difference against random,
    its 95% interval, wins) over args.seeds seeds, the proxy probes fit in args.workers processes."""
    t = time.perf_counter()
    tasks = [(c, s, draw(c, ratio, s)) for c in cands for s in range(args.seeds)]
    with _pool(args.workers) as pool:
        top1 = list(pool.map(_proxy_top1, [idx for _, _, idx in tasks], chunksize=4))
    acc = {c: np.array([a for (c2, _, _), a in zip(tasks, top1) if c2 == c]) for c in cands}
    rows = []
    for c in cands:
        d = 100 * (acc[c] - acc["random"])
        mean, lo, hi = t_interval(d)
        rows.append((c, ratio, 100 * acc[c].mean(), mean, lo, hi, int((d > 0).sum())))
    print(f"study: ratio {ratio} ({round(ratio * len(draw.data.y))} images) in {time.perf_counter() - t:.0f} s",
          flush=True)
    for r in rows:
        print(fmt_row(r, args.seeds), flush=True)
    return rows


def print_table(rows: list[tuple], cands: list[str], seeds: int) -> None:
    print(f"\n| candidate | ratio | top-1 % | − random (points) | 95% interval | wins of {seeds} |")
    print("|---|---:|---:|---:|---|---:|")
    for r in sorted(rows, key=lambda r: (cands.index(r[0]), r[1])):
        print(fmt_row(r, seeds))


def print_scaling(data: StudyData, dq: DqParams) -> None:
    """The cost of the DQ bins at N = 7,500 ... 60,000 (class-balanced prefixes)."""
    print("\n| N | dq bins (s) |\n|---:|---:|")
    for n in (7500, 15000, 30000, 60000):
        idx = np.concatenate([np.flatnonzero(data.y == c)[:n // data.num_classes] for c in range(data.num_classes)])
        t = time.perf_counter()
        dq_bins(data.h[idx], data.y[idx], dq.num_bins, lam=dq.lam, per_class=dq.per_class, precision=dq.precision)
        print(f"| {len(idx)} | {time.perf_counter() - t:.1f} |", flush=True)


def study_cmd(args) -> None:
    from dq.params import FeaturesParams

    size, dq = args.input_size or FeaturesParams().input_size, DqParams()
    data = load_study_data(args.cache, size, dq, args)
    bins = candidate_bins(args.cache, size, args.candidates, data, dq)
    spread = None
    if "dq-adaptive" in args.candidates:
        spread = cell_spread(data.h / np.linalg.norm(data.h, axis=1, keepdims=True), bins["embedding"], data.y)
    draw = Draws(data, bins, dq, spread)
    _PROXY.update(proxy_data(data, args.pca))
    cands = ["random"] + [c for c in args.candidates if c != "random"]
    rows = [row for ratio in args.ratios for row in ratio_rows(args, draw, cands, ratio)]
    print_table(rows, cands, args.seeds)
    if args.scaling:
        print_scaling(data, dq)
    print(f"\nstudy: peak RSS {peak_rss_mb():.0f} MB")


def feature_kind(cand: str) -> str:
    kind = cand.split("-")[1] if "-" in cand else ""
    return kind if kind in ("gradient", "zscore", "logits") else "embedding"


def fmt_row(r, seeds) -> str:
    c, ratio, top1, mean, lo, hi, wins = r
    if c == "random":
        return f"| {c} | {ratio} | {top1:.2f} | — | — | — |"
    return f"| {c} | {ratio} | {top1:.2f} | {mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {wins} |"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("embed", "study"))
    ap.add_argument("--cache", default="/work/cache/fmnist-full")
    ap.add_argument("--input-size", type=int, default=None, help="default: features.input_size")
    ap.add_argument("--max-chunks", type=int, default=0, help="embed: stop after this many chunks (0: all)")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES))
    ap.add_argument("--workers", type=int, default=2, help="processes fitting the proxy probes")
    ap.add_argument("--pca", type=int, default=256, help="principal components the proxy probe sees")
    ap.add_argument("--scaling", action="store_true", help="also time the dq bins at N = 7,500 ... 60,000")
    args = ap.parse_args(argv)
    (embed_cmd if args.command == "embed" else study_cmd)(args)


if __name__ == "__main__":
    main()
