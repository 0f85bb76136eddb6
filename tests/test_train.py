"""Classifier training: it learns, reports the final epoch, is deterministic, resumes exactly, and the
compact input reconstructs dropped patches once with the MAE while keeping stored pixels exact."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dq.compact import reader as compact_reader
from dq.data.rows import ArrayRows
from dq.mae import model as dq_mae
from dq.mae import rebuilt, reconstruct
from dq.train import data as train_data
from dq.train.classifier import create_classifier, read_classifier, save_classifier
from dq.train.data import (augment, channel_stats, compact_training_set, forward_batch, full_training_set,
                           normalisation, split_images, to_input, training_set)
from dq.train.evaluate import evaluate
from dq.train.loop import TrainHooks, TrainResult, _batch_loss, run_fingerprint, train_classifier, train_metrics
from dq.train.schedule import (WeightAverage, classifier_epoch_generator, epoch_batches, learning_rate_factor,
                               optimizer_and_schedule, scheduled_batches, training_schedule)
from dq.core.errors import DQError
from dq.compact.schema import Header
from dq.compact.writer import KeptImages, write_compact
from dq.data.prepared import Prepared, read_prepared
from dq.data.prepared_writer import write_prepared
from dq.params import TrainParams
from stages import train as train_stage

SIZE = 16
COLOURS = np.array([[230, 40, 40], [40, 200, 40], [40, 60, 230], [220, 220, 40]], dtype=np.float64)
TINY = TrainParams(model="test_resnet", input="full", epochs=4, steps=None, batch_size=16, lr=0.05, momentum=0.9,
                   nesterov=False, weight_decay=5.0e-4, schedule="cosine", warmup=0.0, label_smoothing=0.0,
                   tta="none", crop_padding=2, hflip=True, resume=False)


def blobs(n: int, seed: int, size: int = SIZE) -> Prepared:
    """4 classes: a disc of the class's colour at a random place on a noisy grey background."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < (size * 0.25) ** 2
        img = rng.normal(110, 25, (size, size, 3))
        img[disc] = COLOURS[label] + rng.normal(0, 15, 3)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return Prepared(images, labels.astype(np.int64), [f"c{k}" for k in range(4)], "synthetic")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[Prepared, Prepared]:
    return blobs(96, seed=1), blobs(40, seed=2)


def fit(train: Prepared, test: Prepared, config: TrainParams = TINY, **hooks) -> TrainResult:
    return train_classifier(full_training_set(train), test, config, seed=0, device=torch.device("cpu"),
                            hooks=TrainHooks(progress=False, **hooks))


@pytest.fixture(scope="module")
def baseline(data) -> TrainResult:
    """One uninterrupted run of TINY, shared by the tests that compare against it."""
    return fit(*data)


def state_bytes(result, tmp_path: Path, name: str) -> bytes:
    path = tmp_path / name
    save_classifier(path, result, TINY, ["c0", "c1", "c2", "c3"], SIZE)
    return path.read_bytes()


# --- model ---------------------------------------------------------------------------------------------


