"""Each data source, the class-balanced subset, image conversion, and the prepare stage end to end."""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dq.data.sources import balanced_subset, decode_image, load_split, read_idx, LoadReport
from dq.core.errors import DQError
from dq.data.prepared import read_prepared
from dq.params import DataParams
from stages import prepare

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_fashion_mnist_reader_pads_and_repeats_channels(tiny_fashion):
    root, images, labels = tiny_fashion
    split = load_split(DataParams(root=str(root)), "train")
    assert split.images.shape == (30, 32, 32, 3) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.images[:, 2:30, 2:30, 0], images)
    np.testing.assert_array_equal(split.images[..., 0], split.images[..., 2])
    assert split.images[:, :2].max() == 0 and split.images[:, 30:].max() == 0
    assert split.classes[9] == "Ankle boot" and split.source == "fashion-mnist"


def test_fashion_mnist_limit_is_class_balanced_and_deterministic(tiny_fashion):
    root, _, _ = tiny_fashion
    a = load_split(DataParams(root=str(root), train_limit=14), "train")
    b = load_split(DataParams(root=str(root), train_limit=14), "train")
    np.testing.assert_array_equal(a.images, b.images)
    counts = np.bincount(a.labels, minlength=10)
    assert counts.sum() == 14 and counts.max() - counts.min() <= 1


def test_truncated_idx_names_the_file(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 5, 28, 28) + b"\0" * 100)
    with pytest.raises(DQError, match="x.gz: IDX header declares .* truncated"):
        read_idx(path)


def test_missing_fashion_root_is_a_clear_error(tmp_path):
    with pytest.raises(DQError, match="data.root: .*nowhere does not exist"):
        load_split(DataParams(root=str(tmp_path / "nowhere")), "train")


def test_real_debian_fashion_mnist_when_installed():
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    split = load_split(DataParams(test_limit=50), "test")
    assert split.images.shape == (50, 32, 32, 3)
    assert np.bincount(split.labels, minlength=10).tolist() == [5] * 10
    assert split.images.mean() > 20  # real clothes, not an empty canvas


def test_balanced_subset_quota():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 10)
    idx = balanced_subset(labels, 7, 3)
    assert np.bincount(labels[idx], minlength=3).tolist() == [3, 2, 2]
    assert np.all(np.diff(idx) > 0)


def test_synthetic_is_deterministic_and_learnable():
    params = DataParams(source="synthetic", synthetic_classes=3, synthetic_train=60, image_size=16)
    a, b = load_split(params, "train"), load_split(params, "train")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (60, 16, 16, 3) and sorted(set(a.labels.tolist())) == [0, 1, 2]
    # a nearest-class-mean classifier on raw pixels separates the classes well above chance
    x = a.images.reshape(60, -1).astype(float)
    means = np.stack([x[a.labels == c].mean(0) for c in range(3)])
    test = load_split(params, "test")
    xt = test.images.reshape(len(test.labels), -1).astype(float)
    pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test.labels).mean() > 0.8


