"""A catalogue of bad inputs, each run through the real entry point (`python -m stages.<name>`).

Every case must end with a non-zero exit, exactly one stderr line `error: ...` that names the file or
key and what was expected, no traceback (unless DQ_DEBUG=1), and none of the stage's declared outputs
nor any `.*.tmp-*` temporary left behind. Input files come from one shared tiny run (conftest's
`tiny_run`); the cases' subprocesses start together, a few at a time, because each pays for a torch
import.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from dq.core.errors import run_cli
from dq.data.prepared import read_prepared
from dq.data.prepared_writer import write_prepared, write_prepared_v1
from tests.pipeline_repo import ROOT, env, tiny_params

PARALLEL = 3
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar line, which a stage may have drawn before it failed
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def declared_outputs(stage: str) -> list[str]:
    """The outs, metrics and plots of a stage in dvc.yaml, relative to the data folder."""
    block = DVC_STAGES[stage]
    paths = []
    for key in ("outs", "metrics", "plots"):
        for entry in block.get(key, []):
            name = entry if isinstance(entry, str) else next(iter(entry))
            paths.append(name.removeprefix("data/"))
    return paths


@dataclass
class Case:
    """One bad input: what to run, and what the single error line must say."""

    module: str  # stages.<name> or dq.compact
    expect: tuple[str, ...]  # substrings of the error line
    params: dict = field(default_factory=dict)  # overrides of the tiny params
    args: tuple[str, ...] = ()  # extra command-line arguments
    succeeds: bool = False  # converted inputs: the stage must succeed
    debug: bool = False
    env: dict = field(default_factory=dict)

    @property
    def stage(self) -> str | None:
        return self.module.removeprefix("stages.") if self.module.startswith("stages.") else None


@dataclass
class Result:
    case: Case
    data: Path
    proc: subprocess.CompletedProcess | None = None
    seconds: float = 0.0
    skip: str | None = None
    leftovers: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- inputs


def copy_inputs(tiny: Path, data: Path, *names: str) -> None:
    """Copy files (or folders: the prepared splits) of the tiny run's data/ into a case's data folder."""
    for name in names:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        if (tiny / "data" / name).is_dir():
            shutil.copytree(tiny / "data" / name, data / name)
        else:
            shutil.copyfile(tiny / "data" / name, data / name)


def inputs(*names: str, damage: Callable[[Path], None] | None = None):
    """A case setup: copy these tiny-run files into the case's data folder, then damage them."""
    def setup(tiny: Path, case_dir: Path, data: Path) -> None:
        copy_inputs(tiny, data, *names)
        if damage is not None:
            damage(data)
    return setup


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def image_folder(root: Path, classes: dict[str, list[tuple[str, Callable[[Path], None]]]]) -> Path:
    """root/{train,val}/<class>/<file> written by the given writers (val gets the same files)."""
    for split in ("train", "val"):
        for name, files in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for filename, write in files:
                write(folder / filename)
    return root


def rgb(value: int, fmt: str = "PNG"):
    rng = np.random.default_rng(value)
    return lambda p: Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(p, fmt)


def truncated(write: Callable[[Path], None]):
    def writer(p: Path) -> None:
        write(p)
        truncate(p, 0.5)
    return writer


def grey(p: Path) -> None:
    Image.fromarray(np.full((16, 16), 100, np.uint8), "L").save(p)


def rgba_transparent(p: Path) -> None:
    Image.fromarray(np.full((16, 16, 4), (200, 50, 50, 0), np.uint8), "RGBA").save(p)


def sixteen_bit(p: Path) -> None:
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(p)


def two_good_classes(bad_a=(), bad_b=()):
    return {"a": [("0.png", rgb(1)), ("1.jpg", rgb(2, "JPEG")), *bad_a], "b": [("0.png", rgb(3)), *bad_b]}


def imagefolder_params(root: Path) -> dict:
    return {"data": {"source": "imagefolder", "root": str(root)}}


def relabelled(tiny: Path, data: Path, labels_from, rows: slice = slice(None)) -> None:
    """A prepared train split made from the tiny one: some rows, and labels changed by `labels_from`."""
    src = read_prepared(tiny / "data" / "prepared" / "train")
    src.images, src.labels = src.images[rows], labels_from(src.labels[rows].copy())
    write_prepared(data / "prepared" / "train", src)


