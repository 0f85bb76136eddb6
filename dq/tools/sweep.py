"""Parameter sweeps through DVC's experiment queue, and the figures and table that compare them.

    python -m dq.tools.sweep queue --ratios 0.05 0.1 0.2 0.4 --methods dq graphcut random --seeds 0 1 --full
    python -m dq.tools.sweep run [--jobs 1]          # dvc queue start, then wait until the queue is empty
    python -m dq.tools.sweep plot --out docs/results  # reads `dvc exp show --json -A`
    python -m dq.tools.sweep show                     # one narrow line per run, for the terminal

`queue` stages one `dvc exp run --queue` per (method, ratio, seed), and with `--full` one
`train.input=full` run per seed. Every queued run sets ratio, select.method, seed and train.input
explicitly: a queued experiment starts from the workspace's params, which the last `dvc exp run` may
have changed. The `full` runs use the smallest ratio and `random` selection so that select and compress,
which they do not need, stay cheap.

`show` prints what `dvc exp show` buries among 40 columns: one line per finished run with its method,
ratio, seed, input, test top-1 and stored bytes, best first.

`plot` writes accuracy_vs_ratio.png (one line per method: mean over seeds, band from min to max, the
`full` run as a horizontal line), accuracy_vs_bytes.png (every run: test top-1 against the bytes its
training input takes) and results.md (a table of mean, min, max over seeds). Failed, queued and running
experiments are left out: DVC shows a failed run with the metrics of the workspace it started from.

Budget: `train.epochs` counts passes over the chosen training set (dq.train.schedule), so every run sees each
of its images the same number of times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dq.core.errors import DQError, run_cli
from dq.core.figures import pyplot, save_png
from dq.core.io import atomic_path
from dq.select.methods import METHODS

METRICS_SUFFIX = "train_metrics.json"
UNFINISHED = ("queued", "running", "failed")


@dataclass(frozen=True)
class Experiment:
    """One finished run as `dvc exp show` reports it."""

    name: str
    rev: str
    ratio: float
    method: str
    seed: int
    input: str
    top1: float
    stored_bytes: int  # bytes of the training input: the compact file, or raw pixels for selected/full
    train_images: int | None = None

    @property
    def group(self) -> str:
        """The line this run belongs to: its selection method, or `full`."""
        return "full" if self.input == "full" else self.method if self.input == "compact" else f"{self.method} ({self.input})"


# --- queue and run ------------------------------------------------------------------------------------


def queue_commands(ratios: list[float], methods: list[str], seeds: list[int], full: bool) -> list[list[str]]:
    """The `dvc exp run --queue` command lines of the grid, every swept param set explicitly."""
    def exp(ratio, method, seed, inp):
        return ["dvc", "exp", "run", "--queue", "-S", f"ratio={ratio}", "-S", f"select.method={method}",
                "-S", f"seed={seed}", "-S", f"train.input={inp}"]

    commands = [exp(r, m, s, "compact") for m in methods for r in ratios for s in seeds]
    if full:
        commands += [exp(min(ratios), "random", s, "full") for s in seeds]
    return commands


def queue_status_counts(text: str) -> dict[str, int]:
    """Counts per status from `dvc queue status` (a table: Task, Name, Created, Status)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] != "Task" and words[-1] in ("Queued", "Running", "Success", "Failed"):
            counts[words[-1]] = counts.get(words[-1], 0) + 1
    return counts


def run_queue(jobs: int = 1, poll_s: float = 10.0) -> dict[str, int]:
    """Start the queue's workers and wait until nothing is queued or running; returns the final counts."""
    _dvc("queue", "start", "-j", str(jobs))
    while True:
        counts = queue_status_counts(_dvc("queue", "status"))
        print(f"sweep: {counts}", file=sys.stderr, flush=True)
        if not counts.get("Queued") and not counts.get("Running"):
            return counts
        time.sleep(poll_s)


def _dvc(*args: str) -> str:
    # Queued experiments run dvc.yaml's `python` from PATH: make it this interpreter, activated or not.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise DQError(f"dvc {' '.join(args)} failed ({proc.returncode}): {last}")
    return proc.stdout


# --- parse --------------------------------------------------------------------------------------------


