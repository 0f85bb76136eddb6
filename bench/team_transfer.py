"""Push and pull times and sizes of a run's outputs, to a folder remote and to a real local sshd.

    python bench/team_transfer.py [REPO]      # REPO: a repo after `dvc repro` (default: this one)

The baseline, run in the same process, is a plain `cp -r` of the same objects: the ratios say what DVC
adds on top of moving the bytes (its start-up of a few seconds, hashing, one object per file). Cost grows
linearly with the bytes and, for SSH, with the number of objects (one SFTP round trip each). REPO is
only read: the remotes, the pulling copy and the server live in a temporary folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: a bench script named like a stdlib module would shadow it

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import yaml  # noqa: E402

from tests.pipeline_repo import dvc, git  # noqa: E402
from tests.test_team import SSHD, outputs_kept_in_git, running_sshd  # noqa: E402

TRACKED = ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", "dq", "stages")


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of the content-addressed objects under a remote or cache."""
    files = [p for p in (path / "files" / "md5").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    return sum(p.stat().st_size for p in files), len(files)


def fresh_copy(repo: Path, dest: Path) -> Path:
    """The git-tracked side of `repo` (code, dvc.yaml, dvc.lock, `cache: false` outputs), no cache."""
    for name in (*TRACKED, *outputs_kept_in_git(repo)):
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git(dest, "init", "-q")
    return dest


def measure(repo: Path, work: Path, name: str, url: str, local: dict[str, str]) -> dict:
    pusher = fresh_copy(repo, work / f"{name}-pusher")
    dvc(pusher, "cache", "dir", "--local", dvc(repo, "cache", "dir").stdout.strip())
    dvc(pusher, "remote", "add", "-d", name, url)
    puller = fresh_copy(repo, work / f"{name}-puller")
    dvc(puller, "remote", "add", "-d", name, url)
    for key, value in local.items():
        for clone in (pusher, puller):
            dvc(clone, "remote", "modify", "--local", name, key, value)
    done = sorted(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])  # all, or those run so far
    push_s = timed(dvc, pusher, "push", *done)
    pull_s = timed(dvc, puller, "pull", *done)
    assert json.loads(dvc(puller, "status", "--json", *done).stdout or "{}") == {}, "pulled copy is not clean"
    return {"push_s": push_s, "pull_s": pull_s}


def main() -> None:
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT).resolve()
    if not (repo / "dvc.lock").exists():
        raise SystemExit(f"{repo}/dvc.lock is missing: run `dvc repro` there first")
    with tempfile.TemporaryDirectory(prefix="dq-team-bench-") as tmp:
        work = Path(tmp)
        folder = measure(repo, work, "folder", str(work / "folder-store"), {})
        size, count = folder_size(work / "folder-store")
        copy_s = timed(shutil.copytree, work / "folder-store" / "files", work / "plain-copy")
        stages = " ".join(sorted(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]))
        print(f"outputs of {stages}: {size / 2**20:.1f} MiB in {count} objects; baseline cp -r: {copy_s:.2f} s")
        print(f"folder remote: push {folder['push_s']:.1f} s ({folder['push_s'] / copy_s:.0f}x cp), "
              f"pull {folder['pull_s']:.1f} s ({folder['pull_s'] / copy_s:.0f}x cp)")
        if not SSHD.exists():
            print(f"ssh remote: skipped, {SSHD} is missing")
            return
        (work / "sshd").mkdir()
        with running_sshd(work / "sshd") as server:
            ssh = measure(repo, work, "ssh", f"{server['url']}{work / 'ssh-store'}",
                          {"keyfile": str(server["keyfile"])})
        print(f"ssh remote (127.0.0.1): push {ssh['push_s']:.1f} s ({ssh['push_s'] / copy_s:.0f}x cp), "
              f"pull {ssh['pull_s']:.1f} s ({ssh['pull_s'] / copy_s:.0f}x cp)")


if __name__ == "__main__":
    main()
