"""Soft labels: the top-k quantised store (format version 3), the distillation loss, train, teacher and export."""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dq.compact.reader import read_compact, validate

from dq.compact.schema import Header

from dq.compact.writer import KeptImages, write_compact
from dq.core.errors import DQError
from dq.labels.soft import SoftLabels, SoftSpec, dense, distillation_loss, quantise, tempered

pytestmark = pytest.mark.usefixtures("one_thread")

C = 5


def _probs(n=6, views=1, seed=0):
    rng = np.random.default_rng(seed)
    return tempered(rng.normal(size=(n, views, C)) * 3, 1.0)


# --- the loss ------------------------------------------------------------------------------------------


def test_distillation_loss_is_the_textbook_formula():
    """(1 - w) CE(y, softmax(z)) + w T² KL(p ‖ softmax(z/T)), summed over the batch, written out by hand."""
    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    y = torch.tensor([0, 1])
    p = torch.tensor([[0.7, 0.1, 0.2], [0.2, 0.3, 0.5]])
    t, w = 3.0, 0.8
    expected = 0.0
    for i in range(2):
        zi = z[i].tolist()
        ce = -(zi[y[i]] - math.log(sum(math.exp(v) for v in zi)))
        log_q = [v / t - math.log(sum(math.exp(u / t) for u in zi)) for v in zi]
        kl = sum(pj * (math.log(pj) - lq) for pj, lq in zip(p[i].tolist(), log_q))
        expected += (1 - w) * ce + w * t * t * kl
    got = distillation_loss(z, y, p, temperature=t, weight=w)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # weight 0 is the summed cross-entropy; a one-hot target at T = 1 makes the soft term the cross-entropy too
    assert distillation_loss(z, y, p, temperature=t, weight=0.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(z, y, reduction="sum").item(), rel=1e-6)
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    assert distillation_loss(z, y, one_hot, temperature=1.0, weight=1.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(z, y, reduction="sum").item(), rel=1e-6)


# --- quantisation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,bits", [(C, 16), (C, 8), (2, 16), (2, 8)])
def test_quantise_then_dense_gives_back_the_probabilities(k, bits):
    probs = _probs()
    ids, values = quantise(probs, SoftSpec(k=k, bits=bits, temperature=1.0, views=1))
    assert (ids is None) == (k >= C)
    assert values.dtype == (np.float16 if bits == 16 else np.uint8) and values.shape == (6, 1, min(k, C))
    back = dense(ids, values, C)
    assert np.allclose(back.sum(-1), 1.0, atol=1e-6)
    if k >= C:
        assert np.abs(back - probs).max() < (2e-3 if bits == 16 else 1.5 / 255)
        return
    top = np.sort(probs, axis=-1)[..., ::-1][..., :k]
    assert np.array_equal(ids, np.argsort(-probs, axis=-1, kind="stable")[..., :k])
    assert np.abs(np.take_along_axis(back, ids.astype(np.int64), -1) - top).max() < 0.02
    # the mass left over is shared evenly by the classes not kept
    rest = np.ones_like(back, bool)
    np.put_along_axis(rest, ids.astype(np.int64), False, axis=-1)
    others = back[rest].reshape(6, 1, C - k)
    assert np.allclose(others, others[..., :1])


def test_ties_go_to_the_lower_class_id():
    probs = np.array([[[0.3, 0.3, 0.2, 0.2, 0.0]]])
    ids, _ = quantise(probs, SoftSpec(k=3, bits=16, temperature=1.0, views=1))
    assert ids.tolist() == [[[0, 1, 2]]]


def test_targets_pick_the_flipped_view():
    probs = _probs(n=4, views=2)
    ids, values = quantise(probs, SoftSpec(k=C, bits=16, temperature=2.0, views=2))
    soft = SoftLabels(ids, values, C, 2.0)
    got = soft.targets(np.array([0, 3]), torch.tensor([False, True])).numpy()
    assert np.allclose(got[0], dense(None, values[0, 0], C)) and np.allclose(got[1], dense(None, values[3, 1], C))


