"""GradCAM++ patch maps, and how good the kept patches are: the torch side of the compress stage's scoring.

The patch scorers themselves, their registry and the keep rule live in dq.patches.scorers (NumPy only); this
module is the torch side:

    target_layer      the backbone layer GradCAM++ reads (`patches.cam_layer`, or the `auto` rule)
    attention_maps    GradCAM++ maps of a batch for each image's true label (dq.patches.scorers.GradCamPlusPlus)
    probe_metrics     the probe's top-1 on the kept images with dropped patches zeroed, for the
                      scorer's masks and for random and highest-pixel-std masks with the same K
                      (`ProbeCounts`: the same, batch by batch)
    score_batches     score, keep, count and pick the figure's images batch by batch, for the compress
                      pass (dq.patches.compress), which hands each batch on to the compact writer

Everything works batch by batch, so the compress stage streams: `score_batches` scores (images, labels,
positions) batches from the prepared store, hands each scored batch to `ProbeCounts`, `FigureSamples` (the
few images the figure shows) and the caller's `on_batch` (the compact writer), and keeps only the scores
and keep masks. Each image gets the same scores, masks and metrics whatever the batches around it.

GradCAM++ (pytorch-grad-cam's `GradCAMPlusPlus`) targets each image's TRUE label: the ImageNet head knows
nothing of the dataset's classes, and the paper's code, which targeted the predicted class, scores the
wrong evidence on misclassified images. Images are resized to `features.input_size` and normalised with
the backbone's own mean/std (its `pretrained_cfg`), exactly as in the features stage. pytorch-grad-cam
upsamples the map to that size; `attention_maps` then resizes it to the stored image size (area averaging
when shrinking).

The layer (`patches.cam_layer`): a module name of the backbone, or `auto`. The `auto` rule: among the
backbone's feature blocks (timm's `feature_info`; the top-level children for other models), take the
deepest whose feature map at `features.input_size` is at least 4×4; if none is, the deepest larger than
1×1. A 1×1 map is one number per channel: its CAM is flat and every patch would tie. For
efficientnet_lite0 that is `blocks.6` (4×4) at input 128 and `blocks.2` (4×4) at input 32; for
resnet10t `layer4` at 128 and `layer2` at 32. A named layer whose map is 1×1 is an error. A map at
least as fine as the patch grid (8×8 for 4-px patches at 32 px: `blocks.4` at input 128) was measured
and keeps worse patches (docs/RESULTS.md, "The backbone and the patch scorers"), so the deepest 4×4 map
stays the rule. On the CPU the whole pass is deterministic: the same inputs give the same bytes.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dq.core.errors import DQError
from dq.core.figures import pyplot, save_png
from dq.patches.grid import grid_of, kept_count, pixel_keep, zero_dropped
from dq.patches.scorers import (PatchScorer, PixelStd, ProbedModel, RandomScores, flat_patches, grid_rings, keep_mask,
                                keep_top, per_patch_map)

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


def attention_maps(probed: ProbedModel, images: np.ndarray, labels: np.ndarray, *, mean=None,
                   std=None) -> np.ndarray:
    """GradCAM++ maps of uint8 images [N, H, W, 3] for their labels [N] → float32 [N, H, W] in [0, 1].

    Images are normalised with `mean`/`std` (by default the model's own, `dq.features.backbones.normalization`)
    and resized to S = `probed.input_size`, `probed.batch_size` at a time; each map is min-max scaled per
    image by pytorch-grad-cam, then resized to H × W.
    """
    n, h, w, _ = images.shape
    size = probed.batch_size
    batches = ((images[s:s + size], labels[s:s + size]) for s in range(0, n, size))
    maps = np.zeros((n, h, w), np.float32)
    start = 0
    for batch_maps in attention_map_batches(probed, batches, mean=mean, std=std):
        maps[start:start + len(batch_maps)] = batch_maps
        start += len(batch_maps)
    return maps


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in eval mode on `device`; on CUDA in the layout cuDNN's fastest convolutions want (no autocast:
    pytorch-grad-cam needs float32)."""
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _cam_input(images: np.ndarray, input_size: int, mean, std, device: torch.device) -> torch.Tensor:
    """uint8 images [b, S', S', 3] → the normalised float input [b, 3, S, S] (S = input_size) on `device`."""
    from dq.features.backbones import preprocess

    _, h, w, _ = images.shape
    if h != w:
        raise DQError(f"images must be square for patch scores, got {h}x{w}")
    x = preprocess(images, input_size, mean=mean, std=std, device=device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def attention_map_batches(probed: ProbedModel, batches: Iterable, *, mean=None, std=None) -> Iterator[np.ndarray]:
    """Yield float32 [b, H, W] GradCAM++ maps for each (uint8 images [b, H, W, 3], labels [b], ...) batch.

    Streaming form of `attention_maps`: batches may come from a DataLoader over the prepared store, and
    the caller keeps what it needs of each batch's maps (patch scores), never the images.
    """
    from pytorch_grad_cam import GradCAMPlusPlus
    from tqdm import tqdm

    from dq.features.backbones import normalization

    device = torch.device(probed.device)
    model = _on_device(probed.model, device)
    if mean is None or std is None:
        mean, std = normalization(model)
    with _gradients_down_to(model, probed.layer):
        cam = GradCAMPlusPlus(model=model, target_layers=[probed.layer])
        try:
            for batch in tqdm(batches, desc="gradcam++", unit="batch", leave=False, disable=not probed.progress):
                images, labels = np.asarray(batch[0]), np.asarray(batch[1])
                x = _cam_input(images, probed.input_size, mean, std, device)
                yield _resize_maps(_batch_maps(cam, x, labels), images.shape[1])
        finally:
            cam.activations_and_grads.release()  # not `with cam`: its __exit__ swallows IndexError


# ---------------------------------------------------------------------------------------------------
# The GradCAM++ scorers (registered in dq.patches.scorers by name)


class GradCamPlusPlus(PatchScorer):
    """GradCAM++ of the probed backbone for each image's true label (`dq.patches.cam.attention_maps`)."""

    name = "gradcam++"

    def __init__(self, patch_size: int, probed: ProbedModel, **context):
        super().__init__(patch_size)
        self.probed = probed

    def maps(self, images, labels, positions=None):
        return attention_maps(self.probed, images, labels)


class GradCamFlatFirst(GradCamPlusPlus):
    """GradCAM++ among the patches with content: flat patches (one colour) rank below every other, the
    outermost ring of the grid lowest (see the module docstring)."""

    name = "gradcam++-flat-first"

    def maps(self, images, labels, positions=None):
        rows, cols = grid_of(images.shape[1], self.patch_size)
        content = ~flat_patches(images, self.patch_size).reshape(len(images), rows, cols)
        cam = super().maps(images, labels, positions)
        flat_order = per_patch_map(np.broadcast_to(grid_rings(rows, cols), content.shape), self.patch_size)
        # [0, 1/3] on flat patches by ring, [2/3, 1] on the rest by GradCAM++ (no tie across the groups)
        return np.where(per_patch_map(content, self.patch_size) > 0, 2 + cam, flat_order) / 3


# ---------------------------------------------------------------------------------------------------
# How good the kept patches are: the probe's top-1 with the dropped ones zeroed


@torch.no_grad()
def _probe_hits(model: nn.Module, images: np.ndarray, labels: np.ndarray, input_size: int,
                device: torch.device | str, mean, std) -> int:
    """How many of one batch of uint8 images [b, H, W, 3] the model (in eval mode) puts in their class."""
    from dq.features.backbones import preprocess

    if len(images) == 0:
        return 0
    x = preprocess(images, input_size, mean=mean, std=std, device=device)
    return int((model(x).argmax(1).cpu().numpy() == np.asarray(labels)).sum())


def probe_top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, input_size: int, batch_size: int,
               device: torch.device | str = "cpu") -> float:
    """Share of uint8 images [N, H, W, 3] whose argmax logit of `model` (backbone + probe) is the label.

    Preprocessed as in the features stage: resized to input_size, normalised with the model's own mean/std.
    """
    from dq.features.backbones import normalization

    if len(images) == 0:
        return 0.0
    model = model.eval().to(device)
    mean, std = normalization(model)
    hits = sum(_probe_hits(model, images[s:s + batch_size], labels[s:s + batch_size], input_size, device, mean, std)
               for s in range(0, len(images), batch_size))
    return hits / len(images)


PROBE_MASKS = ("kept", "random_keep", "std_keep")


class ProbeCounts:
    """`probe_metrics` batch by batch: `add` each batch, then `metrics()`; holds five counts, no images.

    `counts` is int64 [5]: images seen, then the probe's hits on the full images and on the images kept
    with the scorer's masks, random masks and highest-pixel-std masks of the same K (dropped patches
    zeroed). Sums of `counts` over processes (torchrun ranks) are the counts of the whole set. The
    random masks are rows `positions` of the random scorer's seeded draw, the pixel-std masks those the
    pixel-std scorer stores: the same masks whatever the batches.
    """

    def __init__(self, model: nn.Module, patch_size: int, input_size: int, device: torch.device | str = "cpu", *,
                 seed: int = 0):
        from dq.features.backbones import normalization

        self.model = model.eval().to(device)
        self.mean, self.std = normalization(self.model)
        self.patch_size, self.input_size, self.device = patch_size, input_size, device
        self.random, self.pixel_std = RandomScores(patch_size, seed), PixelStd(patch_size)
        self.counts = np.zeros(1 + 1 + len(PROBE_MASKS), np.int64)

    @torch.no_grad()
    def add(self, images: np.ndarray, labels: np.ndarray, keep: np.ndarray, positions: np.ndarray) -> None:
        """One batch: uint8 images [b, H, W, 3], labels [b], the scorer's keep [b, L], positions [b]."""
        if keep.all():  # drop 0: every mask keeps every patch, and each count is the full images'
            self.counts += np.asarray([len(images)] + [self._hits(images, labels)] * (1 + len(PROBE_MASKS)), np.int64)
            return
        k = int(keep[0].sum())  # the scorer's K: the other masks keep as many
        masks = {"kept": keep,
                 "random_keep": keep_top(self.random.scores(images, labels, positions)[1], k),
                 "std_keep": keep_top(self.pixel_std.scores(images, labels)[1], k)}
        hits = [self._hits(images, labels)]
        hits += [self._hits(zero_dropped(images, masks[name], self.patch_size), labels) for name in PROBE_MASKS]
        self.counts += np.asarray([len(images)] + hits, np.int64)

    def _hits(self, images: np.ndarray, labels: np.ndarray) -> int:
        return _probe_hits(self.model, images, labels, self.input_size, self.device, self.mean, self.std)

    def metrics(self, counts: np.ndarray | None = None) -> dict[str, float]:
        """The probe's top-1 shares from `counts` (default this object's), rounded to 4 digits."""
        counts = self.counts if counts is None else np.asarray(counts)
        n = int(counts[0])
        names = ("full",) + PROBE_MASKS
        return {f"probe_top1_{name}": round(int(hits) / n if n else 0.0, 4) for name, hits in zip(names, counts[1:])}


def probe_metrics(counts: ProbeCounts, images: np.ndarray, labels: np.ndarray, keep: np.ndarray,
                  batch_size: int) -> dict[str, float]:
    """The probe's top-1 on full uint8 images [N, H, W, 3], and on images kept with `keep` [N, L], random and
    highest-pixel-std masks of the same K (dropped patches zeroed). A scorer earns its place when
    `probe_top1_kept` beats `probe_top1_random_keep` and reaches `probe_top1_std_keep`. The whole-array form
    of `ProbeCounts`: every batch of `batch_size` images is added to the fresh `counts`."""
    n = len(keep)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        counts.add(images[rows], labels[rows], keep[rows], rows)
    return counts.metrics()


# ---------------------------------------------------------------------------------------------------
# The figure


def figure_rows(labels: np.ndarray, count: int = 8) -> np.ndarray:
    """Up to `count` image rows to show: the first of each class in class order, then the next ones."""
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:count]
    rest = [i for i in range(len(labels)) if i not in set(firsts)][:count - len(firsts)]
    return np.asarray(sorted(firsts + rest), dtype=np.int64)


