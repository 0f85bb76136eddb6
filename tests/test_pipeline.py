"""The whole pipeline through real `dvc repro` and `dvc exp run` in a temporary git repo."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.pipeline_repo import all_stages, dvc, ran_stages, run

ALL_STAGES = all_stages()


@pytest.fixture(scope="module")
def repo(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run (its `dvc repro` ran every stage), for experiments that change it."""
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    shutil.copytree(tiny_run, repo, symlinks=True)
    return repo


def test_repro_writes_every_declared_output(repo):
    data = repo / "data"
    for path in ("prepared/train/index.json", "prepared/train/shard-00000.h5", "prepared/test/index.json",
                 "prepared/test/shard-00000.h5", "features/train.h5", "selection/bins.npy",
                 "selection/indices.npy", "selection/summary.json", "compact/dataset.h5", "mae/model.pt",
                 "train/model.pt", "report/summary.json", "export/dataset.json", "export/train", "export/test"):
        assert (data / path).exists(), path
    metrics = json.loads((data / "train_metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= 1.0
    assert metrics["train_images"] == 24  # ratio 0.25 of 96
    assert metrics["compact_bytes"] > 0


def test_second_repro_runs_nothing(repo):
    out = dvc(repo, "repro")
    assert ran_stages(out.stdout) == [], out.stdout


def test_exp_run_ratio_reruns_select_and_after_only(repo):
    out = dvc(repo, "exp", "run", "-S", "ratio=0.5", "--name", "half")
    ran = ran_stages(out.stdout)
    assert "prepare" not in ran and "features" not in ran and "mae" not in ran, ran
    assert {"select", "compress", "train", "report"} <= set(ran), ran
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    rows = _exp_rows(shown)
    assert len(rows) >= 2
    by_ratio = {row["params"]["ratio"]: row["metrics"] for row in rows}
    assert set(by_ratio) >= {0.25, 0.5}
    assert by_ratio[0.5]["train_images"] == 48 and by_ratio[0.25]["train_images"] == 24
    for metrics in by_ratio.values():
        assert "top1" in metrics and "compact_bytes" in metrics


def test_exp_run_export_format_reruns_only_export(repo):
    out = dvc(repo, "exp", "run", "-S", "export.format=webdataset", "--name", "wds")
    assert ran_stages(out.stdout) == ["export"], out.stdout
    info = json.loads((repo / "data" / "export" / "dataset.json").read_text())
    assert info["layout"] == "webdataset" and info["splits"]["train"]["shards"] == ["train-000000.tar"]
    assert info["figures"]["train_top1"] == json.loads((repo / "data" / "train_metrics.json").read_text())["top1"]


def test_sweep_queues_a_real_grid_runs_it_through_the_queue_and_reports_it(repo, tmp_path):
    sweep = [sys.executable, "-m", "dq.tools.sweep"]
    queued = run(repo, *sweep, "queue", "--ratios", "0.25", "--methods", "random", "--seeds", "1").stdout
    assert queued.count("dvc exp run --queue") == 1, queued
    run(repo, *sweep, "run", timeout=900)
    assert "Failed" not in dvc(repo, "queue", "status").stdout

    lines = run(repo, *sweep, "show").stdout.splitlines()
    runs = {tuple(line.split()[1:5]) for line in lines[1:]}
    assert ("random", "0.25", "1", "compact") in runs, lines  # the queued run
    assert ("dq", "0.25", "0", "compact") in runs, lines      # the committed baseline
    run(repo, *sweep, "plot", "--out", str(tmp_path / "results"))
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| random | 0.25 | 1 |" in table and "| dq | 0.25 |" in table
    assert (tmp_path / "results" / "accuracy_vs_ratio.png").stat().st_size > 1000


def _exp_rows(shown) -> list[dict]:
    """Flatten `dvc exp show --json` (DVC 3) into rows of params.yaml values and train metrics."""
    rows = []

    def visit(entry):
        data = (entry or {}).get("data") or {}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        metrics = (data.get("metrics") or {}).get("data/train_metrics.json", {}).get("data", {})
        if params and metrics:
            rows.append({"params": params, "metrics": metrics})
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                visit(rev)

    for commit in shown:
        visit(commit)
    return rows
