"""GradCAM++ patch scores, the keep rule and the layer rule of dq.patches.cam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dq.patches import cam

from dq.patches import grid

from dq.patches import scorers
from dq.patches.scorers import ProbedModel
from dq.features.backbones import classifier_with_probe, create_backbone
from dq.core.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dq.core.errors import DQError


# ---------------------------------------------------------------------------------------------------
# keep_mask and patch_scores


def test_keep_mask_keeps_the_top_k():
    scores = np.array([[0.1, 0.9, 0.5, 0.8], [0.7, 0.1, 0.2, 0.3]], np.float32)
    keep = scorers.keep_mask(scores, drop=0.5)
    assert keep.tolist() == [[False, True, False, True], [True, False, False, True]]


def test_keep_mask_ties_go_to_the_lower_grid_index():
    scores = np.array([[0.5, 0.2, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [np.nan, 0.0, 0.0, 0.3]], np.float32)
    keep = scorers.keep_mask(scores, drop=0.5)
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False],
                             [False, True, False, True]]  # NaN ranks lowest


@pytest.mark.parametrize("drop, num_patches, kept", [(0.25, 64, 48), (0.3, 16, 11), (0.0, 16, 16),
                                                     (0.125, 4, 4)])  # round(0.5) = 0: half to even
def test_keep_mask_count_is_l_minus_rounded_drop(drop, num_patches, kept):
    scores = np.random.default_rng(0).random((5, num_patches), dtype=np.float32)
    keep = scorers.keep_mask(scores, drop)
    assert (keep.sum(axis=1) == kept).all()
    threshold = np.sort(scores, axis=1)[:, num_patches - kept]
    assert (scores[keep].reshape(5, kept) >= threshold[:, None]).all()


def test_a_drop_that_keeps_no_patch_is_refused_when_params_load():
    from dq.params import ParamError, params_from_dict

    # 16-px images cut into 8-px patches: 4 patches, and drop 0.9 keeps 4 - round(3.6) = 0 of them
    with pytest.raises(ParamError, match="patches.drop = 0.9 is not allowed; expected a share that keeps"):
        params_from_dict({"data": {"image_size": 16}, "patches": {"patch_size": 8, "drop": 0.9}})
    assert grid.drop_problem(0.9, 4) and grid.drop_problem(0.9) is None and grid.drop_problem(0.7, 4) is None


def test_patch_scores_are_patch_means_in_raster_order():
    maps = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    scores = scorers.patch_scores(maps, 2)
    expected = [[np.mean(maps[n, r:r + 2, c:c + 2]) for r in (0, 2) for c in (0, 2)] for n in range(2)]
    assert scores.dtype == np.float32 and scores.shape == (2, 4)
    np.testing.assert_allclose(scores, expected)
    with pytest.raises(DQError, match="patch_size"):
        scorers.patch_scores(maps, 3)


# ---------------------------------------------------------------------------------------------------
# A model with a known map


class Quadrants(nn.Module):
    """Channel c is the image's channel sum, masked to one quadrant: c=0 top-left, c=1 bottom-right."""

    def __init__(self, size: int):
        super().__init__()
        masks = torch.zeros(2, size, size)
        half = size // 2
        masks[0, :half, :half] = 1
        masks[1, half:, half:] = 1
        self.register_buffer("masks", masks[None])

    def forward(self, x):
        return self.masks * x.sum(dim=1, keepdim=True)  # [N, 2, H, W]


class QuadrantNet(nn.Module):
    """logit_c = mean of channel c: each class responds only to its quadrant."""

    def __init__(self, size: int):
        super().__init__()
        self.features = Quadrants(size)
        self.scale = nn.Parameter(torch.ones(()))  # BaseCAM finds the device from a parameter

    def forward(self, x):
        return self.scale * self.features(x).mean(dim=(2, 3))