def parse_exp_show(rows: list) -> list[Experiment]:
    """Finished experiments (and baselines) from `dvc exp show --json`, each revision once, in order.

    Skips the `workspace` row (a copy of whatever was last applied), rows without a train metrics file,
    and experiments that failed, are queued or still run.
    """
    if not isinstance(rows, list):
        raise DQError("dvc exp show --json: expected a JSON list of baseline rows")
    out: dict[str, Experiment] = {}
    for row in rows:
        if not isinstance(row, dict) or row.get("rev") == "workspace":
            continue
        _add(out, row, row.get("name") or str(row.get("rev", ""))[:7])
        for exp in row.get("experiments") or []:
            state = ((exp.get("executor") or {}).get("state") or "").lower()
            if state in UNFINISHED or not exp.get("revs"):
                continue
            _add(out, exp["revs"][0], exp.get("name") or exp["revs"][0].get("name"))
    return list(out.values())


def _add(out: dict, rev: dict, name: str | None) -> None:
    data = rev.get("data") or {}
    if rev.get("error") or rev.get("rev") in out:
        return
    metrics = _metrics_of(data)
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    if metrics is None or "top1" not in metrics or "ratio" not in params:
        return
    select = params.get("select") or {}
    train = params.get("train") or {}
    out[rev.get("rev")] = Experiment(
        name=str(name or rev.get("rev", "")[:7]), rev=str(rev.get("rev")), ratio=float(params["ratio"]),
        method=str(select.get("method", "dq")), seed=int(params.get("seed", 0)),
        input=str(metrics.get("input") or train.get("input", "compact")), top1=float(metrics["top1"]),
        stored_bytes=int(metrics.get("compact_bytes", 0)),
        train_images=int(metrics["train_images"]) if "train_images" in metrics else None)


def _metrics_of(data: dict) -> dict | None:
    for path, entry in sorted((data.get("metrics") or {}).items()):
        if path.endswith(METRICS_SUFFIX) and isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            return entry["data"]
    return None


def read_experiments() -> list[Experiment]:
    """Every finished experiment of the repository (`-A`: the baseline commit may have moved on)."""
    text = _dvc("exp", "show", "--json", "-A")
    try:
        return parse_exp_show(json.loads(text))
    except json.JSONDecodeError as exc:
        raise DQError(f"dvc exp show --json: not JSON ({exc.msg})") from None


# --- summarise, table and figures ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (group, ratio) point: top-1 over seeds, and the mean stored bytes."""

    group: str
    ratio: float
    n: int
    mean: float
    low: float
    high: float
    stored_bytes: float


def cells(experiments: list[Experiment]) -> list[Cell]:
    """Runs grouped by (group, ratio) — a `full` run's ratio is irrelevant, so `full` is one cell."""
    groups: dict[tuple[str, float], list[Experiment]] = {}
    for e in experiments:
        groups.setdefault((e.group, 1.0 if e.group == "full" else e.ratio), []).append(e)
    out = []
    for (group, ratio), runs in sorted(groups.items()):
        accs = [e.top1 for e in runs]
        out.append(Cell(group, ratio, len(runs), statistics.fmean(accs), min(accs), max(accs),
                        statistics.fmean(e.stored_bytes for e in runs)))
    return out


def markdown_table(experiments: list[Experiment]) -> str:
    """Test top-1 (final epoch) per method and ratio: mean, min–max over seeds, runs, stored bytes."""
    lines = ["| method | ratio | runs | top-1 mean | top-1 min–max | stored bytes |", "|---|---:|---:|---:|---:|---:|"]
    for c in cells(experiments):
        ratio = "—" if c.group == "full" else f"{c.ratio:g}"
        lines.append(f"| {c.group} | {ratio} | {c.n} | {c.mean:.4f} | {c.low:.4f}–{c.high:.4f} | "
                     f"{c.stored_bytes:,.0f} |")
    return "\n".join(lines) + "\n"


def group_colors(groups) -> dict[str, str]:
    """One colour per group, the same in every figure: `full` black, the rest tab10 in sorted order."""
    others = sorted(set(groups) - {"full"})
    return {"full": "black", **{g: f"C{i % 10}" for i, g in enumerate(others)}}


