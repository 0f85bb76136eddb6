"""A tiny copy of this project in a temporary git repo, driven by real `dvc` commands.

Used by the end-to-end tests (pipeline, team use, reliability). The tiny config runs the whole pipeline
on a synthetic set in well under a minute on 2 cores.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dq.params import deep_merge

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("dq", "stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore",
          "docs/results/frontier.json")

TINY = {
    "ratio": 0.25,
    "seed": 0,
    "data": {"source": "synthetic", "synthetic_classes": 4, "synthetic_train": 96, "synthetic_test": 40,
             "image_size": 16, "train_limit": None, "test_limit": None},
    "features": {"backbone": "efficientnet_lite0", "weights": "none", "input_size": 32, "batch_size": 32},
    "select": {"num_bins": 3},
    "patches": {"patch_size": 4, "drop": 0.25, "batch_size": 32},
    "mae": {"arch": "mae_vit_micro_patch4", "input_size": 16, "epochs": 2, "batch_size": 32,
            "warmup_epochs": 1, "eval_images": 16},
    "train": {"model": "resnet10t", "epochs": 2, "steps": None, "batch_size": 32},
    "teacher": {"steps": 6},
    "scores": {"seeds": 1, "steps": 6, "batch_size": 32, "el2n_step": 3, "k": 3},
    "runtime": {"threads": 1},
}


def env() -> dict:
    """The environment for subprocesses: this venv first on PATH, offline, quiet."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1",
             GIT_AUTHOR_NAME="dq test", GIT_AUTHOR_EMAIL="test@dq.invalid",
             GIT_COMMITTER_NAME="dq test", GIT_COMMITTER_EMAIL="test@dq.invalid")
    e.pop("DQ_DEBUG", None)
    return e


def all_stages() -> list[str]:
    """Every stage of dvc.yaml: what a `dvc repro` from nothing runs."""
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def tiny_params(overrides: dict | None = None) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_merge(deep_merge(params, TINY), overrides or {})


def run(cwd: Path, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, "git", *args, check=check)


def dvc(cwd: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check, timeout=timeout)


def make_repo(path: Path, overrides: dict | None = None) -> Path:
    """A committed git+DVC repo at `path` holding this project's code and the tiny params."""
    path.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = ROOT / name, path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (path / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "tiny dq pipeline")
    return path


def ran_stages(output: str) -> list[str]:
    """Stage names that `dvc repro`/`dvc exp run` actually ran (not skipped or restored)."""
    return re.findall(r"Running stage '([^']+)'", output)


def digest_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
