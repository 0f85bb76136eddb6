"""Check a DVC remote object by object, and re-upload what is missing or damaged there.

    python -m dq.tools.remote check  [-r REMOTE] [--deep]   # what the remote lacks; --deep downloads and hashes
    python -m dq.tools.remote repair [-r REMOTE] [--deep]   # upload it again from this machine's cache

Why DVC's own commands are not enough (DVC 3.67): every output of this pipeline is a directory, and DVC
counts a directory as present on a remote while its `.dir` manifest is there, without looking for the
files the manifest lists. It also names objects by their md5 and never re-hashes them on the remote. So
a file object lost on the server leaves `dvc status --cloud` "in sync" and `dvc push` "Everything is up
to date" while every pull fails ("1 files failed to download"), and a damaged object (same size, other
bytes) is pulled silently unless the remote has `verify true`.

`check` walks every object behind the workspace's `dvc.lock` (and any `.dvc` file): each output's
object, each directory's `.dir` manifest and every file that manifest lists. It reports the missing ones,
and objects whose size disagrees with `dvc.lock`; `--deep` also downloads every object and compares its
md5 with its name. `repair` runs the same check, then uploads each object it found missing or damaged
from this machine's DVC cache, after re-hashing the local copy, files before the manifests that list them
(so that a manifest never stands on the remote before its files, the rule `dvc push` keeps too).

Everything goes through DVC's own classes: `dvc.repo.Repo` for the outputs, the remote's object database
from `repo.cloud.get_remote_odb` and its filesystem (dvc-s3, dvc-ssh or the local one), configured by
`.dvc/config`, `.dvc/config.local` and the environment exactly as `dvc push` is. Exit status: 0 when the
remote is complete, 1 when something is (or stays) missing or damaged, or the remote cannot be reached
(one line naming the remote and the likely fix, as every dq command line).
"""
from __future__ import annotations

import argparse
import errno
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dq.core.errors import DQError, first_line, run_cli

# Object stores whose first path component is a bucket (or container) that must exist before any push.
BUCKET_PROTOCOLS = {"s3", "gs", "gcs", "azure", "az", "oss"}


@dataclass(frozen=True)
class RemoteObject:
    """One content-addressed object that the workspace's outputs need on the remote."""

    oid: str  # md5 of the bytes; a directory manifest's ends in ".dir"
    label: str  # the output path, or `output/file` for a file inside a directory output
    size: int | None = None  # bytes, where dvc.lock records them (single-file outputs)

    @property
    def is_manifest(self) -> bool:
        return self.oid.endswith(".dir")


@dataclass
class Walk:
    """The objects behind the outputs, and which files each directory manifest lists."""

    objects: dict[str, RemoteObject] = field(default_factory=dict)
    listed: dict[str, set[str]] = field(default_factory=dict)  # manifest oid -> file oids
    unlisted: list[RemoteObject] = field(default_factory=list)  # manifests nobody has: files unknown

    def add(self, obj: RemoteObject) -> None:
        self.objects.setdefault(obj.oid, obj)  # the same bytes in two outputs are one object


@dataclass(frozen=True)
class Finding:
    obj: RemoteObject
    problem: str  # "missing" or "damaged"
    detail: str = ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dq.tools.remote", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("check", "repair"))
    parser.add_argument("-r", "--remote", help="the DVC remote (default: the default remote, as dvc push)")
    parser.add_argument("--deep", action="store_true",
                        help="download every object and compare its md5 with its name (finds damaged ones)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel requests (default: DVC's)")
    parser.add_argument("--repo", type=Path, default=None, help="the repository (default: the one around here)")
    args = parser.parse_args(argv)
    with open_repo(args.repo) as repo:
        remote, odb = remote_of(repo, args.remote, args.command)
        problems = (check if args.command == "check" else repair)(repo, remote, odb, deep=args.deep, jobs=args.jobs)
    if problems:
        raise SystemExit(1)


def open_repo(path: Path | None):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(path) if path else None)
    except NotDvcRepoError:
        where = path or Path.cwd()
        raise DQError(f"{where}: not inside a DVC repository; run python -m dq.tools.remote in the project") from None


