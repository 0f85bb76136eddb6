"""The report stage on fabricated metric files, and the sweep's parser, table, figures and queue lines.

tests/fixtures/dvc_exp_show.json is real `dvc exp show --json -A` output (dvc 3.67.1), captured from a tiny
temporary repo: a baseline, two finished experiments on an older commit, one finished from the queue,
and one FAILED queued experiment, which DVC lists with the metrics of the workspace it started from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dq.tools import sweep
from dq.core.errors import DQError
from dq.report.summary import COPIED_FIGURES, summary
from stages import report as report_stage

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "fixtures" / "dvc_exp_show.json"
PNG = b"\x89PNG\r\n\x1a\n" + b"not really a picture"


def fabricate(data: Path, with_figures: bool = True) -> None:
    """The files the report stage reads, as the train, compress and mae stages write them."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "train").mkdir()
    classes = ["a", "b", "c"]
    confusion = [[8, 2, 0], [1, 9, 0], [0, 3, 7]]
    history = [{"epoch": e, "lr": 0.1, "train_loss": 1.0 / e, "train_acc": 0.5 + 0.1 * e,
                "test_loss": 1.2 / e, "test_acc": 0.4 + 0.1 * e} for e in (1, 2, 3)]
    (data / "train" / "evaluation.json").write_text(json.dumps(
        {"classes": classes, "confusion": confusion, "history": history, "top1": 0.8}))
    (data / "train_metrics.json").write_text(json.dumps(
        {"top1": 0.8, "input": "compact", "model": "resnet10t", "epochs": 3, "train_images": 60,
         "kept_pixels": 60 * 768, "compact_bytes": 40_000, "full_raw_bytes": 600 * 3072,
         "per_class_acc": {"a": 0.8, "b": 0.9, "c": 0.7}}))
    (data / "compact_metrics.json").write_text(json.dumps(
        {"compact_bytes": 40_000, "full_raw_bytes": 600 * 3072, "kept_pixel_share": 0.075,
         "selected_share": 0.1}))
    (data / "mae_metrics.json").write_text(json.dumps(
        {"mae": {"psnr": 21.5, "ssim": 0.61}, "mean_fill": {"psnr": 15.0, "ssim": 0.3},
         "nearest_fill": {"psnr": 17.0, "ssim": 0.45}, "eval_images": 16}))
    if with_figures:
        for folder, name in (("selection_plots", "bins.png"), ("compact_plots", "patches.png"),
                             ("mae_plots", "reconstruction.png")):
            (data / folder).mkdir()
            (data / folder / name).write_bytes(PNG)


def write_params(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"ratio": 0.1, "seed": 3, "select": {"method": "graphcut"},
                                    "patches": {"drop": 0.25}}))
    return path


# --- report ------------------------------------------------------------------------------------------