def accuracy_vs_ratio_figure(path: str | Path, experiments: list[Experiment]) -> None:
    """One line per method (mean over seeds) with a min–max band; `full` as a horizontal line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    all_cells = cells(experiments)
    colors = group_colors(c.group for c in all_cells)
    for group in sorted({c.group for c in all_cells} - {"full"}):
        line = [c for c in all_cells if c.group == group]
        x = [c.ratio for c in line]
        ax.plot(x, [c.mean for c in line], marker="o", label=group, color=colors[group])
        ax.fill_between(x, [c.low for c in line], [c.high for c in line], color=colors[group], alpha=0.2)
    for c in all_cells:
        if c.group == "full":
            ax.axhline(c.mean, color="black", linestyle="--", label=f"full ({c.n} run{'s' * (c.n > 1)})")
            ax.axhspan(c.low, c.high, color="black", alpha=0.08)
    ratios = sorted({c.ratio for c in all_cells if c.group != "full"})
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.set(xlabel="ratio (share of training images kept)", ylabel="test top-1, final epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def accuracy_vs_bytes_figure(path: str | Path, experiments: list[Experiment]) -> None:
    """Every run: test top-1 against the bytes of its training input."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = group_colors(e.group for e in experiments)
    for group in sorted({e.group for e in experiments}):
        runs = [e for e in experiments if e.group == group]
        ax.scatter([e.stored_bytes for e in runs], [e.top1 for e in runs], label=group, s=18, color=colors[group])
    ax.set_xscale("log")
    ax.set(xlabel="stored bytes of the training input", ylabel="test top-1, final epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def write_results(out: str | Path, experiments: list[Experiment]) -> list[Path]:
    """The two figures and results.md into `out`; returns the paths written."""
    if not experiments:
        raise DQError("dvc exp show: no finished experiment with train metrics; run the sweep first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "accuracy_vs_ratio.png", out / "accuracy_vs_bytes.png", out / "results.md"]
    accuracy_vs_ratio_figure(paths[0], experiments)
    accuracy_vs_bytes_figure(paths[1], experiments)
    with atomic_path(paths[2]) as tmp:
        tmp.write_text("# Sweep results\n\nTest top-1 of the final epoch; spread over seeds.\n\n"
                       + markdown_table(experiments)
                       + "\n![accuracy vs ratio](accuracy_vs_ratio.png)\n\n"
                       + "![accuracy vs bytes](accuracy_vs_bytes.png)\n")
    return paths


def runs_table(experiments: list[Experiment]) -> str:
    """One aligned line per run, best top-1 first: what a terminal user wants from `dvc exp show`."""
    header = ("experiment", "method", "ratio", "seed", "input", "top-1", "stored bytes", "images")
    rows = [header] + [
        (e.name, e.method, f"{e.ratio:g}", str(e.seed), e.input, f"{e.top1:.4f}", f"{e.stored_bytes:,}",
         "" if e.train_images is None else f"{e.train_images:,}")
        for e in sorted(experiments, key=lambda e: (-e.top1, e.name))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 1, 4}
    return "\n".join("  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows) + "\n"


# --- command line -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "queue":
        for cmd in queue_commands(args.ratios, args.methods, args.seeds, args.full):
            print(" ".join(cmd), flush=True)
            if not args.dry_run:
                _dvc(*cmd[1:])
    elif args.command == "run":
        counts = run_queue(args.jobs)
        if counts.get("Failed"):
            print(f"sweep: {counts['Failed']} experiment(s) failed; see `dvc queue logs <name>`", file=sys.stderr)
    else:
        _results(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dq.tools.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue the grid with dvc exp run --queue")
    q.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    q.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--full", action="store_true", help="also one train.input=full run per seed")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    r = sub.add_parser("run", help="dvc queue start, then wait for the queue to drain")
    r.add_argument("--jobs", type=int, default=1)
    p = sub.add_parser("plot", help="figures and a Markdown table from dvc exp show --json")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--json", type=Path, default=None, help="read this saved `dvc exp show --json` instead")
    s = sub.add_parser("show", help="one line per finished run: method, ratio, seed, top-1, bytes")
    s.add_argument("--json", type=Path, default=None, help="read this saved `dvc exp show --json` instead")
    return parser


def _results(args: argparse.Namespace) -> None:
    """`show`: one line per finished run; `plot`: the figures and table, one written path a line."""
    experiments = read_experiments() if args.json is None else read_saved(args.json)
    if args.command == "show":
        if not experiments:
            raise DQError("dvc exp show: no finished experiment with train metrics yet")
        print(runs_table(experiments), end="")
        return
    for path in write_results(args.out, experiments):
        print(path)


def read_saved(path: Path) -> list[Experiment]:
    """Experiments from a saved `dvc exp show --json` (CI artefacts, or a colleague's machine)."""
    try:
        return parse_exp_show(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise DQError(f"{path}: not JSON ({exc.msg}); save `dvc exp show --json` there") from None
    except OSError as exc:
        raise DQError(f"{path}: cannot read ({exc.strerror})") from None


if __name__ == "__main__":
    run_cli(main)