# --- the store, version 3 ------------------------------------------------------------------------------------


def _header(soft=None, codec="png"):
    return Header(image_size=8, patch_size=4, channels=3, drop=0.25, ratio=0.5, classes=[f"c{i}" for i in range(C)],
                  source="synthetic", codec=codec, soft=soft)


def _write(path, soft_spec=None, probs=None, n=6):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    keep = np.zeros((n, 4), bool)
    keep[:, :3] = True
    labels = np.arange(n) % C
    soft = quantise(probs, soft_spec) if soft_spec is not None else None
    write_compact(path, _header(soft_spec), KeptImages(images, keep, labels, np.arange(n), np.zeros(n, np.int32)),
                  soft=soft)
    return images, soft


@pytest.mark.parametrize("k,bits,views", [(C, 16, 1), (3, 8, 1), (2, 16, 2)])
def test_store_round_trip_with_soft_labels(tmp_path, k, bits, views):
    spec = SoftSpec(k=k, bits=bits, temperature=4.0, views=views)
    probs = _probs(views=views)
    _, (ids, values) = _write(tmp_path / "c.h5", spec, probs)
    header = validate(tmp_path / "c.h5")
    assert header.version == 3 and header.soft == spec
    compact = read_compact(tmp_path / "c.h5")
    assert np.array_equal(compact.soft.values, values)
    assert (compact.soft.ids is None and ids is None) or np.array_equal(compact.soft.ids, ids)
    assert compact.soft.temperature == 4.0
    with h5py.File(tmp_path / "c.h5") as f:
        assert ("soft_ids" in f) == (k < C)
        assert f.attrs["soft_k"] == k and f.attrs["soft_views"] == views


def test_a_store_without_soft_labels_stays_version_2(tmp_path):
    _write(tmp_path / "c.h5")
    assert validate(tmp_path / "c.h5").version == 2 and read_compact(tmp_path / "c.h5").soft is None
    with h5py.File(tmp_path / "c.h5") as f:
        assert "soft_k" not in f.attrs and "soft_probs" not in f


@pytest.mark.parametrize("damage,message", [
    (lambda f: f["soft_ids"].__setitem__((0, 0, 0), C), "soft_ids' holds class 5; expected ids below 5"),
    (lambda f: f.attrs.__setitem__("soft_bits", 4), "soft_bits = 4; expected 16 or 8"),
    (lambda f: f["soft_probs"].__setitem__((0, 0, 0), 1.5), "soft_probs' holds values outside [0, 1]"),
    (lambda f: f.attrs.__delitem__("soft_views"), "missing root attribute 'soft_views'"),
])
def test_damaged_soft_labels_are_one_line_errors(tmp_path, damage, message):
    _write(tmp_path / "c.h5", SoftSpec(k=3, bits=16, temperature=4.0, views=1), _probs())
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        damage(f)
    with pytest.raises(DQError) as err:
        validate(tmp_path / "c.h5")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_writer_refuses_soft_labels_of_the_wrong_shape(tmp_path):
    spec = SoftSpec(k=3, bits=16, temperature=4.0, views=1)
    with pytest.raises(ValueError, match="soft_probs"):
        write_compact(tmp_path / "c.h5", _header(spec),
                      KeptImages(np.zeros((2, 8, 8, 3), np.uint8), np.tile([True, True, True, False], (2, 1)),
                                 np.zeros(2, np.int64), np.arange(2), np.zeros(2, np.int32)),
                      soft=quantise(_probs(n=3), spec))
    assert not (tmp_path / "c.h5").exists()


# --- train ------------------------------------------------------------------------------------------------------


def _training_set(soft=None, n=32):
    from dq.train.data import TrainingSet

    rng = np.random.default_rng(0)
    labels = np.arange(n) % C
    images = rng.integers(0, 60, (n, 16, 16, 3), dtype=np.uint8)
    images[np.arange(n), :, :, labels % 3] += 150  # learnable
    return TrainingSet(images, labels, [f"c{i}" for i in range(C)], "compact", kept_pixels=n * 256,
                       stored_bytes=1, soft=soft)


