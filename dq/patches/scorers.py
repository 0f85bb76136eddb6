"""Patch scorers: images → importance maps → patch scores → which patches of each image are kept.

The steps, one function each (NumPy only: this module loads without torch, so params validation reads the
registry):

    PatchScorer.maps  uint8 images [N, H, W, 3], labels [N] → importance maps float32 [N, H, W]
    patch_scores      maps [N, H, W] → mean of each p×p patch, float32 [N, L], raster order
    keep_mask         scores [N, L] → bool [N, L], the K = L - round(drop * L) highest scores

Scorers (`patches.scorer`) are entries of the registry `SCORERS` (dq.core.registry), pytorch-grad-cam's BaseCAM
style: `PatchScorer` owns the machinery (maps to patch scores), each variant overrides `maps` only and
declares whether it needs the probed backbone and a CAM layer (`needs_model`; the compress stage builds
them only then):

    gradcam++-flat-first  flat patches (every pixel the same colour: empty background, padding) go first,
                          outermost ring of the grid first, then GradCAM++ decides among the rest (the
                          default)
    gradcam++             GradCAM++ on the features backbone followed by the features stage's linear
                          probe (the paper; the class and its maps live in dq.patches.cam, which loads torch)
    pixel-std             the standard deviation of each patch's pixel values: flat patches go first
    random                uniform random scores under `seed`: the baseline every scorer must beat

Adding a scorer is one class:

    @SCORERS.register("brightness")
    class Brightness(PatchScorer):
        def maps(self, images, labels, positions=None):
            return images.mean(axis=3).astype(np.float32) / 255.0   # bright patches kept first

Why flat-first: a flat patch holds one colour and nothing else, and dropping it loses only that colour
(MAE fills it back from its neighbours). GradCAM++ alone, at 4×4 resolution on 32-px images, spends part
of the drop budget on content next to the object while flat background survives. Measured on the
default (docs/RESULTS.md, "The backbone and the patch scorers"), flat-first GradCAM++ keeps what the
probe needs as well as pixel-std at drop 0.25 and better at 0.5, where pixel-std has to cut into content.
Among the flat patches GradCAM++ has nothing to say (its coarse map is smeared over them from the
object), so they go in a fixed order: the outermost ring of the patch grid first (`grid_rings`), lower
grid index kept on a tie. Dropped background then sits at the same places in most images, and the keep
mask, the one part of the store that dropping adds, compresses to about 0.6x of its size under
GradCAM++'s order (docs/RESULTS.md, "What dropping costs").

Ties in `keep_mask` go to the lower grid index (a stable sort), so a flat map keeps the first K
patches. Every scorer gives each image the same scores whatever the batches around it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dq.core.errors import DQError
from dq.patches.grid import grid_of, kept_count
from dq.core.registry import Registry

SCORERS = Registry("patch scorer", "patches.scorer", needs_model=False)
MAX_UINT8_STD = 127.5  # the largest std uint8 values can have: scales pixel-std maps into [0, 1]


def patch_scores(maps: np.ndarray, patch_size: int) -> np.ndarray:
    """Mean of each p×p patch: maps [N, H, W] → float32 [N, L], L = (H/p)(W/p), raster order."""
    n, h, w = maps.shape
    p = patch_size
    rows, cols = grid_of(h, p)
    blocks = maps.reshape(n, rows, p, cols, p).astype(np.float64)
    return blocks.mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


def keep_mask(scores: np.ndarray, drop: float) -> np.ndarray:
    """bool [N, L]: the K = L - round(drop * L) highest scores of each row; ties keep the lower index.

    NaN scores rank lowest. `drop` is checked once, when params load (dq.patches.grid.drop_problem).
    """
    return keep_top(scores, kept_count(scores.shape[1], drop))


def keep_top(scores: np.ndarray, k: int) -> np.ndarray:
    """bool [N, L]: the k highest scores of each row (`keep_mask` for K = k); ties keep the lower index."""
    n, num_patches = scores.shape
    ranked = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")  # stable: equal scores stay in grid order
    keep = np.zeros((n, num_patches), dtype=bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    return keep


# ---------------------------------------------------------------------------------------------------
# Scorers: one base owns the machinery, each variant overrides `maps`


class PatchScorer:
    """Images → importance maps → patch scores → keep masks. Subclasses override `maps` only.

    Scorers work batch by batch: `positions` are the batch's places in the whole scored set (0..n-1,
    default 0..len-1, i.e. the batch is the set), and every scorer gives each image the same scores
    whatever the batches around it (the random scorer draws row `position` of its seeded [n, L] draw;
    GradCAM++ maps each image on its own, up to float order inside a batch).
    """

    name = ""

    def __init__(self, patch_size: int, **context):
        # `context` (seed, probed: `create_scorer`'s keywords) is there for the scorers that need it; the
        # others ignore it
        self.patch_size = patch_size

    def maps(self, images: np.ndarray, labels: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """uint8 images [N, H, W, 3], int labels [N] → float32 [N, H, W]; higher = keep first."""
        raise NotImplementedError

    def scores(self, images: np.ndarray, labels: np.ndarray,
               positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(maps float32 [N, H, W], patch scores float32 [N, L])."""
        maps = self.maps(images, labels, positions)
        return maps, patch_scores(maps, self.patch_size)


def per_patch_map(values: np.ndarray, patch_size: int) -> np.ndarray:
    """One value per patch [N, rows, cols] → a map [N, rows·p, cols·p] constant over each patch."""
    return np.repeat(np.repeat(values, patch_size, axis=1), patch_size, axis=2).astype(np.float32)