def hand_gradcam_pp(images: np.ndarray, labels: np.ndarray, size: int) -> np.ndarray:
    """GradCAM++ (Chattopadhay et al., eq. 19) of QuadrantNet, worked out by hand in float64.

    A_c = mask_c * sum_k x_k; d logit_y / d A_c = 1/(HW) where c = y, 0 elsewhere. With g = 1/(HW):
    alpha = g² / (2g² + sum(A_y) g³), w_y = sum_ij relu(g) alpha, cam = relu(w_y A_y), min-max scaled.
    """
    x = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    s = x.sum(axis=3)  # [N, H, W]
    half = size // 2
    maps = np.zeros_like(s)
    g = 1.0 / (size * size)
    for n, y in enumerate(labels):
        a = np.zeros_like(s[n])
        quadrant = (slice(None, half), slice(None, half)) if y == 0 else (slice(half, None), slice(half, None))
        a[quadrant] = s[n][quadrant]
        alpha = g ** 2 / (2 * g ** 2 + a.sum() * g ** 3 + 1e-6)
        weight = size * size * g * alpha
        c = np.maximum(weight * a, 0)
        c = c - c.min()
        maps[n] = c / (1e-7 + c.max())
    return maps


def test_gradcam_matches_a_hand_computed_map_and_keeps_the_true_labels_quadrant():
    size, p = 16, 4
    rng = np.random.default_rng(0)
    images = rng.integers(128, 256, (6, size, size, 3), dtype=np.uint8)  # positive after normalisation
    labels = np.array([0, 1, 0, 1, 1, 0])
    model = QuadrantNet(size)
    maps = cam.attention_maps(ProbedModel(model, model.features, size, batch_size=4, progress=False), images, labels)
    expected = hand_gradcam_pp(images, labels, size)
    assert maps.shape == (6, size, size) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    np.testing.assert_allclose(scorers.patch_scores(maps, p), scorers.patch_scores(expected.astype(np.float32), p),
                               atol=1e-5)

    keep = scorers.keep_mask(scorers.patch_scores(maps, p), drop=0.75).reshape(6, 4, 4)
    top_left, bottom_right = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    top_left[:2, :2] = True
    bottom_right[2:, 2:] = True
    for k, y in zip(keep, labels):
        assert (k == (top_left if y == 0 else bottom_right)).all()


def test_the_label_not_the_prediction_chooses_the_map():
    size = 16
    images = np.full((2, size, size, 3), 200, np.uint8)
    model = QuadrantNet(size)
    maps = cam.attention_maps(ProbedModel(model, model.features, size, 2, progress=False), images, np.array([0, 1]))
    assert maps[0, :8, :8].min() > 0.99 and maps[0, 8:, 8:].max() == 0
    assert maps[1, 8:, 8:].min() > 0.99 and maps[1, :8, :8].max() == 0


def test_maps_are_resized_to_the_stored_image_size():
    model = QuadrantNet(32)  # runs at input_size 32 on 16x16 images: the map comes back 16x16
    images = np.full((1, 16, 16, 3), 200, np.uint8)
    maps = cam.attention_maps(ProbedModel(model, model.features, 32, 1, progress=False), images, np.array([1]))
    assert maps.shape == (1, 16, 16)
    assert maps[0, 8:, 8:].min() > 0.99 and maps[0, :8, :].max() == 0


# ---------------------------------------------------------------------------------------------------
# The layer rule, on a real timm backbone


@pytest.fixture(scope="module")
def resnet():
    return create_backbone("resnet10t", "none")


def test_auto_layer_is_the_deepest_with_a_map_of_at_least_4x4(resnet):
    assert cam.target_layer(resnet, "auto", 32)[0] == "layer2"  # layer3 is 2x2, layer4 1x1
    assert cam.target_layer(resnet, "auto", 64)[0] == "layer3"
    assert cam.target_layer(resnet, "auto", 128)[0] == "layer4"
    assert cam.target_layer(resnet, "auto", 16)[0] == "layer1"
    name, module = cam.target_layer(resnet, "layer1", 32)
    assert module is resnet.layer1


def test_auto_layer_falls_back_to_the_deepest_map_above_1x1():
    # no feature_info: the candidates are the top-level children
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert cam.target_layer(net, "auto", 32)[0] == "1"  # 8x8, then 4x4
    assert cam.target_layer(net, "auto", 8)[0] == "0"  # 2x2, then 1x1: none reaches 4x4
    with pytest.raises(DQError, match="no layer of the backbone has a feature map larger than 1x1"):
        cam.target_layer(net, "auto", 4)