def _train(train_set, **overrides):
    from dq.params import TrainParams
    from dq.train.data import LabelledImages
    from dq.train.loop import TrainHooks, train_classifier

    config = TrainParams(model="smallnet", steps=6, batch_size=8, **overrides)
    test = LabelledImages(train_set.images, train_set.labels, train_set.classes)
    return train_classifier(train_set, test, config, seed=0, device="cpu", hooks=TrainHooks(progress=False))


def test_without_soft_labels_training_ignores_the_distillation_params():
    """A store of hard labels trains exactly as before: the distillation weight changes no byte."""
    a, b = _train(_training_set(), distill_weight=0.9), _train(_training_set(), distill_weight=0.3)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.history == b.history


def test_soft_labels_change_training_and_weight_zero_is_the_hard_loss():
    n = 32
    labels = np.arange(n) % C
    probs = tempered(np.random.default_rng(3).normal(size=(n, 1, C)) * 2, 4.0)
    soft = SoftLabels(*quantise(probs, SoftSpec(k=C, bits=16, temperature=4.0, views=1)), C, 4.0)
    hard = _train(_training_set())
    distilled = _train(_training_set(soft))
    assert distilled.history[-1]["train_loss"] != hard.history[-1]["train_loss"]
    zero = _train(_training_set(soft), distill_weight=0.0)
    for x, y in zip(zero.model.state_dict().values(), hard.model.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-4)
    assert labels.size == n


# --- export -----------------------------------------------------------------------------------------------------


def test_soft_labels_rows_follow_imagefolder_order(tmp_path):
    from dq.export.writer import Split, class_folders, write_soft_labels

    labels = np.array([2, 0, 2, 1])
    rows = np.array([7, 3, 1, 9])
    soft = np.eye(C, dtype=np.float32)[[2, 0, 2, 1]][:, None, :] * 0.5 + 0.1
    soft[:, 0, 4] = rows / 100  # tell the rows apart
    split = Split("train", None, labels, rows, soft=soft)
    folders = class_folders([f"c{i}" for i in range(C)])
    record = write_soft_labels(tmp_path, split, folders)
    listed = (tmp_path / "soft_labels.txt").read_text().splitlines()
    assert listed == sorted(listed)  # ImageFolder sorts class folders, then files
    saved = np.load(tmp_path / "soft_labels.npy")
    assert saved.dtype == np.float32 and saved.shape == (4, C)
    for line, row in zip(listed, saved):
        assert row[4] == pytest.approx(int(line.rsplit("/", 1)[1][:-4]) / 100)
    assert record == {"files": ["soft_labels.npy"], "list": "soft_labels.txt"}
    assert json.dumps(record)


# --- params and the stages end to end -------------------------------------------------------------------------


def test_a_checkpoint_teacher_needs_its_path():
    from dq.params import ParamError, params_from_dict

    with pytest.raises(ParamError, match=r"teacher.checkpoint = None is not allowed; expected the path of a model.pt"):
        params_from_dict({"teacher": {"kind": "checkpoint"}})


@pytest.fixture(scope="module")
def soft_run(tiny_run, tmp_path_factory):
    """The tiny run's outputs, then compress, train and export again with soft labels in the store."""
    import shutil

    import yaml

    from stages import compress, export, train

    root = tmp_path_factory.mktemp("soft")
    data = root / "data"
    shutil.copytree(tiny_run / "data", data, symlinks=False)
    params = yaml.safe_load((tiny_run / "params.yaml").read_text())
    params["labels"] = {"soft": True, "k": 3, "bits": 8, "temperature": 2.0, "views": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(root / "params.yaml"), "--data", str(data)]
    for stage in (compress, train, export):
        stage.main(argv)
    return root, data, params