def version_1(tiny: Path, data: Path) -> None:
    """The tiny run's prepared train split as an old single-file (version 1) store."""
    write_prepared_v1(data / "prepared" / "train.h5", read_prepared(tiny / "data" / "prepared" / "train"))


def set_attr(path: Path, name: str, value) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[name] = value


def flip_stream_byte(path: Path, row: int) -> None:
    """Corrupt one byte in the middle of image `row`'s codec stream (its crc32 must catch it)."""
    with h5py.File(path, "r") as f:
        at = int(f["streams"].id.get_offset()) + int((f["offsets"][row] + f["offsets"][row + 1]) // 2)
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))


def flip_chunk_byte(path: Path, dataset: str) -> None:
    """Corrupt one byte in the middle of the first stored chunk of `dataset` (fletcher32 must catch it)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def wrong_mae_checkpoint(tiny: Path, case_dir: Path) -> str:
    """The tiny run's micro MAE, offered to a run that asks for the tiny architecture."""
    path = case_dir / "mae_visualize_other.pth"
    shutil.copyfile(tiny / "data" / "mae" / "model.pt", path)
    return str(path)


# ---------------------------------------------------------------------------------------------- cases

TRAIN_INPUTS = ("prepared/train", "prepared/test", "compact/dataset.h5", "mae/model.pt")

