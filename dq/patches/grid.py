"""The patch grid: the rules every stage shares about square images cut into p×p patches.

One home for each rule: `patch_size` divides the image side (`grid_of`, also called by params
validation), K = L - round(drop * L) patches are kept (`kept_count`; `drop_problem` is the one check of
`patches.drop`), patches are numbered in raster order (`to_patches`, NumPy [N, L, p, p, C]; the MAE's
`patchify` in dq.mae.model is its own torch layout [N, L, p*p*3]), and a patch keep mask [N, L] expands
to a pixel mask [N, H, W] (`pixel_keep`). Pure NumPy, so params validation can use it without importing
torch.
"""
from __future__ import annotations

import numpy as np

from dq.core.errors import DQError


def grid_of(image_size: int, patch_size: int) -> tuple[int, int]:
    """The patch grid (rows, cols) of a square image; `patch_size` must divide `image_size`."""
    if patch_size < 1 or image_size % patch_size:
        raise DQError(f"patches.patch_size = {patch_size} is not allowed; expected a divisor of the "
                      f"image size {image_size}")
    return image_size // patch_size, image_size // patch_size


def kept_count(num_patches: int, drop: float) -> int:
    """K = L - round(drop * L), with Python's round (half to even)."""
    return num_patches - round(drop * num_patches)


def drop_problem(drop, num_patches: int | None = None) -> str | None:
    """What `patches.drop` must be when it is not: a share in [0, 1) that, on a grid of `num_patches`, keeps
    at least one patch. The one check of the rule: params validation calls it once per run."""
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
        return "a number in [0, 1)"
    if num_patches is not None and kept_count(num_patches, drop) < 1:
        return (f"a share that keeps at least one of the {num_patches} patches of each image, or a smaller "
                "patches.patch_size")
    return None


def to_patches(images: np.ndarray, patch_size: int) -> np.ndarray:
    """[N, H, W, C] → [N, L, p, p, C], patches in raster order (row by row of the grid)."""
    n, h, w, c = images.shape
    p = patch_size
    x = images.reshape(n, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), p, p, c)


def from_patches(patches: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[N, L, p, p, C] → [N, H, W, C]; the inverse of `to_patches`."""
    n, _, p, _, c = patches.shape
    rows, cols = grid
    x = patches.reshape(n, rows, cols, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, rows * p, cols * p, c)


def pixel_keep(keep: np.ndarray, patch_size: int, image_size: int | tuple[int, int]) -> np.ndarray:
    """keep bool [N, L] -> bool [N, H, W]: True on the pixels of kept patches (`image_size`: S or (H, W))."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid = np.asarray(keep, dtype=bool).reshape(-1, h // patch_size, w // patch_size)
    return grid.repeat(patch_size, axis=1).repeat(patch_size, axis=2)


def zero_dropped(images: np.ndarray, keep: np.ndarray, patch_size: int, *, in_place: bool = False) -> np.ndarray:
    """uint8 images [N, H, W, C] with the pixels of dropped patches (keep [N, L] False) set to 0, as every
    reader of the compact store returns them: a multiply on the patch grid view, several times faster than a
    boolean mask. `in_place` writes into `images` (C-contiguous) instead of a copy."""
    out = images if in_place else np.array(images, dtype=np.uint8, copy=True, order="C")
    n, h, w, c = out.shape
    grid = out.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size, c)
    grid *= np.asarray(keep, bool).reshape(n, h // patch_size, 1, w // patch_size, 1, 1)
    return out


def extract_patches(images: np.ndarray, keep: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 images [N, H, W, C] and keep [N, L] (K True per row) → kept patches [N, K, p, p, C]."""
    n = images.shape[0]
    counts = keep.sum(axis=1)
    if n and (counts != counts[0]).any():
        raise ValueError("every row of keep must hold the same number of True values")
    k = int(counts[0]) if n else 0
    everything = to_patches(images, patch_size)
    # boolean indexing walks rows then grid positions: raster order within each image
    return np.ascontiguousarray(everything[keep].reshape(n, k, patch_size, patch_size, images.shape[3]))


def assemble(patches: np.ndarray, keep: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Kept patches [N, K, p, p, C] and keep [N, L] → images [N, H, W, C], dropped patches zero."""
    n, k, p, _, c = patches.shape
    full = np.zeros((n, keep.shape[1], p, p, c), dtype=patches.dtype)
    full[keep] = patches.reshape(n * k, p, p, c)
    return from_patches(full, grid)
