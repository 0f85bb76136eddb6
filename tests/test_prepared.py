"""The prepared store, version 2 (dq.data.prepared): shards of codec streams, their index, their checks, and the
streaming prepare and features stages that write and read them."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import dq
from dq.core.errors import DQError
from dq.data.prepared import Prepared, Store, image_loader, open_store, read_prepared, verify_store
from dq.data.prepared_writer import write_prepared, write_prepared_v1
from stages import features as features_stage
from stages import prepare as prepare_stage

ROOT = Path(__file__).resolve().parents[1]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def _split(n: int, size: int = 16, seed: int = 0) -> Prepared:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[::3] = images[::3, :, :, :1]  # some grey images: stored as 1-channel streams, read back as 3
    return Prepared(images, (np.arange(n) % 3).astype(np.int64), ["a", "b", "c"], "synthetic")


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the store ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["raw", "png", "webp-lossless", "webp", "jpeg"])
def test_store_round_trip_across_shards(tmp_path, codec):
    split = _split(23)
    index = write_prepared(tmp_path / "train", split, codec=codec, quality=90, shard_images=7)
    assert [s.count for s in index.shards] == [7, 7, 7, 2] and index.num_images == 23
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "index.json", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5", "shard-00003.h5"]
    raw = json.loads((tmp_path / "train" / "index.json").read_text())
    assert (raw["format"], raw["schema_version"], raw["codec"], raw["image_shape"]) == (
        "dq-prepared", 2, codec, [16, 16, 3])
    rows = [22, 0, 7, 7, 6, 13, 14]  # across shard borders, repeated, out of order
    images = dq.read_images(tmp_path / "train", rows)
    assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(dq.read_labels(tmp_path / "train"), split.labels)
    if codec in ("raw", "png", "webp-lossless"):
        assert np.array_equal(images, split.images[rows])
        assert np.array_equal(read_prepared(tmp_path / "train").images, split.images)
    else:  # noise is the worst case for a lossy codec: only check it decodes to the right images roughly
        assert np.abs(images.astype(int) - split.images[rows]).mean() < 60
    assert verify_store(tmp_path / "train").num_images == 23


def test_a_shuffled_batch_of_small_images_costs_one_read_per_shard_and_large_gaps_split_reads(tmp_path, monkeypatch):
    """Streams lying within READ_GAP bytes are read as one span (one h5py call per shard for a shuffled batch of
    small images), streams further apart are read on their own, and either way each row gets its own bytes."""
    split = _split(90)
    write_prepared(tmp_path / "s", split, codec="raw", shard_images=40)  # at most 768 bytes per stream
    store = open_store(tmp_path / "s")
    reads = []
    read_bytes = Store.read_bytes
    monkeypatch.setattr(Store, "read_bytes", lambda self, k, a, b: (reads.append(b - a), read_bytes(self, k, a, b))[1])
    rows = np.random.default_rng(0).permutation(90)[:30]
    shard_of = np.searchsorted(store.starts, np.sort(rows), side="right") - 1

    def decoded():
        return np.stack([store.decode_row(int(r), s) for r, s in zip(rows, store.streams(rows))])

    assert np.array_equal(decoded(), split.images[rows]) and len(reads) == len(set(shard_of))
    reads.clear()
    monkeypatch.setattr("dq.data.prepared.READ_GAP", 0)  # as if every stream were larger than the gap
    assert np.array_equal(decoded(), split.images[rows])
    runs = 1 + np.count_nonzero((np.diff(np.sort(rows)) > 1) | (np.diff(shard_of) != 0))
    assert len(reads) == runs < 30 and max(reads) < 768 * 30


def test_shard_layout_is_readable_without_dq(tmp_path):
    """What docs/FORMAT.md promises readers in other languages: offsets into one byte array, standard PNG."""
    from PIL import Image
    import io

    split = _split(5)
    write_prepared(tmp_path / "s", split, codec="png", shard_images=10)
    with h5py.File(tmp_path / "s" / "shard-00000.h5", "r") as f:
        streams, offsets, labels = f["streams"][...], f["offsets"][...], f["labels"][...]
        assert (f.attrs["format"], int(f.attrs["schema_version"]), f.attrs["codec"]) == ("dq-prepared-shard", 2, "png")
    assert offsets[0] == 0 and offsets[-1] == streams.size and labels.tolist() == split.labels.tolist()
    pixels = np.asarray(Image.open(io.BytesIO(streams[offsets[1]:offsets[2]].tobytes())).convert("RGB"))
    assert np.array_equal(pixels, split.images[1])


def test_loader_reads_rows_in_order_with_workers(tmp_path):
    split = _split(30)
    write_prepared(tmp_path / "s", split, shard_images=8)
    rows = np.asarray([29, 3, 4, 5, 17, 0, 8, 9])
    store = open_store(tmp_path / "s")
    for workers in (0, 2):
        got = [(im.numpy(), y.numpy(), r.numpy()) for im, y, r in
               image_loader(store, rows, batch_size=3, num_workers=workers)]
        assert [len(r) for _, _, r in got] == [3, 3, 2]
        assert np.array_equal(np.concatenate([im for im, _, _ in got]), split.images[rows])
        assert np.array_equal(np.concatenate([y for _, y, _ in got]), split.labels[rows])
        assert np.array_equal(np.concatenate([r for _, _, r in got]), rows)


@pytest.fixture
def store3(tmp_path) -> Path:
    write_prepared(tmp_path / "train", _split(20), codec="png", shard_images=8)
    return tmp_path / "train"


def test_missing_shard_is_named(store3):
    (store3 / "shard-00001.h5").unlink()
    with pytest.raises(DQError) as exc:
        open_store(store3)
    assert "shard-00001.h5: shard missing" in _one_line(exc) and "rerun the prepare stage" in str(exc.value)


def test_truncated_shard_is_named(store3):
    path = store3 / "shard-00002.h5"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DQError) as exc:
        dq.read_images(store3, [0])
    assert "shard-00002.h5" in _one_line(exc) and "truncated" in str(exc.value)


@pytest.mark.parametrize("foreign", ["codec", "schema"])
def test_foreign_shard_is_named(store3, tmp_path, foreign):
    """A shard of another store (another codec) or version, even with a size the index agrees with."""
    path = store3 / "shard-00001.h5"
    if foreign == "codec":
        write_prepared(tmp_path / "other", _split(20), codec="webp-lossless", shard_images=8)
        path.write_bytes((tmp_path / "other" / "shard-00001.h5").read_bytes())
    else:
        with h5py.File(path, "r+") as f:
            f.attrs["schema_version"] = 3
    index = json.loads((store3 / "index.json").read_text())
    index["shards"][1]["bytes"] = path.stat().st_size  # get past the size check: the attributes must catch it
    (store3 / "index.json").write_text(json.dumps(index))
    with pytest.raises(DQError) as exc:
        open_store(store3)
    message = _one_line(exc)
    assert "shard-00001.h5" in message and ("codec" in message if foreign == "codec" else "schema_version" in message)


def test_damaged_bytes_fail_the_checksums(store3):
    path = store3 / "shard-00000.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the SHA-256 in the index can tell
    path.write_bytes(bytes(data))
    open_store(store3)  # the cheap checks pass
    with pytest.raises(DQError) as exc:
        verify_store(store3)
    assert "shard-00000.h5: SHA-256 differs" in _one_line(exc)


def test_version_1_store_is_refused_by_stages_but_readable_by_the_api(tmp_path):
    split = _split(6)
    data = tmp_path / "data"
    write_prepared_v1(data / "prepared" / "train.h5", split)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"features": {"backbone": "resnet10t", "weights": "none", "input_size": 32},
                                      "runtime": {"device": "cpu"}}))
    with pytest.raises(DQError) as exc:
        features_stage.main(["--params", str(params), "--data", str(data)])
    message = _one_line(exc)
    assert "train.h5: a version 1 prepared store" in message and "rerun the prepare stage" in message
    for name in ("train", "train.h5"):  # the public API still reads old results
        assert np.array_equal(dq.read_images(data / "prepared" / name, [5, 1]), split.images[[5, 1]])
        assert np.array_equal(dq.read_labels(data / "prepared" / name), split.labels)


# --- the prepare stage ----------------------------------------------------------------------------------------

def _params(tmp_path: Path, data: dict, runtime: dict | None = None) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(data)
    raw["runtime"].update(runtime or {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """An image folder of 3 classes × 14 JPEG and PNG files of several sizes, one of them unreadable."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 14), ("val", 3)):
        for c in ("cat", "dog", "owl"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
                img.save(root / split / c / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    (root / "train" / "dog" / "007.jpg").write_bytes(b"not a jpeg")
    return root


def test_prepare_bytes_do_not_depend_on_the_number_of_workers(tmp_path, photo_folder):
    digests = []
    for workers in (0, 1, 2):
        params = _params(tmp_path / f"w{workers}", {"source": "imagefolder", "root": str(photo_folder),
                                                    "image_size": 24, "shard_images": 10, "skip_bad": True},
                         {"num_workers": workers})
        data = tmp_path / f"w{workers}" / "data"
        prepare_stage.main(["--params", str(params), "--data", str(data)])
        digests.append(_digest(data / "prepared"))
    assert digests[0] == digests[1] == digests[2]
    assert sorted(digests[0]) == ["test/index.json", "test/shard-00000.h5", "train/index.json",
                                  "train/shard-00000.h5", "train/shard-00001.h5", "train/shard-00002.h5",
                                  "train/shard-00003.h5", "train/shard-00004.h5"]
    assert open_store(tmp_path / "w0" / "data" / "prepared" / "train").index.num_images == 41  # one skipped


def test_prepare_names_a_bad_file_with_workers(tmp_path, photo_folder):
    params = _params(tmp_path, {"source": "imagefolder", "root": str(photo_folder), "image_size": 24},
                     {"num_workers": 2})
    with pytest.raises(DQError, match=r"dog/007.jpg: not a readable image"):
        prepare_stage.main(["--params", str(params), "--data", str(tmp_path / "data")])
    assert not (tmp_path / "data" / "prepared").exists()


def test_killed_prepare_leaves_no_shard_and_a_rerun_gives_the_same_bytes(tmp_path):
    data = {"source": "synthetic", "synthetic_train": 4000, "synthetic_test": 40, "image_size": 48,
            "shard_images": 100}
    params = _params(tmp_path, data)
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "stages.prepare", "--params", str(params), "--data", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:  # kill it once it has finished some shards and is writing more
        while not list(out.glob(".prepared.tmp-*/train/shard-00003.h5")):
            assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "prepared").exists()
    assert not list(out.glob("prepared/**/*.h5"))
    assert list(out.glob(".prepared.tmp-*"))  # the killed run's temporary, invisible to DVC and readers
    prepare_stage.main(["--params", str(params), "--data", str(out)])
    assert not list(out.glob(".prepared.tmp-*"))  # swept by the rerun
    clean = tmp_path / "clean"
    prepare_stage.main(["--params", str(params), "--data", str(clean)])
    assert _digest(out / "prepared") == _digest(clean / "prepared")
    assert open_store(out / "prepared" / "train").index.num_images == 4000


# --- streaming: no stage reads a whole split ------------------------------------------------------------------

def test_features_stage_never_reads_more_than_a_batch(tmp_path, monkeypatch):
    """N = 300 images in shards of 40: the largest single read of image bytes is one batch (16 rows), and
    nothing decodes the whole split."""
    n, batch = 300, 16
    split = _split(n, size=32)
    data = tmp_path / "data"
    write_prepared(data / "prepared" / "train", split, shard_images=40)
    largest = {"rows": 0, "calls": 0}
    streams = Store.streams

    def recording_streams(self, rows):
        largest["rows"] = max(largest["rows"], len(np.asarray(rows).reshape(-1)))
        largest["calls"] += 1
        return streams(self, rows)

    def no_whole_split(self, rows=None):
        raise AssertionError("a stage decoded a whole split")

    monkeypatch.setattr(Store, "streams", recording_streams)
    monkeypatch.setattr(Store, "read", no_whole_split)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"features": {"backbone": "resnet10t", "weights": "none", "kind": "embedding",
                                                   "input_size": 32, "batch_size": batch},
                                      "runtime": {"device": "cpu"}}))
    features_stage.main(["--params", str(params), "--data", str(data)])
    assert largest["rows"] == batch and largest["calls"] == -(-n // batch)
    assert dq.read_features(data / "features" / "train.h5").embedding.shape[0] == n


def test_compress_stage_never_reads_more_than_a_batch(tmp_path, monkeypatch):
    """N = 300 images in shards of 40, 64 of them selected: the CAM pass and the writer see one batch
    (8 images) at a time, the largest single read of image bytes is one batch, and nothing decodes the
    whole split or the whole selection."""
    from dq.compact import reader as compact_reader
    from dq.compact import writer as compact_writer
    from stages import compress as compress_stage
    from tests.test_format import _tiny_pipeline, smooth_images

    n, batch = 300, 8
    indices = np.sort(np.random.default_rng(0).choice(n, 64, replace=False))
    root = _tiny_pipeline(tmp_path, n=n, indices=indices, shard_images=40, batch_size=batch, scorer="pixel-std")
    largest = {"read": 0, "reads": 0, "written": 0}
    streams, add = Store.streams, compact_writer.CompactWriter.add

    def recording_streams(self, rows):
        largest["read"] = max(largest["read"], len(np.asarray(rows).reshape(-1)))
        largest["reads"] += 1
        return streams(self, rows)

    def recording_add(self, images, *rest):
        largest["written"] = max(largest["written"], len(images))
        return add(self, images, *rest)

    def no_whole_split(self, rows=None):
        raise AssertionError("a stage decoded a whole split")

    monkeypatch.setattr(Store, "streams", recording_streams)
    monkeypatch.setattr(Store, "read", no_whole_split)
    monkeypatch.setattr(compact_writer.CompactWriter, "add", recording_add)
    compress_stage.main(["--params", str(root / "params.yaml"), "--data", str(root / "data")])
    assert largest == {"read": batch, "reads": 64 // batch, "written": batch}
    data = compact_reader.read_compact(root / "data/compact/dataset.h5")
    np.testing.assert_array_equal(data.indices, indices)
    kept = data.keep.reshape(64, 8, 8).repeat(4, axis=1).repeat(4, axis=2)
    np.testing.assert_array_equal(data.images()[kept], smooth_images(n, 32, 3)[indices][kept])


def test_a_bad_stream_read_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    """torch re-raises a worker's DQError with the worker's traceback in its message: run_cli prints the
    original line, naming the shard and the row."""
    from dq.core.errors import run_cli

    write_prepared(tmp_path / "train", _split(12), shard_images=5)
    with h5py.File(tmp_path / "train" / "shard-00001.h5", "r+") as f:
        offsets = f["offsets"][...]
        f["streams"][offsets[1]:offsets[2]] = 0  # row 6
    store = open_store(tmp_path / "train")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: list(image_loader(store, batch_size=4, num_workers=1)))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'train' / 'shard-00001.h5'}: row 6: "), err
