"""The README's two commands: `make pipeline` and `make test` must work from any shell.

dvc.yaml's stage commands say `python -m stages...`; DVC runs them through the caller's shell, so the
Makefile must put its own venv first on PATH. Without that, a fresh machine's `make pipeline` ran the
system python, which has none of the pinned packages.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_env_probe(variable: str) -> str:
    """The value of `variable` as a recipe of the Makefile sees it, run from a bare shell."""
    if shutil.which("make") is None:
        pytest.skip("GNU make is missing")
    probe = f"probe: ; @printf '%s' \"$${variable}\""
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "--eval", probe, "probe"],
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def test_make_puts_the_venv_first_on_path_for_dvc_stage_commands():
    first = make_env_probe("PATH").split(":")[0]
    assert Path(first) == ROOT / ".venv" / "bin"


def test_make_runs_offline_by_default():
    assert make_env_probe("HF_HUB_OFFLINE") == "1"
    assert make_env_probe("DVC_NO_ANALYTICS") == "1"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make pipeline" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.parametrize("stage", ["prepare", "select", "train"])
def test_a_stage_run_by_a_python_without_the_packages_says_so_in_one_line(stage):
    # -S hides site-packages: the same as dvc finding the system python on PATH.
    done = subprocess.run([sys.executable, "-S", "-m", f"stages.{stage}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {sys.executable} lacks the pinned packages (numpy, torch")
    assert ". .venv/bin/activate" in lines[0]