def remote_of(repo, name: str | None, command: str):
    """DVC's Remote (its name, URL, filesystem and config) and its object database."""
    from dvc.config import ConfigError, NoRemoteError

    try:
        remote = repo.cloud.get_remote(name, command)
        return remote, repo.cloud.get_remote_odb(name, command)
    except NoRemoteError:
        raise DQError(f"{repo.root_dir}: no default DVC remote; pass -r NAME (dvc remote list) or set one "
                      "(dvc remote default NAME)") from None
    except ConfigError as exc:  # a remote that does not exist, a bad setting
        raise DQError(f"{repo.root_dir}/.dvc/config: {first_line(exc)}") from None


def url_of(remote) -> str:
    return remote.fs.unstrip_protocol(remote.path)


def check(repo, remote, odb, *, deep: bool, jobs: int | None) -> list[Finding]:
    """Print what the remote lacks (one line each) and a summary; return the findings."""
    reach(remote)
    walk = walk_outputs(repo, remote, odb)
    findings = inspect(remote, odb, walk, deep=deep, jobs=jobs)
    report(remote, odb, walk, findings, deep=deep)
    return findings + [Finding(m, "missing") for m in walk.unlisted]


def repair(repo, remote, odb, *, deep: bool, jobs: int | None) -> list[Finding]:
    """Upload every missing (with `deep` also every damaged) object this machine has a good copy of."""
    reach(remote)
    walk = walk_outputs(repo, remote, odb)
    findings = inspect(remote, odb, walk, deep=deep, jobs=jobs)
    if not findings and not walk.unlisted:
        report(remote, odb, walk, findings, deep=deep)
        return []
    cache = repo.cache.local
    supply, left = _by_local_copy(cache, findings)  # left: what stays missing or damaged, and why
    files = [oid for oid in supply if not supply[oid].obj.is_manifest]
    failed = upload(cache, odb, files, jobs)
    manifests, held = _ready_manifests(supply, walk, {f.obj.oid for f, _ in left} | set(failed))
    left += held
    failed.update(upload(cache, odb, manifests, jobs))
    left += _print_uploads(odb, supply, files + manifests, failed)
    for finding, reason in left:
        print(f"not repaired: {describe(finding.obj, odb)} is {finding.problem}; {reason}")
    for obj in walk.unlisted:
        print(f"not repaired: {obj.label}: its manifest {obj.oid} is neither on the remote nor in this cache; "
              "run python -m dq.tools.remote repair where the stage ran, or rerun it (dvc repro -f) and dvc push")
    still = [f for f, _ in left] + [Finding(m, "missing") for m in walk.unlisted]
    print(f"remote '{remote.name}' ({url_of(remote)}): {len(files) + len(manifests) - len(failed)} objects "
          f"uploaded again, {len(still)} still missing or damaged, of {len(walk.objects)} behind dvc.lock")
    return still


def _by_local_copy(cache, findings: list[Finding]) -> tuple[dict[str, Finding], list[tuple[Finding, str]]]:
    """({oid: finding} of the objects this cache has a good copy of, [(finding, why not)] of the others)."""
    supply: dict[str, Finding] = {}
    left: list[tuple[Finding, str]] = []
    for finding in findings:
        reason = local_copy_problem(cache, finding.obj.oid)
        if reason:
            left.append((finding, reason))
        else:
            supply[finding.obj.oid] = finding
    return supply, left


def _ready_manifests(supply: dict[str, Finding], walk: Walk, stuck: set[str]) -> tuple[list[str], list]:
    """(the manifests to upload, [(finding, why not)] of those held back). A manifest goes up only once every
    file it lists is there: a manifest without its files is exactly what hides them from `dvc push` (DVC's
    own transfer keeps the same rule)."""
    manifests, held = [], []
    for oid in [o for o in supply if supply[o].obj.is_manifest]:
        if walk.listed.get(oid, set()) & stuck:
            held.append((supply[oid], "not uploaded while files it lists are missing (a manifest would hide them)"))
        else:
            manifests.append(oid)
    return manifests, held


def _print_uploads(odb, supply: dict[str, Finding], uploaded: list[str], failed: dict) -> list[tuple[Finding, str]]:
    """Print each repaired object; return [(finding, why not)] of the uploads that failed."""
    left = []
    for oid in uploaded:
        if oid in failed:
            left.append((supply[oid], f"the upload failed ({first_line(failed[oid])})"))
        else:
            print(f"repaired: {describe(supply[oid].obj, odb)} was {supply[oid].problem}")
    return left


