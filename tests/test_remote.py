"""S3 remotes and their repair, with real servers and real clones.

moto's S3 server runs on 127.0.0.1 (a free port) for the module. The README's S3 recipe, read from the
README itself, sets up the remote in a clone of the session's `tiny_run` (whose cache holds every output
of one `dvc repro`; clones point their cache at it instead of running the pipeline again) and pushes;
teammates' fresh clones pull, check and repair. moto checks request signatures against an IAM user made
here, so a wrong secret gets the same 403 as from AWS.

DVC reaches moto through tests/tcp_relay.py, so that a test can cut the server off in the middle of a push
and bring it back with the objects it had stored (moto keeps them in memory only, so a restart of moto
itself would be an empty server). `dq.tools.remote` check and repair are tested on S3 and on a folder remote.
"""
from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.pipeline_repo import ROOT, dvc, env, git, run
from tests.test_team import ALL_STAGES, data_digest, logged, stage_log, status

RELAY = ROOT / "tests" / "tcp_relay.py"
BUCKET = "dq-team"
# The README's placeholders, and what each becomes here (see s3_recipe).
PLACEHOLDERS = ("s3://my-bucket/", "https://s3.example.org", "AKIAEXAMPLE", "SECRETEXAMPLE")
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class S3:
    """moto's S3 server, the relay DVC talks to, and the IAM key that may use the bucket."""

    root: Path
    moto_port: int
    relay_port: int
    key: str
    secret: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.relay_port}"

    def fs(self):
        """DVC's own S3 filesystem, straight to moto: the test's hands on the server side."""
        from dvc_s3 import S3FileSystem

        return S3FileSystem(endpointurl=f"http://127.0.0.1:{self.moto_port}", access_key_id=self.key,
                            secret_access_key=self.secret)

    def relay(self, port: int, die_after: int | None = None) -> subprocess.Popen:
        """A relay on `port` to moto; with `die_after`, it SIGKILLs itself after that many bytes up."""
        log = self.root / f"relay-{port}.log"
        cmd = [sys.executable, str(RELAY), str(port), str(self.moto_port)]
        if die_after:
            cmd += ["--die-after", str(die_after)]
        with open(log, "a") as out:
            relay = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(port, relay, log)
        return relay


def moto_call(port: int, path: str, body: bytes) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200, response.read()


def iam_key_and_bucket(port: int) -> tuple[str, str]:
    """An IAM user allowed everything, its key, and the bucket; then moto checks every request's signature."""
    import boto3

    setup = dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="setup", aws_secret_access_key="setup")
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="alice")
    iam.put_user_policy(UserName="alice", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="alice")["AccessKey"]
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    moto_call(port, "/moto-api/reset-auth", b"0")  # authenticate every request from now on
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory):
    """No AWS setting of the machine reaches the tests: no profile, no credentials, no endpoint."""
    root = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in AWS_VARIABLES:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(root / "config"))
        # Without credentials botocore would next ask the EC2 instance metadata service, off this machine.
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(root / "credentials"))
        yield


@pytest.fixture(scope="module")
def s3(tmp_path_factory, aws_env):
    root = tmp_path_factory.mktemp("moto")
    moto_port = free_port()
    log = root / "moto.log"
    with open(log, "w") as out:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env())
    relay = None
    try:
        wait_for_port(moto_port, moto, log)
        key, secret = iam_key_and_bucket(moto_port)
        server = S3(root, moto_port, free_port(), key, secret)
        relay = server.relay(server.relay_port)
        yield server
    finally:
        if relay:
            stop(relay)
        stop(moto)


def s3_recipe(doc: Path) -> list[str]:
    """The S3 setup lines of a doc: `dvc remote add -d store s3://...` and the `dvc remote modify` after it."""
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dvc remote add -d store s3://"))
    recipe = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("dvc remote modify"):
            break
        recipe.append(line)
    return recipe


@dataclass
class Team:
    """A bare git remote, and the producer: a clone of tiny_run that set up S3 by the README and pushed."""

    root: Path
    origin: Path
    producer: Path
    cache: Path
    digest: dict[str, str]

    def clone(self, name: str, *, shared_cache: bool = False, config_local: str = "") -> Path:
        """A teammate's fresh `git clone`; `shared_cache`: one that has every output in its cache."""
        path = self.root / name
        git(self.root, "clone", "-q", str(self.origin), str(path))
        if shared_cache:
            config_local = f"[cache]\n    dir = {self.cache}\n" + config_local
        (path / ".dvc" / "config.local").write_text(config_local)
        return path


