"""The export stage and dq.rebuilt_dataset: the rebuilt compact set leaves dq as files other trainers read,
with the pixels the train stage trains on, bit for bit."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dq.export import writer as dq_export
from dq.mae import model as dq_mae
from dq.train.data import training_set
from dq.core.errors import DQError
from dq.data.prepared import read_images, read_labels
from stages import export as export_stage
from tests.test_train import blobs, make_pipeline_inputs, write_params

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """data/: prepared 96 + 40 blob images of 4 classes, a compact store of every 2nd image, a micro MAE."""
    root = tmp_path_factory.mktemp("export")
    make_pipeline_inputs(root / "data", (blobs(96, seed=1), blobs(40, seed=2)))
    return root


def export(root: Path, name: str, **export_params) -> Path:
    """Run the export stage on a copy of `root`'s inputs (links) with `export_params`; the data folder."""
    data = root / name
    if not data.exists():
        data.mkdir()
        for part in ("prepared", "compact", "mae"):
            (data / part).symlink_to(root / "data" / part, target_is_directory=True)
    params = write_params(root / f"{name}.yaml", input="compact")
    raw = yaml.safe_load(params.read_text())
    raw["export"] = export_params
    params.write_text(yaml.safe_dump(raw))
    export_stage.main(["--params", str(params), "--data", str(data)])
    return data


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def trained_pixels(root: Path, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, prepared rows) of the `compact` training set the train stage builds, from the same cache."""
    train_set = training_set("compact", blobs(96, seed=1), data / "compact" / "dataset.h5",
                             data / "mae" / "model.pt", device=torch.device("cpu"), rebuilt_cache=data / "fill")
    return train_set.images.read(np.arange(len(train_set.labels))), train_set.labels, train_set.indices


def test_imagefolder_gives_torchvision_the_pixels_and_labels_train_trains_on(inputs):
    from torchvision.datasets import ImageFolder

    data = export(inputs, "folder")
    images, labels, rows = trained_pixels(inputs, data)
    train = ImageFolder(str(data / "export" / "train"), allow_empty=True)  # every 2nd image: classes 0 and 2
    assert train.classes == dq_export.class_folders(["c0", "c1", "c2", "c3"]) == ["000_c0", "001_c1", "002_c2", "003_c3"]
    assert len(train) == len(labels)
    order = {int(Path(path).stem): i for i, (path, _) in enumerate(train.samples)}
    for k, row in enumerate(rows):  # ImageFolder lists by class, then name: match by the prepared row
        image, label = train[order[int(row)]]
        assert label == labels[k]
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), images[k])
    test = ImageFolder(str(data / "export" / "test"))
    test_images = read_images(data / "prepared" / "test")
    assert [t for _, t in test.samples] == sorted(read_labels(data / "prepared" / "test").tolist())
    for path, target in test.samples[::7]:
        row = int(Path(path).stem)
        np.testing.assert_array_equal(np.asarray(test.loader(path)), test_images[row])
    info = dq_export.read_export_info(data / "export")
    assert info["splits"]["train"]["images"] == 48 and info["splits"]["test"]["per_class"] == [10, 10, 10, 10]
    assert info["sources"]["compact"]["md5"] == hashlib.md5((data / "compact" / "dataset.h5").read_bytes()).hexdigest()
    assert info["figures"]["share_of_images"] == 0.5 and info["figures"]["train_top1"] is None  # no train run here
    from dq.compact.reader import open_compact

    with open_compact(data / "compact" / "dataset.h5") as cf:
        assert info["params"]["compact"] == cf.header.params  # the params that made the store


def test_the_public_dataset_streams_the_same_pixels_through_dataloader_workers(inputs):
    import dq

    data = export(inputs, "folder")
    images, labels, _ = trained_pixels(inputs, data)
    ds = dq.rebuilt_dataset(data / "compact" / "dataset.h5", data / "mae" / "model.pt")  # cache: data/fill
    assert len(ds) == len(labels) and ds.classes == ["c0", "c1", "c2", "c3"]
    loader = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=2)
    got = torch.cat([x for x, _ in loader]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, images)
    assert torch.cat([y for _, y in loader]).tolist() == labels.tolist()
    assert ds[0][0].shape == (3, 16, 16) and ds[0][0].dtype == torch.uint8


def test_webdataset_package_reads_every_sample_back(inputs):
    import webdataset as wds

    data = export(inputs, "wds", format="webdataset", shard_images=20)
    images, labels, rows = trained_pixels(inputs, data)
    info = dq_export.read_export_info(data / "export")
    assert info["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    urls = [str(data / "export" / shard) for shard in info["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "cls", "json"))
    assert [int(key) for key, *_ in samples] == rows.tolist()
    for k, (_, image, cls, meta) in enumerate(samples):
        np.testing.assert_array_equal(image, images[k])
        assert cls == labels[k] == meta["label"] and meta["class"] == f"c{labels[k]}" and meta["row"] == rows[k]
        assert len(meta["filled_patches"]) == 4 and meta["num_patches"] == 16  # 4 of 16 patches dropped
    assert info["splits"]["test"]["shards"] == ["test-000000.tar", "test-000001.tar"]
    test = list(wds.WebDataset([str(data / "export" / s) for s in info["splits"]["test"]["shards"]],
                               shardshuffle=False).decode("rgb8").to_tuple("png", "cls"))
    np.testing.assert_array_equal(np.stack([t[0] for t in test]), read_images(data / "prepared" / "test"))


def test_equal_inputs_give_byte_identical_exports_and_skip_leaves_the_test_split_out(inputs):
    first = digest(export(inputs, "wds", format="webdataset", shard_images=20) / "export")
    again = digest(export(inputs, "wds-again", format="webdataset", shard_images=20) / "export")
    assert first == again
    assert digest(export(inputs, "folder") / "export") == digest(export(inputs, "folder-again") / "export")
    skipped = export(inputs, "skip", test="skip")
    assert not (skipped / "export" / "test").exists()
    assert dq_export.read_export_info(skipped / "export")["splits"]["test"] is None


def test_a_class_name_that_is_not_a_safe_folder_name_is_percent_encoded():
    from urllib.parse import unquote

    names = ["T-shirt/top", "a:b", "..", "ok (x)", "café"]
    folders = dq_export.class_folders(names)
    assert folders == ["000_T-shirt%2Ftop", "001_a%3Ab", "002_..", "003_ok (x)", "004_caf%C3%A9"]
    assert [unquote(f.split("_", 1)[1]) for f in folders] == names
    assert dq_export.class_folders([str(i) for i in range(1500)])[7] == "0007_7"  # wide enough to sort


def test_an_mae_for_another_grid_is_refused_naming_both_files(inputs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for part in ("prepared", "compact"):
        (data / part).symlink_to(inputs / "data" / part, target_is_directory=True)
    (data / "mae").mkdir()
    coarse = dq_mae.create_mae("mae_vit_micro_patch4", img_size=16, patch_size=8)  # 8-px patches: 2 stored ones
    torch.save(dq_mae.checkpoint_dict(coarse, "mae_vit_micro_patch4"), data / "mae" / "model.pt")
    params = write_params(tmp_path / "params.yaml", input="compact")
    with pytest.raises(DQError) as info:
        export_stage.main(["--params", str(params), "--data", str(data)])
    message = str(info.value)
    assert "\n" not in message and str(data / "compact" / "dataset.h5") in message
    assert str(data / "mae" / "model.pt") in message and "do not fit" in message
    assert not (data / "export").exists() and not (data / "fill").exists()


def test_an_export_killed_half_way_leaves_no_partial_folder_and_the_rerun_finishes(inputs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for part in ("prepared", "compact", "mae"):
        (data / part).symlink_to(inputs / "data" / part, target_is_directory=True)
    params = write_params(tmp_path / "params.yaml", input="compact")
    slow = ("import sys, time; from dq.export import writer as export; real = export._tar_add\n"
            "def slow(*a):\n    time.sleep(0.05); return real(*a)\n"
            "export._tar_add = slow\nsys.argv = ['stages.export'] + sys.argv[1:]\n"
            "import runpy; runpy.run_module('stages.export', run_name='__main__')\n")
    raw = yaml.safe_load(params.read_text())
    raw["export"] = {"format": "webdataset", "shard_images": 8}
    params.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", slow, "--params", str(params), "--data", str(data)], cwd=REPO,
                            env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(data.glob(".export.tmp-*/train-000001.tar")):  # killed while writing the second shard
        assert proc.poll() is None and time.time() < deadline, "the export ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (data / "export").exists()  # a half-written export never sits where a finished one would
    export_stage.main(["--params", str(params), "--data", str(data)])
    assert dq_export.read_export_info(data / "export")["splits"]["train"]["shards"][-1] == "train-000005.tar"
    assert not [p for p in data.iterdir() if p.name.startswith(".export")]  # the killed run's temporary is gone
