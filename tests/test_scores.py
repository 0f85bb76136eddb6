"""The scores stage (stages/scores.py): training dynamics (dq.scores.dynamics) and feature-only scores (dq.scores.file)
on a tiny set, their file, and AUM finding deliberately mislabelled samples."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from dq.core.errors import DQError
from dq.params import ScoresParams, params_from_dict
from dq.data.prepared import Prepared
from dq.data.prepared_writer import write_prepared
from tests.pipeline_repo import tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")


def _easy_images(n: int, seed: int = 0):
    """Two trivially separable classes of 16 px images: dark (0) and bright (1), with a little noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = (rng.integers(0, 40, (n, 16, 16, 3)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    return images, labels.astype(np.int64)


def _write_inputs(tmp_path, flipped=()):
    from dq.features.file import Features, write_features

    images, labels = _easy_images(64)
    labels[list(flipped)] = 1 - labels[list(flipped)]
    write_prepared(tmp_path / "prepared" / "train", Prepared(images, labels, ["dark", "bright"], "synthetic"))
    rng = np.random.default_rng(1)
    embedding = (rng.normal(size=(64, 6)) + 3 * labels[:, None]).astype(np.float32)
    write_features(tmp_path / "features" / "train.h5", Features(
        embedding=embedding, logit_grad=None, probe_weight=np.zeros((2, 6), np.float32),
        probe_bias=np.zeros(2, np.float32), kind="embedding", backbone="efficientnet_lite0", weights="none",
        input_size=32, classes=["dark", "bright"], probe_train_accuracy=1.0))
    params = tiny_params({"scores": {"dynamics": "runs", "seeds": 2, "steps": 24, "batch_size": 16, "el2n_step": 4,
                                     "k": 3}, "runtime": {"threads": 1}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path, labels, embedding


def test_stage_writes_finite_scores_of_the_right_shape(tmp_path):
    from dq.scores.file import NAMES, read_scores
    from stages.scores import main

    params, labels, _ = _write_inputs(tmp_path)
    main(["--params", str(params), "--data", str(tmp_path)])
    scores = read_scores(tmp_path / "scores" / "scores.h5", labels)
    assert set(scores.values) == set(NAMES) and len(scores) == 64
    for name in NAMES:
        assert scores[name].shape == (64,) and np.isfinite(scores[name]).all(), name
    assert (scores["el2n"] >= 0).all() and (scores["el2n"] <= math.sqrt(2)).all()
    assert (scores["forgetting"] >= 0).all()
    assert scores.params == {"scores": {"dynamics": "runs", "model": "smallnet", "seeds": 2, "steps": 24, "batch_size": 16, "lr": 0.2,
                                        "el2n_step": 4, "k": 3}}
    metrics = json.loads((tmp_path / "scores_metrics.json").read_text())
    assert metrics["images"] == 64 and "seconds" not in metrics  # no timings: reruns give the same bytes
    first = (tmp_path / "scores" / "scores.h5").read_bytes()
    main(["--params", str(params), "--data", str(tmp_path)])  # same params: same bytes
    assert (tmp_path / "scores" / "scores.h5").read_bytes() == first
    with pytest.raises(DQError, match="labels are not the prepared training set's"):
        read_scores(tmp_path / "scores" / "scores.h5", labels[::-1].copy())


def test_by_default_the_scores_are_the_teachers_recorded_dynamics(tiny_run):
    """scores.dynamics: teacher: the teacher stage recorded AUM, EL2N and forgetting while it trained, and the
    scores stage took them as they were (nothing trained twice)."""
    from dq.scores.file import DYNAMICS_SCORES, read_scores

    data = tiny_run / "data"
    recorded = read_scores(data / "teacher" / "dynamics.h5")
    scores = read_scores(data / "scores" / "scores.h5", recorded.labels)
    assert set(recorded.values) == set(DYNAMICS_SCORES) and recorded.params["teacher"]["kind"] == "trained"
    for name in DYNAMICS_SCORES:
        assert np.array_equal(scores[name], recorded[name]), name
    assert json.loads((data / "scores_metrics.json").read_text())["dynamics"] == "teacher"


def test_teacher_dynamics_need_a_trained_teacher(tmp_path):
    with pytest.raises(DQError, match=r"^params: scores.dynamics = 'teacher' is not allowed; expected runs while "
                                      r"teacher.kind is 'probe'"):
        params_from_dict(tiny_params({"teacher": {"kind": "probe"}}))
    params_from_dict(tiny_params({"teacher": {"kind": "probe"}, "scores": {"dynamics": "runs"}}))
    path, _, _ = _write_inputs(tmp_path)
    params = yaml.safe_load(path.read_text())
    params["scores"]["dynamics"] = "teacher"
    path.write_text(yaml.safe_dump(params))
    from stages.scores import main

    with pytest.raises(DQError, match=r"teacher/dynamics.h5: not found; scores.dynamics: teacher reads"):
        main(["--params", str(path), "--data", str(tmp_path)])


def test_aum_is_lower_for_mislabelled_samples(tmp_path):
    """Pleiss et al.'s point: a sample whose label contradicts its image keeps a low (negative) margin."""
    from dq.scores.dynamics import training_dynamics

    images, labels = _easy_images(64)
    flipped = np.array([3, 10, 17, 40])
    labels[flipped] = 1 - labels[flipped]
    config = ScoresParams(seeds=1, steps=24, batch_size=16, el2n_step=8)
    values, _ = training_dynamics(images, labels, 2, config, device="cpu", progress=False)
    clean = np.setdiff1d(np.arange(64), flipped)
    assert values["aum"][flipped].max() < values["aum"][clean].mean()
    assert values["el2n"][flipped].mean() > values["el2n"][clean].mean()


def test_feature_scores_equal_plain_references():
    from dq.scores.file import knn_density, median_distance

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], [9, 12])
    x = rng.normal(size=(21, 4))
    med, dens = median_distance(x, labels), knn_density(x, labels, 3)
    for i in range(21):
        members = [j for j in range(21) if labels[j] == labels[i]]
        centre = [float(np.median([x[j][d] for j in members])) for d in range(4)]
        assert med[i] == pytest.approx(math.dist(x[i], centre), rel=1e-12)
        unit = {j: x[j] / math.sqrt(sum(v * v for v in x[j])) for j in members}
        near = sorted(math.dist(unit[i], unit[j]) for j in members if j != i)[:3]
        assert dens[i] == pytest.approx(sum(math.exp(-d) for d in near) / 3, rel=1e-9)


def test_too_few_steps_and_bad_params_are_refused_in_one_line():
    from dq.scores.dynamics import training_dynamics

    images, labels = _easy_images(64)
    with pytest.raises(DQError, match=r"^scores.steps = 2 is less than one epoch \(4 steps of 16 over 64 images\)"):
        training_dynamics(images, labels, 2, ScoresParams(steps=2, batch_size=16, el2n_step=1), device="cpu")
    for key, value, expected in (("el2n_step", 900, r"an integer in \[1, scores.steps\] \(scores.steps = \d+\)"),
                                 ("seeds", 0, "a positive integer"), ("lr", -1.0, "a finite number > 0"),
                                 ("model", "nonet", "smallnet or a timm model name")):
        with pytest.raises(DQError, match=rf"^params: scores.{key} = {value!r} is not allowed; expected {expected}"):
            params_from_dict(tiny_params({"scores": {key: value}})).check_model_names("params")