def reach(remote) -> None:
    """Raise one line naming the remote and the likely fix when it cannot be used at all.

    For object stores the bucket is asked for first: a missing bucket would otherwise make every object
    look missing. A folder or SSH path that does not exist yet is no error: nothing was pushed there.
    """
    path = remote.path.split("/")[0] if remote.fs.protocol in BUCKET_PROTOCOLS else remote.path
    try:
        remote.fs.info(path)
    except FileNotFoundError as exc:
        if remote.fs.protocol in BUCKET_PROTOCOLS:
            raise remote_error(remote, exc) from None
    except Exception as exc:  # credentials, endpoint, permissions: whatever the client raised
        raise remote_error(remote, exc) from None


def walk_outputs(repo, remote, odb) -> Walk:
    """Every object behind the outputs that dvc.lock (and any .dvc file) names."""
    from dvc.cachemgr import LEGACY_HASH_NAMES

    walk = Walk()
    for out in repo.index.outs:
        info = out.hash_info
        if not out.use_cache or not info or not info.value:
            continue  # an output kept in git, or a stage that has not run yet
        if info.name in LEGACY_HASH_NAMES:
            raise DQError(f"{out}: hashed by DVC 2 (md5-dos2unix); run `dvc cache migrate --dvc-files` first")
        if not info.isdir:
            walk.add(RemoteObject(info.value, str(out), out.meta.size if out.meta else None))
            continue
        manifest = RemoteObject(info.value, f"{out} manifest")
        walk.add(manifest)
        tree = load_tree(info, repo.cache.local, remote, odb)
        if tree is None:
            walk.unlisted.append(manifest)
            continue
        walk.listed[info.value] = set()
        for key, _meta, entry in tree:
            walk.add(RemoteObject(entry.value, "/".join((str(out), *key))))
            walk.listed[info.value].add(entry.value)
    return walk


def load_tree(info, cache, remote, odb):
    """The directory manifest from this machine's cache, else from the remote, or None when neither
    has a readable copy (a damaged manifest on the remote is reported by the object check)."""
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.errors import ObjectFormatError

    for source in (cache, odb):
        try:
            return Tree.load(source, info)
        except (FileNotFoundError, ObjectFormatError):
            continue
        except Exception as exc:  # only the remote's filesystem raises more than these
            raise remote_error(remote, exc) from None
    return None


def inspect(remote, odb, walk: Walk, *, deep: bool, jobs: int | None) -> list[Finding]:
    """Missing objects, objects whose size disagrees with dvc.lock, and with `deep` damaged bytes."""
    objects = list(walk.objects.values())
    paths = [odb.oid_to_path(o.oid) for o in objects]
    infos = odb.fs.info(paths, batch_size=jobs, return_exceptions=True)
    findings, present = [], []
    for obj, path, info in zip(objects, paths, infos):
        if isinstance(info, FileNotFoundError):
            findings.append(Finding(obj, "missing"))
        elif isinstance(info, BaseException):
            raise remote_error(remote, info)
        elif obj.size is not None and info.get("size") != obj.size:
            findings.append(Finding(obj, "damaged", f"{info.get('size')} bytes, dvc.lock says {obj.size}"))
        else:
            present.append((obj, path))
    if deep:
        with ThreadPoolExecutor(max_workers=jobs or odb.fs.jobs) as pool:
            digests = list(pool.map(lambda item: remote_md5(remote, odb, item[1]), present))
        for (obj, _), digest in zip(present, digests):
            if digest is None:
                findings.append(Finding(obj, "missing"))  # gone between the listing and the download
            elif digest != obj.oid.split(".")[0]:
                findings.append(Finding(obj, "damaged", f"its bytes hash to {digest}"))
    return sorted(findings, key=lambda f: f.obj.label)


def remote_md5(remote, odb, path: str) -> str | None:
    """The md5 of a remote object's bytes, streamed (DVC's own hashing), or None when it is gone."""
    from dvc_data.hashfile.hash import fobj_md5

    try:
        with odb.fs.open(path, "rb") as fobj:
            return fobj_md5(fobj, name=odb.hash_name)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise remote_error(remote, exc) from None


def local_copy_problem(cache, oid: str) -> str | None:
    """Why this machine's cache cannot supply the object (None when its copy hashes to its name).

    The copy is hashed here, not through `cache.check`, which deletes a damaged cache file.
    """
    from dvc_data.hashfile.hash import fobj_md5

    path = cache.oid_to_path(oid)
    try:
        with cache.fs.open(path, "rb") as fobj:
            digest = fobj_md5(fobj, name=cache.hash_name)
    except FileNotFoundError:
        return ("this machine's DVC cache has no copy; run python -m dq.tools.remote repair where the stage ran, "
                "or rerun it (dvc repro -f <stage>) and dvc push")
    if digest != oid.split(".")[0]:
        return f"this machine's copy is damaged too (its bytes hash to {digest}); repair from another machine"
    return None


