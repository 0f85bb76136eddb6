"""Team use with real remotes and real clones: a folder remote, a real sshd, a shared cache, experiments,
the run cache, and a push killed half-way.

The tiny pipeline runs once, in clone A (module fixture). Every other clone gets its outputs from a
remote or a cache, and `DQ_STAGE_LOG` (dq.core.errors.run_cli appends each entry point's name to it) proves
that no stage command ran there. Clones compare every declared output (cached or not) byte for byte.

Outputs marked `cache: false` are never pushed by DVC, so they must travel in git: clone A commits them
(`git add -f`, as long as .gitignore ignores data/), and experiment commits then carry them too. What git
cannot carry are the metrics a run-cache record points to: `dvc push --run-cache` does not push
`cache: false` metrics, so their stages cannot be restored elsewhere. docs/TEAM.md: cache every output.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.pipeline_repo import all_stages, digest_tree, dvc, env, git, make_repo, ran_stages

SSHD = Path("/usr/sbin/sshd")
ALL_STAGES = all_stages()
OTHER_RATIO = 0.5  # the experiment, and the run cache's parameter set that is never committed
BULK_FILES = 1500  # objects in the interrupted push: enough that a kill lands half-way


@dataclass
class Team:
    """A bare git remote, a folder DVC remote, a shared cache, and clone A that ran the pipeline."""

    root: Path
    origin: Path
    store: Path
    shared_cache: Path
    a: Path
    data_digest: dict[str, str]

    def clone(self, name: str, *, shared_cache: bool = False) -> Path:
        """A fresh `git clone` of origin; with `shared_cache`, it uses the cache clone A filled.

        The shared cache is written straight into .dvc/config.local (what `use_cache` makes `dvc` write),
        to save two DVC start-ups per clone; clone A and the shared-cache test use the commands.
        """
        path = self.root / name
        git(self.root, "clone", "-q", str(self.origin), str(path))
        if shared_cache:
            (path / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {self.shared_cache}\n    shared = group\n")
        return path


def use_cache(repo: Path, cache: Path, link: str | None = None) -> None:
    """Point `repo` at a cache directory shared by a group, as docs/TEAM.md describes."""
    dvc(repo, "cache", "dir", "--local", str(cache))
    dvc(repo, "config", "--local", "cache.shared", "group")
    if link:
        dvc(repo, "config", "--local", "cache.type", link)


def declared_outputs(repo: Path) -> dict[str, bool]:
    """Every output path in dvc.yaml → whether DVC caches it (`cache: false` ones live in git instead)."""
    outs = {}
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind) or []:
                path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                outs[path] = (opts or {}).get("cache", True)
    return outs


def outputs_kept_in_git(repo: Path) -> list[str]:
    return [path for path, cached in declared_outputs(repo).items() if not cached]


def data_digest(repo: Path) -> dict[str, str]:
    """sha256 of every file of every declared output (stages may leave undeclared files, e.g. checkpoints)."""
    digest = {}
    for out in declared_outputs(repo):
        path = repo / out
        files = digest_tree(path) if path.is_dir() else {"": hashlib.sha256(path.read_bytes()).hexdigest()}
        digest.update({f"{out}/{name}".rstrip("/"): sha for name, sha in files.items()})
    return digest


def status(repo: Path, *args: str) -> dict:
    """`dvc status --json`: {} when the workspace matches dvc.lock (and the remote, with -c)."""
    return json.loads(dvc(repo, "status", "--json", *args).stdout or "{}")


def set_params(repo: Path, **values) -> None:
    """Edit params.yaml in place, as a user would (not committed)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@contextlib.contextmanager
def stage_log(tmp: Path):
    """A file that every stage command started by DVC appends its name to, while inside the block."""
    log = tmp / f"stages-{time.monotonic_ns()}.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DQ_STAGE_LOG", str(log))
        yield log