def test_resnets_on_small_images_get_the_cifar_stem():
    small = create_classifier("test_resnet", 4, 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    large = create_classifier("test_resnet", 4, 128)
    assert not isinstance(large.maxpool, torch.nn.Identity)


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(DQError, match="train.model"):
        create_classifier("no_such_model_xyz", 4, 32)


def test_augment_keeps_pixels_and_is_seeded():
    images = torch.from_numpy(blobs(8, seed=3).images)
    a = augment(images, torch.Generator().manual_seed(5), 2, True)
    b = augment(images, torch.Generator().manual_seed(5), 2, True)
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    # no padding and no flip: the identity
    assert torch.equal(augment(images, torch.Generator().manual_seed(5), 0, False), images)
    # a flip only mirrors: every image is itself or its mirror
    flipped = augment(images, torch.Generator().manual_seed(1), 0, True)
    for x, y in zip(images, flipped):
        assert torch.equal(x, y) or torch.equal(x.flip(1), y)


# --- training ------------------------------------------------------------------------------------------


def test_learns_and_reports_the_final_epoch(data, baseline):
    train, test = data
    result = baseline
    assert len(result.history) == TINY.epochs
    assert result.final.top1 > 0.7  # chance is 0.25
    assert result.final.top1 == result.history[-1]["test_acc"]
    again = evaluate(result.model, test, result.mean, result.std, torch.device("cpu"))
    assert again.top1 == pytest.approx(result.final.top1)
    metrics = train_metrics(result, full_training_set(train), TINY, train.images.nbytes)
    assert metrics["top1"] == result.history[-1]["test_acc"]
    assert metrics["best_epoch_test_acc_do_not_use_for_selection"] == max(r["test_acc"] for r in result.history)
    assert set(metrics["per_class_acc"]) == {"c0", "c1", "c2", "c3"}
    assert result.final.confusion.sum() == len(test.labels)


def test_classifier_file_reads_back_to_the_same_predictions(data, baseline, tmp_path):
    """dq.train.classifier owns model.pt: what save_classifier writes, read_classifier rebuilds and validates."""
    _, test = data
    path = tmp_path / "model.pt"
    save_classifier(path, baseline, TINY, ["c0", "c1", "c2", "c3"], SIZE)
    back = read_classifier(path)
    assert back.classes == ["c0", "c1", "c2", "c3"] and back.image_size == SIZE and not back.model.training
    again = evaluate(back.model, test, back.mean, back.std, torch.device("cpu"))
    assert again.top1 == baseline.final.top1 and np.array_equal(again.confusion, baseline.final.confusion)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DQError, match="model.pt: not a readable classifier file"):
        read_classifier(path)
    torch.save({"model": {}}, path)
    with pytest.raises(DQError, match="model.pt: missing 'arch'"):
        read_classifier(path)
    with pytest.raises(DQError, match="classifier file not found"):
        read_classifier(tmp_path / "none.pt")


def test_two_runs_are_identical_and_resume_matches_an_uninterrupted_run(data, baseline, tmp_path):
    train, test = data
    config = TINY
    first = baseline
    second = fit(train, test, config)
    assert first.history == second.history
    assert state_bytes(first, tmp_path, "a.pt") == state_bytes(second, tmp_path, "b.pt")

    ckpt = tmp_path / "ckpt" / "last.pt"

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(train, test, config, checkpoint=ckpt, on_epoch=stop_after_two)
    seen = []
    resumed = fit(train, test, dataclasses.replace(config, resume=True), checkpoint=ckpt, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2, 3, 4]  # the logger sees the replayed epochs too
    assert resumed.history == first.history
    assert state_bytes(resumed, tmp_path, "c.pt") == state_bytes(first, tmp_path, "a.pt")


# 96 images in batches of 16: 6 steps an epoch; rounds of 5 steps end inside epochs 0 and 1
STEPS = dataclasses.replace(TINY, steps=13, eval_every=5)


def test_a_step_budget_takes_its_steps_whatever_the_set_size(data):
    import math

    for n, per_epoch in ((96, 6), (40, 3), (2, 1)):
        schedule = training_schedule(n, STEPS)
        assert (schedule.steps_per_epoch, schedule.total, schedule.rounds) == (per_epoch, 13, 3)
        assert [schedule.round_end(r) for r in range(3)] == [5, 10, 13]
    assert training_schedule(96, TINY).total == TINY.epochs * 6  # the epoch budget, unchanged
    assert training_schedule(96, dataclasses.replace(TINY, steps=95)).round_steps == 10  # a tenth
    train, test = data
    result = fit(train, test, STEPS)
    assert [r["step"] for r in result.history] == [5, 10, 13]
    assert [r["epoch"] for r in result.history] == [0.8333, 1.6667, 2.1667]
    # the cosine schedule spans the 13 steps: the lr at each round's start
    assert [r["lr"] for r in result.history] == pytest.approx([0.025 * (1 + math.cos(math.pi * s / 13))
                                                               for s in (0, 5, 10)])
    metrics = train_metrics(result, full_training_set(train), STEPS, train.images.nbytes)
    assert (metrics["budget"], metrics["steps"], metrics["epochs"]) == ("steps", 13, 2.1667)
    baseline_metrics = train_metrics(fit(train, test, dataclasses.replace(TINY, epochs=1)),
                                     full_training_set(train), TINY, train.images.nbytes)
    assert (baseline_metrics["budget"], baseline_metrics["steps"], baseline_metrics["epochs"]) == ("epochs", 6, 1)


