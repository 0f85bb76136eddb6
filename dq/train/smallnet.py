"""`smallnet`: a fast, strong classifier for small images (at most 64 px), sized for a CPU.

The architecture learns from airbench (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
2024; github.com/KellerJordan/cifar10-airbench, MIT), written anew and sized for two CPU cores:

    whiten      2×2 convolution, frozen: the ZCA-like whitening of the training set's 2×2 patches,
                each eigenvector once with + and once with − sign, then GELU          [N, 2·4C, H-1, W-1]
    group × 3   conv 3×3 → max-pool 2 → BatchNorm → GELU → conv 3×3 → BatchNorm → GELU
    head        global max-pool → linear (no bias), logits scaled by 1/`HEAD_SCALE`   [N, num_classes]

- The whitening layer (`init_from_data`) is set from the training images before the first step: its
  filters are the eigenvectors of the 2×2 patch covariance divided by sqrt(eigenvalue + eps), and 0 for
  directions under WHITEN_FLOOR of the largest eigenvalue (noise the whitening would amplify). It never
  trains, so the first layer needs no learning at all (airbench's first trick).
- Every 3×3 convolution starts as a Dirac (identity) kernel on its first filters, the rest
  random (airbench's "identity init"), so the net starts close to shallow.
- BatchNorm keeps its bias but not its scale (`weight` frozen at 1), momentum 0.4 as in airbench: with
  few steps the running statistics must follow the weights quickly.
- The head's 1/HEAD_SCALE keeps the first logits small, which label smoothing and a high learning rate need.

The training recipe that goes with it (Nesterov SGD, label smoothing, an EMA of the weights, flip
test-time augmentation) lives in dq.train.schedule and dq.train.loop and is chosen by `train.*` params; `configs/` holds the paper's.
Widths are `SmallNetConfig.widths`; `smallnet` is the default registered size, measured in
bench/trainer.py (docs/RESULTS.md, "The trainer").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_SCALE = 1 / 9
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4
# Patch directions with less than this share of the largest eigenvalue carry no image structure, only codec
# or MAE reconstruction noise (a grey image's colour directions: exactly 0 in the prepared images, ~2e-5 of
# the largest after the MAE's reconstruction). Whitening would blow that noise up to unit variance, so their filters are 0.
WHITEN_FLOOR = 1e-4
BN_MOMENTUM = 0.4  # airbench's 0.6 in Keras' convention (1 - 0.6 of the new batch)


@dataclass(frozen=True)
class SmallNetConfig:
    widths: tuple[int, int, int] = (32, 64, 128)
    pool_last: bool = False  # conv, conv, then pool (VGG's order) instead of airbench's conv, pool, conv
    whiten: bool = True  # False: the first layer is an ordinary trained convolution (an ablation)


class ConvGroup(nn.Module):
    """conv 3×3 → max-pool 2 → BN → GELU → conv 3×3 → BN → GELU: [N, c_in, H, W] → [N, c_out, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int, pool_last: bool = False):
        super().__init__()
        self.pool_last = pool_last
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.norm1 = batch_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.norm2 = batch_norm(c_out)
        identity_init(self.conv1)
        identity_init(self.conv2)

    def forward(self, x):
        if self.pool_last:
            x = F.gelu(self.norm1(self.conv1(x)))
            return F.max_pool2d(F.gelu(self.norm2(self.conv2(x))), 2)
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.gelu(self.norm1(x))
        return F.gelu(self.norm2(self.conv2(x)))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with a learned bias and a frozen scale of 1."""
    norm = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)  # eps 1e-5: a channel the whitening zeroes stays finite
    norm.weight.requires_grad_(False)
    return norm


def identity_init(conv: nn.Conv2d) -> None:
    """The first min(c_in, c_out) filters become Dirac kernels (filter i passes input channel i through);
    the others keep their random init, so the layer starts as the identity plus new features."""
    with torch.no_grad():
        torch.nn.init.dirac_(conv.weight[:min(conv.in_channels, conv.out_channels)])


class SmallNet(nn.Module):
    """The airbench-style net. Input: normalised float [N, C, H, W]; output: logits [N, num_classes]."""

    def __init__(self, num_classes: int, in_chans: int = 3, config: SmallNetConfig = SmallNetConfig()):
        super().__init__()
        whiten_width = 2 * in_chans * WHITEN_KERNEL ** 2
        self.whiten = nn.Conv2d(in_chans, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        self.learn_first_layer = not config.whiten  # the ablation: an ordinary trained 2×2 convolution
        self.whiten.requires_grad_(self.learn_first_layer)
        widths = (whiten_width,) + tuple(config.widths)
        self.groups = nn.Sequential(*(ConvGroup(a, b, config.pool_last) for a, b in zip(widths[:-1], widths[1:])))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        # oneDNN's channels-last convolutions take about 3/4 of the time on a CPU (bench/trainer.py).
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        """[N, C, H, W] → [N, num_classes]."""
        x = F.gelu(self.whiten(x.contiguous(memory_format=torch.channels_last)))
        x = self.groups(x)
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * HEAD_SCALE

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the frozen first layer from normalised training images [n, C, H, W] (a sample suffices)."""
        if self.learn_first_layer:
            return
        patches = patches_2x2(images.float())  # [P, C·k·k]
        eigenvalues, eigenvectors = patch_eigens(patches)
        filters = eigenvectors.T / torch.sqrt(eigenvalues + WHITEN_EPS)[:, None]  # [C·k·k, C·k·k]
        filters[eigenvalues < WHITEN_FLOOR * eigenvalues[0]] = 0.0
        filters = filters.view(-1, *self.whiten.weight.shape[1:])
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()


def patches_2x2(images: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] → [n·(H-1)·(W-1), C·k·k]: every k×k patch (k = WHITEN_KERNEL), flattened like a conv weight."""
    c = images.shape[1]
    unfolded = images.unfold(2, WHITEN_KERNEL, 1).unfold(3, WHITEN_KERNEL, 1)  # [n, C, H', W', k, k]
    return unfolded.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * WHITEN_KERNEL ** 2)


def patch_eigens(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [D] and eigenvectors [D, D] (columns) of the patches' covariance, in float64, largest first."""
    x = patches.double()
    x = x - x.mean(dim=0)
    cov = x.T @ x / max(len(x) - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order].clamp_min(0).float(), eigenvectors[:, order].float()


def create_smallnet(num_classes: int, in_chans: int = 3, widths: tuple[int, int, int] | None = None) -> SmallNet:
    config = SmallNetConfig(widths) if widths else SmallNetConfig()
    return SmallNet(num_classes, in_chans, config)