def logged(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def remote_objects(store: Path) -> list[Path]:
    """The content-addressed objects of a folder/SSH remote (files/md5/xx/yyyy), not temp files."""
    return [p for p in (store / "files" / "md5").glob("*/*") if p.is_file() and not p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Team:
    root = tmp_path_factory.mktemp("team")
    origin, store, shared_cache = root / "origin.git", root / "store", root / "shared-cache"
    git(root, "init", "-q", "--bare", "-b", "main", str(origin))
    a = make_repo(root / "A")
    dvc(a, "remote", "add", "-d", "store", str(store))  # the folder recipe of the README and docs/TEAM.md
    dvc(a, "remote", "modify", "store", "verify", "true")
    git(a, "commit", "-q", "-am", "folder remote")
    git(a, "remote", "add", "origin", str(origin))
    use_cache(a, shared_cache)

    with stage_log(root) as log:
        out = dvc(a, "repro")
    assert sorted(ran_stages(out.stdout)) == sorted(ALL_STAGES), out.stdout
    assert set(ALL_STAGES) <= set(logged(log)), "DQ_STAGE_LOG must name every stage that runs"

    git(a, "add", "-A")
    if outputs_kept_in_git(a):
        git(a, "add", "-f", *outputs_kept_in_git(a))  # -f: see test_outputs_kept_in_git_are_not_git_ignored
    git(a, "commit", "-q", "-m", "tiny run")
    git(a, "push", "-q", "origin", "main")
    dvc(a, "push")
    return Team(root, origin, store, shared_cache, a, data_digest(a))


def test_outputs_kept_in_git_are_not_git_ignored(team):
    """`git add` and `dvc exp run` skip git-ignored files: a metric ignored there never reaches a teammate."""
    kept_in_git = outputs_kept_in_git(team.a)
    ignored = git(team.a, "check-ignore", "--no-index", *kept_in_git, check=False).stdout.split() if kept_in_git else []
    assert ignored == [], (f".gitignore hides the cache: false outputs {ignored}: teammates never get them. "
                           "Let DVC cache them (drop `cache: false` in dvc.yaml) or un-ignore them (docs/TEAM.md)")


def test_folder_remote_pull_into_fresh_clone_reruns_nothing(team, tmp_path):
    b = team.clone("B")
    dvc(b, "pull")
    assert status(b) == {}
    assert status(b, "--cloud") == {}
    with stage_log(tmp_path) as log:
        out = dvc(b, "repro")
    assert ran_stages(out.stdout) == [] and logged(log) == [], out.stdout
    assert data_digest(b) == team.data_digest


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} is missing: install Debian's openssh-server (`make system-packages` does)")
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@contextlib.contextmanager
def running_sshd(root: Path):
    """A real OpenSSH server on 127.0.0.1, key-only, with a throwaway host key and user key in `root`."""
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(root / key)],
                       check=True)
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    port = _free_port()
    (root / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    with open(root / "sshd.log", "w") as log:
        server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")], stderr=log)
        try:
            _wait_for_port(port, server, root / "sshd.log")
            yield {"port": port, "keyfile": root / "user_key",
                   "url": f"ssh://{getpass.getuser()}@127.0.0.1:{port}"}
        finally:
            server.terminate()
            server.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"sshd exited with {server.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"sshd did not listen on port {port}: {log.read_text()[-2000:]}")


def test_ssh_remote_push_then_pull_into_fresh_clone(team, sshd, tmp_path, monkeypatch):
    # A HOME of its own: the test neither reads nor writes the user's ~/.ssh. dvc-ssh 4.3.0 does not
    # check host keys at all (sshfs connects with known_hosts=None), see docs/TEAM.md.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    store = tmp_path / "ssh-store"
    url = f"{sshd['url']}{store}"

    pusher = team.clone("ssh-pusher", shared_cache=True)
    dvc(pusher, "remote", "add", "ssh", url)
    dvc(pusher, "remote", "modify", "--local", "ssh", "keyfile", str(sshd["keyfile"]))
    dvc(pusher, "remote", "modify", "ssh", "verify", "true")
    dvc(pusher, "push", "-r", "ssh")
    assert remote_objects(store)
    git(pusher, "commit", "-q", "-am", "ssh remote")
    git(pusher, "push", "-q", "-f", "origin", "HEAD:ssh-remote")
    assert ".dvc/config.local" not in git(pusher, "ls-files").stdout.split()
    committed = (pusher / ".dvc" / "config").read_text()
    assert url in committed and "keyfile" not in committed and str(sshd["keyfile"]) not in committed
    assert "verify = true" in committed  # the puller re-hashes what it pulls

    puller = team.root / "ssh-puller"
    git(team.root, "clone", "-q", "-b", "ssh-remote", str(team.origin), str(puller))
    dvc(puller, "remote", "modify", "--local", "ssh", "keyfile", str(sshd["keyfile"]))
    dvc(puller, "pull", "-r", "ssh")
    assert status(puller) == {}
    assert data_digest(puller) == team.data_digest


def test_shared_cache_second_clone_is_a_cache_hit_for_every_stage(team, tmp_path):
    c = team.clone("C")
    use_cache(c, team.shared_cache, link="symlink")
    with stage_log(tmp_path) as log:
        out = dvc(c, "repro")
    assert ran_stages(out.stdout) == [] and logged(log) == [], out.stdout
    for stage in ALL_STAGES:
        assert f"Stage '{stage}' is cached" in out.stdout or f"Stage '{stage}' didn't change" in out.stdout, \
            (stage, out.stdout)
    assert data_digest(c) == team.data_digest
    linked = c / "data" / "prepared" / "train" / "shard-00000.h5"
    assert linked.is_symlink() and linked.resolve().is_relative_to(team.shared_cache.resolve())
    # cache.shared group: new cache folders are group-writable and hand their group down (setgid)
    folder = linked.resolve().parent
    assert folder.stat().st_mode & 0o2775 == 0o2775, oct(folder.stat().st_mode)
    assert status(c) == {}


def test_experiment_push_and_pull_bring_its_metrics(team):
    runner = team.clone("exp-runner", shared_cache=True)
    dvc(runner, "exp", "run", "-S", f"ratio={OTHER_RATIO}", "--name", "half")
    dvc(runner, "exp", "push", "origin", "half")

    other = team.clone("exp-other")
    dvc(other, "exp", "pull", "origin", "half")
    rows = _experiments(json.loads(dvc(other, "exp", "show", "--json").stdout))
    assert "half" in rows, rows
    assert rows["half"]["params"]["ratio"] == OTHER_RATIO
    assert 0.0 <= rows["half"]["metrics"]["top1"] <= 1.0
    assert rows["half"]["metrics"]["train_images"] == 48  # ratio 0.5 of the 96 synthetic images

    dvc(other, "exp", "apply", "half")
    assert status(other) == {}
    assert json.loads((other / "data" / "train_metrics.json").read_text()) == rows["half"]["metrics"]


def _experiments(shown: list) -> dict[str, dict]:
    """Name → params.yaml values and train metrics, from `dvc exp show --json` (DVC 3)."""
    rows = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                rows[rev.get("name") or exp.get("name")] = {
                    "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
                    "metrics": (data.get("metrics") or {}).get("data/train_metrics.json", {}).get("data", {}),
                }
    return rows


def test_run_cache_restores_uncommitted_params_without_running(team, tmp_path):
    producer = team.clone("run-cache-producer", shared_cache=True)
    set_params(producer, ratio=OTHER_RATIO)
    dvc(producer, "repro")
    dvc(producer, "push", "--run-cache")

    consumer = team.clone("run-cache-consumer")
    set_params(consumer, ratio=OTHER_RATIO)
    dvc(consumer, "pull", "--run-cache")
    # --pull: DVC 3.67's `pull --run-cache` fetches the run records but not their outputs; repro fetches
    # the outputs of each record it restores (without it, plain `dvc repro` runs the stages).
    with stage_log(tmp_path) as log:
        out = dvc(consumer, "repro", "--pull")
    assert ran_stages(out.stdout) == [] and logged(log) == [], out.stdout
    for stage in ("select", "compress", "train", "report"):  # the stages that read `ratio`, and after
        assert f"Stage '{stage}' is cached - skipping run" in out.stdout, (stage, out.stdout)
    assert status(consumer) == {}
    assert len(np.load(consumer / "data" / "selection" / "indices.npy")) == 48  # ratio 0.5 of 96 images
    assert data_digest(consumer) == data_digest(producer)
    assert data_digest(consumer) != team.data_digest


def test_push_killed_half_way_then_rerun_completes_and_pull_verifies(team, tmp_path):
    pusher = team.clone("kill-pusher", shared_cache=True)
    bulk = pusher / "bulk"
    bulk.mkdir()
    rng = random.Random(0)
    for i in range(BULK_FILES):
        (bulk / f"{i:05d}.bin").write_bytes(rng.randbytes(1024))
    store = tmp_path / "kill-store"
    dvc(pusher, "remote", "add", "kill", str(store))
    dvc(pusher, "add", "bulk")
    git(pusher, "add", "-A")
    git(pusher, "commit", "-q", "-m", "bulk data and a second remote")

    push = subprocess.Popen([sys.executable, "-m", "dvc", "push", "-r", "kill"], cwd=pusher, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not remote_objects(store) and push.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(push.pid, signal.SIGKILL)
    push.wait()
    landed = len(remote_objects(store))
    assert push.returncode == -signal.SIGKILL, "the push finished before it could be killed"
    assert 0 < landed < BULK_FILES, landed

    dvc(pusher, "push", "-r", "kill")  # DVC's lock dies with the process: no stale lock to clear
    assert status(pusher, "--cloud", "-r", "kill") == {}
    objects = remote_objects(store)
    assert len(objects) > BULK_FILES
    for obj in objects:  # content addressed: every object's md5 is its name, so none is torn
        assert hashlib.md5(obj.read_bytes()).hexdigest() == obj.parent.name + obj.name.removesuffix(".dir")

    puller = tmp_path / "kill-puller"
    git(tmp_path, "clone", "-q", str(pusher), str(puller))
    dvc(puller, "remote", "modify", "--local", "kill", "verify", "true")  # re-hash every download
    dvc(puller, "pull", "-r", "kill")
    assert status(puller) == {}
    assert json.loads(dvc(puller, "data", "status", "--json", "--granular").stdout or "{}").keys() <= {"git"}
    assert digest_tree(puller / "bulk") == digest_tree(bulk)
    assert data_digest(puller) == team.data_digest



def test_pull_with_verify_rejects_a_torn_remote_object(team, tmp_path):
    """What a push killed mid-file leaves on an SSH remote (dvc-ssh writes objects in place): a short object.

    Without `verify` DVC trusts the remote and checks it out as is; with it, the pull fails and names the
    output. Every remote recipe in the README and docs/TEAM.md turns it on.
    """
    torn = tmp_path / "torn-store"
    subprocess.run(["cp", "-r", str(team.store), str(torn)], check=True)
    features = yaml.safe_load((team.a / "dvc.lock").read_text())["stages"]["features"]["outs"][0]["md5"]
    tree = json.loads((torn / "files" / "md5" / features[:2] / features[2:]).read_text())
    obj = torn / "files" / "md5" / tree[0]["md5"][:2] / tree[0]["md5"][2:]
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:1000])

    clone = team.clone("torn-puller")
    dvc(clone, "remote", "add", "--local", "torn", str(torn))
    dvc(clone, "remote", "modify", "--local", "torn", "verify", "true")
    pulled = dvc(clone, "pull", "-r", "torn", check=False)
    assert pulled.returncode != 0 and "data/features" in pulled.stderr, pulled.stderr
    assert not (clone / "data" / "features" / "train.h5").exists()
    assert status(clone)  # not clean: data/features is missing, and says so