def test_the_step_stream_is_the_epoch_stream_cut_anywhere():
    """Steps [a, b) of a step budget are the epochs' own batches and draws, wherever a and b fall."""
    n = 40  # 3 steps an epoch: 16, 16 and the last 8
    schedule = training_schedule(n, STEPS)
    epochs = [b for e in range(5) for b in epoch_batches(n, STEPS, classifier_epoch_generator(0, e))]
    cuts = [0, 1, 4, 5, 9, 13]
    pieces = [b for a, z in zip(cuts, cuts[1:]) for b in scheduled_batches(schedule, n, STEPS, 0, a, z)]
    assert len(pieces) == 13
    for (rows, draws), (rows_e, draws_e) in zip(pieces, epochs):
        assert torch.equal(rows, rows_e) and all(torch.equal(d, e) for d, e in zip(draws, draws_e))
    assert sorted(torch.cat([r for r, _ in pieces[:3]]).tolist()) == list(range(n))  # an epoch sees every image


def test_a_step_budget_resumed_inside_an_epoch_matches_the_uninterrupted_run(data, tmp_path):
    train, test = data
    first = fit(train, test, STEPS)
    ckpt = tmp_path / "ckpt" / "last.pt"

    def stop_after_one(record):
        if record["step"] == 5:  # 5 of epoch 0's 6 steps
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(train, test, STEPS, checkpoint=ckpt, on_epoch=stop_after_one)
    resumed = fit(train, test, dataclasses.replace(STEPS, resume=True), checkpoint=ckpt)
    assert resumed.history == first.history
    assert state_bytes(resumed, tmp_path, "r.pt") == state_bytes(first, tmp_path, "f.pt")
    with pytest.raises(DQError, match="other train params"):  # another budget is another run
        fit(train, test, dataclasses.replace(STEPS, steps=14, resume=True), checkpoint=ckpt)