def test_bad_layers_are_one_line_errors(resnet):
    with pytest.raises(DQError, match=r"patches.cam_layer = 'layer4' gives a 1x1 map"):
        cam.target_layer(resnet, "layer4", 32)
    with pytest.raises(DQError, match=r"patches.cam_layer = 'nope' is not a module.*layer2"):
        cam.target_layer(resnet, "nope", 32)


def test_cam_on_a_probed_backbone_is_deterministic(resnet):
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(3, resnet.num_features)).astype(np.float32)
    model = classifier_with_probe(resnet, weight, np.zeros(3, np.float32))
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1])
    _, layer = cam.target_layer(resnet, "auto", 32)
    first = cam.attention_maps(ProbedModel(model, layer, 32, 2, progress=False), images, labels)
    second = cam.attention_maps(ProbedModel(model, layer, 32, 2, progress=False), images, labels)
    whole = cam.attention_maps(ProbedModel(model, layer, 32, 5, progress=False), images, labels)
    assert first.shape == (5, 32, 32) and np.isfinite(first).all()
    assert 0.0 <= first.min() and first.max() <= 1.0 + 1e-6 and first.max() > 0.99
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, whole, atol=1e-4)  # batching changes nothing but float order
    assert all(p.requires_grad for p in model.parameters())  # the weights are frozen only meanwhile


# ---------------------------------------------------------------------------------------------------
# Scorers and the probe metrics


