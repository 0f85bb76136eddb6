"""The accuracy/bytes frontier of compact sets: top-1 against stored bytes, per family of runs.

A study (bench/frontier.py) trains one run per (family, ratio, seed). This module turns the finished runs
into what a user reads off: for B bytes, which family trains the best model.

    cells          runs -> one Cell per (family, ratio): mean bytes and top-1, seed range, per-seed values
    interpolate    a family's top-1 at any byte budget inside its range: linear in log-bytes between the
                   two points around it, per seed (seeds are paired: seed s of one family against seed s
                   of another, each at its own bytes)
    paired         the paired differences of two families at a budget, with a 95% t-interval
    pareto         the cells no other cell beats in both bytes (fewer) and top-1 (higher)

The study's summary, `frontier.json` (owned here: `write_study` writes it, `read_summary` reads and checks
it), is what the report stage reads to place its own run beside the whole set and the trivial families.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from dq.core.errors import DQError
from dq.core.figures import pyplot, save_png
from dq.core.io import atomic_path, write_json

SUMMARY_VERSION = 1
# The families a user has without dq: a random subset of whole images, or the whole set at lower quality.
TRIVIAL = ("random-webp-lossless", "random-jpeg90", "random-jpeg50", "whole-jpeg")
DQ = ("dq-webp-lossless", "dq-drop25", "dq-drop50", "dq-soft", "dq-soft-k3", "dq-soft-8bit", "dq-soft-k3-8bit",
      "dq-soft-flip", "dq-soft-probe", "dq-ccs-webp-lossless", "dq-ccs-drop25")
WHOLE_LOSSLESS = "random-webp-lossless"  # at ratio 1.0: the whole set, losslessly; the budgets' yardstick
WHOLE_JPEG = "whole-jpeg"  # the whole set at JPEG q90, q50, q25: built from the jpeg families' ratio-1.0 runs
BUDGETS = (0.02, 0.05, 0.1, 0.2)  # shares of the whole set's lossless bytes


@dataclass
class Cell:
    """One (family, setting): `ratio` (and `quality`) with per-seed (bytes, top-1)."""

    family: str
    ratio: float
    quality: int
    seeds: dict[int, tuple[int, float]] = field(default_factory=dict)
    images: int = 0
    minutes: list[float] = field(default_factory=list)
    spread: tuple[float, float] | None = None  # (min, max) over seeds when only the mean is known (a summary)

    @property
    def bytes(self) -> float:
        return statistics.fmean(b for b, _ in self.seeds.values())

    @property
    def top1(self) -> float:
        return statistics.fmean(t for _, t in self.seeds.values())

    @property
    def low(self) -> float:
        return self.spread[0] if self.spread else min(t for _, t in self.seeds.values())

    @property
    def high(self) -> float:
        return self.spread[1] if self.spread else max(t for _, t in self.seeds.values())

    @property
    def setting(self) -> str:
        return f"q{self.quality}" if self.family == WHOLE_JPEG else f"{self.ratio:g}"


def cells(records: list[dict]) -> list[Cell]:
    """One Cell per (family, ratio) of the finished runs, plus the `whole-jpeg` cells (the ratio-1.0 runs of
    the JPEG families), sorted by family and bytes. `records`: dicts with family, ratio, seed, bytes, top1,
    quality (bench/frontier.py's `finished`)."""
    out: dict[tuple[str, float, int], Cell] = {}
    for r in records:
        families = [r["family"]]
        if r["ratio"] == 1.0 and "jpeg" in r["family"] and "drop" not in r["family"]:
            # a family that is only the whole set at one quality (whole-jpeg25) is a point of whole-jpeg
            families = [WHOLE_JPEG] if r["family"].startswith(WHOLE_JPEG) else families + [WHOLE_JPEG]
        for family in families:
            key = (family, r["ratio"], r["quality"] if family == WHOLE_JPEG else 0)
            cell = out.setdefault(key, Cell(family, r["ratio"], r["quality"]))
            cell.seeds[int(r["seed"])] = (int(r["bytes"]), float(r["top1"]))
            cell.images = int(r.get("train_images") or 0)
            if r.get("minutes") is not None:
                cell.minutes.append(float(r["minutes"]))
    return sorted(out.values(), key=lambda c: (c.family, c.bytes))


def curve(all_cells: list[Cell], family: str, seed: int | None = None) -> list[tuple[float, float]]:
    """(bytes, top-1) of a family's cells sorted by bytes: one seed's values, or the means (seed None)."""
    points = [((c.seeds[seed] if seed is not None else (c.bytes, c.top1))) for c in all_cells
              if c.family == family and (seed is None or seed in c.seeds)]
    return sorted(points)


EQUAL_BYTES = 0.01  # two stores within 1% of each other's bytes count as equal (no interpolation needed)


def interpolate(points: list[tuple[float, float]], budget: float) -> float | None:
    """Top-1 at `budget` bytes on the piecewise-linear curve in log-bytes through `points` (sorted by bytes);
    None outside their range (no extrapolation), but for a budget within EQUAL_BYTES of an end point, which
    takes that point's top-1 (a dq store 0.2% smaller than a random one of the same ratio is compared)."""
    if not points:
        return None
    if budget < points[0][0]:
        return points[0][1] if budget >= points[0][0] * (1 - EQUAL_BYTES) else None
    if budget > points[-1][0]:
        return points[-1][1] if budget <= points[-1][0] * (1 + EQUAL_BYTES) else None
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if b0 <= budget <= b1:
            if b1 == b0:
                return max(t0, t1)
            w = (math.log(budget) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return t0 + w * (t1 - t0)
    return points[0][1]  # a single point, exactly at the budget


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of a two-sided t-interval; low and high None with fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Comparison:
    """Family `a` against family `b` at a budget: per-seed top-1 of each, paired differences a - b."""

    a: str
    b: str
    budget: float
    a_top1: dict[int, float]
    b_top1: dict[int, float]

    @property
    def diffs(self) -> list[float]:
        return [self.a_top1[s] - self.b_top1[s] for s in sorted(self.a_top1) if s in self.b_top1]

    def interval(self) -> tuple[float, float | None, float | None]:
        return t_interval(self.diffs)


def family_at(all_cells: list[Cell], family: str, budget: float | dict[int, float]) -> dict[int, float]:
    """Per seed, the family's top-1 at `budget` bytes (one budget for all seeds, or one per seed); seeds whose
    curve does not reach the budget, or that have no budget of their own (a study still running), are left out."""
    seeds = sorted({s for c in all_cells if c.family == family for s in c.seeds})
    out = {}
    for s in seeds:
        b = budget.get(s) if isinstance(budget, dict) else budget
        if b is None:
            continue
        value = interpolate(curve(all_cells, family, s), b)
        if value is not None:
            out[s] = value
    return out


def best_at(all_cells: list[Cell], families, budget: float | dict[int, float]) -> tuple[str | None, dict[int, float]]:
    """The family with the highest mean top-1 at `budget` among `families`, and its per-seed values."""
    best, values = None, {}
    for family in families:
        at = family_at(all_cells, family, budget)
        if at and (best is None or statistics.fmean(at.values()) > statistics.fmean(values.values())):
            best, values = family, at
    return best, values


def pareto(all_cells: list[Cell]) -> list[Cell]:
    """Cells that no other cell beats with fewer (or as few) mean bytes and a higher (or equal) mean top-1."""
    def beaten(c: Cell) -> bool:
        return any(o is not c and o.bytes <= c.bytes and o.top1 >= c.top1 and (o.bytes, o.top1) != (c.bytes, c.top1)
                   for o in all_cells)

    return [c for c in all_cells if not beaten(c)]


def whole_set(all_cells: list[Cell]) -> Cell | None:
    """The whole training set stored losslessly: the budgets' yardstick and the full-set top-1."""
    return next((c for c in all_cells if c.family == WHOLE_LOSSLESS and c.ratio == 1.0), None)


def default_comparisons(all_cells: list[Cell], family: str = "dq-drop25") -> list[tuple[Cell, str | None, Comparison | None]]:
    """For every cell of `family` below the whole set: the best trivial family at that cell's own bytes (per
    seed), and the paired comparison against it."""
    out = []
    for c in (c for c in all_cells if c.family == family and c.ratio < 1.0):
        budgets = {s: b for s, (b, _) in c.seeds.items()}
        best, values = best_at(all_cells, TRIVIAL, budgets)
        comparison = None
        if best is not None:
            comparison = Comparison(family, best, c.bytes, {s: t for s, (_, t) in c.seeds.items()}, values)
        out.append((c, best, comparison))
    return out


def budget_comparisons(all_cells: list[Cell]) -> list[tuple[float, float, Comparison | None]]:
    """(share, bytes, the best dq family against the best trivial family there) at each of BUDGETS."""
    whole = whole_set(all_cells)
    if whole is None:
        return []
    out = []
    for share in BUDGETS:
        budget = share * whole.bytes
        best_dq, dq_values = best_at(all_cells, DQ, budget)
        best_trivial, trivial_values = best_at(all_cells, TRIVIAL, budget)
        comparison = None
        if best_dq is not None and best_trivial is not None:
            comparison = Comparison(best_dq, best_trivial, budget, dq_values, trivial_values)
        out.append((share, budget, comparison))
    return out


# What each step of dq buys, at the same ratio: (a, b, what a - b measures). Bytes are within a few tenths
# of a percent of each other in every pair, so these are also comparisons at equal bytes.
ABLATIONS = (
    ("dq-drop25", "dq-webp-lossless", "dropping 25% of patches, dq subset"),
    ("random-drop25", "random-webp-lossless", "dropping 25% of patches, random subset"),
    ("dq-drop50", "dq-drop25", "dropping 50% instead of 25%, dq subset"),
    ("dq-webp-lossless", "random-webp-lossless", "dq selection instead of random, whole images"),
    ("dq-drop25", "random-drop25", "dq selection instead of random, 25% dropped"),
    ("dq-soft", "dq-webp-lossless", "soft labels instead of hard, dq subset"),
    ("random-soft", "random-webp-lossless", "soft labels instead of hard, random subset"),
    ("dq-soft", "random-soft", "dq selection instead of random, soft labels"),
    ("dq-soft-k3", "dq-soft", "top 3 classes instead of all 10"),
    ("dq-soft-8bit", "dq-soft", "8-bit instead of 16-bit probabilities"),
    ("dq-soft-k3-8bit", "dq-soft", "top 3 classes at 8 bits instead of all 10 at 16"),
    ("dq-soft-flip", "dq-soft", "a label per flip view instead of one per image"),
    ("dq-soft-probe", "dq-soft", "the features' linear probe as teacher instead of the trained net"),
    ("ccs-webp-lossless", "random-webp-lossless", "CCS instead of random, whole images"),
    ("dq-ccs-webp-lossless", "dq-webp-lossless", "CCS strata inside dq's bins instead of a uniform draw"),
    ("d2-webp-lossless", "random-webp-lossless", "D2 pruning instead of random, whole images"),
    ("moderate-webp-lossless", "random-webp-lossless", "Moderate-DS instead of random, whole images"),
    ("ccs-drop25", "random-drop25", "CCS instead of random, 25% dropped"),
    ("d2-drop25", "random-drop25", "D2 pruning instead of random, 25% dropped"),
    ("moderate-drop25", "random-drop25", "Moderate-DS instead of random, 25% dropped"),
    ("dq-ccs-drop25", "dq-drop25", "CCS strata inside dq's bins, 25% dropped"),
)


def ablations(all_cells: list[Cell]) -> list[tuple[str, float, Comparison, float]]:
    """(what, ratio, a against b paired by seed, bytes of a / bytes of b) for every ABLATIONS pair and ratio
    that both families have."""
    out = []
    for a, b, what in ABLATIONS:
        for ca in (c for c in all_cells if c.family == a and c.ratio < 1.0):
            cb = next((c for c in all_cells if c.family == b and c.ratio == ca.ratio), None)
            if cb is None:
                continue
            out.append((what, ca.ratio, Comparison(a, b, ca.bytes, {s: t for s, (_, t) in ca.seeds.items()},
                                                   {s: t for s, (_, t) in cb.seeds.items()}), ca.bytes / cb.bytes))
    return out


# Hard-label selections of whole images, each against a class-balanced random subset of the same ratio
SELECTIONS = ("dq-webp-lossless", "ccs-webp-lossless", "d2-webp-lossless", "moderate-webp-lossless",
              "dq-ccs-webp-lossless")
RANDOM = "random-webp-lossless"


def selection_choices(all_cells: list[Cell]) -> list[tuple[float, list[Comparison], str]]:
    """Per ratio that random has: every SELECTIONS family's paired comparison with random (hard labels, whole
    images) and the pick: the family with the highest mean whose 95% interval lies above zero, else random
    (a selection level with random costs its scores and buys nothing)."""
    out = []
    for r in sorted({c.ratio for c in all_cells if c.family == RANDOM and c.ratio < 1.0}):
        cell = {c.family: c for c in all_cells if c.ratio == r}
        rows = [Comparison(f, RANDOM, cell[f].bytes, {s: t for s, (_, t) in cell[f].seeds.items()},
                           {s: t for s, (_, t) in cell[RANDOM].seeds.items()}) for f in SELECTIONS if f in cell]
        above = [c for c in rows if len(c.diffs) >= 2 and c.interval()[1] > 0]
        pick = max(above, key=lambda c: c.interval()[0]).a if above else RANDOM
        out.append((r, rows, pick))
    return out


# --- outputs ---------------------------------------------------------------------------------------------

def _interval_text(c: Comparison | None) -> str:
    if c is None or not c.diffs:
        return "n/a"
    mean, low, high = c.interval()
    spread = f" [{100 * low:+.2f}, {100 * high:+.2f}]" if low is not None else ""
    return f"{100 * mean:+.2f}{spread} (n={len(c.diffs)})"


def markdown(all_cells: list[Cell], descriptions: dict[str, str]) -> str:
    """The study's tables: every cell; the dq default against the best trivial family at its bytes; budgets;
    what each step buys; which selection for a budget; then the families' descriptions."""
    lines = (_cells_table(all_cells) + _default_table(all_cells) + _budget_table(all_cells)
             + _ablation_table(all_cells) + _selection_table(all_cells))
    present = {c.family for c in all_cells}
    lines += ["", "Families: " + "; ".join(f"`{k}`: {v}" for k, v in descriptions.items() if k in present) + "."]
    return "\n".join(lines) + "\n"


def _cells_table(all_cells: list[Cell]) -> list[str]:
    whole = whole_set(all_cells)
    front = {id(c) for c in pareto([c for c in all_cells if not c.family.endswith("-epochs")])}
    lines = ["| family | setting | images | stored bytes | share of whole (lossless) | top-1 mean | min–max | "
             "seeds | front | min/run |", "|---|---|---:|---:|---:|---:|---:|---:|:-:|---:|"]
    for c in sorted(all_cells, key=lambda c: (c.family, c.bytes)):
        share = f"{c.bytes / whole.bytes:.3f}" if whole else "n/a"
        minutes = f"{statistics.fmean(c.minutes):.1f}" if c.minutes else ""
        lines.append(f"| {c.family} | {c.setting} | {c.images:,} | {c.bytes:,.0f} | {share} | {c.top1:.4f} | "
                     f"{c.low:.4f}–{c.high:.4f} | {len(c.seeds)} | {'●' if id(c) in front else ''} | {minutes} |")
    return lines


def _default_table(all_cells: list[Cell]) -> list[str]:
    lines = ["", "The dq default (`dq-drop25`) against the best trivial family at its own bytes (each seed at the "
             "bytes of its own dq run; top-1 interpolated linearly in log-bytes between the trivial family's two "
             "runs of the same seed around it; points in percent, paired 95% t-interval):", "",
             "| ratio | dq bytes | dq top-1 | best trivial family there | its top-1 | dq − trivial, points |",
             "|---:|---:|---:|---|---:|---|"]
    for c, best, comparison in default_comparisons(all_cells):
        theirs = f"{statistics.fmean(comparison.b_top1.values()):.4f}" if comparison and comparison.b_top1 else "n/a"
        lines.append(f"| {c.ratio:g} | {c.bytes:,.0f} | {c.top1:.4f} | {best or 'none reaches these bytes'} | "
                     f"{theirs} | {_interval_text(comparison)} |")
    return lines


def _budget_table(all_cells: list[Cell]) -> list[str]:
    whole = whole_set(all_cells)
    if not whole:
        return []
    lines = ["", f"At budgets of the whole set's lossless bytes ({whole.bytes:,.0f}): the best dq family against "
             "the best trivial family, both interpolated at the budget:", "",
             "| budget | bytes | best dq family | top-1 | best trivial family | top-1 | dq − trivial, points |",
             "|---:|---:|---|---:|---|---:|---|"]
    for share, budget, comparison in budget_comparisons(all_cells):
        if comparison is None:
            lines.append(f"| {share:.0%} | {budget:,.0f} | n/a | | n/a | | n/a |")
            continue
        lines.append(f"| {share:.0%} | {budget:,.0f} | {comparison.a} | {statistics.fmean(comparison.a_top1.values()):.4f} | "
                     f"{comparison.b} | {statistics.fmean(comparison.b_top1.values()):.4f} | {_interval_text(comparison)} |")
    return lines


def _ablation_table(all_cells: list[Cell]) -> list[str]:
    rows = ablations(all_cells)
    if not rows:
        return []
    lines = ["", "What each step buys, at the same ratio (paired by seed; points, 95% t-interval):", "",
             "| a − b | measures | ratio | bytes a / b | a − b, points |", "|---|---|---:|---:|---|"]
    for what, ratio, comparison, byte_ratio in rows:
        lines.append(f"| {comparison.a} − {comparison.b} | {what} | {ratio:g} | {byte_ratio:.3f} | "
                     f"{_interval_text(comparison)} |")
    return lines


def _selection_table(all_cells: list[Cell]) -> list[str]:
    choices = selection_choices(all_cells)
    if not choices:
        return []
    lines = ["", "Which selection for your budget, hard labels, whole images: each method − a class-balanced "
             "random subset of the same ratio (paired by seed; points, 95% t-interval). The pick is the best "
             "method whose interval lies above zero, else random:", "",
             "| ratio | " + " | ".join(f.removesuffix("-webp-lossless") for f in SELECTIONS) + " | pick |",
             "|---:|" + "---|" * len(SELECTIONS) + "---|"]
    for ratio, rows, pick in choices:
        by = {c.a: c for c in rows}
        lines.append(f"| {ratio:g} | " + " | ".join(_interval_text(by.get(f)) for f in SELECTIONS)
                     + f" | {pick.removesuffix('-webp-lossless')} |")
    return lines


def figure(path: str | Path, all_cells: list[Cell], descriptions: dict[str, str], *, title: str = "",
           run: tuple[float, float, str] | None = None) -> None:
    """Top-1 against stored bytes (log axis): one line per family (means, bars from the seeds' min to max),
    the Pareto front ringed; `run` (bytes, top-1, label) adds one run's own point as a star."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    front = {id(c) for c in pareto([c for c in all_cells if not c.family.endswith("-epochs")])}
    families = list(dict.fromkeys(c.family for c in all_cells))
    styles = {f: ("-" if f in DQ else "--" if f in TRIVIAL else ":") for f in families}
    for i, family in enumerate(families):
        line = sorted((c for c in all_cells if c.family == family), key=lambda c: c.bytes)
        x, y = [c.bytes for c in line], [c.top1 for c in line]
        colour = f"C{i % 10}"
        ax.plot(x, y, styles[family], marker="o", color=colour, label=descriptions.get(family, family), ms=4)
        ax.vlines(x, [c.low for c in line], [c.high for c in line], color=colour, alpha=0.5)
    ringed = [c for c in all_cells if id(c) in front]
    ax.scatter([c.bytes for c in ringed], [c.top1 for c in ringed], s=110, facecolors="none", edgecolors="black",
               linewidths=1.2, label="Pareto front", zorder=5)
    if run is not None:
        ax.scatter([run[0]], [run[1]], marker="*", s=260, color="red", edgecolors="black", zorder=6, label=run[2])
    ax.set_xscale("log")
    ax.set(xlabel="stored bytes (compact file, log scale)", ylabel="test top-1 (final)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def summary(all_cells: list[Cell], descriptions: dict[str, str], match: dict, budget: dict) -> dict:
    """The study in a small file: what makes a run comparable (`match`), the training budget, the whole set's
    bytes and top-1, and every family's mean points."""
    whole = whole_set(all_cells)
    front = {id(c) for c in pareto([c for c in all_cells if not c.family.endswith("-epochs")])}
    families: dict[str, dict] = {}
    for c in sorted(all_cells, key=lambda c: (c.family, c.bytes)):
        entry = families.setdefault(c.family, {"description": descriptions.get(c.family, c.family),
                                               "trivial": c.family in TRIVIAL, "points": []})
        entry["points"].append({"ratio": c.ratio, "quality": c.quality, "bytes": round(c.bytes),
                                "top1": round(c.top1, 6), "low": c.low, "high": c.high, "seeds": len(c.seeds),
                                "front": id(c) in front})
    return {"version": SUMMARY_VERSION, "match": match, "budget": budget,
            "whole_set": None if whole is None else {"bytes": round(whole.bytes), "top1": round(whole.top1, 6)},
            "families": families}


def write_study(folder: str | Path, records: list[dict], descriptions: dict[str, str], match: dict,
                budget: dict) -> list[Path]:
    """frontier.png, frontier.md and frontier.json of the finished runs into `folder`."""
    if not records:
        raise DQError("frontier: no finished run; run `python -m bench.frontier run` first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    all_cells = cells(records)
    paths = [folder / "frontier.png", folder / "frontier.md", folder / "frontier.json"]
    figure(paths[0], all_cells, descriptions, title="Fashion-MNIST default: top-1 against stored bytes")
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(markdown(all_cells, descriptions))
    write_json(paths[2], summary(all_cells, descriptions, match, budget))
    return paths


def read_summary(path: str | Path) -> dict | None:
    """The study's summary, or None when there is no file; a file that is not one is a one-line DQError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DQError(f"{path}: not a readable frontier summary ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != SUMMARY_VERSION or "families" not in data:
        raise DQError(f"{path}: not a frontier summary of version {SUMMARY_VERSION}; rerun "
                      "`python -m bench.frontier report`")
    return data


def summary_cells(data: dict) -> list[Cell]:
    """The summary's mean points as cells whose one seed (0) holds the mean, for `curve` and `figure`."""
    return [Cell(family, p["ratio"], p["quality"], {0: (p["bytes"], p["top1"])}, spread=(p["low"], p["high"]))
            for family, entry in data["families"].items() for p in entry["points"]]
