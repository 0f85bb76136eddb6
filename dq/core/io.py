"""Atomic outputs, JSON and HDF5 opening: the file handling every artifact's owner module shares.

Every stage writes each output to a temporary name beside it and renames it into place only when the
write finished, so a killed or failing stage never leaves a partial file at a declared output path.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dq.core.errors import DQError, first_line

H5_OPEN_ERRORS = (OSError, KeyError, ValueError, RuntimeError)
# Below this much free space a failed write is taken for a full disk: numpy, torch and HDF5 report
# ENOSPC as "requested and written", "file write failed" or a RuntimeError without an errno.
DISK_FULL_BYTES = 1024 * 1024
# bytes: streams of one HDF5 byte dataset lying closer than this are read in one call (byte_runs)
READ_GAP = 64 * 1024
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(\.old|\.part)?$")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it to `path`.

    On any exception the temporary file or folder is removed and `path` is left untouched; a full disk
    becomes one DQError naming `path`. Temporaries that a killed run left beside `path` (their process
    is gone) are removed first, so an interrupted stage leaves no litter behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException as exc:
        full = _disk_full(exc, path.parent)
        _remove(tmp)
        if full:
            raise DQError(f"{path}: no space left on the device while writing it; free some space or "
                          f"point --data at a larger disk") from None
        raise


def _replace(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path`, never removing the old content before the new is in place.

    A file is renamed over the old one in one step, so `path` always holds one or the other. A folder
    cannot be renamed over a non-empty folder, so the old one is first renamed aside
    (`.<name>.tmp-<pid>.old`, swept like any temporary if the process dies there) and removed after the
    swap; `path` is missing only between those two renames.
    """
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".{path.name}.tmp-{os.getpid()}.old")
        _remove(aside)  # a dead process that had our pid may have left one
        os.replace(path, aside)
        os.replace(tmp, path)
        _remove(aside)
        return
    if path.exists() and path.is_dir() != tmp.is_dir():  # a file for a folder or back: no one-step rename
        _remove(path)
    os.replace(tmp, path)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>[.old|.part]` beside `path` whose process no longer runs (a killed stage's temps;
    `.part` is a writer's side file, such as dq.compact.writer.CompactWriter's spooled streams)."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        match = _TEMP_RE.match(entry.name)
        if match and match["name"] == path.name and not _pid_alive(int(match["pid"])):
            _remove(entry)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _disk_full(exc: BaseException, folder: Path) -> bool:
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def check_free_space(path: str | Path, raw_bytes: int) -> None:
    """Refuse, before writing, an HDF5 file whose uncompressed data would not fit beside `path`.

    HDF5 can crash the process (a segfault, not an exception) when the disk fills up in the middle
    of writing a chunked file, so the check happens first. The raw size bounds the file's size:
    gzip never grows a chunk by more than a few bytes, plus headers.
    """
    path = Path(path)
    need = int(raw_bytes) + int(raw_bytes) // 64 + 256 * 1024
    folder = path.parent if path.parent.is_dir() else Path(".")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise DQError(f"{path}: needs up to {need:,} bytes but only {free:,} are free on its disk; free some "
                      f"space or point --data at a larger disk")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically, with sorted keys so equal inputs give equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


METRICS_DIGITS = 6  # significant digits of every float in a metrics file


def rounded(obj, digits: int = METRICS_DIGITS):
    """`obj` with every float rounded to `digits` significant digits (in dicts, lists and tuples)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def write_metrics(path: str | Path, obj) -> None:
    """`write_json` of a metrics file, every float to METRICS_DIGITS significant digits: the last digits of a
    float sum may move between two runs on one machine, and a metrics file must not (dvc.lock, dvc status)."""
    write_json(path, rounded(obj))


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from `path` (what `write_json` wrote); a DQError naming the file and the stage that writes it
    otherwise."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DQError(f"{path}: not found; run the {what} stage first") from None
    except (OSError, ValueError) as exc:
        raise DQError(f"{path}: not readable JSON ({first_line(exc, 120)}); rerun the {what} stage") from None
    if not isinstance(obj, dict):
        raise DQError(f"{path}: expected a JSON object; rerun the {what} stage")
    return obj


def h5_file(path: str | Path, mode: str = "r"):
    """Open an HDF5 file, turning h5py's errors into one DQError line naming the file.

    Reading works on read-only files and folders: HDF5's file locking is off for reads.
    """
    import h5py

    path = Path(path)
    if mode == "r" and not path.is_file():
        raise DQError(f"{path}: file not found")
    try:
        if mode == "r":
            return h5py.File(path, "r", locking=False)
        return h5py.File(path, mode, libver="earliest", track_order=False)
    except H5_OPEN_ERRORS as exc:
        raise DQError(f"{path}: not a readable HDF5 file ({first_line(exc)})") from None


def byte_runs(starts, stops, gap: int = READ_GAP) -> list[tuple[int, int]]:
    """[first, last) positions of runs of sorted byte ranges [starts[i], stops[i]) whose gaps are at most `gap`.

    An h5py read costs about as much as copying tens of kilobytes, so readers of many small streams
    (a batch of 32-px images) read each run as one span and cut it apart in memory.
    """
    starts, stops = np.asarray(starts), np.asarray(stops)
    if not len(starts):
        return []
    breaks = np.flatnonzero(starts[1:] - stops[:-1] > gap) + 1
    edges = [0, *breaks.tolist(), len(starts)]
    return list(zip(edges[:-1], edges[1:]))


def read_runs(read: Callable[[int, int], np.ndarray], starts, stops, gap: int = READ_GAP) -> list[np.ndarray]:
    """The byte ranges [starts[i], stops[i]) (sorted), one array each, with one read(start, stop) call per
    run of ranges at most `gap` apart (see byte_runs)."""
    out = []
    for first, last in byte_runs(starts, stops, gap):
        base = int(starts[first])
        span = read(base, int(stops[last - 1]))
        out += [span[a - base:b - base] for a, b in zip(starts[first:last], stops[first:last])]
    return out


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks (`md5`: what DVC records in dvc.lock)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