@pytest.fixture(scope="module")
def team(tiny_run, s3, tmp_path_factory) -> Team:
    root = tmp_path_factory.mktemp("s3team")
    origin, producer, cache = root / "origin.git", root / "producer", tiny_run / ".dvc" / "cache"
    git(root, "init", "-q", "--bare", "-b", "main", str(origin))
    git(root, "clone", "-q", str(tiny_run), str(producer))
    git(producer, "remote", "set-url", "origin", str(origin))
    (producer / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n")

    recipe = s3_recipe(ROOT / "README.md")
    assert recipe == s3_recipe(ROOT / "docs" / "TEAM.md"), "README and docs/TEAM.md must give the same S3 recipe"
    values = dict(zip(PLACEHOLDERS, (f"s3://{BUCKET}/", s3.endpoint, s3.key, s3.secret)))
    assert all(any(p in line for line in recipe) for p in PLACEHOLDERS), recipe
    for line in recipe:
        words = shlex.split(line.split("#")[0])
        for placeholder, value in values.items():
            words = [w.replace(placeholder, value) for w in words]
        assert words[0] == "dvc", line
        dvc(producer, *words[1:])
    git(producer, "add", ".dvc/config")
    git(producer, "commit", "-q", "-m", "DVC remote")
    git(producer, "push", "-q", "origin", "main")
    dvc(producer, "push", "--run-cache")
    return Team(root, origin, producer, cache, data_digest(tiny_run))


@pytest.fixture
def teammate_keys(s3, monkeypatch):
    """A teammate's credentials, in the environment (the recipe's alternative to .dvc/config.local)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)


def remote_check(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dq.tools.remote", *args, check=False, timeout=300)


def problems(output: str) -> dict[str, str]:
    """`dq.tools.remote` report lines: output label → missing / damaged / repaired / not repaired."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(missing|damaged|repaired|not repaired): (.+?) \(files/md5/", line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def lock_outputs(repo: Path) -> dict[str, str]:
    """Output path → md5 in dvc.lock (".dir" for directories)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def file_object(cache: Path, lock: dict[str, str], output: str, relpath: str) -> str:
    """The md5 of one file inside a directory output, from the manifest in the cache."""
    manifest = lock[output]
    entries = json.loads((cache / "files" / "md5" / manifest[:2] / manifest[2:]).read_text())
    return next(e["md5"] for e in entries if e["relpath"] == relpath)


def test_committed_config_holds_the_s3_recipe_and_no_secret(team, s3):
    committed = git(team.producer, "show", "HEAD:.dvc/config").stdout
    assert f"url = s3://{BUCKET}/dq-store" in committed and f"endpointurl = {s3.endpoint}" in committed
    assert "verify = true" in committed
    assert s3.key not in committed and s3.secret not in committed
    assert ".dvc/config.local" not in git(team.producer, "ls-files").stdout.split()
    private = (team.producer / ".dvc" / "config.local").read_text()
    assert s3.key in private and s3.secret in private


def test_s3_pull_into_fresh_clone_reruns_nothing(team, teammate_keys, tmp_path):
    b = team.clone("B")
    dvc(b, "pull")
    assert status(b) == {}
    with stage_log(tmp_path) as log:
        out = dvc(b, "repro")
    assert ran_nothing(out, log)
    assert data_digest(b) == team.digest


def ran_nothing(out: subprocess.CompletedProcess, log: Path) -> bool:
    return re.findall(r"Running stage '([^']+)'", out.stdout) == [] and logged(log) == []


def test_s3_run_cache_restores_every_stage_without_running(team, teammate_keys, tmp_path):
    """A clone whose dvc.lock lacks the runs (deleted here) gets every stage from the pushed run cache."""
    c = team.clone("run-cache")
    (c / "dvc.lock").unlink()
    with stage_log(tmp_path) as log:
        out = dvc(c, "repro", "--pull")
    assert ran_nothing(out, log), out.stdout
    for stage in ALL_STAGES:
        assert f"Stage '{stage}' is cached - skipping run" in out.stdout, (stage, out.stdout)
    assert git(c, "status", "--porcelain").stdout == ""  # the same dvc.lock, written again
    assert data_digest(c) == team.digest


def test_s3_push_cut_off_by_the_server_then_rerun_completes(team, s3, teammate_keys, tmp_path, monkeypatch):
    port = free_port()
    store = f"s3://{BUCKET}/cut-store"
    remote = f"['remote \"store\"']\n    url = {store}\n    endpointurl = http://127.0.0.1:{port}\n"
    pusher = team.clone("cut-pusher", shared_cache=True, config_local=remote)
    sizes = sorted(p.stat().st_size for p in (team.cache / "files").rglob("*") if p.is_file())
    # dies once the largest object (the classifier, most of the bytes) and half of the rest have gone up,
    # whichever order DVC sends them in: some objects landed, some did not
    relay = s3.relay(port, die_after=sizes[-1] + sum(sizes[:-1]) // 2)
    try:
        with monkeypatch.context() as mp:
            mp.setenv("AWS_MAX_ATTEMPTS", "1")  # fail at once rather than after botocore's retries (~20 s)
            cut = dvc(pusher, "push", "-j", "1", check=False)  # one upload at a time: half the bytes, some objects
        assert relay.wait(timeout=60) == -9, "the relay never passed half of the push's bytes"
        assert cut.returncode != 0 and "Could not connect to the endpoint URL" in cut.stderr, cut.stderr
    finally:
        stop(relay)

    relay = s3.relay(port)  # the server is back, with every object it had stored
    try:
        landed = remote_check(pusher, "check", "--deep")
        found = problems(landed.stdout)
        assert landed.returncode == 1 and set(found.values()) == {"missing"}, landed.stdout  # none torn
        pushed = dvc(pusher, "push")
        assert f"{len(found)} files pushed" in pushed.stdout, (found, pushed.stdout)
        after = remote_check(pusher, "check", "--deep")
        assert after.returncode == 0 and "their bytes hash to their names" in after.stdout, after.stdout
        assert 0 < len(found) < int(re.search(r"all (\d+) objects", after.stdout).group(1)), landed.stdout

        puller = team.clone("cut-puller", config_local=remote)
        dvc(puller, "pull")  # verify is on (committed): every download is re-hashed
        assert status(puller) == {}
        assert data_digest(puller) == team.digest
    finally:
        stop(relay)


@pytest.fixture(params=["folder", "s3"])
def remote_kind(request):
    return request.param


def test_repair_restores_what_dvc_push_cannot_see(team, s3, remote_kind, teammate_keys, tmp_path):
    """One file deleted behind its manifest, then a manifest deleted and a byte flipped; repaired by dq.tools.remote."""
    if remote_kind == "folder":
        store = tmp_path / "store"
        config = f"[core]\n    remote = folder\n['remote \"folder\"']\n    url = {store}\n    verify = true\n"
        where, fs = str(store), None
    else:
        config = f"['remote \"store\"']\n    url = s3://{BUCKET}/repair-store\n"
        where, fs = f"{BUCKET}/repair-store", s3.fs()
    pusher = team.clone(f"repair-pusher-{remote_kind}", shared_cache=True, config_local=config)
    dvc(pusher, "push")
    lock = lock_outputs(pusher)
    compact = file_object(team.cache, lock, "data/compact", "dataset.h5")
    features = file_object(team.cache, lock, "data/features", "train.h5")
    selection = lock["data/selection"]

    def path(oid: str) -> str:
        return f"{where}/files/md5/{oid[:2]}/{oid[2:]}"

    def delete(oid: str) -> None:
        Path(path(oid)).unlink() if fs is None else fs.rm(path(oid))

    def flip_a_byte(oid: str) -> None:
        data = bytearray(Path(path(oid)).read_bytes() if fs is None else fs.cat_file(path(oid)))
        data[len(data) // 2] ^= 0xFF
        if fs is None:
            Path(path(oid)).chmod(0o644)
            Path(path(oid)).write_bytes(bytes(data))
        else:
            fs.pipe_file(path(oid), bytes(data))

    # 1. A file object lost behind its manifest: DVC sees nothing wrong, and no pull can complete.
    delete(compact)
    assert status(pusher, "--cloud") == {}
    assert "Everything is up to date" in dvc(pusher, "push").stdout
    puller = team.clone(f"repair-puller-{remote_kind}", config_local=config)
    pulled = dvc(puller, "pull", check=False)
    # the file, and its directory with it: "2 files failed to download"
    assert pulled.returncode != 0 and re.search(r"\d+ files failed to download", pulled.stderr), pulled.stderr
    checked = remote_check(pusher, "check")
    assert checked.returncode == 1 and problems(checked.stdout) == {"data/compact/dataset.h5": "missing"}, \
        checked.stdout
    cannot = remote_check(puller, "repair")  # the puller's cache never had it
    assert cannot.returncode == 1 and problems(cannot.stdout) == {"data/compact/dataset.h5": "not repaired"}
    assert "has no copy" in cannot.stdout, cannot.stdout

    # 2. Worse: a manifest gone, a byte flipped (same size: only --deep sees it).
    delete(selection)
    flip_a_byte(features)
    shallow = problems(remote_check(pusher, "check").stdout)
    assert shallow == {"data/compact/dataset.h5": "missing", "data/selection manifest": "missing"}, shallow
    deep = problems(remote_check(pusher, "check", "--deep").stdout)
    assert deep == {**shallow, "data/features/train.h5": "damaged"}, deep

    repaired = remote_check(pusher, "repair", "--deep")
    assert repaired.returncode == 0 and problems(repaired.stdout) == {k: "repaired" for k in deep}, repaired.stdout
    clean = remote_check(pusher, "check", "--deep")
    assert clean.returncode == 0 and "their bytes hash to their names" in clean.stdout, clean.stdout

    dvc(puller, "pull")
    assert status(puller) == {}
    assert data_digest(puller) == team.digest


def test_pull_with_verify_rejects_a_damaged_s3_object(team, s3, teammate_keys):
    """A flipped byte (same size) on S3: `verify true`, from the committed recipe, fails the pull."""
    store = f"{BUCKET}/damaged-store"
    config = f"['remote \"store\"']\n    url = s3://{store}\n"
    pusher = team.clone("damage-pusher", shared_cache=True, config_local=config)
    dvc(pusher, "push")
    oid = file_object(team.cache, lock_outputs(pusher), "data/features", "train.h5")
    fs = s3.fs()
    data = bytearray(fs.cat_file(f"{store}/files/md5/{oid[:2]}/{oid[2:]}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{store}/files/md5/{oid[:2]}/{oid[2:]}", bytes(data))

    puller = team.clone("damage-puller", config_local=config)
    pulled = dvc(puller, "pull", check=False)
    assert pulled.returncode != 0 and "Checkout failed for following targets" in pulled.stderr, pulled.stderr
    assert "data/features" in pulled.stderr
    assert not (puller / "data" / "features" / "train.h5").exists()
    assert not (puller / ".dvc" / "cache" / "files" / "md5" / oid[:2] / oid[2:]).exists()  # dropped, not kept


def test_remote_errors_are_one_line_naming_the_remote_and_the_fix(team, s3, monkeypatch):
    """Wrong secret, no credentials, a missing bucket, an endpoint nobody listens on: DVC's message, then ours."""
    d = team.clone("errors")
    config = d / ".dvc" / "config.local"

    def one_line(expected: str) -> str:
        out = remote_check(d, "check")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: remote 'store' ("), out
        assert expected in lines[0], lines[0]
        return lines[0]

    config.write_text(f"['remote \"store\"']\n    access_key_id = {s3.key}\n    secret_access_key = wrong\n")
    pulled = dvc(d, "pull", check=False)
    assert pulled.returncode != 0 and "Forbidden" in pulled.stderr and "HeadObject" in pulled.stderr, pulled.stderr
    assert "secret_access_key" in one_line("the server refused the credentials (403 Forbidden)")

    config.write_text("")
    pulled = dvc(d, "pull", check=False)
    assert pulled.returncode != 0 and "Unable to locate credentials" in pulled.stderr, pulled.stderr
    assert "AWS_ACCESS_KEY_ID" in one_line("no credentials found")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    config.write_text("['remote \"store\"']\n    url = s3://no-such-bucket/dq-store\n")
    pulled = dvc(d, "pull", check=False)
    assert pulled.returncode != 0 and "bucket does not exist" in pulled.stderr, pulled.stderr
    one_line("bucket 'no-such-bucket' does not exist")

    closed = free_port()
    config.write_text(f"['remote \"store\"']\n    endpointurl = http://127.0.0.1:{closed}\n")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # at once, not after botocore's retries
    assert "endpointurl" in one_line(f"cannot connect to http://127.0.0.1:{closed}")
