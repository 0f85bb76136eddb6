"""One run's results in one place: accuracy, storage and reconstruction figures, and the image grids.

`build_report` reads the metrics of the compress, mae and train stages and the train stage's final
evaluation, and writes into one folder:

    summary.json     top1, storage (compact_bytes, full_raw_bytes, compression_ratio, kept_pixel_share),
                     MAE PSNR/SSIM against the simple fills, and the params that produced the run
    confusion.png    the final epoch's confusion matrix on the test set
    curves.png       loss and accuracy per epoch
    bins.png, patches.png, reconstruction.png   the earlier stages' image grids, copied when present
    frontier.png     the run's own point on the frontier study's top-1 against bytes (when comparable)
    index.md         a short page linking all of it

The frontier. bench/frontier.py's study leaves a small summary (docs/results/frontier.json, dq.report.frontier)
with every family's mean top-1 and bytes on the built-in default data. When this run is on the same data
(classes, whole training set's raw bytes, test set) with the same classifier, `summary.json["frontier"]`
gives its bytes and top-1 beside the whole set's lossless bytes and the full-set top-1 of the study, the
share of the whole set it stores, and the best trivial family's top-1 at the run's own bytes
(interpolated in log-bytes between the family's points); `same_budget` says whether the run trained under
the study's step budget (only then are the top-1s like for like). Nothing is hard-coded: without a study
file, or on other data, the report says so.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.report import frontier
from dq.core.errors import DQError
from dq.core.figures import pyplot, save_png
from dq.core.io import atomic_path, read_json, write_json

COPIED_FIGURES = ("bins.png", "patches.png", "reconstruction.png")
RECONSTRUCTIONS = ("mae", "mean_fill", "nearest_fill")  # mae_metrics.json's keys: the MAE and the simple fills


def _need(obj: dict, key: str, where: str):
    if key not in obj:
        raise DQError(f"{where}: missing key '{key}'; rerun the stage that writes it")
    return obj[key]


def summary(train: dict, compact: dict, mae: dict, params: dict) -> dict:
    """The run's accuracy, storage and ratios. `params` holds ratio, seed, select.method, patches.drop.

    compact_bytes is the compact file; training_bytes what the classifier's input (train.input) takes,
    which is the compact file for `compact` and raw pixels for `selected` and `full`.
    """
    full_raw = int(_need(compact, "full_raw_bytes", "compact_metrics.json"))
    compact_bytes = int(_need(compact, "compact_bytes", "compact_metrics.json"))
    training_bytes = int(_need(train, "compact_bytes", "train_metrics.json"))
    return {
        "top1": float(_need(train, "top1", "train_metrics.json")),
        "input": _need(train, "input", "train_metrics.json"),
        "model": train.get("model"),
        "epochs": train.get("epochs"),
        "train_images": int(_need(train, "train_images", "train_metrics.json")),
        "kept_pixels": int(_need(train, "kept_pixels", "train_metrics.json")),
        "per_class_acc": train.get("per_class_acc", {}),
        "compact_bytes": compact_bytes,
        "full_raw_bytes": full_raw,
        "compression_ratio": full_raw / max(compact_bytes, 1),
        "training_bytes": training_bytes,
        "training_compression_ratio": full_raw / max(training_bytes, 1),
        "kept_pixel_share": float(_need(compact, "kept_pixel_share", "compact_metrics.json")),
        "selected_share": compact.get("selected_share"),
        "reconstruction": {fill: {k: mae[fill][k] for k in ("psnr", "ssim") if k in mae[fill]}
                           for fill in RECONSTRUCTIONS if isinstance(mae.get(fill), dict)},
        "params": dict(params),
    }


def frontier_point(s: dict, evaluation: dict, train: dict, study: dict | None) -> dict:
    """This run against the frontier study (see the module docstring); `comparable` False says why not."""
    if study is None:
        return {"comparable": False, "why": "no frontier study summary (run python -m bench.frontier report)"}
    match = {"classes": list(evaluation.get("classes", [])), "full_raw_bytes": s["full_raw_bytes"],
             "test_images": int(np.asarray(evaluation.get("confusion", [[0]])).sum()), "model": s["model"]}
    differ = sorted(k for k in match if study["match"].get(k) != match[k])
    if differ:
        return {"comparable": False, "why": f"the study ran on other data or another classifier ({', '.join(differ)})"}
    cells = frontier.summary_cells(study)
    whole = study.get("whole_set") or {}
    best, best_top1 = None, None
    for family in frontier.TRIVIAL:
        top1 = frontier.interpolate(frontier.curve(cells, family), s["compact_bytes"])
        if top1 is not None and (best_top1 is None or top1 > best_top1):
            best, best_top1 = family, top1
    steps = study["budget"].get("steps")
    return {"comparable": True, "same_budget": train.get("budget") == "steps" and train.get("steps") == steps,
            "study_budget": f"{steps} steps", "run_bytes": s["compact_bytes"], "run_top1": s["top1"],
            "whole_set_bytes": whole.get("bytes"), "full_set_top1": whole.get("top1"),
            "share_of_whole_set": s["compact_bytes"] / whole["bytes"] if whole.get("bytes") else None,
            "best_trivial_at_run_bytes": None if best is None else {"family": best, "top1": best_top1}}


# --- figures ------------------------------------------------------------------------------------------


def confusion_figure(path: str | Path, confusion: np.ndarray, classes: list[str]) -> None:
    """Rows are true classes, columns predictions; each cell shows its count, rows shaded by recall."""
    plt = pyplot()
    confusion = np.asarray(confusion, dtype=np.int64)
    recall = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    c = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * c, 0.8 + 0.5 * c))
    ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if recall[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(c), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test top-1 {np.trace(confusion) / max(confusion.sum(), 1):.3f}")
    fig.tight_layout()
    save_png(fig, path)


def curves_figure(path: str | Path, history: list[dict]) -> None:
    """Loss and accuracy per epoch, training (augmented batches) and test (the rounds that were scored)."""
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(8, 3))
    for split in ("train", "test"):
        scored = [r for r in history if f"{split}_acc" in r]
        epochs = [r["epoch"] for r in scored]
        loss_ax.plot(epochs, [r[f"{split}_loss"] for r in scored], marker=".", label=split)
        acc_ax.plot(epochs, [r[f"{split}_acc"] for r in scored], marker=".", label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1")
    acc_ax.legend()
    fig.tight_layout()
    save_png(fig, path)


# --- the page -----------------------------------------------------------------------------------------


def index_markdown(s: dict, figures: list[str]) -> str:
    """A short page: the headline numbers and the figures present."""
    lines = _headline_lines(s) + _reconstruction_lines(s) + _frontier_lines(s.get("frontier") or {})
    lines += ["", "Details: [summary.json](summary.json).", ""]
    for name in figures:
        lines += [f"![{name[:-4]}]({name})", ""]
    return "\n".join(lines)


def _headline_lines(s: dict) -> list[str]:
    p = s["params"]
    return [
        "# dq run report",
        "",
        f"Ratio {p.get('ratio')}, method {p.get('method')}, patch drop {p.get('drop')}, seed {p.get('seed')}; "
        f"{s['model']} trained {s['epochs']} epochs on {s['train_images']} `{s['input']}` images.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| test top-1 (final epoch) | {s['top1']:.4f} |",
        f"| compact file | {s['compact_bytes']:,} bytes |",
        f"| full training set, raw | {s['full_raw_bytes']:,} bytes |",
        f"| compression ratio (full raw / compact) | {s['compression_ratio']:.2f}× |",
        f"| kept pixel share | {s['kept_pixel_share']:.4f} |",
    ]


def _reconstruction_lines(s: dict) -> list[str]:
    return [f"| dropped patches, {fill.replace('_', ' ')}: PSNR / SSIM | {m['psnr']:.2f} dB / {m['ssim']:.4f} |"
            for fill, m in s["reconstruction"].items() if "psnr" in m and "ssim" in m]


def _frontier_lines(point: dict) -> list[str]:
    """The run against the frontier study's whole set and best trivial family, or why it cannot be."""
    if not point.get("comparable"):
        return [f"| frontier study | {point.get('why', 'not known')} |"]
    trivial = point["best_trivial_at_run_bytes"]
    whole = point["whole_set_bytes"] is not None
    lines = ["| stored bytes / the whole set's, lossless (study) | "
             + (f"{point['share_of_whole_set']:.3f} ({point['whole_set_bytes']:,} bytes) |" if whole
                else "not in the study yet |"),
             f"| full-set top-1 (study, {point['study_budget']}) | "
             + (f"{point['full_set_top1']:.4f} |" if whole else "not in the study yet |"),
             "| best trivial family at these bytes (study) | "
             + (f"{trivial['family']}: {trivial['top1']:.4f} |" if trivial else "none reaches them |")]
    if not point["same_budget"]:
        lines.append(f"| note | this run's budget is not the study's ({point['study_budget']}): compare with care |")
    return lines


