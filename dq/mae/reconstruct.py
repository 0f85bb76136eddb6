"""Reconstructing dropped patches: the MAE's reconstruction with exact kept pixels, two simple fills, their
PSNR/SSIM on the dropped pixels (the `mae` stage's evaluation) and the reconstruction figure.

Mask mapping (`map_keep`). Stored masks live on the stored grid (patch p_s on S-px images); the MAE has
its own grid (patch p_m on T-px images, after a bilinear resize S -> T). An MAE patch is KEPT only if
every stored pixel that its resized pixels are interpolated from lies in a kept stored patch. Why this
conservative rule: dropped pixels are arbitrary (zero in the compact format), so an MAE patch that mixes
in any of them would feed garbage to the encoder; with this rule the reconstruction does not depend on
the dropped pixels at all (tested). The price is that a few kept pixels next to dropped ones are
predicted too, which costs nothing: `reconstruct` pastes back every kept stored pixel exactly.

Equal counts. The encoder needs the same number of kept tokens in every row of a batch. When grids
differ, rows can map to different counts, so `reconstruct` groups rows by their count (stable order)
and batches within a group; nothing is un-kept, and results do not depend on the batch size.

norm_pix_loss. With it the decoder predicts each patch normalised by its own mean/std, which a dropped
patch does not have. `reconstruct` then borrows them: the mean of the per-patch means and variances of
the kept patches in the 3x3 neighbourhood (else of all kept patches of the image). The small default MAE
is trained WITHOUT it (params.yaml `mae.norm_pix_loss: false`) and predicts pixels directly: with
borrowed statistics the fills' PSNR stayed ~2.5 dB lower in a short Fashion-MNIST comparison. The
reference visualisation checkpoint `mae_visualize_vit_large` was also trained without it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dq.core.figures import pyplot, save_png
from dq.patches.grid import grid_of, kept_count, pixel_keep
from dq.data.prepared import open_store
from dq.mae.model import MaskedAutoencoderViT, from_model_output, resize, to_model_input
from dq.params import Params
from dq.core.runtime import autocast

FIGURE_IMAGES = 6
DROPPED_COLOUR = (70, 110, 180)


# --------------------------------------------------------------------------------------------------
# Mask mapping: the stored grid to the MAE's
# --------------------------------------------------------------------------------------------------
def _footprint(i: int, mae_size: int, mae_patch: int, stored_size: int) -> tuple[int, int]:
    """Stored pixel rows [lo, hi] that bilinear upsampling (align_corners=False) reads for MAE patch row i.

    Output pixel t reads source x = (t + 0.5) * S / T - 0.5, i.e. floor(x) and ceil(x), clamped; in
    integers x = ((2t + 1) * S - T) / (2T).
    """
    if mae_size == stored_size:
        return i * mae_patch, (i + 1) * mae_patch - 1
    a, b = i * mae_patch, (i + 1) * mae_patch - 1
    den = 2 * mae_size
    lo = ((2 * a + 1) * stored_size - mae_size) // den
    hi = -((-((2 * b + 1) * stored_size - mae_size)) // den)
    return max(lo, 0), min(hi, stored_size - 1)


def grid_map(stored_size: int, stored_patch: int, mae_size: int, mae_patch: int) -> np.ndarray:
    """bool [Gm, Gs]: MAE patch row i reads stored patch row j (the same holds for columns)."""
    gm, gs = mae_size // mae_patch, stored_size // stored_patch
    reads = np.zeros((gm, gs), dtype=bool)
    for i in range(gm):
        lo, hi = _footprint(i, mae_size, mae_patch, stored_size)
        reads[i, lo // stored_patch:hi // stored_patch + 1] = True
    return reads


def map_keep(keep: np.ndarray, stored_size: int, stored_patch: int, mae_size: int, mae_patch: int) -> np.ndarray:
    """keep bool [N, Ls] on the stored grid -> bool [N, Lm] on the MAE grid.

    An MAE patch is kept only if every stored patch it reads (after the bilinear resize) is kept.
    """
    gs, gm = stored_size // stored_patch, mae_size // mae_patch
    keep = np.asarray(keep, dtype=bool).reshape(-1, gs, gs)
    reads = grid_map(stored_size, stored_patch, mae_size, mae_patch).astype(np.int64)  # [Gm, Gs]
    dropped = (~keep).astype(np.int64)
    # dropped stored patches read by MAE patch (i, k): sum_j,l reads[i, j] dropped[j, l] reads[k, l]
    touched = np.einsum("ij,njl,kl->nik", reads, dropped, reads)
    return (touched == 0).reshape(-1, gm * gm)


# --------------------------------------------------------------------------------------------------
# The MAE's reconstruction
# --------------------------------------------------------------------------------------------------
def _neighbour_stats(target: torch.Tensor, keep: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """target [N, L, p*p*3], keep [N, L] -> mean, var [N, L, 1]: each patch's own for kept patches, else
    the average over kept patches in its 3x3 neighbourhood, else over all kept patches of the image."""
    mean = target.mean(dim=-1)
    var = target.var(dim=-1)
    k = keep.to(target.dtype)
    n = target.shape[0]

    def pooled(v):
        return F.avg_pool2d(v.view(n, 1, grid, grid), 3, stride=1, padding=1, count_include_pad=False)

    weight = pooled(k).view(n, -1)
    local_mean = pooled(mean * k).view(n, -1) / weight.clamp_min(1e-12)
    local_var = pooled(var * k).view(n, -1) / weight.clamp_min(1e-12)
    count = k.sum(dim=1, keepdim=True)
    global_mean = (mean * k).sum(dim=1, keepdim=True) / count.clamp_min(1)
    global_var = torch.where(count > 0, (var * k).sum(dim=1, keepdim=True) / count.clamp_min(1),
                             torch.ones_like(count))
    borrow_mean = torch.where(weight > 0, local_mean, global_mean)
    borrow_var = torch.where(weight > 0, local_var, global_var)
    return (torch.where(keep, mean, borrow_mean).unsqueeze(-1),
            torch.where(keep, var, borrow_var).unsqueeze(-1))


@torch.no_grad()
def predict_images(model: MaskedAutoencoderViT, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [N, 3, T, T] normalised, keep [N, L] (equal counts) -> [N, 3, T, T] in [0, 1]: kept patches
    from x, dropped ones predicted."""
    latent, ids_restore = model.forward_encoder(x, keep)
    pred = model.forward_decoder(latent, ids_restore).float()
    target = model.patchify(x.float())
    if model.norm_pix_loss:
        mean, var = _neighbour_stats(target, keep, model.config.grid)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    patches = torch.where(keep.unsqueeze(-1), target, pred)
    return from_model_output(model.unpatchify(patches), model.config)


