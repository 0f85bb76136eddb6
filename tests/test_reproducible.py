"""Reproducibility and concurrent reading.

Two fresh clones running the tiny pipeline give the same bytes in every output of every stage (metrics
JSON, DVCLive logs and PNGs included) and the same dvc.lock. The compact dataset reads the same bytes
with 4 DataLoader workers over 3 epochs as with none, and HDF5 files open on read-only storage and
while another process holds HDF5's write lock.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import h5py
import pytest
import torch

from dq.features.file import read_features
from dq.compact.dataset import CompactDataset
from dq.compact.reader import validate
from dq.data.prepared import read_prepared
from tests.pipeline_repo import all_stages, digest_tree, dvc, env, make_repo, ran_stages

EPOCHS = 3


def test_two_fresh_clones_give_identical_bytes_in_every_output(tiny_run, tmp_path):
    other = make_repo(tmp_path / "clone")
    out = dvc(other, "repro")
    assert len(ran_stages(out.stdout)) == len(all_stages()), out.stdout
    first, second = digest_tree(tiny_run / "data"), digest_tree(other / "data")
    assert sorted(first) == sorted(second)
    for stage_dir in ("prepared", "features", "selection", "compact", "mae", "train", "report"):
        assert any(name.startswith(stage_dir + "/") for name in first), f"no output of {stage_dir}"
    assert any(name.endswith(".png") for name in first) and any(name.endswith(".json") for name in first)
    differ = sorted(name for name in first if first[name] != second[name])
    assert differ == [], f"outputs that differ between two clones: {differ}"
    assert (tiny_run / "dvc.lock").read_text() == (other / "dvc.lock").read_text()


@pytest.mark.parametrize("outside", [
    {"OMP_NUM_THREADS": "2"},  # another thread count
    {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
     "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "COMPATIBLE"},  # another machine's kernels
], ids=["threads", "isa"])
def test_features_and_compress_give_the_same_bytes_whatever_the_kernels_and_threads(tiny_run, tmp_path, outside):
    """What another CPU would pick (ISA limits set from outside) or another core count changes no byte of the
    shared artifacts: dq.core.kernels pins the kernels before torch loads, and the probe is fit on one thread."""
    data = tmp_path / "data"
    data.mkdir()
    for part in ("prepared", "selection", "teacher"):  # the teacher's logits: the store's soft labels
        (data / part).symlink_to(tiny_run / "data" / part, target_is_directory=True)
    run_env = {**env(), **outside}
    for stage in ("features", "compress"):
        done = subprocess.run([sys.executable, "-m", "stages.launch", stage, "--params", str(tiny_run / "params.yaml"),
                               "--data", str(data)], cwd=tiny_run, env=run_env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    for name in ("features/train.h5", "compact/dataset.h5", "compact_metrics.json"):
        assert (data / name).read_bytes() == (tiny_run / "data" / name).read_bytes(), name


def test_pinning_overrides_the_environment_unless_asked_not_to(monkeypatch):
    import platform

    from dq.core import kernels

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    environ = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "MKL_CBWR": "AUTO"}
    assert kernels.pin_cpu_kernels(environ) == kernels.PINNED and environ == kernels.PINNED
    assert kernels.pin_cpu_kernels({"DQ_CPU_KERNELS": "native"}) == {}
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert kernels.pin_cpu_kernels({}) == {}


# ------------------------------------------------------------------------------------------- workers


def _epochs(ds: CompactDataset, workers: int) -> list[bytes]:
    """The bytes of (images, keep, labels) in each of EPOCHS shuffled epochs; the order is seeded."""
    out = []
    for epoch in range(EPOCHS):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, num_workers=workers,
                                             generator=torch.Generator().manual_seed(epoch),
                                             persistent_workers=False)
        parts = [torch.cat(t).numpy().tobytes() for t in zip(*[(x.flatten(), k.flatten(), y.flatten())
                                                               for x, k, y in loader])]
        out.append(b"".join(parts))
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 4 workers on 2 cores, on purpose
def test_four_workers_over_three_epochs_read_the_same_bytes_as_none(tiny_run):
    path = tiny_run / "data" / "compact" / "dataset.h5"
    ds = CompactDataset(path)
    serial = _epochs(ds, 0)
    parallel = _epochs(ds, 4)
    assert serial == parallel
    assert len(set(serial)) == EPOCHS  # the epochs really were shuffled differently
    # and every epoch holds every stored image exactly once
    whole = [ds[i] for i in range(len(ds))]
    expected = sorted(x.numpy().tobytes() for x, _, _ in whole)
    for epoch in range(EPOCHS):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, num_workers=4,
                                             generator=torch.Generator().manual_seed(epoch))
        seen = sorted(x.numpy().tobytes() for batch in loader for x in batch[0])
        assert seen == expected


# ----------------------------------------------------------------------------------------- read-only


def _read_everything(folder):
    """Open every HDF5 file of a run the way the stages do, and read it whole."""
    prepared = read_prepared(folder / "train")
    features = read_features(folder / "features.h5", expected_rows=len(prepared.labels))
    header = validate(folder / "dataset.h5")
    ds = CompactDataset(folder / "dataset.h5")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return prepared.images.sum(), features.embedding.shape, header.num_images, images.shape


def _copy_run_files(tiny_run, folder):
    folder.mkdir(parents=True, exist_ok=True)
    data = tiny_run / "data"
    shutil.copytree(data / "prepared/train", folder / "train")
    for src, name in ((data / "features/train.h5", "features.h5"), (data / "compact/dataset.h5", "dataset.h5")):
        shutil.copyfile(src, folder / name)
    return folder


def test_read_only_files_in_a_read_only_folder_open(tiny_run, tmp_path):
    folder = _copy_run_files(tiny_run, tmp_path / "ro")
    expected = _read_everything(folder)
    for f in folder.rglob("*"):
        f.chmod(0o555 if f.is_dir() else 0o444)
    folder.chmod(0o555)
    try:
        assert _read_everything(folder) == expected
    finally:
        for d in [folder, *folder.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)


def test_read_only_mount_opens(tiny_run, tmp_path):
    """root ignores permission bits, so also read from a file system mounted read-only."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        expected = _read_everything(_copy_run_files(tiny_run, folder))
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")  # the mount really is read-only
        assert _read_everything(folder) == expected
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_readers_take_no_lock_while_another_process_holds_the_write_lock(tiny_run, tmp_path, monkeypatch):
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    folder = _copy_run_files(tiny_run, tmp_path / "locked")
    expected = _read_everything(folder)
    holder = textwrap.dedent("""
        import sys, h5py
        files = [h5py.File(p, "r+", locking=True) for p in sys.argv[1:]]
        print("locked", flush=True)
        sys.stdin.read()
    """)
    e = env()
    e.pop("HDF5_USE_FILE_LOCKING", None)
    proc = subprocess.Popen([sys.executable, "-c", holder, *map(str, sorted(folder.rglob("*.h5")))], env=e,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OSError, match="lock"):  # a locking reader is refused: the lock is real
            h5py.File(folder / "dataset.h5", "r", locking=True)
        assert _read_everything(folder) == expected
    finally:
        proc.communicate("", timeout=30)
    assert proc.returncode == 0


def test_metrics_files_round_every_float_so_last_digit_noise_moves_no_byte(tiny_run, tmp_path):
    """A float sum's last digits may move between two runs on one machine; a metrics file keeps
    METRICS_DIGITS significant digits, so it (and dvc.lock) does not."""
    import json

    from dq.core.io import METRICS_DIGITS, write_metrics

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_metrics(a, {"x": 0.1 + 0.2, "nested": [{"y": 2 / 3}], "n": 7, "inf": float("inf")})
    write_metrics(b, {"x": 0.3, "nested": [{"y": 0.6666666666666667 - 1e-16}], "n": 7, "inf": float("inf")})
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text())["nested"][0]["y"] == 0.666667
    for name in ("selection_metrics", "compact_metrics", "train_metrics", "mae_metrics", "teacher_metrics",
                 "scores_metrics"):
        text = (tiny_run / "data" / f"{name}.json").read_text()
        floats = [float(t) for t in __import__("re").findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", text)]
        assert all(float(f"{v:.{METRICS_DIGITS}g}") == v for v in floats), name