def test_the_teacher_stage_labels_every_training_image(tiny_run):
    from dq.data.prepared import open_store
    from dq.labels.teacher import read_teacher_logits

    data = tiny_run / "data"
    store = open_store(data / "prepared" / "train")
    teacher = read_teacher_logits(data / "teacher" / "logits.h5", expected_rows=len(store), classes=store.classes)
    assert teacher.kind == "trained" and teacher.views == 2 and teacher.num_images == len(store)
    metrics = json.loads((data / "teacher_metrics.json").read_text())
    assert 0 <= metrics["test_top1"] <= 1 and 0 <= metrics["train_agreement"] <= 1
    assert (data / "teacher" / "model.pt").is_file()
    # the default params store soft labels: a version 3 store with the default top 10 at 8 bits
    header = validate(data / "compact" / "dataset.h5")
    assert header.version == 3 and header.soft == SoftSpec(k=10, bits=8, temperature=4.0, views=1)


def test_compress_stores_the_teachers_labels_of_the_selected_images(soft_run):
    from dq.data.prepared import open_store
    from dq.labels.teacher import read_teacher_logits

    _, data, _ = soft_run
    compact = read_compact(data / "compact" / "dataset.h5")
    spec = SoftSpec(k=3, bits=8, temperature=2.0, views=2)
    assert compact.header.version == 3 and compact.header.soft == spec
    store = open_store(data / "prepared" / "train")
    teacher = read_teacher_logits(data / "teacher" / "logits.h5", expected_rows=len(store), classes=store.classes)
    ids, values = quantise(tempered(teacher.read(compact.indices, 2), 2.0), spec)
    assert np.array_equal(compact.soft.ids, ids) and np.array_equal(compact.soft.values, values)
    metrics = json.loads((data / "compact_metrics.json").read_text())
    assert 0 < metrics["soft_label_bytes"] < metrics["compact_bytes"]


def test_train_distils_from_the_store_and_export_carries_the_labels(soft_run):
    from torchvision.datasets import ImageFolder

    from dq.mae.rebuilt import rebuilt_dataset

    _, data, _ = soft_run
    assert json.loads((data / "train_metrics.json").read_text())["soft_labels"] is True
    export = data / "export"
    info = json.loads((export / "dataset.json").read_text())
    assert info["soft_labels"]["files"] == ["soft_labels.npy", "soft_labels_flip.npy"]
    saved = np.load(export / "soft_labels.npy")
    folder = ImageFolder(export / "train")
    listed = (export / "soft_labels.txt").read_text().splitlines()
    assert [str(Path(path).relative_to(export)) for path, _ in folder.samples] == listed
    dataset = rebuilt_dataset(data / "compact" / "dataset.h5", data / "mae" / "model.pt", soft_labels=True)
    by_row = {int(r): i for i, r in enumerate(dataset.indices)}
    for line, row in zip(listed, saved):
        image, label, soft = dataset[by_row[int(line.rsplit("/", 1)[1][:-4])]]
        assert np.allclose(soft.numpy(), row) and abs(float(soft.sum()) - 1) < 1e-5
    assert saved.shape == (len(dataset), len(dataset.classes))


def test_webdataset_samples_carry_their_soft_labels(tmp_path):
    import io
    import tarfile

    from dq.export.writer import Split, write_webdataset
    from dq.data.rows import as_rows

    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    soft = np.random.default_rng(1).random((3, 2, C)).astype(np.float32)
    split = Split("train", as_rows(images), np.array([0, 1, 2]), np.array([5, 6, 9]), soft=soft)
    where = write_webdataset(tmp_path, split, [f"c{i}" for i in range(C)], shard_images=10, num_workers=0)
    with tarfile.open(tmp_path / where["shards"][0]) as tar:
        names = tar.getnames()
        assert names[:5] == ["00000005.png", "00000005.cls", "00000005.json", "00000005.soft", "00000005.soft_flip"]
        got = np.load(io.BytesIO(tar.extractfile("00000009.soft_flip").read()))
    assert got.dtype == np.float32 and np.array_equal(got, soft[2, 1])