def _textured_quadrant_images(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grey (100) images with one textured quadrant, [150, 255] noise: top-left for label 0, bottom-right for 1."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = np.full((n, size, size, 3), 100, np.uint8)
    half = size // 2
    for i, y in enumerate(labels):
        rows = slice(None, half) if y == 0 else slice(half, None)
        images[i, rows, rows] = rng.integers(150, 256, (half, half, 3))
    return images, labels


def test_pixel_std_scores_are_each_patch_std_over_pixels_and_channels():
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[0, :4, 4:] = 255  # flat bright patch: std 0
    images[0, 4:, :4, 0] = 255  # one channel of three on: std of {255, 0, 0}
    images[0, 4:, 4:] = np.indices((4, 4)).sum(0)[..., None] % 2 * 255  # checkerboard: std 127.5
    scores = scorers.pixel_std_scores(images, 4)
    np.testing.assert_allclose(scores, [[0.0, 0.0, np.std([255, 0, 0]), 127.5]], rtol=1e-6)
    maps, pooled = scorers.create_scorer("pixel-std", 4).scores(images, np.zeros(1, np.int64))
    assert maps.shape == (1, 8, 8) and maps.max() <= 1.0
    np.testing.assert_allclose(pooled, scores / 127.5, rtol=1e-6)


def test_flat_patches_are_one_colour_not_one_value():
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[0, :4, 4:] = (255, 0, 0)  # flat red: one colour, though its values differ across channels
    images[0, 4:, :4] = 7
    images[0, 4:, 4:] = 7
    images[0, 7, 7, 2] = 8  # one value of one pixel differs
    assert scorers.flat_patches(images, 4).tolist() == [[True, True, True, False]]


def test_pixel_std_keeps_texture_and_drops_flat_background():
    images, labels = _textured_quadrant_images(4)
    _, scores = scorers.create_scorer("pixel-std", 4).scores(images, labels)
    keep = scorers.keep_mask(scores, drop=0.75).reshape(4, 4, 4)
    for k, y in zip(keep, labels):
        quadrant = (slice(None, 2), slice(None, 2)) if y == 0 else (slice(2, None), slice(2, None))
        assert k[quadrant].all() and k.sum() == 4


def test_random_scorer_is_seeded_and_not_the_grid_order():
    images, labels = _textured_quadrant_images(6)
    first = scorers.create_scorer("random", 4, seed=3).scores(images, labels)[1]
    np.testing.assert_array_equal(first, scorers.create_scorer("random", 4, seed=3).scores(images, labels)[1])
    assert not np.array_equal(first, scorers.create_scorer("random", 4, seed=4).scores(images, labels)[1])
    np.testing.assert_allclose(first, scorers.random_scores(6, 16, 3), rtol=1e-6)
    keep = scorers.keep_mask(first, 0.5)
    assert len({tuple(row) for row in keep}) > 1  # not the same patches in every image


def test_unknown_or_incomplete_scorer_is_a_one_line_error():
    with pytest.raises(DQError, match=r"^patches.scorer = 'saliency' is not a registered patch scorer; expected one "
                                      r"of pixel-std, random, gradcam\+\+, gradcam\+\+-flat-first$"):
        scorers.create_scorer("saliency", 4)
    with pytest.raises(DQError, match="patches.scorer = 'gradcam\\+\\+' needs"):
        scorers.create_scorer("gradcam++", 4)


def test_flat_first_drops_flat_patches_then_follows_gradcam():
    size, p = 16, 4
    rng = np.random.default_rng(2)
    images = rng.integers(128, 256, (4, size, size, 3), dtype=np.uint8)
    images[:, :4, :] = 200  # the first row of patches is flat (one colour)
    images[:, 8:12, 12:] = 0  # and one more patch, in the bottom-right quadrant
    labels = np.array([0, 1, 0, 1])
    model = QuadrantNet(size)
    probed = ProbedModel(model, model.features, size, batch_size=2, progress=False)
    plain = scorers.create_scorer("gradcam++", p, probed=probed)
    first = scorers.create_scorer("gradcam++-flat-first", p, probed=probed)
    cam_scores = plain.scores(images, labels)[1]
    maps, scores = first.scores(images, labels)
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    flat = np.zeros(16, bool)
    flat[[0, 1, 2, 3, 11]] = True
    keep = scorers.keep_mask(scores, drop=5 / 16)
    assert (keep == ~flat).all()  # exactly the five flat patches go
    for row_first, row_cam in zip(scores, cam_scores):  # among the rest, GradCAM++'s order
        content = np.flatnonzero(~flat)
        np.testing.assert_array_equal(np.argsort(-row_first[content], kind="stable"),
                                      np.argsort(-row_cam[content], kind="stable"))
    # with a bigger drop, the next patches to go are GradCAM++'s lowest among the content
    plain_keep = scorers.keep_mask(np.where(flat, -1.0, cam_scores), drop=0.75)
    np.testing.assert_array_equal(scorers.keep_mask(scores, drop=0.75), plain_keep)
    # the five flat patches all lie on the outer ring: the higher grid index goes first
    np.testing.assert_array_equal(scorers.keep_mask(scores, drop=2 / 16)[:, [3, 11]], False)


def test_flat_first_drops_flat_patches_from_the_outer_ring_inwards():
    size, p = 32, 4
    images = np.full((2, size, size, 3), 90, np.uint8)  # every patch flat
    images[1, 12:20, 12:20] = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)  # the 2x2 centre has content
    model = QuadrantNet(size)
    scorer = scorers.create_scorer("gradcam++-flat-first", p,
                                   probed=ProbedModel(model, model.features, size, batch_size=2, progress=False))
    scores = scorer.scores(images, np.array([0, 1]))[1]
    rings = np.repeat(scorers.grid_rings(8, 8).reshape(1, -1), 2, axis=0)
    keep = scorers.keep_mask(scores, drop=28 / 64)
    np.testing.assert_array_equal(keep, rings > 0)  # exactly the outer ring of 28 patches
    keep = scorers.keep_mask(scores, drop=2 / 64)
    assert np.flatnonzero(~keep[0]).tolist() == [62, 63]  # within a ring, the higher grid index goes first
    innermost = scorers.keep_mask(scores, drop=60 / 64)
    assert np.flatnonzero(innermost[0]).tolist() == [27, 28, 35, 36]  # the last ring left: the centre