# name -> (case, setup(tiny repo, case dir, data dir) -> params overrides merged into the case's)
CASES: dict[str, tuple[Case, Callable[[Path, Path, Path], dict] | None]] = {
    # params: checked before any work, by whichever stage starts
    "ratio zero": (Case("stages.prepare", ("ratio = 0", "(0, 1]"), {"ratio": 0}), None),
    "ratio negative": (Case("stages.prepare", ("ratio = -0.5", "(0, 1]"), {"ratio": -0.5}), None),
    "ratio above one": (Case("stages.prepare", ("ratio = 1.5", "(0, 1]"), {"ratio": 1.5}), None),
    "ratio not a number": (Case("stages.prepare", ("ratio = 'lots'", "a number"), {"ratio": "lots"}), None),
    "num_bins zero": (Case("stages.prepare", ("select.num_bins = 0", "positive integer"),
                           {"select": {"num_bins": 0}}), None),
    "patch_size not a divisor": (Case("stages.prepare", ("patches.patch_size = 5", "divisor of data.image_size"),
                                      {"patches": {"patch_size": 5}}), None),
    "drop one": (Case("stages.prepare", ("patches.drop = 1.0", "[0, 1)"), {"patches": {"drop": 1.0}}), None),
    "unknown backbone": (Case("stages.features", ("features.backbone = 'resnet_nonexistent'", "timm model name"),
                              {"features": {"backbone": "resnet_nonexistent"}}), None),
    "unknown key": (Case("stages.select", ("unknown key select.bins", "num_bins"), {"select": {"bins": 3}}), None),
    "wrong type": (Case("stages.mae", ("mae.epochs = 'ten'", "an integer"), {"mae": {"epochs": "ten"}}), None),
    "debug shows the traceback": (Case("stages.prepare", ("ratio = 0",), {"ratio": 0}, debug=True), None),
    "num_bins above smallest class": (
        Case("stages.select", ("select.num_bins = 30", "smallest class"), {"select": {"num_bins": 30}}),
        inputs("prepared/train", "features/train.h5")),

    # data
    "missing root": (Case("stages.prepare", ("data.root", "does not exist")),
                     lambda tiny, d, data: imagefolder_params(d / "no-such-folder")),
    "empty class folder": (Case("stages.prepare", ("b: empty class folder", "at least one image")),
                           lambda tiny, d, data: imagefolder_params(image_folder(d / "img", {"a": [("0.png", rgb(1))],
                                                                                            "b": []}))),
    "non-image file": (Case("stages.prepare", ("notes.txt: not an image file", "expected one of")),
                       lambda tiny, d, data: imagefolder_params(image_folder(
                           d / "img", two_good_classes(bad_b=[("notes.txt", lambda p: p.write_text("hi"))])))),
    "truncated jpeg": (Case("stages.prepare", ("9.jpg: not a readable image",)),
                       lambda tiny, d, data: imagefolder_params(image_folder(
                           d / "img", two_good_classes(bad_a=[("9.jpg", truncated(rgb(9, "JPEG")))])))),
    "truncated png": (Case("stages.prepare", ("9.png: not a readable image",)),
                      lambda tiny, d, data: imagefolder_params(image_folder(
                          d / "img", two_good_classes(bad_b=[("9.png", truncated(rgb(9)))])))),
    "single class": (Case("stages.prepare", ("1 class folder", "at least 2 classes")),
                     lambda tiny, d, data: imagefolder_params(image_folder(d / "img", {"a": [("0.png", rgb(1))]}))),
    "grey rgba 16-bit are converted": (
        Case("stages.prepare", (), succeeds=True),
        lambda tiny, d, data: imagefolder_params(image_folder(
            d / "img", {"a": [("grey.png", grey), ("rgba.png", rgba_transparent)],
                        "b": [("deep.png", sixteen_bit)]}))),
    "labels outside range": (
        Case("stages.select", ("prepared/train", "labels must lie in [0, 3]", "found 0..7")),
        lambda tiny, d, data: relabelled(tiny, data, lambda y: np.where(np.arange(len(y)) == 5, 7, y))),

    # files
    "truncated prepared shard": (
        Case("stages.features", ("prepared/train/shard-00000.h5", "truncated", "rerun the prepare stage")),
        inputs("prepared/train", damage=lambda data: truncate(data / "prepared/train/shard-00000.h5"))),
    "missing prepared shard": (
        Case("stages.compress", ("prepared/train/shard-00000.h5: shard missing", "rerun the prepare stage")),
        inputs("prepared/train", "selection", "features/train.h5", "teacher/logits.h5",
               damage=lambda data: (data / "prepared/train/shard-00000.h5").unlink())),
    "version 1 prepared store": (
        Case("stages.features", ("prepared/train.h5: a version 1 prepared store", "rerun the prepare stage")),
        lambda tiny, d, data: version_1(tiny, data)),
    "bad codec": (Case("stages.prepare", ("data.codec = 'gif'", "one of raw, png"), {"data": {"codec": "gif"}}), None),
    "truncated features": (Case("stages.select", ("features/train.h5", "not a readable HDF5 file")),
                           inputs("prepared/train", "features/train.h5",
                                  damage=lambda data: truncate(data / "features/train.h5"))),
    "features rows differ from prepared": (
        Case("stages.select", ("features/train.h5: has 96 rows but the prepared training set has 80",)),
        lambda tiny, d, data: (copy_inputs(tiny, data, "features/train.h5"),
                               relabelled(tiny, data, lambda y: y, slice(0, 80)))[-1]),
    "truncated compact (validate)": (
        Case("dq.compact", ("dataset.h5", "not a readable HDF5 file")),
        inputs("compact/dataset.h5", damage=lambda data: truncate(data / "compact/dataset.h5"))),
    "wrong format (validate)": (
        Case("dq.compact", ("format = 'something-else'", "expected 'dq-compact'")),
        inputs("compact/dataset.h5",
               damage=lambda data: set_attr(data / "compact/dataset.h5", "format", "something-else"))),
    "newer schema (validate)": (
        Case("dq.compact", ("schema_version 4 is newer", "update dq")),
        inputs("compact/dataset.h5",
               damage=lambda data: set_attr(data / "compact/dataset.h5", "schema_version", np.int64(4)))),
    "checksum (validate)": (
        Case("dq.compact", ("dataset 'keep'", "fails its checksum")),
        inputs("compact/dataset.h5", damage=lambda data: flip_chunk_byte(data / "compact/dataset.h5", "keep"))),
    "corrupt stream (validate)": (
        Case("dq.compact", ("compact/dataset.h5: image row 3:", "fails its crc32 check")),
        inputs("compact/dataset.h5", damage=lambda data: flip_stream_byte(data / "compact/dataset.h5", 3))),
    "newer schema (train)": (
        Case("stages.train", ("compact/dataset.h5", "schema_version 4 is newer")),
        inputs(*TRAIN_INPUTS,
               damage=lambda data: set_attr(data / "compact/dataset.h5", "schema_version", np.int64(4)))),
    "checksum (train)": (
        Case("stages.train", ("compact/dataset.h5", "checksum")),
        inputs(*TRAIN_INPUTS, damage=lambda data: flip_chunk_byte(data / "compact/dataset.h5", "keep"))),
    "corrupt stream (train)": (
        Case("stages.train", ("compact/dataset.h5: image row 3:", "crc32")),
        inputs(*TRAIN_INPUTS, damage=lambda data: flip_stream_byte(data / "compact/dataset.h5", 3))),
    "mae checkpoint of another architecture": (
        Case("stages.mae", ("mae_visualize_other.pth: does not fit mae.arch = 'mae_vit_tiny_patch4'",)),
        lambda tiny, d, data: {"mae": {"arch": "mae_vit_tiny_patch4", "checkpoint": wrong_mae_checkpoint(tiny, d)}}),
}
DISK_FULL = "disk full (tmpfs)"