def upload(cache, odb, oids: list[str], jobs: int | None) -> dict[str, BaseException]:
    """Copy objects from the local cache to the remote, overwriting damaged ones; the failures."""
    failed: dict[str, BaseException] = {}
    if oids:
        odb.add([cache.oid_to_path(o) for o in oids], cache.fs, oids, check_exists=False, verify=False,
                batch_size=jobs, on_error=lambda oid, exc: failed.setdefault(oid, exc))
    return failed


def describe(obj: RemoteObject, odb) -> str:
    """`data/compact/dataset.h5 (files/md5/89/ada5...)`: the output and the object's path in the remote."""
    return f"{obj.label} ({odb.fs.relpath(odb.oid_to_path(obj.oid), odb.fs.parent(odb.fs.parent(odb.path)))})"


def report(remote, odb, walk: Walk, findings: list[Finding], *, deep: bool) -> None:
    for finding in findings:
        detail = f": {finding.detail}" if finding.detail else ""
        print(f"{finding.problem}: {describe(finding.obj, odb)}{detail}")
    for obj in walk.unlisted:
        print(f"missing: {obj.label}: its manifest {obj.oid} is neither on the remote nor in this cache, "
              "so its files cannot be listed")
    total = len(walk.objects)
    missing = sum(f.problem == "missing" for f in findings) + len(walk.unlisted)
    damaged = sum(f.problem == "damaged" for f in findings)
    how = "present, and their bytes hash to their names" if deep else "present (--deep also hashes them)"
    if missing or damaged:
        print(f"remote '{remote.name}' ({url_of(remote)}): {missing} missing and {damaged} damaged of {total} "
              f"objects behind dvc.lock; run python -m dq.tools.remote repair{' --deep' if deep else ''} on a machine "
              "whose DVC cache has them")
    else:
        print(f"remote '{remote.name}' ({url_of(remote)}): all {total} objects behind dvc.lock are {how}")
    if not remote.config.get("verify"):
        print(f"note: remote '{remote.name}' has verify off: a damaged object is pulled without a word; "
              f"dvc remote modify {remote.name} verify true")


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from (botocore's errors hide behind s3fs's)."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def remote_error(remote, exc: BaseException) -> DQError:
    """One line naming the remote, what went wrong and the likely fix, for the errors teams hit most."""
    name, where = remote.name, f"remote '{remote.name}' ({url_of(remote)})"
    chain = causes(exc)
    kinds = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    endpoint = remote.config.get("endpointurl") or remote.config.get("host") or remote.fs.protocol
    if kinds & {"NoCredentialsError", "PartialCredentialsError"}:
        return DQError(f"{where}: no credentials found ({first_line(exc)}); set them with `dvc remote modify "
                       f"--local {name} access_key_id ...` and `... secret_access_key ...`, or export "
                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if "NoSuchBucket" in kinds or "NoSuchBucket" in text or (
            isinstance(exc, FileNotFoundError) and remote.fs.protocol in BUCKET_PROTOCOLS):
        bucket = remote.path.split("/")[0]
        return DQError(f"{where}: bucket '{bucket}' does not exist on {endpoint}; create it, or fix the URL "
                       f"(`dvc remote modify {name} url {remote.fs.protocol}://BUCKET/PATH`)")
    if isinstance(exc, PermissionError) or kinds & {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"} \
            or "(403)" in text:
        return DQError(f"{where}: the server refused the credentials (403 Forbidden); check access_key_id and "
                       f"secret_access_key in .dvc/config.local (`dvc remote modify --local {name} ...`) or "
                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that the key may read and write the bucket")
    if kinds & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "gaierror", "ConnectionLost", "ConnectionResetError", "TimeoutError"} or any(
            isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
            for e in chain):
        return DQError(f"{where}: cannot connect to {endpoint} ({first_line(chain[-1])}); check that the server "
                       f"is up and the endpoint is right (`dvc remote modify {name} endpointurl URL`)")
    return DQError(f"{where}: {type(exc).__name__}: {first_line(exc)}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