class FigureSamples:
    """The few images the figure shows (`figure_rows` of all the labels), picked out while batches pass."""

    def __init__(self, positions: np.ndarray):
        self.wanted = np.asarray(positions, np.int64)
        self.positions, self.images, self.maps, self.keep = [], [], [], []

    def add(self, positions: np.ndarray, images: np.ndarray, maps: np.ndarray, keep: np.ndarray) -> None:
        take = np.flatnonzero(np.isin(positions, self.wanted))
        for name, values in (("positions", positions), ("images", images), ("maps", maps), ("keep", keep)):
            getattr(self, name).append(np.asarray(values)[take])

    def arrays(self, image_shape: tuple[int, ...], num_patches: int) -> tuple[np.ndarray, ...]:
        """(positions int64 [m], images uint8 [m, H, W, C], maps float32 [m, H, W], keep bool [m, L]) so far."""
        empty = (np.zeros(0, np.int64), np.zeros((0,) + tuple(image_shape), np.uint8),
                 np.zeros((0,) + tuple(image_shape[:2]), np.float32), np.zeros((0, num_patches), bool))
        if not self.positions:
            return empty
        return tuple(np.concatenate(parts) for parts in (self.positions, self.images, self.maps, self.keep))


def _scored(scorer: PatchScorer, batch: tuple, num_patches: int, keeps_all: bool) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 [b, H, W], scores float32 [b, L]) of one (images, labels, positions) batch; at drop 0
    (`keeps_all`) every patch is kept whatever the scores, so none are computed (all zero)."""
    images, labels, positions = batch
    if keeps_all:
        return np.zeros(images.shape[:3], np.float32), np.zeros((len(images), num_patches), np.float32)
    return scorer.scores(images, labels, positions)


def score_batches(scorer: PatchScorer, batches: Iterable, drop: float, num_patches: int, *,
                  probe: ProbeCounts | None = None, figure: FigureSamples | None = None,
                  on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Score (uint8 images [b, H, W, 3], labels [b], positions [b]) batches and choose their keep masks.

    Each batch is scored (`_scored`), its keep mask chosen (`keep_mask`), then handed to `probe`, `figure`
    and `on_batch(images, labels, positions, scores, keep)` (the compress pass's compact writer), and let
    go: only the scores and keep masks stay. Returns (scores float32 [n, L], keep bool [n, L]) in order.
    """
    all_scores, all_keep = [], []
    keeps_all = kept_count(num_patches, drop) == num_patches
    for batch in batches:
        images, labels, positions = (np.asarray(a) for a in batch)
        maps, scores = _scored(scorer, (images, labels, positions), num_patches, keeps_all)
        keep = keep_mask(scores, drop)
        if probe is not None:
            probe.add(images, labels, keep, positions)
        if figure is not None:
            figure.add(positions, images, maps, keep)
        if on_batch is not None:
            on_batch(images, labels, positions, scores, keep)
        all_scores.append(scores)
        all_keep.append(keep)
    if not all_scores:  # a torchrun rank with no rows
        return np.zeros((0, num_patches), np.float32), np.zeros((0, num_patches), bool)
    return np.concatenate(all_scores), np.concatenate(all_keep)


def plot_patches(path, images: np.ndarray, maps: np.ndarray, keep: np.ndarray, patch_size: int,
                 titles: list[str], map_name: str = "GradCAM++") -> None:
    """A PNG grid, one column per image; rows: original | the scorer's map | kept patches over grey.

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
    for i, name in enumerate(("original", map_name, "kept")):
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