@dataclass(frozen=True)
class ReportInputs:
    """The files the report reads: the train, compress and mae stages' metrics, train's final evaluation,
    the earlier stages' figures (a name in COPIED_FIGURES → its PNG; missing ones are skipped) and the
    frontier study's summary (dq.report.frontier), when there is one."""

    train_metrics: str | Path
    compact_metrics: str | Path
    mae_metrics: str | Path
    evaluation: str | Path
    figures: dict[str, str | Path]
    study: str | Path | None = None


def build_report(out: str | Path, inputs: ReportInputs, params: dict) -> dict:
    """Write the report folder `out` whole (atomically) from `inputs`; returns the summary. `params` holds
    ratio, seed, select.method and patches.drop (as `summary` reads them)."""
    train = read_json(inputs.train_metrics, "train")
    s = summary(train, read_json(inputs.compact_metrics, "compress"), read_json(inputs.mae_metrics, "mae"), params)
    ev = read_json(inputs.evaluation, "train")
    study = frontier.read_summary(inputs.study) if inputs.study is not None else None
    s["frontier"] = frontier_point(s, ev, train, study)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        written = _evaluation_figures(tmp, ev, str(inputs.evaluation)) + _copied_figures(tmp, inputs.figures)
        if s["frontier"]["comparable"]:
            written.append(_frontier_figure(tmp, s, study))
        write_json(tmp / "summary.json", s)
        (tmp / "index.md").write_text(index_markdown(s, written))
    return s


def _evaluation_figures(folder: Path, ev: dict, where: str) -> list[str]:
    """confusion.png and curves.png from train's final evaluation (`where`: its file, for errors)."""
    confusion_figure(folder / "confusion.png", np.asarray(_need(ev, "confusion", where)), _need(ev, "classes", where))
    curves_figure(folder / "curves.png", _need(ev, "history", where))
    return ["confusion.png", "curves.png"]


def _copied_figures(folder: Path, figures: dict[str, str | Path]) -> list[str]:
    """The earlier stages' figures that exist, copied into `folder`, in COPIED_FIGURES order."""
    written = []
    for name in COPIED_FIGURES:
        src = Path(figures.get(name, ""))
        if figures.get(name) and src.is_file():
            shutil.copyfile(src, folder / name)
            written.append(name)
    return written


def _frontier_figure(folder: Path, s: dict, study: dict) -> str:
    """The run's own point on the study's top-1 against bytes: frontier.png."""
    frontier.figure(folder / "frontier.png", frontier.summary_cells(study),
                    {name: entry["description"] for name, entry in study["families"].items()},
                    title=f"this run on the frontier study ({s['frontier']['study_budget']})",
                    run=(s["compact_bytes"], s["top1"], "this run"))
    return "frontier.png"
