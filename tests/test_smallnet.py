"""dq.train.smallnet, the default classifier for small images: whitening, identity init, frozen parts, the registry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dq.train.data import full_training_set, normalisation, to_input
from dq.train.loop import TrainHooks, train_classifier
from dq.train.classifier import CLASSIFIERS, create_classifier, read_classifier, save_classifier
from dq.core.errors import DQError
from dq.params import TrainParams
from dq.train.smallnet import WHITEN_EPS, SmallNet, identity_init, patches_2x2

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_images(n: int = 64, size: int = 12, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] with strongly correlated neighbouring pixels and channels (a blurred noise field)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size + 1, size + 1, generator=g)
    smooth = (base[..., 1:, 1:] + base[..., :-1, :-1] + base[..., 1:, :-1]) / 3
    return torch.cat([smooth * 2, smooth + 0.3 * torch.randn(n, 1, size, size, generator=g),
                      torch.randn(n, 1, size, size, generator=g)], dim=1)


def test_whitening_layer_whitens_the_training_patches():
    """Its + filters map the 2×2 patches to covariance diag(λ / (λ + eps)), about the identity; the − filters
    are their negatives. The reference is numpy's own covariance and eigendecomposition."""
    images = correlated_images()
    net = SmallNet(4)
    net.init_from_data(images)
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).numpy().astype(np.float64)
    cov = np.cov(patches, rowvar=False)
    w = net.whiten.weight.detach().numpy().reshape(24, 12).astype(np.float64)
    plus, minus = w[:12], w[12:]
    np.testing.assert_allclose(minus, -plus)
    eigenvalues = np.linalg.eigvalsh(cov)[::-1]
    np.testing.assert_allclose(plus @ cov @ plus.T, np.diag(eigenvalues / (eigenvalues + WHITEN_EPS)), atol=2e-4)
    assert not net.whiten.weight.requires_grad and not net.whiten.bias.requires_grad


def test_patches_are_flattened_like_a_conv_weight():
    """patches_2x2 · w equals the 2×2 convolution with w, so the covariance's eigenvectors are filters."""
    images = correlated_images(4, 6)
    w = torch.randn(5, 3, 2, 2)
    by_patches = patches_2x2(images) @ w.reshape(5, -1).T  # [n·5·5, 5]
    by_conv = torch.nn.functional.conv2d(images, w).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(by_patches, by_conv)


def test_identity_init_passes_the_first_channels_through():
    conv = torch.nn.Conv2d(6, 8, 3, padding="same", bias=False)
    identity_init(conv)
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv(x)[:, :6], x)


def test_normalisation_scale_is_frozen_and_the_head_has_no_bias():
    net = SmallNet(10)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert net.head.bias is None
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_registered_and_refused_on_large_images():
    assert "smallnet" in CLASSIFIERS
    assert isinstance(create_classifier("smallnet", 10, 32), SmallNet)
    with pytest.raises(DQError, match=r"train.model = 'smallnet' is built for images of at most 64 px, got 128 px"):
        create_classifier("smallnet", 10, 128)


def test_trains_through_the_train_stage_code_and_reads_back(tmp_path):
    from tests.test_train import SIZE, blobs

    train, test = blobs(96, seed=1), blobs(40, seed=2)
    config = TrainParams(model="smallnet", input="full", steps=24, batch_size=16, lr=0.2, ema=0.9)
    result = train_classifier(full_training_set(train), test, config, seed=0, device=torch.device("cpu"),
                              hooks=TrainHooks(progress=False))
    assert result.final.top1 >= 0.9
    path = tmp_path / "model.pt"
    save_classifier(path, result, config, test.classes, SIZE)
    restored = read_classifier(path)
    x = to_input(torch.from_numpy(test.images), normalisation(result.mean, result.std, "cpu"), torch.device("cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(restored.model(x), result.model.eval()(x))


def test_whitening_zeroes_the_directions_that_hold_only_noise():
    """Grey images with faint colour noise (what the MAE fill leaves): the colour directions' filters are 0,
    so the noise is not blown up to unit variance, and the grey directions are whitened as before."""
    grey = correlated_images()[:, :1].repeat(1, 3, 1, 1)
    noisy = grey + 1e-3 * torch.randn(grey.shape, generator=torch.Generator().manual_seed(1))
    net = SmallNet(4)
    net.init_from_data(noisy)
    w = net.whiten.weight.detach().reshape(24, 12)[:12]
    assert int((w.abs().sum(1) > 0).sum()) == 4  # a grey 2×2 patch has 4 dimensions
    out = torch.nn.functional.conv2d(noisy - grey, net.whiten.weight[:12])
    assert float(out.abs().max()) < 0.05  # the colour noise stays noise-sized