def _write_params(case_dir: Path, overrides: dict) -> Path:
    path = case_dir / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    return path


def _timed_run(case: Case, params: Path, data: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    return _run(case, params, data), time.perf_counter() - start


def _run(case: Case, params: Path, data: Path) -> subprocess.CompletedProcess:
    if case.module == "dq.compact":
        cmd = [sys.executable, "-m", "dq.compact", "validate", str(data / "compact" / "dataset.h5")]
    else:
        cmd = [sys.executable, "-m", case.module, "--params", str(params), "--data", str(data), *case.args]
    e = env() | case.env
    if case.debug:
        e["DQ_DEBUG"] = "1"
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def _mount_tmpfs(folder: Path) -> str | None:
    """Mount a 64 KiB tmpfs at `folder`; the reason when that is not possible."""
    if shutil.which("mount") is None:
        return "no mount command"
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}"


@pytest.fixture(scope="module")
def results(tiny_run, tmp_path_factory) -> dict[str, Result]:
    """Run every case once, PARALLEL at a time; the tests below only look at the results."""
    base = tmp_path_factory.mktemp("bad_input")
    jobs: dict[str, tuple[Case, Path, Path]] = {}
    for i, (name, (case, setup)) in enumerate(CASES.items()):
        case_dir = base / f"case{i}"
        data = case_dir / "data"
        data.mkdir(parents=True)
        overrides = dict(case.params)
        if setup is not None:
            overrides |= setup(tiny_run, case_dir, data) or {}
        jobs[name] = (case, _write_params(case_dir, overrides), data)

    out: dict[str, Result] = {}
    full = base / "full"
    skip = _mount_tmpfs(full)
    # a larger synthetic set than the 64 KiB the tmpfs holds
    disk_case = Case("stages.prepare", ("free on its disk", "--data at a larger disk"),
                     {"data": {"synthetic_train": 400}})
    if skip is None:
        jobs[DISK_FULL] = (disk_case, _write_params(base, disk_case.params), full)
    else:
        out[DISK_FULL] = Result(disk_case, full, skip=skip)
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = {name: pool.submit(_timed_run, *job) for name, job in jobs.items()}
            for name, future in futures.items():
                out[name] = Result(jobs[name][0], jobs[name][2], *future.result())
        if skip is None:
            out[DISK_FULL].leftovers = sorted(p.name for p in full.rglob("*"))
    finally:
        if skip is None:
            subprocess.run(["umount", str(full)], check=False)
    for name, r in sorted(out.items(), key=lambda kv: -kv[1].seconds):
        print(f"{r.seconds:6.1f} s  {name}")
    return out


def _assert_one_error_line(result: Result) -> str:
    proc, case = result.proc, result.case
    where = f"{case.module} exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 1, where  # 2 would be an internal error, not a recognised bad input
    assert "Traceback" not in proc.stderr, where
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    for text in case.expect:
        assert text in lines[0], f"{text!r} missing from: {lines[0]}"
    return lines[0]


def _assert_nothing_left(result: Result) -> None:
    stage = result.case.stage
    for out in declared_outputs(stage) if stage else []:
        assert not (result.data / out).exists(), f"{stage} left {out} behind"
    temps = [str(p) for p in result.data.rglob(".*.tmp-*")]
    assert not temps, temps


@pytest.mark.parametrize("name", [n for n, (c, _) in CASES.items() if not c.succeeds and not c.debug])
def test_bad_input_is_one_error_line_and_leaves_nothing(results, name):
    result = results[name]
    _assert_one_error_line(result)
    _assert_nothing_left(result)