def _batches_by_count(counts: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices grouped by their kept count (stable order), in batches of at most batch_size."""
    out = []
    for c in np.unique(counts):
        rows = np.flatnonzero(counts == c)
        out.extend(rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return out


MAP_CHUNK = 65536  # rows of keep mapped at a time: bounds the einsum's int64 temporaries


def reconstruction_batches(keep: np.ndarray, patch_size: int, image_size: int, model: MaskedAutoencoderViT,
                 batch_size: int) -> list[np.ndarray]:
    """The batches `reconstruct` runs: rows grouped by their kept count on the MAE's grid (stable order),
    at most `batch_size` a batch, each batch's rows increasing. Needs only the keep masks [N, L]."""
    cfg = model.config
    keep = np.asarray(keep, dtype=bool)
    counts = np.concatenate([map_keep(keep[s:s + MAP_CHUNK], image_size, patch_size, cfg.img_size,
                                      cfg.patch_size).sum(axis=1) for s in range(0, len(keep), MAP_CHUNK)]
                            or [np.zeros(0, np.int64)])
    return _batches_by_count(counts, batch_size)


@torch.no_grad()
def reconstruct_batch(model: MaskedAutoencoderViT, images: np.ndarray, keep: np.ndarray, patch_size: int,
               device: torch.device) -> np.ndarray:
    """One batch of `reconstruction_batches`: uint8 [b, H, W, 3] (dropped pixels arbitrary) and its keep bool [b, L]
    -> uint8 [b, H, W, 3], kept pixels exactly the input's. `model` is on `device`, in eval mode."""
    cfg, h = model.config, images.shape[1]
    keep_m = map_keep(keep, h, patch_size, cfg.img_size, cfg.patch_size)
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True), cfg)
    with autocast(device):
        filled = predict_images(model, x, torch.from_numpy(keep_m).to(device, non_blocking=True))
    filled = resize(filled.float(), h).clamp_(0.0, 1.0)
    filled = (filled * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.where(pixel_keep(keep, patch_size, h)[:, :, :, None], images, filled)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: np.ndarray, keep: np.ndarray, patch_size: int, *,
                batch_size: int = 256, device: torch.device | str | None = None,
                progress: bool = True) -> np.ndarray:
    """Fill the dropped patches of `images` with the MAE's prediction.

    images uint8 [N, H, W, 3] (dropped pixels arbitrary), keep bool [N, L] on the stored grid of
    `patch_size` -> uint8 [N, H, W, 3] where every kept pixel equals the input exactly. In memory; the
    rebuilt cache reconstructs a store batch by batch (dq.mae.rebuilt: `reconstruction_batches`,
    `reconstruct_batch`, the same batches, the same bytes).
    """
    from tqdm import tqdm

    images = np.asarray(images)
    keep = np.asarray(keep, dtype=bool)
    n, h, w, c = images.shape if images.ndim == 4 else (0, 0, 0, 0)
    if images.ndim != 4 or h != w or c != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, S, S, 3], got {images.dtype} {list(images.shape)}")
    rows, cols = grid_of(h, patch_size)
    if keep.shape != (n, rows * cols):
        raise ValueError(f"keep must be bool [N, {rows * cols}] for {patch_size}-px patches on "
                         f"{h}-px images, got {list(keep.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    out = images.copy()
    batches = reconstruction_batches(keep, patch_size, h, model, batch_size)
    for rows in tqdm(batches, desc="mae reconstruct", unit="batch", disable=not progress, leave=False):
        out[rows] = reconstruct_batch(model, images[rows], keep[rows], patch_size, device)
    return out


# --------------------------------------------------------------------------------------------------
# Simple fills and quality metrics
# --------------------------------------------------------------------------------------------------
def mean_fill(images: np.ndarray, keep: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 [N, H, W, 3]: dropped pixels set to the mean colour of the image's kept pixels."""
    kept = pixel_keep(keep, patch_size, images.shape[1])[..., None]
    total = (images.astype(np.float64) * kept).sum(axis=(1, 2))
    count = np.maximum(kept.sum(axis=(1, 2)), 1)
    colour = np.round(total / count).astype(np.uint8)[:, None, None, :]
    return np.where(kept, images, colour)


def nearest_fill(images: np.ndarray, keep: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 [N, H, W, 3]: each dropped pixel copies its nearest kept pixel (Euclidean distance)."""
    from scipy.ndimage import distance_transform_edt

    kept = pixel_keep(keep, patch_size, images.shape[1])
    out = images.copy()
    for i in range(images.shape[0]):
        if kept[i].all() or not kept[i].any():
            continue
        _, (rr, cc) = distance_transform_edt(~kept[i], return_indices=True)
        out[i] = images[i][rr, cc]
    return out


def psnr_dropped(pred: np.ndarray, target: np.ndarray, dropped: np.ndarray) -> float:
    """Mean over images of the PSNR (dB, 8-bit range) on the dropped pixels; dropped bool [N, H, W].

    An exact match counts as 100 dB, so one perfect image cannot make the mean infinite."""
    from skimage.metrics import peak_signal_noise_ratio

    values = []
    for i in range(pred.shape[0]):
        if dropped[i].any():
            with np.errstate(divide="ignore"):  # an exact match is infinite here, capped below
                db = peak_signal_noise_ratio(target[i][dropped[i]], pred[i][dropped[i]], data_range=255)
            values.append(min(100.0, float(db)))
    return float(np.mean(values)) if values else float("nan")


def ssim_dropped(pred: np.ndarray, target: np.ndarray, dropped: np.ndarray) -> float:
    """Mean over images of the full-image SSIM map averaged over the dropped pixels; uint8 [N, H, W, 3],
    dropped bool [N, H, W].

    The map is Wang et al. 2004's, as scikit-image computes it: Gaussian window (sigma 1.5, 11 taps),
    K1 = 0.01, K2 = 0.03, population (co)variances, borders reflected, averaged over channels.
    """
    from skimage.metrics import structural_similarity

    # With Gaussian weights the window size only crops skimage's own mean, which is not used here; but
    # skimage refuses a window larger than the image, and data.image_size may be as small as 8.
    side = min(pred.shape[1:3])
    win_size = min(11, side if side % 2 else side - 1)
    values = []
    for i in range(pred.shape[0]):
        if dropped[i].any():
            _, full = structural_similarity(pred[i], target[i], data_range=255, channel_axis=2,
                                            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            full=True, win_size=win_size)
            values.append(full.mean(axis=-1)[dropped[i]].mean())
    return float(np.mean(values)) if values else float("nan")


def eval_keep(n: int, num_patches: int, drop: float, seed: int) -> np.ndarray:
    """bool [N, L]: the L - K patches that compress would drop (dq.patches.grid.kept_count), drawn from `seed` alone."""
    rng = np.random.default_rng(seed)
    num_drop = num_patches - kept_count(num_patches, drop)
    keep = np.ones((n, num_patches), dtype=bool)
    for i in range(n):
        keep[i, rng.permutation(num_patches)[:num_drop]] = False
    return keep


# --------------------------------------------------------------------------------------------------
# The mae stage's evaluation and figure
# --------------------------------------------------------------------------------------------------
def reconstruction_metrics(model: MaskedAutoencoderViT, params: Params, test_images: Path, figure: Path,
                           device: torch.device) -> dict:
    """PSNR/SSIM on the dropped patches of the first mae.eval_images images of `test_images` (the prepared
    test split): the MAE against the simple fills. Also draws the reconstruction figure at `figure`.

    The masks are drawn from `seed` at `patches.drop` / `patches.patch_size`, not read from the compact
    store, so the MAE's evaluation does not depend on selection or compression.
    """
    test = open_store(test_images)
    originals = test.read(np.arange(min(params.mae.eval_images, len(test))))  # only the images scored
    size, patch = originals.shape[1], params.patches.patch_size
    rows, cols = grid_of(size, patch)  # params validation checked this against data.image_size
    keep = eval_keep(len(originals), rows * cols, params.patches.drop, params.seed)
    kept_px = pixel_keep(keep, patch, size)
    masked = np.where(kept_px[..., None], originals, 0).astype(np.uint8)
    fills = {
        "mae": reconstruct(model, masked, keep, patch, batch_size=params.mae.batch_size, device=device),
        "mean_fill": mean_fill(masked, keep, patch),
        "nearest_fill": nearest_fill(masked, keep, patch),
    }
    dropped = ~kept_px
    metrics = {name: {"psnr": round(psnr_dropped(img, originals, dropped), 4),
                      "ssim": round(ssim_dropped(img, originals, dropped), 5)}
               for name, img in fills.items()}
    metrics.update(eval_images=len(originals), drop=params.patches.drop, patch_size=patch, arch=params.mae.arch)
    # dropped patches shown in a colour no prepared image has, so black backgrounds do not hide them
    shown = np.where(kept_px[..., None], originals, np.array(DROPPED_COLOUR, np.uint8)).astype(np.uint8)
    save_reconstruction_figure(figure, originals[:FIGURE_IMAGES], shown[:FIGURE_IMAGES],
                               fills["mae"][:FIGURE_IMAGES])
    return metrics


def save_reconstruction_figure(path: str | Path, originals: np.ndarray, kept: np.ndarray,
                               reconstructed: np.ndarray) -> None:
    """A PNG grid, one row per image: original | kept | reconstructed (uint8 [n, H, W, 3] each)."""
    plt = pyplot()
    n = len(originals)
    fig, axes = plt.subplots(n, 3, figsize=(4.5, 1.5 * n + 0.3), squeeze=False)
    for row in range(n):
        for col, (title, imgs) in enumerate((("original", originals), ("kept", kept),
                                             ("reconstructed", reconstructed))):
            ax = axes[row, col]
            ax.imshow(imgs[row], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
