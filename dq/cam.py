"""GradCAM++ attention → per-patch scores → which patches of each image are kept.

The steps, one function each:

    attention_maps  uint8 images [N, H, W, 3] → GradCAM++ maps float32 [N, H, W] in [0, 1]
    patch_scores    maps [N, H, W] → mean of each p×p patch, float32 [N, L], raster order
    keep_mask       scores [N, L] → bool [N, L], the K = L - round(drop * L) highest scores

GradCAM++ (pytorch-grad-cam's `GradCAMPlusPlus`) runs on the features backbone followed by the linear
probe of the features stage, and targets each image's TRUE label: the ImageNet head knows nothing of
the dataset's classes, and the paper's code, which targeted the predicted class, scores the wrong
evidence on misclassified images. Images are resized to `features.input_size` before the backbone,
exactly as in the features stage. pytorch-grad-cam upsamples the map to that size; `attention_maps`
then resizes it to the stored image size (area averaging when shrinking).

The layer (`patches.cam_layer`): a module name of the backbone, or `auto`. The `auto` rule: among the
backbone's feature blocks (timm's `feature_info`; the top-level children for other models), take the
deepest whose feature map at `features.input_size` is at least 4×4; if none is, the deepest larger than
1×1. A 1×1 map is one number per channel: its CAM is flat and every patch would tie. For
efficientnet_lite0 that is `blocks.6` (4×4) at input 128 and `blocks.2` (4×4) at input 32; for
resnet10t `layer4` at 128 and `layer2` at 32. A named layer whose map is 1×1 is an error.

Ties in `keep_mask` go to the lower grid index (a stable sort), so a flat map keeps the first K
patches. On the CPU the whole pass is deterministic: the same inputs give the same bytes.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import DQError
from dq.figures import pyplot, save_png
from dq.grid import grid_of, kept_count, pixel_keep

MIN_MAP_SIDE = 4  # the auto rule's preferred smallest feature map


# ---------------------------------------------------------------------------------------------------
# The target layer


def candidate_layers(backbone: nn.Module) -> list[str]:
    """Module names of the backbone's feature blocks, shallow to deep."""
    info = getattr(backbone, "feature_info", None)
    if info:
        names = [d["module"] for d in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
        if names:
            return names
    return [name for name, _ in backbone.named_children()]


@torch.no_grad()
def feature_map_sizes(backbone: nn.Module, names: list[str], input_size: int) -> dict[str, tuple[int, int]]:
    """Spatial size (h, w) of each named module's output for one input_size × input_size image.

    Modules whose output is not a 4-D tensor are left out.
    """
    modules = dict(backbone.named_modules())
    sizes: dict[str, tuple[int, int]] = {}

    def hook_for(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                sizes[name] = (int(output.shape[-2]), int(output.shape[-1]))
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    was_training = backbone.training
    try:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        backbone.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        backbone.train(was_training)
        for h in handles:
            h.remove()
    return sizes


def target_layer(backbone: nn.Module, cam_layer: str, input_size: int) -> tuple[str, nn.Module]:
    """The (name, module) GradCAM++ hooks: `cam_layer` itself, or the auto rule of the module docstring."""
    modules = dict(backbone.named_modules())
    candidates = candidate_layers(backbone)
    if cam_layer != "auto":
        if cam_layer not in modules or not cam_layer:
            raise DQError(f"patches.cam_layer = {cam_layer!r} is not a module of the backbone; expected auto "
                          f"or a module name such as {', '.join(candidates)}")
        size = feature_map_sizes(backbone, [cam_layer], input_size).get(cam_layer)
        if size is None or size[0] * size[1] <= 1:
            got = "no 4-D feature map" if size is None else f"a {size[0]}x{size[1]} map"
            raise DQError(f"patches.cam_layer = {cam_layer!r} gives {got} at features.input_size = "
                          f"{input_size}; expected a conv layer whose map is larger than 1x1 (or use auto)")
        return cam_layer, modules[cam_layer]
    sizes = feature_map_sizes(backbone, candidates, input_size)
    for smallest in (MIN_MAP_SIDE, 2):
        fitting = [n for n in candidates if n in sizes and min(sizes[n]) >= smallest]
        if fitting:
            return fitting[-1], modules[fitting[-1]]
    raise DQError(f"patches.cam_layer = 'auto': no layer of the backbone has a feature map larger than 1x1 at "
                  f"features.input_size = {input_size}; use a larger input_size")


# ---------------------------------------------------------------------------------------------------
# Attention maps → patch scores → keep mask


@contextlib.contextmanager
def _gradients_down_to(model: nn.Module, layer: nn.Module):
    """Backward runs from the logits down to `layer` only: no weight gradients, nothing below the layer.

    The weights are frozen for the duration, and a forward hook (registered before GradCAM++'s own, so
    they see its result) restarts the graph at the layer's output.
    """
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    # clone: downstream in-place ops may touch a non-leaf, never a leaf
    handle = layer.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True).clone())
    try:
        yield
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _batch_maps(cam, x: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """GradCAM++ of one batch [B, 3, S, S] for each image's label → float32 [B, S, S] in [0, 1]."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(y)) for y in labels])


def _resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """[B, S, S] → [B, size, size]: area averaging when shrinking, bilinear when growing."""
    if maps.shape[-1] == size:
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[:, None]
    if maps.shape[-1] > size:
        t = F.interpolate(t, size=(size, size), mode="area")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[:, 0].numpy()


def attention_maps(model: nn.Module, layer: nn.Module, images: np.ndarray, labels: np.ndarray, input_size: int,
                   batch_size: int, device: torch.device | str = "cpu", *, mean=None, std=None,
                   progress: bool = True) -> np.ndarray:
    """GradCAM++ maps of uint8 images [N, H, W, 3] for their labels [N] → float32 [N, H, W] in [0, 1].

    `model` maps [N, 3, S, S] to logits over the dataset's classes; `layer` is one of its modules.
    Images are normalised with `mean`/`std` (the backbone's, ImageNet's by default) and resized to S =
    input_size; each map is min-max scaled per image by pytorch-grad-cam, then resized to H × W.
    """
    n, h, w, _ = images.shape
    batches = ((images[s:s + batch_size], labels[s:s + batch_size]) for s in range(0, n, batch_size))
    maps = np.zeros((n, h, w), np.float32)
    start = 0
    for batch_maps in attention_map_batches(model, layer, batches, input_size, device, mean=mean, std=std,
                                            progress=progress):
        maps[start:start + len(batch_maps)] = batch_maps
        start += len(batch_maps)
    return maps


def attention_map_batches(model: nn.Module, layer: nn.Module, batches: Iterable, input_size: int,
                          device: torch.device | str = "cpu", *, mean=None, std=None,
                          progress: bool = True) -> Iterator[np.ndarray]:
    """Yield float32 [b, H, W] GradCAM++ maps for each (uint8 images [b, H, W, 3], labels [b], ...) batch.

    Streaming form of `attention_maps`: batches may come from a DataLoader over the prepared store, and
    the caller keeps what it needs of each batch's maps (patch scores), never the images.
    """
    from pytorch_grad_cam import GradCAMPlusPlus
    from tqdm import tqdm

    from dq.backbones import preprocess
    from dq.imagenet import IMAGENET_MEAN, IMAGENET_STD

    device = torch.device(device)
    model = model.eval().to(device)
    cuda = device.type == "cuda"
    if cuda:  # the layout cuDNN's fastest convolutions want; no autocast: pytorch-grad-cam needs float32
        model = model.to(memory_format=torch.channels_last)
    with _gradients_down_to(model, layer):
        cam = GradCAMPlusPlus(model=model, target_layers=[layer])
        try:
            for batch in tqdm(batches, desc="gradcam++", unit="batch", leave=False, disable=not progress):
                images, labels = np.asarray(batch[0]), np.asarray(batch[1])
                _, h, w, _ = images.shape
                if h != w:
                    raise DQError(f"images must be square for patch scores, got {h}x{w}")
                x = preprocess(images, input_size, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD,
                               device=device)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield _resize_maps(_batch_maps(cam, x, labels), h)
        finally:
            cam.activations_and_grads.release()  # not `with cam`: its __exit__ swallows IndexError


def patch_scores(maps: np.ndarray, patch_size: int) -> np.ndarray:
    """Mean of each p×p patch: maps [N, H, W] → float32 [N, L], L = (H/p)(W/p), raster order."""
    n, h, w = maps.shape
    p = patch_size
    rows, cols = grid_of(h, p)
    blocks = maps.reshape(n, rows, p, cols, p).astype(np.float64)
    return blocks.mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


def keep_mask(scores: np.ndarray, drop: float) -> np.ndarray:
    """bool [N, L]: the K = L - round(drop * L) highest scores of each row; ties keep the lower index.

    NaN scores rank lowest.
    """
    n, num_patches = scores.shape
    k = kept_count(num_patches, drop)
    if k < 1:
        raise DQError(f"patches.drop = {drop} drops all {num_patches} patches of each image; "
                      f"expected a smaller drop or a smaller patch_size")
    ranked = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")  # stable: equal scores stay in grid order
    keep = np.zeros((n, num_patches), dtype=bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    return keep


# ---------------------------------------------------------------------------------------------------
# The figure


def figure_rows(labels: np.ndarray, count: int = 8) -> np.ndarray:
    """Up to `count` image rows to show: the first of each class in class order, then the next ones."""
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:count]
    rest = [i for i in range(len(labels)) if i not in set(firsts)][:count - len(firsts)]
    return np.asarray(sorted(firsts + rest), dtype=np.int64)


def plot_patches(path, images: np.ndarray, maps: np.ndarray, keep: np.ndarray, patch_size: int,
                 titles: list[str]) -> None:
    """A PNG grid, one column per image; rows: original | GradCAM++ map | kept patches over grey.

    images uint8 [n, H, W, 3], maps float32 [n, H, W], keep bool [n, L].
    """
    plt = pyplot()
    n, h, w, _ = images.shape
    kept = np.where(pixel_keep(keep, patch_size, (h, w))[..., None], images, np.uint8(128))
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.4), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        axes[0, j].set_title(titles[j], fontsize=7)
        axes[1, j].imshow(images[j].mean(axis=2), cmap="gray")
        axes[1, j].imshow(maps[j], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        axes[2, j].imshow(kept[j])
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for i, name in enumerate(("original", "GradCAM++", "kept")):
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