def test_debug_shows_the_traceback(results):
    proc = results["debug shows the traceback"].proc
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ParamError" in proc.stderr and "ratio = 0" in proc.stderr


def test_grey_rgba_and_16bit_images_are_converted_not_rejected(results):
    result = results["grey rgba 16-bit are converted"]
    assert result.proc.returncode == 0, result.proc.stderr[-3000:]
    train = read_prepared(result.data / "prepared" / "train")
    assert train.images.shape == (3, 16, 16, 3) and train.images.dtype == np.uint8
    assert train.classes == ["a", "b"] and train.labels.tolist() == [0, 0, 1]
    grey_img, rgba_img, deep_img = train.images  # sorted file names: grey.png, rgba.png; deep.png
    assert (grey_img == 100).all()  # grey repeated to 3 channels
    assert (rgba_img == 0).all()  # fully transparent: composited onto black
    assert (deep_img == 40000 >> 8).all()  # 16-bit scaled to 8 bits


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(results):
    result = results[DISK_FULL]
    if result.skip:
        pytest.skip(result.skip)
    line = _assert_one_error_line(result)
    assert "prepared" in line
    assert result.leftovers == [], result.leftovers


# --------------------------------------------------------------------------- in-process variants


def _cli_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    assert info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    ({"patches": {"drop": -0.1}}, "patches.drop = -0.1 is not allowed; expected a number in [0, 1)"),
    ({"patches": {"drop": 1.5}}, "patches.drop = 1.5"),
    ({"select": {"num_bins": -2}}, "select.num_bins = -2"),
    ({"select": {"num_bins": 2.5}}, "select.num_bins = 2.5 is not allowed; expected an integer"),
    ({"data": {"image_size": "big"}}, "data.image_size = 'big'"),
    ({"ratio": None}, "ratio = None is not allowed; expected a number"),
    ({"bogus": 1}, "unknown key bogus"),
    ({"mae": {"arch": "mae_vit_giant"}}, "mae.arch = 'mae_vit_giant' is not allowed; expected one of mae_vit_base_patch16"),
    ({"patches": {"codec": "avif"}},
     "patches.codec = 'avif' is not allowed; expected one of raw, png, webp-lossless, webp, jpeg"),
    ({"patches": {"codec": "jpeg", "quality": 0}}, "patches.quality = 0 is not allowed; expected an integer in [1, 100]"),
])
def test_more_params_in_process(tmp_path, capsys, monkeypatch, overrides, expected):
    from stages import mae, prepare

    monkeypatch.delenv("DQ_DEBUG", raising=False)
    params = _write_params(tmp_path, overrides)
    main = mae.main if "mae" in overrides else prepare.main
    line = _cli_error(capsys, main, ["--params", str(params), "--data", str(tmp_path / "data")])
    assert expected in line, line
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_params_file_missing_or_not_yaml(tmp_path, capsys, monkeypatch):
    from stages import prepare

    monkeypatch.delenv("DQ_DEBUG", raising=False)
    line = _cli_error(capsys, prepare.main, ["--params", str(tmp_path / "none.yaml")])
    assert "none.yaml: cannot read the params file" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: [0.1\nseed: 0\n")
    assert "bad.yaml: not valid YAML at line" in _cli_error(capsys, prepare.main, ["--params", str(bad)])


def test_disk_full_in_a_numpy_writer_leaves_no_partial_selection(tiny_run, tmp_path, capsys, monkeypatch):
    """The select stage's np.save fails half way with ENOSPC: no selection folder, no temporaries."""
    import errno

    from stages import select

    monkeypatch.delenv("DQ_DEBUG", raising=False)
    data = tmp_path / "data"
    copy_inputs(tiny_run, data, "prepared/train", "features/train.h5")
    params = _write_params(tmp_path, {})
    real_save = np.save
    calls = []

    def save_then_fill_the_disk(file, arr, *args, **kwargs):
        calls.append(file)
        if len(calls) == 2:  # bins.npy is written, indices.npy hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fill_the_disk)
    line = _cli_error(capsys, select.main, ["--params", str(params), "--data", str(data)])
    assert len(calls) == 2
    assert "selection: no space left on the device" in line, line
    assert not (data / "selection").exists()
    assert not list(data.rglob(".*.tmp-*"))