def pixel_std_scores(images: np.ndarray, patch_size: int) -> np.ndarray:
    """Standard deviation of each patch's pixel values (all channels): uint8 [N, H, W, C] → float32 [N, L]."""
    n, h, w, c = images.shape
    rows, cols = grid_of(h, patch_size)
    blocks = images.reshape(n, rows, patch_size, cols, patch_size, c).astype(np.float64)
    return blocks.std(axis=(2, 4, 5)).reshape(n, -1).astype(np.float32)


def flat_patches(images: np.ndarray, patch_size: int) -> np.ndarray:
    """bool [N, L]: True where every pixel of the patch has the same colour (uint8 images [N, H, W, C])."""
    n, h, w, c = images.shape
    rows, cols = grid_of(h, patch_size)
    blocks = images.reshape(n, rows, patch_size, cols, patch_size, c)
    return (blocks.max(axis=(2, 4)) == blocks.min(axis=(2, 4))).all(axis=-1).reshape(n, -1)


def random_scores(n: int, num_patches: int, seed: int) -> np.ndarray:
    """Uniform random scores float32 [n, L] under `seed`: the same for the random scorer and its metric."""
    return np.random.default_rng(seed).random((n, num_patches), dtype=np.float32)


class RandomRows:
    """Rows of `random_scores(n, L, seed)` on demand, for any n, without drawing the whole [n, L].

    Consecutive draws of one generator continue one stream (tests/test_cam.py checks it), so asking for
    rows in increasing order draws each value once; rows before the last one asked for restart the
    stream, and rows further on skip ahead in blocks.
    """

    SKIP_BLOCK = 1 << 20  # values drawn and dropped at a time when skipping ahead

    def __init__(self, num_patches: int, seed: int):
        self.num_patches, self.seed = num_patches, seed
        self._restart()

    def _restart(self) -> None:
        self._rng, self._next = np.random.default_rng(self.seed), 0

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """float32 [len(positions), L]: the rows `positions` of the seeded draw."""
        positions = np.asarray(positions, np.int64).reshape(-1)
        if positions.size == 0:
            return np.zeros((0, self.num_patches), np.float32)
        first, last = int(positions.min()), int(positions.max()) + 1
        if first < self._next:
            self._restart()
        step = max(1, self.SKIP_BLOCK // max(self.num_patches, 1))
        while self._next < first:
            take = min(step, first - self._next)
            self._rng.random((take, self.num_patches), dtype=np.float32)
            self._next += take
        block = self._rng.random((last - first, self.num_patches), dtype=np.float32)
        self._next = last
        return block[positions - first]


@SCORERS.register("pixel-std")
class PixelStd(PatchScorer):
    """Keeps the patches whose pixels vary most: edges and texture, not flat background."""

    name = "pixel-std"

    def maps(self, images, labels, positions=None):
        rows, cols = grid_of(images.shape[1], self.patch_size)
        values = pixel_std_scores(images, self.patch_size).reshape(len(images), rows, cols)
        return per_patch_map(values / MAX_UINT8_STD, self.patch_size)


@SCORERS.register("random")
class RandomScores(PatchScorer):
    """Uniform random patch scores: the baseline."""

    name = "random"

    def __init__(self, patch_size: int, seed: int = 0, **context):
        super().__init__(patch_size)
        self.seed = seed
        self._rows: RandomRows | None = None

    def maps(self, images, labels, positions=None):
        rows, cols = grid_of(images.shape[1], self.patch_size)
        if self._rows is None or self._rows.num_patches != rows * cols:
            self._rows = RandomRows(rows * cols, self.seed)
        positions = np.arange(len(images)) if positions is None else positions
        values = self._rows.rows(positions).reshape(len(images), rows, cols)
        return per_patch_map(values, self.patch_size)


def grid_rings(rows: int, cols: int) -> np.ndarray:
    """float [rows, cols] in [0, 1]: 0 on the outermost ring of the grid, rising ring by ring to 1 at the centre."""
    y, x = np.mgrid[:rows, :cols]
    ring = np.minimum(np.minimum(y, rows - 1 - y), np.minimum(x, cols - 1 - x))
    return ring / max(int(ring.max()), 1)


# GradCAM++ needs torch and pytorch-grad-cam: its scorers live in dq.patches.cam, registered here by name so that
# params validation and every stage read the names without loading torch
SCORERS.register_lazy("gradcam++", "dq.patches.cam:GradCamPlusPlus", needs_model=True)
SCORERS.register_lazy("gradcam++-flat-first", "dq.patches.cam:GradCamFlatFirst", needs_model=True)


@dataclass(frozen=True)
class ProbedModel:
    """The probed backbone a scorer that `needs_model` reads (GradCAM++), and how to run it.

    `model` (a torch module) maps float [N, 3, S, S] to logits over the dataset's classes: the backbone and
    the features stage's linear probe. `layer` is the module GradCAM++ hooks (dq.patches.cam.target_layer).
    Images are resized to S = `input_size` and go `batch_size` at a time to `device`.
    """

    model: Any
    layer: Any
    input_size: int
    batch_size: int = 64
    device: Any = "cpu"
    progress: bool = True


def create_scorer(name: str, patch_size: int, *, seed: int = 0, probed: ProbedModel | None = None) -> PatchScorer:
    """The registered scorer `name` (patches.scorer); one that `needs_model` needs `probed`, with its target
    layer."""
    entry = SCORERS.get(name)
    if entry.needs_model and (probed is None or probed.layer is None):
        raise DQError(f"patches.scorer = {name!r} needs the probed backbone and a target layer")
    return entry.obj(patch_size, seed=seed, probed=probed)