def test_grid_rings_count_from_the_border_inwards():
    np.testing.assert_array_equal(scorers.grid_rings(4, 4), [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    assert scorers.grid_rings(8, 8)[3, 4] == 1.0 and scorers.grid_rings(8, 8)[1, 1] == pytest.approx(1 / 3)


class QuadrantBrightness(nn.Module):
    """logit_0 = mean of the top-left quadrant, logit_1 = mean of the bottom-right: a known probe."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        half = x.shape[-1] // 2
        s = x.sum(dim=1)
        return self.scale * torch.stack([s[:, :half, :half].mean((1, 2)), s[:, half:, half:].mean((1, 2))], 1)


def test_probe_metrics_score_kept_random_and_pixel_std_masks():
    images, labels = _textured_quadrant_images(8)
    model = QuadrantBrightness()
    wrong = np.zeros((8, 16), bool)  # keeps only the quadrant of the other class: that one wins
    for i, y in enumerate(labels):
        wrong[i].reshape(4, 4)[(slice(2, None),) * 2 if y == 0 else (slice(None, 2),) * 2] = True
    metrics = cam.probe_metrics(cam.ProbeCounts(model, 4, 16, seed=0), images, labels, wrong, 3)
    assert metrics["probe_top1_full"] == 1.0 and metrics["probe_top1_kept"] == 0.0
    assert metrics["probe_top1_std_keep"] == 1.0  # pixel-std keeps exactly the textured quadrant
    random_keep = scorers.keep_mask(scorers.random_scores(8, 16, 0), 0.75)
    expected = cam.probe_top1(model, grid.zero_dropped(images, random_keep, 4), labels, 16, 8)
    assert metrics["probe_top1_random_keep"] == round(expected, 4)
    zeroed = grid.zero_dropped(images, wrong, 4)
    assert (zeroed[0, :8, :8] == 0).all() and (zeroed[0, 8:, 8:] == 100).all()


def test_compress_stage_writes_probe_metrics_for_every_scorer(tmp_path):
    import json

    import yaml

    from stages import compress
    from tests.test_format import _tiny_pipeline

    results = {}
    for scorer in ("gradcam++-flat-first", "gradcam++", "pixel-std", "random"):
        root = _tiny_pipeline(tmp_path / scorer)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["patches"]["scorer"] = scorer
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        compress.main(["--params", str(root / "params.yaml"), "--data", str(root / "data")])
        results[scorer] = json.loads((root / "data/compact_metrics.json").read_text())
    for metrics in results.values():
        for key in ("probe_top1_full", "probe_top1_kept", "probe_top1_random_keep", "probe_top1_std_keep"):
            assert 0.0 <= metrics[key] <= 1.0, key
        assert metrics["compact_bytes"] > 0  # the storage metrics are still there
    # the baselines are the masks those scorers store
    assert results["pixel-std"]["probe_top1_kept"] == results["pixel-std"]["probe_top1_std_keep"]
    assert results["random"]["probe_top1_kept"] == results["random"]["probe_top1_random_keep"]


# ---------------------------------------------------------------------------------------------------
# Batch by batch: the same scores, masks and metrics as the whole array


def test_random_rows_are_rows_of_the_whole_seeded_draw_in_any_order():
    whole = scorers.random_scores(50, 7, seed=3)  # 7 patches: rows start on odd values of the stream
    rows = scorers.RandomRows(7, seed=3)
    rows.SKIP_BLOCK = 10  # skipping ahead takes several draws
    for positions in ([0, 1, 2], [3], [20, 21, 22, 23], [5, 6], [49], [0], [48, 46]):
        np.testing.assert_array_equal(rows.rows(positions), whole[positions])
    assert rows.rows([]).shape == (0, 7)


def test_scorers_give_each_image_its_scores_whatever_the_batches():
    images, labels = _textured_quadrant_images(11)
    for name in ("random", "pixel-std"):
        whole = scorers.create_scorer(name, 4, seed=5).scores(images, labels)[1]
        scorer = scorers.create_scorer(name, 4, seed=5)
        parts = [scorer.scores(images[s:s + 4], labels[s:s + 4], np.arange(s, min(s + 4, 11)))[1]
                 for s in range(0, 11, 4)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(scorers.create_scorer("random", 4, seed=5).scores(images, labels)[1],
                                  scorers.random_scores(11, 16, 5))


def test_probe_counts_over_batches_equal_the_whole_array_metrics():
    """ProbeCounts fed uneven batches (as the stage's DataLoader or a torchrun shard would) gives what the
    whole-array computation gives: the random and pixel-std masks are those of the whole set."""
    images, labels = _textured_quadrant_images(13, seed=4)
    model = QuadrantBrightness()
    scores = np.random.default_rng(9).random((13, 16), dtype=np.float32)
    keep = scorers.keep_mask(scores, 0.5)
    expected = {  # main's whole-array formulas, written out
        "probe_top1_full": cam.probe_top1(model, images, labels, 16, 13),
        "probe_top1_kept": cam.probe_top1(model, grid.zero_dropped(images, keep, 4), labels, 16, 13),
        "probe_top1_random_keep": cam.probe_top1(
            model, grid.zero_dropped(images, scorers.keep_mask(scorers.random_scores(13, 16, 2), 0.5), 4), labels, 16, 13),
        "probe_top1_std_keep": cam.probe_top1(
            model, grid.zero_dropped(images, scorers.keep_mask(scorers.pixel_std_scores(images, 4), 0.5), 4), labels, 16, 13)}
    expected = {k: round(v, 4) for k, v in expected.items()}
    assert cam.probe_metrics(cam.ProbeCounts(model, 4, 16, seed=2), images, labels, keep, 5) == expected
    counts = cam.ProbeCounts(model, 4, 16, seed=2)
    for rows in (np.arange(0, 5), np.arange(5, 6), np.arange(6, 13)):
        counts.add(images[rows], labels[rows], keep[rows], rows)
    assert counts.metrics() == expected and counts.counts[0] == 13
    # two shards' counts add up (what torchrun's all-reduce does)
    first, second = cam.ProbeCounts(model, 4, 16, seed=2), cam.ProbeCounts(model, 4, 16, seed=2)
    first.add(images[:8], labels[:8], keep[:8], np.arange(8))
    second.add(images[8:], labels[8:], keep[8:], np.arange(8, 13))
    assert first.metrics(first.counts + second.counts) == expected


def test_score_batches_hands_each_batch_on_and_keeps_only_scores_and_masks():
    images, labels = _textured_quadrant_images(10)
    scorer = scorers.create_scorer("pixel-std", 4)
    batches = [(images[s:s + 3], labels[s:s + 3], np.arange(s, min(s + 3, 10))) for s in range(0, 10, 3)]
    seen = []
    figure = cam.FigureSamples(cam.figure_rows(labels, count=3))
    scores, keep = cam.score_batches(scorer, iter(batches), 0.75, 16, figure=figure,
                                     on_batch=lambda im, y, pos, sc, kp: seen.append((len(im), pos.tolist())))
    whole_maps, whole = scorer.scores(images, labels)
    np.testing.assert_array_equal(scores, whole)
    np.testing.assert_array_equal(keep, scorers.keep_mask(whole, 0.75))
    assert seen == [(3, [0, 1, 2]), (3, [3, 4, 5]), (3, [6, 7, 8]), (1, [9])]
    positions, shown, maps, shown_keep = figure.arrays(images.shape[1:], 16)
    assert positions.tolist() == cam.figure_rows(labels, count=3).tolist() == [0, 1, 2]
    np.testing.assert_array_equal(shown, images[positions])
    np.testing.assert_array_equal(maps, whole_maps[positions])
    np.testing.assert_array_equal(shown_keep, keep[positions])
    empty = cam.score_batches(scorer, iter([]), 0.75, 16)
    assert empty[0].shape == (0, 16) and empty[1].shape == (0, 16)


def test_drop_0_keeps_every_patch_without_scoring_and_probes_the_full_images_once():
    class Refuses(scorers.PatchScorer):
        def maps(self, images, labels, positions=None):
            raise AssertionError("a drop of 0 needs no scores")

    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(5) % 2
    calls = []

    class Counting(cam.ProbeCounts):
        def _hits(self, images, labels):
            calls.append(len(images))
            return 3

    probe = Counting(QuadrantNet(16), 4, 16)
    scores, keep = cam.score_batches(Refuses(4), [(images, labels, np.arange(5))], 0.0, 16, probe=probe)
    assert keep.all() and not scores.any()
    assert calls == [5] and probe.counts.tolist() == [5, 3, 3, 3, 3]