def test_report_stage_collects_summary_figures_and_index(tmp_path):
    data = tmp_path / "data"
    fabricate(data)
    params = write_params(tmp_path / "params.yaml")
    report_stage.main(["--params", str(params), "--data", str(data)])
    out = data / "report"
    s = json.loads((out / "summary.json").read_text())
    assert s["top1"] == 0.8 and s["compact_bytes"] == 40_000 and s["full_raw_bytes"] == 600 * 3072
    assert s["compression_ratio"] == pytest.approx(600 * 3072 / 40_000)
    assert s["kept_pixel_share"] == 0.075
    assert s["reconstruction"]["mae"] == {"psnr": 21.5, "ssim": 0.61}
    assert s["reconstruction"]["nearest_fill"]["psnr"] == 17.0
    assert s["params"] == {"ratio": 0.1, "seed": 3, "method": "graphcut", "drop": 0.25}
    for name in COPIED_FIGURES:
        assert (out / name).read_bytes() == PNG
    for name in ("confusion.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG[:8]
    index = (out / "index.md").read_text()
    assert "0.8000" in index and "(confusion.png)" in index and "(reconstruction.png)" in index

    first = {p.name: p.read_bytes() for p in out.iterdir()}
    report_stage.main(["--params", str(params), "--data", str(data)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # byte-identical rerun


def test_report_skips_missing_grids_and_names_a_missing_metrics_file(tmp_path):
    data = tmp_path / "data"
    fabricate(data, with_figures=False)
    params = write_params(tmp_path / "params.yaml")
    report_stage.main(["--params", str(params), "--data", str(data)])
    assert sorted(p.name for p in (data / "report").iterdir()) == ["confusion.png", "curves.png", "index.md",
                                                                   "summary.json"]
    (data / "mae_metrics.json").unlink()
    with pytest.raises(DQError, match="mae_metrics.json: not found; run the mae stage"):
        report_stage.main(["--params", str(params), "--data", str(data)])


def test_summary_names_a_missing_key():
    with pytest.raises(DQError, match="train_metrics.json: missing key 'top1'"):
        summary({"input": "full", "compact_bytes": 1}, {"compact_bytes": 1, "full_raw_bytes": 2, "kept_pixel_share": 1.0}, {}, {})


# --- sweep -------------------------------------------------------------------------------------------


def test_parser_reads_finished_runs_of_a_real_exp_show_and_skips_failed_and_workspace():
    rows = json.loads(SAMPLE.read_text())
    exps = sweep.parse_exp_show(rows)
    by_name = {e.name: e for e in exps}
    assert "surer-jump" not in by_name  # failed: its metrics are the workspace's, not its own
    assert {"apeak-jogs", "ghast-bite", "japan-zhos", "master"} <= set(by_name)
    assert len({e.rev for e in exps}) == len(exps)  # the workspace copy is not counted twice
    g = by_name["ghast-bite"]
    assert (g.ratio, g.method, g.seed, g.input, g.top1, g.stored_bytes) == (0.2, "dq", 1, "compact", 0.71, 200)
    assert by_name["japan-zhos"].method == "random" and by_name["japan-zhos"].ratio == 0.05


def test_parser_rejects_non_lists_and_ignores_rows_without_metrics():
    with pytest.raises(DQError, match="expected a JSON list"):
        sweep.parse_exp_show({"rev": "workspace"})
    row = {"rev": "abc", "name": "x", "error": None, "experiments": None,
           "data": {"params": {"params.yaml": {"data": {"ratio": 0.1}}}, "metrics": {}}}
    assert sweep.parse_exp_show([row]) == []


def experiments() -> list[sweep.Experiment]:
    out = []
    for method, base in (("dq", 0.70), ("random", 0.60)):
        for ratio in (0.1, 0.2):
            for seed in (0, 1):
                out.append(sweep.Experiment(f"{method}-{ratio}-{seed}", f"{method}{ratio}{seed}", ratio, method,
                                            seed, "compact", base + ratio + 0.02 * seed, int(ratio * 10_000)))
    out.append(sweep.Experiment("full-0", "f0", 0.1, "random", 0, "full", 0.9, 600_000))
    return out


def test_table_has_mean_and_spread_per_method_and_ratio():
    table = sweep.markdown_table(experiments()).splitlines()
    assert table[0].startswith("| method | ratio | runs |")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in table[2:]}
    assert set(rows) == {("dq", "0.1"), ("dq", "0.2"), ("random", "0.1"), ("random", "0.2"), ("full", "—")}
    assert "| 2 | 0.8100 | 0.8000–0.8200 |" in rows[("dq", "0.1")]
    assert "| 1 | 0.9000 | 0.9000–0.9000 | 600,000 |" in rows[("full", "—")]


def test_write_results_draws_both_figures_and_the_table(tmp_path):
    paths = sweep.write_results(tmp_path / "results", experiments())
    assert [p.name for p in paths] == ["accuracy_vs_ratio.png", "accuracy_vs_bytes.png", "results.md"]
    assert all(p.stat().st_size > 1000 for p in paths[:2])
    assert "| dq | 0.2 | 2 |" in paths[2].read_text()
    with pytest.raises(DQError, match="no finished experiment"):
        sweep.write_results(tmp_path / "empty", [])


def test_each_group_has_one_colour_in_both_figures_and_full_is_black():
    colors = sweep.group_colors(["random", "full", "dq", "graphcut", "dq"])
    assert colors == {"full": "black", "dq": "C0", "graphcut": "C1", "random": "C2"}


def test_plot_command_on_a_saved_exp_show(tmp_path, capsys):
    sweep.main(["plot", "--json", str(SAMPLE), "--out", str(tmp_path / "r")])
    assert "| dq | 0.2 | 1 | 0.7100 |" in (tmp_path / "r" / "results.md").read_text()


def test_show_command_prints_one_aligned_line_per_run_best_first(capsys):
    sweep.main(["show", "--json", str(SAMPLE)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["experiment", "method", "ratio", "seed", "input", "top-1", "stored", "bytes", "images"]
    names = [line.split()[0] for line in lines[1:]]
    assert "surer-jump" not in names and "ghast-bite" in names
    top1 = [float(line.split()[5]) for line in lines[1:]]
    assert top1 == sorted(top1, reverse=True)
    top1_end = lines[0].index("top-1") + len("top-1")
    assert all(line[top1_end - 6:top1_end].strip().replace(".", "").isdigit() for line in lines[1:])
    ghast = next(line for line in lines if line.startswith("ghast-bite"))
    assert ghast.split()[1:7] == ["dq", "0.2", "1", "compact", "0.7100", "200"]


def test_show_command_names_a_missing_saved_file(tmp_path):
    with pytest.raises(DQError, match=r"missing\.json: cannot read"):
        sweep.main(["show", "--json", str(tmp_path / "missing.json")])


def test_queue_sets_every_swept_param_on_every_run():
    cmds = sweep.queue_commands([0.05, 0.1], ["dq", "random"], [0, 1], full=True)
    assert len(cmds) == 2 * 2 * 2 + 2
    for cmd in cmds:
        assert cmd[:4] == ["dvc", "exp", "run", "--queue"]
        keys = [cmd[i + 1].split("=")[0] for i, w in enumerate(cmd) if w == "-S"]
        assert keys == ["ratio", "select.method", "seed", "train.input"]
    assert sum("train.input=full" in c for c in cmds) == 2
    assert cmds[0][4:] == ["-S", "ratio=0.05", "-S", "select.method=dq", "-S", "seed=0", "-S", "train.input=compact"]


def test_dvc_calls_put_this_interpreter_first_on_path_for_queued_stages(monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(cmd=cmd, path=kwargs["env"]["PATH"])
        return subprocess.CompletedProcess(cmd, 0, stdout="ok", stderr="")

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep._dvc("queue", "status") == "ok"
    assert seen["cmd"][:3] == [sys.executable, "-m", "dvc"]
    assert seen["path"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_queue_status_counts_parses_dvc_queue_status():
    text = ("Task     Name        Created    Status\nf29e756  surer-jump  01:56 PM   Failed\n"
            "f8ed0cc  japan-zhos  01:56 PM   Success\nabc1234  x-y  01:57 PM   Running\n\n"
            "Worker status: 0 active, 1 idle\n")
    assert sweep.queue_status_counts(text) == {"Failed": 1, "Success": 1, "Running": 1}
    assert np.isclose(sum(sweep.queue_status_counts(text).values()), 3)


def test_the_report_places_its_run_on_the_frontier_study_of_the_same_data(tmp_path):
    """A study on the same classes, whole-set bytes, test set and classifier gives the run's point beside the
    whole set's and the best trivial family's at the run's bytes; a study on other data is said not to fit."""
    from dq.report import frontier

    data = tmp_path / "data"
    fabricate(data)
    params = write_params(tmp_path / "params.yaml")
    match = {"classes": ["a", "b", "c"], "full_raw_bytes": 600 * 3072, "test_images": 30, "model": "resnet10t"}
    records = [{"family": family, "ratio": ratio, "seed": 0, "bytes": nbytes, "top1": top1, "quality": 90}
               for family, ratio, nbytes, top1 in (("random-webp-lossless", 0.05, 20_000, 0.5),
                                                   ("random-webp-lossless", 0.1, 80_000, 0.7),
                                                   ("random-webp-lossless", 1.0, 800_000, 0.9),
                                                   ("random-jpeg90", 0.1, 40_000, 0.55))]
    frontier.write_study(tmp_path / "study", records, {}, match, {"steps": 800})
    report_stage.main(["--params", str(params), "--data", str(data), "--study", str(tmp_path / "study" / "frontier.json")])
    point = json.loads((data / "report" / "summary.json").read_text())["frontier"]
    assert point["comparable"] and not point["same_budget"]  # the fabricated run trained by epochs
    assert (point["whole_set_bytes"], point["full_set_top1"]) == (800_000, 0.9)
    assert point["share_of_whole_set"] == 40_000 / 800_000
    assert point["best_trivial_at_run_bytes"] == {"family": "random-webp-lossless", "top1": pytest.approx(0.6)}
    assert (data / "report" / "frontier.png").stat().st_size > 1000
    assert "best trivial family at these bytes (study) | random-webp-lossless: 0.6000" in \
        (data / "report" / "index.md").read_text()
    frontier.write_study(tmp_path / "other", records, {}, {**match, "classes": ["x", "y", "z"]}, {"steps": 800})
    report_stage.main(["--params", str(params), "--data", str(data), "--study", str(tmp_path / "other" / "frontier.json")])
    point = json.loads((data / "report" / "summary.json").read_text())["frontier"]
    assert point == {"comparable": False, "why": "the study ran on other data or another classifier (classes)"}
    assert not (data / "report" / "frontier.png").exists()
    partial = [r for r in records if r["ratio"] < 1.0]  # a study still running: no whole-set run yet
    frontier.write_study(tmp_path / "partial", partial, {}, match, {"steps": 800})
    report_stage.main(["--params", str(params), "--data", str(data), "--study", str(tmp_path / "partial" / "frontier.json")])
    point = json.loads((data / "report" / "summary.json").read_text())["frontier"]
    assert point["comparable"] and point["whole_set_bytes"] is None and point["share_of_whole_set"] is None
    assert "not in the study yet" in (data / "report" / "index.md").read_text()