def test_recording_training_dynamics_changes_no_byte_and_resumes(data, tmp_path):
    """The teacher records AUM, EL2N and forgetting inside train's own loop (dq.scores.dynamics): the run is the
    same run, and a run killed and resumed records what the uninterrupted one did."""
    from dq.scores.dynamics import recorder_for

    train, test = data
    plain = fit(train, test, STEPS)

    def recorder():
        return recorder_for(train.images, train.labels, 4, 6, device="cpu")

    whole = recorder()
    recorded = fit(train, test, STEPS, recorder=whole)
    assert recorded.history == plain.history
    assert state_bytes(recorded, tmp_path, "r.pt") == state_bytes(plain, tmp_path, "p.pt")
    scores = whole.scores()
    assert whole.steps == 13 and (whole.seen >= 2).all() and np.isfinite(scores["aum"]).all()
    assert (scores["el2n"] >= 0).all() and (scores["forgetting"] >= 0).all()

    ckpt = tmp_path / "ckpt" / "last.pt"

    def stop_after_one(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(train, test, STEPS, checkpoint=ckpt, on_epoch=stop_after_one, recorder=recorder())
    again = recorder()
    fit(train, test, dataclasses.replace(STEPS, resume=True), checkpoint=ckpt, recorder=again)
    for name, values in scores.items():
        assert np.array_equal(again.scores()[name], values), name
    fit(train, test, STEPS, checkpoint=ckpt)  # a checkpoint that holds no dynamics ...
    with pytest.raises(DQError, match="last.pt: was saved by a run that did not record training dynamics"):
        fit(train, test, dataclasses.replace(STEPS, resume=True), checkpoint=ckpt, recorder=recorder())


def test_a_checkpoint_from_other_params_or_unreadable_is_refused(data, tmp_path):
    train, test = data
    ckpt = tmp_path / "last.pt"
    fit(train, test, dataclasses.replace(TINY, epochs=1), checkpoint=ckpt)
    saved = ckpt.read_bytes()
    with pytest.raises(DQError, match=r"last.pt: was saved with other train params, seed or training data; "
                                      r"delete it or set train.resume: false"):
        fit(train, test, dataclasses.replace(TINY, epochs=1, lr=0.01, resume=True), checkpoint=ckpt)
    assert ckpt.read_bytes() == saved  # refused, not overwritten
    ckpt.write_bytes(saved[:100])
    with pytest.raises(DQError, match="last.pt: not a readable classifier training state; delete it or set "
                                      "train.resume: false"):
        fit(train, test, dataclasses.replace(TINY, epochs=1, resume=True), checkpoint=ckpt)
    # without `resume` the file is neither read nor a reason to stop
    result = fit(train, test, dataclasses.replace(TINY, epochs=1, lr=0.01), checkpoint=ckpt)
    assert [r["epoch"] for r in result.history] == [1] and result.history[0]["lr"] == 0.01


# --- the stage and the compact input -------------------------------------------------------------------


def write_params(path: Path, **train) -> Path:
    raw = {"seed": 0, "data": {"image_size": SIZE}, "patches": {"patch_size": 4},
           "train": {**{k: v for k, v in dataclasses.asdict(TINY).items()}, **train},
           "runtime": {"device": "cpu", "threads": 1}}
    path.write_text(yaml.safe_dump(raw))
    return path


def make_pipeline_inputs(root: Path, data: tuple[Prepared, Prepared], shard_images: int = 10000) -> np.ndarray:
    """prepared/, compact/dataset.h5 (every 2nd image, a quarter of patches dropped), mae/model.pt."""
    train, test = data
    write_prepared(root / "prepared" / "train", train, shard_images=shard_images)
    write_prepared(root / "prepared" / "test", test, shard_images=shard_images)
    indices = np.arange(0, len(train.labels), 2, dtype=np.int64)
    n, grid = len(indices), SIZE // 4
    rng = np.random.default_rng(0)
    scores = rng.random((n, grid * grid)).astype(np.float32)
    keep = np.zeros((n, grid * grid), dtype=bool)
    np.put_along_axis(keep, np.argsort(-scores, axis=1)[:, :12], True, axis=1)
    header = Header(image_size=SIZE, patch_size=4, channels=3, drop=0.25, ratio=0.5, classes=train.classes,
                    source="synthetic")
    write_compact(root / "compact" / "dataset.h5", header,
                  KeptImages(train.images[indices], keep, train.labels[indices], indices, np.zeros(n, np.int32), scores))
    torch.manual_seed(0)
    mae = dq_mae.create_mae("mae_vit_micro_patch4", img_size=SIZE)
    (root / "mae").mkdir()
    torch.save(dq_mae.checkpoint_dict(mae, "mae_vit_micro_patch4"), root / "mae" / "model.pt")
    return keep


def count_reconstructions(monkeypatch) -> list[int]:
    """Each MAE forward pass of the compact set's reconstruction appends its batch size."""
    calls = []
    real = reconstruct.reconstruct_batch

    def counting(model, images, *args, **kwargs):
        calls.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(reconstruct, "reconstruct_batch", counting)
    return calls


def test_compact_input_is_reconstructed_once_and_keeps_stored_pixels(data, tmp_path, monkeypatch):
    keep = make_pipeline_inputs(tmp_path, data)
    calls = count_reconstructions(monkeypatch)
    train_set = training_set("compact", data[0], tmp_path / "compact" / "dataset.h5",
                             tmp_path / "mae" / "model.pt", device=torch.device("cpu"),
                             rebuilt_cache=tmp_path / "direct_fill")
    assert calls == [len(keep)]  # one batch: every row keeps 12 patches on the MAE's grid too
    original = data[0].images[::2]
    filled = train_set.images.read(np.arange(len(keep)))
    kept_px = np.repeat(np.repeat(keep.reshape(-1, 4, 4), 4, axis=1), 4, axis=2)
    assert np.array_equal(filled[kept_px], original[kept_px])
    assert train_set.kept_pixels == int(keep.sum()) * 16
    assert train_set.stored_bytes == (tmp_path / "compact" / "dataset.h5").stat().st_size

    params = write_params(tmp_path / "params.yaml", input="compact", epochs=1)
    calls.clear()
    train_stage.main(["--params", str(params), "--data", str(tmp_path)])
    assert calls == [len(keep)]  # once per run, not once per epoch
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert metrics["input"] == "compact" and metrics["train_images"] == len(data[0].labels) // 2
    assert metrics["compact_bytes"] == train_set.stored_bytes
    assert metrics["kept_pixels"] == train_set.kept_pixels
    assert np.array_equal(np.load(tmp_path / "fill" / "images.npy"), filled)
    calls.clear()
    train_stage.main(["--params", str(params), "--data", str(tmp_path)])
    assert calls == []  # the next run reads the cache


def test_selected_input_is_the_compact_rows_with_original_pixels(data, tmp_path):
    make_pipeline_inputs(tmp_path, data)
    selected = training_set("selected", data[0], tmp_path / "compact" / "dataset.h5",
                            tmp_path / "mae" / "model.pt", device=torch.device("cpu"))
    assert np.array_equal(selected.images.read(np.arange(len(selected.labels))), data[0].images[::2])
    assert selected.kept_pixels == len(selected.labels) * SIZE * SIZE
    assert selected.stored_bytes == data[0].images[::2].nbytes


def test_stage_outputs_are_byte_identical_across_runs(data, tmp_path):
    make_pipeline_inputs(tmp_path, data)
    params = write_params(tmp_path / "params.yaml", input="full", epochs=2)
    outputs = ["train/model.pt", "train/evaluation.json", "train_metrics.json",
               "train_live/plots/metrics/test/acc.tsv"]
    train_stage.main(["--params", str(params), "--data", str(tmp_path)])
    first = {name: (tmp_path / name).read_bytes() for name in outputs}
    train_stage.main(["--params", str(params), "--data", str(tmp_path)])
    assert {name: (tmp_path / name).read_bytes() for name in outputs} == first
    metrics = json.loads(first["train_metrics.json"])
    for key in ("top1", "per_class_acc", "train_images", "kept_pixels", "compact_bytes", "input", "epochs",
                "model"):
        assert key in metrics
    assert metrics["train_images"] == 96 and metrics["kept_pixels"] == 96 * SIZE * SIZE
    assert metrics["compact_bytes"] == 96 * SIZE * SIZE * 3
    evaluation = json.loads(first["train/evaluation.json"])
    assert np.array(evaluation["confusion"]).sum() == 40
    rows = (tmp_path / "train_live/plots/metrics/test/acc.tsv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + one row per epoch
    assert read_prepared(tmp_path / "prepared" / "test").labels.size == 40


def test_a_compact_file_from_other_prepared_data_is_refused(data, tmp_path):
    make_pipeline_inputs(tmp_path, data)
    train = data[0]
    other = Prepared(train.images, np.roll(train.labels, 1), train.classes, train.source)
    with pytest.raises(DQError, match="do not match the prepared training set"):
        training_set("compact", other, tmp_path / "compact" / "dataset.h5", tmp_path / "mae" / "model.pt",
                     device=torch.device("cpu"), rebuilt_cache=tmp_path / "fill")
    assert not (tmp_path / "fill").exists()  # refused before anything was reconstructed


# --- streaming: no read is larger than a batch, the rebuilt set is cached, results equal the in-memory path


def test_channel_stats_are_exact_whatever_the_batches():
    images = blobs(37, seed=4).images
    mean, std = channel_stats(images)
    assert channel_stats(images, batch_size=5) == (mean, std)
    assert channel_stats(ArrayRows(images[::-1]), batch_size=3) == (mean, std)
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    assert np.allclose(mean, x.mean(axis=0), rtol=1e-12) and np.allclose(std, x.std(axis=0), rtol=1e-12)


def test_no_train_read_is_larger_than_a_batch(tmp_path, monkeypatch):
    """N = 300 training and 100 test images in shards of 40: for every train.input, the largest single
    read of images (prepared stores, compact file, rebuilt cache) is one batch (16 rows), the reconstruction
    included, and nothing builds a whole split in memory."""
    from dq.data import rows as row_sources
    from dq.compact.reader import CompactFile
    from dq.data.prepared import Store

    batch = 16
    make_pipeline_inputs(tmp_path, (blobs(300, seed=1), blobs(100, seed=2)), shard_images=40)
    monkeypatch.setattr(train_data, "EVAL_BATCH_SIZE", batch)
    monkeypatch.setattr(rebuilt, "RECONSTRUCT_BATCH_SIZE", batch)
    largest: dict[str, list[int]] = {}

    def recording(cls, name, what):
        real = getattr(cls, name)

        def wrapper(self, rows, *args, **kwargs):
            largest.setdefault(what, []).append(len(np.asarray(rows).reshape(-1)))
            return real(self, rows, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    recording(Store, "streams", "prepared")
    recording(CompactFile, "read_images", "compact")
    recording(rebuilt.RebuiltRows, "_read_sorted", "rebuilt cache")

    def whole(*args, **kwargs):
        raise AssertionError("the train stage held a whole split")

    monkeypatch.setattr(Store, "read", whole)
    monkeypatch.setattr(row_sources.ArrayRows, "__init__", whole)
    monkeypatch.setattr(compact_reader, "read_compact", whole)
    for kind, readers in (("full", {"prepared"}), ("selected", {"prepared"}),
                          ("compact", {"prepared", "compact", "rebuilt cache"})):
        largest.clear()
        params = write_params(tmp_path / "params.yaml", input=kind, epochs=1, batch_size=batch)
        train_stage.main(["--params", str(params), "--data", str(tmp_path)])
        assert set(largest) == readers, kind  # compact: the test set is still read from its store
        assert max(max(sizes) for sizes in largest.values()) == batch, (kind, largest)
        assert json.loads((tmp_path / "train_metrics.json").read_text())["train_images"] == (
            300 if kind == "full" else 150)


def test_the_rebuilt_cache_is_reused_and_rebuilt_when_its_inputs_change(data, tmp_path, monkeypatch):
    keep = make_pipeline_inputs(tmp_path, data)
    compact, mae_path, cache = tmp_path / "compact" / "dataset.h5", tmp_path / "mae" / "model.pt", tmp_path / "fill"
    calls = count_reconstructions(monkeypatch)

    def rebuilt_images() -> np.ndarray:
        train_set = compact_training_set(compact, mae_path, rebuilt_cache=cache)
        return train_set.images.read(np.arange(len(train_set.labels)))

    first = rebuilt_images()
    key = (cache / "key.json").read_text()
    assert calls == [len(keep)]
    calls.clear()
    assert np.array_equal(rebuilt_images(), first) and calls == []  # reused: the MAE is not called

    # the rebuilt images are the in-memory reconstruction's, bit for bit
    model = dq_mae.load_mae(mae_path)
    stored = np.where(np.repeat(np.repeat(keep.reshape(-1, 4, 4), 4, 1), 4, 2)[..., None], data[0].images[::2], 0)
    assert np.array_equal(reconstruct.reconstruct(model, stored.astype(np.uint8), keep, 4, progress=False), first)
    calls.clear()

    # another MAE: rebuilt again, with other pixels
    torch.manual_seed(1)
    torch.save(dq_mae.checkpoint_dict(dq_mae.create_mae("mae_vit_micro_patch4", img_size=SIZE), "mae_vit_micro_patch4"),
               mae_path)
    other_mae = rebuilt_images()
    assert calls == [len(keep)] and not np.array_equal(other_mae, first)
    assert (cache / "key.json").read_text() != key

    # another compact file (other patches kept): rebuilt again
    calls.clear()
    make_pipeline_inputs(tmp_path / "other", data)
    scores = np.random.default_rng(5).random(keep.shape).astype(np.float32)
    other_keep = np.zeros_like(keep)
    np.put_along_axis(other_keep, np.argsort(-scores, axis=1)[:, :12], True, axis=1)
    header = Header(image_size=SIZE, patch_size=4, channels=3, drop=0.25, ratio=0.5, classes=data[0].classes,
                    source="synthetic")
    rows = np.arange(0, len(data[0].labels), 2)
    write_compact(compact, header, KeptImages(data[0].images[rows], other_keep, data[0].labels[rows], rows,
                                              np.zeros(len(rows), np.int32), scores))
    other_compact = rebuilt_images()
    assert calls == [len(keep)] and not np.array_equal(other_compact, other_mae)

    # a damaged cache is rebuilt, not read
    calls.clear()
    images_npy = cache / "images.npy"
    images_npy.write_bytes(images_npy.read_bytes()[:-10])
    assert np.array_equal(rebuilt_images(), other_compact) and calls == [len(keep)]

    # a reconstruction that fails leaves the last complete cache as it was, and no temporary
    saved = {p.name: p.read_bytes() for p in cache.iterdir()}
    torch.manual_seed(2)
    torch.save(dq_mae.checkpoint_dict(dq_mae.create_mae("mae_vit_micro_patch4", img_size=SIZE), "mae_vit_micro_patch4"),
               mae_path)

    def failing(*args, **kwargs):
        raise DQError("reconstruction failed")

    monkeypatch.setattr(reconstruct, "reconstruct_batch", failing)
    with pytest.raises(DQError, match="reconstruction failed"):
        rebuilt_images()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == saved
    assert not list(tmp_path.glob(".fill.tmp-*"))

    # a damaged MAE file is one line naming it
    mae_path.write_bytes(b"not a model")
    with pytest.raises(DQError, match="model.pt: not a readable"):
        rebuilt_images()


def test_training_streamed_from_the_stores_equals_training_in_memory(data, baseline, tmp_path):
    """The same numbers and model bytes from the prepared stores (shards of 40, with and without
    DataLoader workers) as from arrays in memory; likewise for the selected and compact inputs."""
    from dq.data.prepared import open_store

    make_pipeline_inputs(tmp_path, data, shard_images=40)
    train_store, test = open_store(tmp_path / "prepared" / "train"), open_store(tmp_path / "prepared" / "test")
    streamed_test = split_images(test)
    for workers in (0, 2):
        streamed = train_classifier(full_training_set(train_store), streamed_test, TINY, seed=0,
                                    device=torch.device("cpu"), num_workers=workers, hooks=TrainHooks(progress=False))
        assert streamed.history == baseline.history
        assert state_bytes(streamed, tmp_path, "s.pt") == state_bytes(baseline, tmp_path, "b.pt")

    one = dataclasses.replace(TINY, epochs=1)
    compact, mae_path = tmp_path / "compact" / "dataset.h5", tmp_path / "mae" / "model.pt"
    for kind in ("selected", "compact"):
        from_store = training_set(kind, train_store, compact, mae_path, device=torch.device("cpu"),
                                  rebuilt_cache=tmp_path / "fill")
        in_memory = training_set(kind, data[0], compact, mae_path, device=torch.device("cpu"),
                                 rebuilt_cache=tmp_path / "fill")
        images = in_memory.images.read(np.arange(len(in_memory.labels)))
        in_memory = dataclasses.replace(in_memory, images=images)  # a plain array, as before streaming
        a = train_classifier(from_store, streamed_test, one, seed=0, device=torch.device("cpu"),
                             hooks=TrainHooks(progress=False))
        b = train_classifier(in_memory, data[1], one, seed=0, device=torch.device("cpu"),
                             hooks=TrainHooks(progress=False))
        assert a.history == b.history and a.mean == b.mean and a.std == b.std, kind


def test_forward_batches_on_the_cpu_hold_a_fixed_number_of_pixels():
    """The default's 32-px batches are unchanged; 224-px ones shrink so that host memory stays small."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert forward_batch(train_data.EVAL_BATCH_SIZE, (32, 32, 3), cpu) == train_data.EVAL_BATCH_SIZE
    assert rebuilt.reconstruct_batch_size((32, 32, 3), cpu) == rebuilt.RECONSTRUCT_BATCH_SIZE
    assert rebuilt.reconstruct_batch_size((224, 224, 3), cpu) == 500 * 32 * 32 // (224 * 224)
    assert forward_batch(500, (224, 224, 3), cpu) == 500 * 32 * 32 // (224 * 224)
    assert forward_batch(500, (4096, 4096, 3), cpu) == 1
    assert forward_batch(500, (224, 224, 3), cuda) == 500


def test_the_resume_fingerprint_of_stored_images_decodes_nothing_and_follows_the_shards(tmp_path, monkeypatch):
    """Prepared stores, subsets of them and the rebuilt cache are fingerprinted by identity (the index with its
    shards' SHA-256, the rows, the cache key), not by decoding every image once more; changing one image, the
    rows or the key changes the fingerprint, and equal content gives an equal one."""
    from types import SimpleNamespace

    from dq.data import rows as row_sources
    from dq.data.prepared import Store, open_store

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    write_prepared(tmp_path / "a", Prepared(images, labels, ["x", "y", "z"], "synthetic"), shard_images=8)
    write_prepared(tmp_path / "same", Prepared(images.copy(), labels, ["x", "y", "z"], "synthetic"), shard_images=8)
    images[17, 0, 0, 0] ^= 1
    write_prepared(tmp_path / "b", Prepared(images, labels, ["x", "y", "z"], "synthetic"), shard_images=8)
    monkeypatch.setattr(Store, "decode_row", lambda *a: pytest.fail("the fingerprint decoded an image"))

    def fingerprint(train_rows, test_name="a"):
        test = SimpleNamespace(images=row_sources.StoreRows(open_store(tmp_path / test_name)), labels=labels)
        return run_fingerprint(SimpleNamespace(images=train_rows, labels=np.zeros(len(train_rows), np.int64)),
                               test, TINY, 0)

    def store(name):
        return row_sources.StoreRows(open_store(tmp_path / name))

    assert fingerprint(store("a")) == fingerprint(store("same")) != fingerprint(store("b"))
    assert fingerprint(store("a"), "same") != fingerprint(store("a"), "b")
    assert fingerprint(store("a").subset([1, 2])) != fingerprint(store("a").subset([1, 3]))
    filled = [rebuilt.RebuiltRows(tmp_path / "none.npy", (30, 8, 8, 3), 128, key) for key in ("k1", "k1", "k2")]
    assert fingerprint(filled[0]) == fingerprint(filled[1]) != fingerprint(filled[2])


# --- the recipe: schedule, loss, averaging, test-time flips ------------------------------------------------


def test_learning_rate_schedules_follow_their_formulas():
    import math

    # onecycle over 10 steps, warmup 0.2: 2 steps up (1/2, 2/2), then down from 8/8 to 1/8
    assert [learning_rate_factor(k, 10, "onecycle", 0.2) for k in range(10)] == \
        pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [learning_rate_factor(k, 7, "cosine", 0.0) for k in range(7)] == \
        pytest.approx([0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(7)])


def test_label_smoothing_loss_is_the_textbook_formula():
    """(1 - e) * CE(y) + e * mean_k(-log p_k), in one process and summed over ranks' parts."""
    g = torch.Generator().manual_seed(0)
    logits, y, e = torch.randn(6, 5, generator=g), torch.tensor([0, 4, 2, 2, 1, 3]), 0.2
    logp = torch.log_softmax(logits, 1)
    expected = ((1 - e) * -logp[torch.arange(6), y] + e * -logp.mean(1)).mean()
    loss, summed = _batch_loss(logits, y, 6, 1, e)
    torch.testing.assert_close(loss, expected)
    parts = [_batch_loss(logits[s], y[s], 6, 2, e)[0] for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(sum(parts) / 2, expected)


def test_weight_average_is_the_exponential_moving_average_and_copies_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(net, 0.9)
    before = [p.detach().clone() for p in average.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(3.0)
    average.update()
    for avg, old, new in zip(average.model.parameters(), before, net.parameters()):
        torch.testing.assert_close(avg, 0.9 * old + 0.1 * new)
    assert torch.equal(average.model[1].running_mean, torch.full((2,), 3.0))


def test_weight_decay_spares_biases_and_normalisation():
    net = create_classifier("test_resnet", 4, 32)
    optimizer, _ = optimizer_and_schedule(net, TINY, 10)
    decayed, spared = optimizer.param_groups
    assert decayed["weight_decay"] == TINY.weight_decay and spared["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in spared["params"])


def test_a_step_budget_without_eval_every_scores_the_final_step_only(data):
    train, test = data
    result = fit(train, test, dataclasses.replace(TINY, steps=10, eval_every=None))
    assert [r["step"] for r in result.history] == list(range(1, 11))  # rounds of a tenth, for logs and resume
    assert ["test_acc" in r for r in result.history] == [False] * 9 + [True]
    assert result.history[-1]["test_acc"] == result.final.top1


def test_flip_tta_scores_the_mean_of_both_views(data, baseline):
    train, test = data
    model = baseline.model.eval()
    scored = evaluate(model, test, baseline.mean, baseline.std, "cpu", tta="flip")
    x = to_input(torch.from_numpy(test.images), normalisation(baseline.mean, baseline.std, "cpu"),
                 torch.device("cpu"))
    with torch.inference_mode():
        logits = (model(x) + model(x.flip(3))) / 2
    assert scored.top1 == pytest.approx(float((logits.argmax(1).numpy() == test.labels).mean()))
    assert scored.loss == pytest.approx(float(F.cross_entropy(logits, torch.from_numpy(test.labels))), rel=1e-5)


def _stop_at_step(step: int):
    def stop(record):
        if record["step"] == step:
            raise KeyboardInterrupt
    return stop


def test_a_run_with_weight_averaging_resumes_to_the_uninterrupted_result(data, tmp_path):
    train, test = data
    config = dataclasses.replace(STEPS, ema=0.8, tta="flip", label_smoothing=0.1, nesterov=True,
                                 schedule="onecycle", warmup=0.2)
    whole = fit(train, test, config)
    ckpt = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(train, test, config, checkpoint=ckpt, on_epoch=_stop_at_step(5))
    resumed = fit(train, test, dataclasses.replace(config, resume=True), checkpoint=ckpt)
    assert resumed.history == whole.history
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
