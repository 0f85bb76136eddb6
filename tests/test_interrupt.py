"""SIGKILL in the middle of a long stage loses nothing: no partial file at a declared output path, and
`dvc repro` afterwards completes with the bytes of an uninterrupted run.

Each long stage (features, compress, mae, train) runs directly, as dvc.yaml's command, in a copy of the
shared tiny run: once to completion (timing it), then again killed with SIGKILL after a seeded random
share of that time, downstream stages first so that each one's inputs are whole. DVC deletes a stage's outputs before it runs the stage, and so does this test.
A killed MAE training resumes from its last checkpoint (`mae.resume: true`) to the same model.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dq.compact.reader import validate
from tests.pipeline_repo import ROOT, digest_tree, dvc, env, git, ran_stages

LONG_STAGES = ("features", "compress", "mae", "train")
SEED = 8
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def declared_outputs(stage: str) -> list[str]:
    block = DVC_STAGES[stage]
    return [(entry if isinstance(entry, str) else next(iter(entry)))
            for key in ("outs", "metrics", "plots") for entry in block.get(key, [])]


def stage_command(stage: str) -> list[str]:
    cmd = DVC_STAGES[stage]["cmd"].split()
    return [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]


def remove_outputs(repo: Path, stage: str) -> None:
    for out in declared_outputs(stage):
        path = repo / out
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def start(repo: Path, stage: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(stage_command(stage), cwd=repo, env=env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


# ------------------------------------------------------------------------------------ validity checks


def check_complete(path: Path) -> None:
    """Raise unless `path` is a whole, readable file of its kind."""
    name = path.name
    if name == "dataset.h5":
        validate(path)
    elif name.endswith(".h5"):
        with h5py.File(path, "r", locking=False) as f:
            for key in f:
                f[key][...]  # fletcher32 checks every chunk
    elif name.endswith(".pt"):
        torch.load(path, map_location="cpu", weights_only=True)
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".npy"):
        np.load(path, allow_pickle=False)
    elif name.endswith(".png"):
        with Image.open(path) as img:
            img.load()
    elif name.endswith(".tsv"):
        text = path.read_text()
        rows = text.splitlines()
        assert text.endswith("\n") and len(rows) >= 2, f"{path}: torn log"
        assert len({len(row.split("\t")) for row in rows}) == 1, f"{path}: torn row"


def partial_outputs(repo: Path, stage: str) -> list[str]:
    """Declared outputs of `stage` that exist but are not complete and valid."""
    bad = []
    for out in declared_outputs(stage):
        path = repo / out
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
        for f in files:
            if f.name.startswith(".") and ".tmp-" in f.name:
                continue  # a temporary of the killed process: not a declared path, swept by the next run
            try:
                check_complete(f)
            except Exception as exc:  # noqa: BLE001 - anything unreadable is partial
                bad.append(f"{f.relative_to(repo)}: {type(exc).__name__}: {str(exc)[:120]}")
    return bad


# -------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def killed(tiny_run, tmp_path_factory):
    """A copy of the tiny run in which each long stage was killed once; what each kill left behind."""
    repo = tmp_path_factory.mktemp("interrupt") / "repo"
    shutil.copytree(tiny_run, repo, symlinks=True)
    shutil.rmtree(repo / ".dvc" / "cache")  # else `dvc repro` checks the lost outputs out instead of rerunning
    reference = digest_tree(tiny_run / "data")
    rng = random.Random(SEED)
    report = {}
    for stage in reversed(LONG_STAGES):  # downstream first: a killed stage's inputs stay whole
        remove_outputs(repo, stage)
        began = time.perf_counter()
        proc = start(repo, stage, repo / f"{stage}.full.log")
        assert proc.wait(timeout=600) == 0, (repo / f"{stage}.full.log").read_text()[-3000:]
        duration = time.perf_counter() - began
        own = tuple(o.removeprefix("data/") for o in declared_outputs(stage))
        again = digest_tree(repo / "data")
        mine = {k: v for k, v in again.items() if k.startswith(own)}
        assert mine and mine == {k: v for k, v in reference.items() if k.startswith(own)}, f"{stage} run directly"

        remove_outputs(repo, stage)
        delay = rng.uniform(0.3, 0.9) * duration
        proc = start(repo, stage, repo / f"{stage}.killed.log")
        time.sleep(delay)
        finished = proc.poll() is not None
        kill(proc)
        report[stage] = {"delay": delay, "duration": duration, "finished_before_kill": finished,
                         "partial": partial_outputs(repo, stage),
                         "present": [o for o in declared_outputs(stage) if (repo / o).exists()]}
    for stage in LONG_STAGES:
        (repo / f"{stage}.full.log").unlink()
        (repo / f"{stage}.killed.log").unlink()
    return repo, reference, report


@pytest.mark.parametrize("stage", LONG_STAGES)
def test_sigkill_leaves_no_partial_output(killed, stage):
    _, _, report = killed
    seen = report[stage]
    assert seen["partial"] == [], seen
    print(f"{stage}: killed after {seen['delay']:.1f} of {seen['duration']:.1f} s "
          f"({'after' if seen['finished_before_kill'] else 'before'} it finished); present: {seen['present']}")


def test_kills_landed_mid_stage(killed):
    """Most kills must hit a running stage, or the test above proves little."""
    _, _, report = killed
    assert sum(not seen["finished_before_kill"] for seen in report.values()) >= 3, report


def test_repro_after_the_kills_gives_the_uninterrupted_bytes(killed):
    repo, reference, _ = killed
    out = dvc(repo, "repro")
    ran = ran_stages(out.stdout)
    assert ran, f"dvc repro found nothing to redo after the kills:\n{out.stdout}"
    after = digest_tree(repo / "data")
    assert sorted(after) == sorted(reference), sorted(set(after) ^ set(reference))
    assert [k for k in reference if after[k] != reference[k]] == []
    assert not git(repo, "status", "--porcelain", "dvc.lock").stdout.strip()  # the same lock as before


# The MAE stage as dvc.yaml runs it, except that the process SIGKILLs itself the moment the first
# epoch's checkpoint is in place. Killing it from outside on seeing the file raced the tiny run's
# second epoch (a few milliseconds) and failed under load; the random-time kills are `killed`'s job.
KILLED_AFTER_FIRST_CHECKPOINT = """
import os, signal
import dq.mae.training as training
import stages.mae as stage
save_resume = training.save_resume
def save_then_die(*args, **kwargs):
    save_resume(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
training.save_resume = save_then_die
stage.main([])
"""


def test_killed_mae_training_resumes_from_its_checkpoint(tiny_run, tmp_path):
    """SIGKILL right after the first epoch's checkpoint; `mae.resume: true` finishes to the same model bytes."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_run, repo, symlinks=True)
    remove_outputs(repo, "mae")
    shutil.rmtree(repo / "data" / "mae_ckpt")
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_CHECKPOINT], cwd=repo, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(repo / "data" / "mae_ckpt" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1
    assert not (repo / "data" / "mae" / "model.pt").exists()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mae"]["resume"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(stage_command("mae"), cwd=repo, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch 1" in proc.stderr
    for name in ("mae/model.pt", "mae_metrics.json", "mae_live/plots/metrics/train/loss.tsv"):
        assert (repo / "data" / name).read_bytes() == (tiny_run / "data" / name).read_bytes(), name


def test_the_next_write_sweeps_temporaries_of_killed_processes(tmp_path):
    """A SIGKILL during a write leaves `.<name>.tmp-<pid>`; the next atomic write of that path removes it."""
    from dq.core.io import write_json

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "metrics.json"
    dead = tmp_path / f".metrics.json.tmp-{gone.pid}"
    dead.write_text('{"half": ')
    alive = tmp_path / f".metrics.json.tmp-{os.getppid()}"  # a running process's write in progress
    alive.write_text("{")
    other = tmp_path / f".other.json.tmp-{gone.pid}"  # another output's: not this write's business
    other.write_text("{")
    write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    assert not dead.exists() and alive.exists() and other.exists()


def test_replacing_a_file_never_leaves_its_path_empty(tmp_path, monkeypatch):
    """The old file stays whole until the new one is renamed over it; a failed rename keeps the old one."""
    import dq.core.io
    from dq.core.io import write_json

    out = tmp_path / "last.json"
    write_json(out, {"epoch": 1})

    def refuse(src, dst):
        assert out.exists(), "the old file was removed before the new one was in place"
        raise OSError(errno.EIO, "rename refused")

    monkeypatch.setattr(dq.core.io.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        write_json(out, {"epoch": 2})
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.json"]


def test_replacing_a_folder_swaps_it_whole_and_sweeps_a_dead_swap(tmp_path):
    """A folder output is replaced by the new folder; an old one set aside by a killed process is swept."""
    from dq.core.io import atomic_path

    out = tmp_path / "selection"
    for version in ("old", "new"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / f"{version}.npy").write_bytes(version.encode())
    assert [p.name for p in out.iterdir()] == ["new.npy"]
    with atomic_path(out) as tmp:  # a file where the folder was, and back
        tmp.write_text("file")
    assert out.read_text() == "file"
    with atomic_path(out) as tmp:
        tmp.mkdir()
    assert out.is_dir()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    aside = tmp_path / f".selection.tmp-{gone.pid}.old"
    aside.mkdir()
    with atomic_path(out) as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selection"]