def _save(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(["cat", "dog"]):
            for i in range(n):
                arr = rng.integers(0, 256, size=(20 + 7 * i, 30, 3), dtype=np.uint8)
                _save(root / split / name / f"{i}.png", Image.fromarray(arr))
    return root


def test_imagefolder_reads_classes_and_resizes(folder_tree):
    params = DataParams(source="imagefolder", root=str(folder_tree), image_size=16)
    train = load_split(params, "train")
    assert train.classes == ["cat", "dog"] and train.images.shape == (6, 16, 16, 3)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert load_split(params, "test").images.shape == (4, 16, 16, 3)


def test_imagefolder_corrupt_file_stops_or_is_skipped(folder_tree):
    bad = folder_tree / "train" / "dog" / "9_truncated.png"
    data = (folder_tree / "train" / "dog" / "0.png").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    params = DataParams(source="imagefolder", root=str(folder_tree), image_size=16)
    with pytest.raises(DQError, match="9_truncated.png: not a readable image"):
        load_split(params, "train")
    report = LoadReport()
    skipped = load_split(DataParams(source="imagefolder", root=str(folder_tree), image_size=16, skip_bad=True),
                         "train", report)
    assert len(skipped.labels) == 6 and report.skipped == [str(bad)]


def test_imagefolder_non_image_file_and_empty_class(folder_tree):
    (folder_tree / "train" / "cat" / "notes.txt").write_text("hello")
    params = DataParams(source="imagefolder", root=str(folder_tree), image_size=16)
    with pytest.raises(DQError, match=r"notes.txt: not an image file \(extension '.txt'\)"):
        load_split(params, "train")
    (folder_tree / "train" / "cat" / "notes.txt").unlink()
    (folder_tree / "train" / "empty").mkdir()
    with pytest.raises(DQError, match="empty: empty class folder"):
        load_split(params, "train")


def test_imagefolder_single_class_is_an_error(tmp_path):
    _save(tmp_path / "r" / "train" / "only" / "a.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DQError, match="expected at least 2 classes"):
        load_split(DataParams(source="imagefolder", root=str(tmp_path / "r"), image_size=8), "train")


def test_grey_rgba_and_16bit_images_are_converted(tmp_path):
    grey = _save(tmp_path / "g.png", Image.fromarray(np.full((10, 10), 200, np.uint8), "L"))
    rgba_arr = np.zeros((10, 10, 4), np.uint8)
    rgba_arr[..., 0] = 255
    rgba_arr[..., 3] = 128
    rgba = _save(tmp_path / "a.png", Image.fromarray(rgba_arr, "RGBA"))
    deep = _save(tmp_path / "d.png", Image.fromarray(np.full((10, 10), 51200, np.uint16)))
    assert decode_image(grey, 10).tolist() == np.full((10, 10, 3), 200).tolist()
    a = decode_image(rgba, 10)
    assert abs(int(a[0, 0, 0]) - 128) <= 1 and a[0, 0, 1] == 0  # half-transparent red over black
    assert decode_image(deep, 10)[0, 0].tolist() == [200, 200, 200]  # 51200 / 256


def test_resize_rule_is_shorter_side_then_centre_crop(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 15:25] = 255  # a white centre band, a quarter of the width
    out = decode_image(_save(tmp_path / "w.png", Image.fromarray(arr)), 10)
    assert out.shape == (10, 10, 3)
    # 20×40 → 10×20, then the centre 10 columns: the band becomes the middle half of the crop
    assert out[:, 4:6].min() > 240 and out[:, 0].max() < 20 and out[:, 9].max() < 20


def run_prepare(tmp_path: Path, data: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    prepare.main(["--params", str(path), "--data", str(tmp_path / "data")])
    return tmp_path / "data" / "prepared"


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_stage_writes_contract_files_byte_identically(tmp_path):
    out = run_prepare(tmp_path, {"source": "synthetic", "synthetic_train": 40, "synthetic_test": 12})
    first = tree_digest(out)
    assert sorted(first) == ["test/index.json", "test/shard-00000.h5", "train/index.json", "train/shard-00000.h5"]
    train = read_prepared(out / "train")
    assert train.images.shape == (40, 32, 32, 3) and train.labels.dtype == np.int64
    assert train.classes == ["class_0", "class_1", "class_2", "class_3"] and train.source == "synthetic"
    assert np.array_equal(train.images, load_split(DataParams(source="synthetic", synthetic_train=40), "train").images)
    out = run_prepare(tmp_path, {"source": "synthetic", "synthetic_train": 40, "synthetic_test": 12})
    assert tree_digest(out) == first


def test_prepare_failure_leaves_no_output(tmp_path):
    with pytest.raises(DQError):
        run_prepare(tmp_path, {"root": str(tmp_path / "missing")})
    assert not (tmp_path / "data" / "prepared").exists()
    assert not list((tmp_path / "data").glob(".*tmp*")) if (tmp_path / "data").exists() else True


def test_read_prepared_rejects_labels_out_of_range(tmp_path):
    import h5py

    out = run_prepare(tmp_path, {"source": "synthetic", "synthetic_train": 8, "synthetic_test": 4})
    shard = out / "train" / "shard-00000.h5"
    size = shard.stat().st_size
    with h5py.File(shard, "r+") as f:
        f["labels"][0] = 7
    assert shard.stat().st_size == size  # the index's size check still passes: the labels check must catch it
    with pytest.raises(DQError, match=r"train: labels must lie in \[0, 3\] for 4 classes, found 0..7"):
        read_prepared(out / "train")


def test_public_api_reads_a_split_by_its_design_name(tmp_path):
    """dq.read_images / dq.read_labels take `data/prepared/train` (or the .h5 file), rows in the given order."""
    import dq

    out = run_prepare(tmp_path, {"source": "synthetic", "synthetic_train": 12, "synthetic_test": 4})
    full = read_prepared(out / "train")
    for split in (out / "train", out / "train.h5", str(out / "train")):
        assert np.array_equal(dq.read_images(split), full.images)
        assert np.array_equal(dq.read_labels(split), full.labels) and dq.read_labels(split).dtype == np.int64
    rows = [5, 0, 5, 11]
    assert np.array_equal(dq.read_images(out / "train", rows), full.images[rows])
    assert dq.read_images(out / "train", []).shape == (0, 32, 32, 3)
    with pytest.raises(DQError, match=r"rows must lie in \[0, 12\)"):
        dq.read_images(out / "train", [12])
    assert set(dq.__all__) >= {"read_images", "read_labels", "read_features", "create_backbone",
                               "classifier_with_probe", "preprocess"}
    assert callable(dq.create_backbone) and callable(dq.preprocess) and callable(dq.classifier_with_probe)
    with pytest.raises(AttributeError):
        dq.no_such_name
