"""The masked autoencoder that rebuilds dropped patches: model, registry, training, reconstruction.

The model is the reference MAE (facebookresearch/mae, `models_mae.py`: MaskedAutoencoderViT) built from
timm's ViT `Block` and `PatchEmbed`, so its `state_dict` has exactly the reference names and shapes and
the official checkpoints (`{'model': state_dict}`) load strictly. The one change: the mask is given, a
bool `keep` [N, L] (True = the encoder sees the patch), instead of drawn inside `forward_encoder`;
training draws it with `random_keep`.

Pixel convention. Every model, small or reference, takes RGB in [0, 1] normalised with the ImageNet
mean/std (`MaeConfig.mean/std`), as the reference checkpoints expect; for the small MAE this is just a
fixed affine map, and one convention means one code path.

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

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from dq.errors import DQError, first_line
from dq.figures import pyplot, save_png
from dq.runtime import autocast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# 2-D sin-cos position embeddings, as in the reference (util/pos_embed.py)
# --------------------------------------------------------------------------------------------------
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """[grid_size*grid_size (+1), embed_dim]: fixed embeddings, a zero row first for the cls token."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([_1d_sincos(embed_dim // 2, grid[0]), _1d_sincos(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[M, embed_dim] from positions [M]: sin and cos at geometric frequencies."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------------------------------
# Config and registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaeConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> "MaeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names})


_REGISTRY: dict[str, Callable[[], MaeConfig]] = {}


def register_mae(fn: Callable[[], MaeConfig]) -> Callable[[], MaeConfig]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_maes() -> list[str]:
    return sorted(_REGISTRY)


def mae_config(name: str, **overrides) -> MaeConfig:
    if name not in _REGISTRY:
        raise DQError(f"mae.arch = {name!r} is not a known MAE; expected one of {', '.join(list_maes())}")
    return dataclasses.replace(_REGISTRY[name](), **overrides)


def create_mae(name: str, **overrides) -> "MaskedAutoencoderViT":
    """Build a registered MAE, e.g. `create_mae('mae_vit_tiny_patch4', norm_pix_loss=True)`."""
    return MaskedAutoencoderViT(mae_config(name, **overrides))


@register_mae
def mae_vit_base_patch16() -> MaeConfig:
    return MaeConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_mae
def mae_vit_large_patch16() -> MaeConfig:
    return MaeConfig(patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register_mae
def mae_vit_huge_patch14() -> MaeConfig:
    return MaeConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16)


@register_mae
def mae_vit_tiny_patch4() -> MaeConfig:
    """32x32 images, 8x8 grid: the default MAE trained on the prepared training set (~1.0M parameters,
    sized so that 10 epochs on 6,000 images fit the pipeline's CPU budget)."""
    return MaeConfig(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                     decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4)


@register_mae
def mae_vit_micro_patch4() -> MaeConfig:
    """For tests: a few thousand parameters."""
    return MaeConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone; the reference model with a given keep mask."""

    def __init__(self, config: MaeConfig):
        super().__init__()
        self.config = c = config
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=c.mlp_ratio, qkv_bias=True, norm_layer=norm_layer, init_values=None)

        # encoder
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, c.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(c.embed_dim, c.num_heads) for _ in range(c.depth)])
        self.norm = norm_layer(c.embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, c.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block(c.decoder_embed_dim, c.decoder_num_heads)
                                             for _ in range(c.decoder_depth)])
        self.decoder_norm = norm_layer(c.decoder_embed_dim)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size**2 * c.in_chans, bias=True)

        self.norm_pix_loss = c.norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches**0.5)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dec = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec).float().unsqueeze(0))
        # patch_embed like nn.Linear, not nn.Conv2d: xavier on the flattened kernel
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, 3, H, W] -> x [N, L, p*p*3]"""
        p = self.patch_embed.patch_size[0]
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p**2 * 3)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, L, p*p*3] -> imgs [N, 3, H, W]"""
        p = self.patch_embed.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], 3, h * p, h * p)

    @staticmethod
    def keep_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """keep bool [N, L] -> ids_shuffle [N, L] (kept first, raster order), ids_restore [N, L], len_keep"""
        counts = keep.sum(dim=1)
        if keep.shape[0] and not bool((counts == counts[0]).all()):
            raise ValueError("keep must hold the same number of kept patches in every row")
        ids_shuffle = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        return ids_shuffle, ids_restore, int(counts[0]) if keep.shape[0] else 0

    def forward_encoder(self, imgs: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [N, 3, H, W], keep bool [N, L] -> latent [N, 1+K, D] of the kept tokens, ids_restore [N, L]"""
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        ids_shuffle, ids_restore, len_keep = self.keep_order(keep)
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2]))

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D], ids_restore [N, L] -> pred [N, L, p*p*3]"""
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs [N, 3, H, W], pred [N, L, p*p*3], mask [N, L] (0 keep, 1 remove) -> mean loss on removed patches"""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, keep: torch.Tensor):
        """imgs [N, 3, H, W], keep bool [N, L] -> loss, pred [N, L, p*p*3], mask [N, L] (1 = removed)"""
        latent, ids_restore = self.forward_encoder(imgs, keep)
        pred = self.forward_decoder(latent, ids_restore)
        mask = (~keep).to(pred.dtype)
        return self.forward_loss(imgs, pred, mask), pred, mask


def random_keep(n: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """bool [N, L]: int(L * (1 - mask_ratio)) kept patches per row, uniformly at random (the reference rule)."""
    len_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(n, num_patches, generator=generator)
    ids_keep = torch.argsort(noise, dim=1)[:, :len_keep]
    keep = torch.zeros(n, num_patches, dtype=torch.bool)
    keep.scatter_(1, ids_keep, True)
    return keep


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def checkpoint_dict(model: MaskedAutoencoderViT, arch: str) -> dict:
    """What `data/mae/model.pt` holds: the reference layout {'model': state_dict} plus how to rebuild."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"model": sd, "arch": arch, "config": model.config.as_dict()}


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict with key 'model' (a state dict); a DQError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DQError(f"{path}: MAE checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise DQError(f"{path}: not a readable MAE checkpoint ({first_line(exc, 160)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise DQError(f"{path}: expected a checkpoint dict with key 'model' holding the state dict")
    return ckpt


def load_state_strict(model: MaskedAutoencoderViT, state: dict, where: str, arch: str, *,
                      assign: bool = False) -> None:
    """Load `state` strictly, or one DQError line listing the first mismatched names."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                parts.append(f"{label}: {', '.join(names[:3])}{more}")
        hint = ""
        if any(s.startswith("pos_embed ") for s in shapes):
            hint = f"; check mae.input_size (this model is built for {model.config.img_size} px)"
        raise DQError(f"{where}: does not fit mae.arch = {arch!r}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=True, assign=assign)


def load_mae(path: str | Path, arch: str | None = None, **overrides) -> MaskedAutoencoderViT:
    """Rebuild an MAE from `data/mae/model.pt` (arch and config inside) or a reference checkpoint + `arch`."""
    ckpt = read_checkpoint(path)
    if "config" in ckpt and isinstance(ckpt["config"], dict):
        arch = ckpt.get("arch", arch)
        config = dataclasses.replace(MaeConfig.from_dict(ckpt["config"]), **overrides)
    elif arch is not None:
        config = mae_config(arch, **overrides)
    else:
        raise DQError(f"{path}: a reference checkpoint has no architecture; pass mae.arch")
    model = MaskedAutoencoderViT(config)
    load_state_strict(model, ckpt["model"], str(path), str(arch))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def to_model_input(images: torch.Tensor, config: MaeConfig) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, T, T], resized to the MAE's img_size and normalised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    x = resize(x, config.img_size)
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def from_model_output(x: torch.Tensor, config: MaeConfig) -> torch.Tensor:
    """float [N, 3, T, T] normalised -> float [N, 3, T, T] in [0, 1]"""
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp_(0.0, 1.0)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size], bilinear without antialiasing (the footprint `map_keep` assumes)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def lr_at(step: float, *, lr: float, warmup: float, total: float, min_lr: float = 0.0) -> float:
    """Linear warmup then half-cosine decay, in (fractional) epochs, as the reference lr_sched."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(total - warmup, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and tokens (1-D or [1, 1, D]), as timm's add_weight_decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in ("cls_token", "mask_token") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Each epoch's shuffle and masks come from (seed, epoch) alone, so a resumed run matches a straight one."""
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(state)


@dataclass
class TrainState:
    model: MaskedAutoencoderViT
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs finished


def train_epoch(state: TrainState, images: torch.Tensor, *, seed: int, mask_ratio: float, batch_size: int,
                lr: float, warmup_epochs: int, epochs: int, device: torch.device,
                progress=None) -> Iterator[float]:
    """Train one epoch over uint8 images [N, H, W, 3]; yields each batch's loss, once the epoch is done.

    The losses stay on the device until then: reading one per step would stall the GPU every step.
    """
    model, opt, epoch = state.model, state.optimizer, state.epoch
    gen = epoch_generator(seed, epoch)
    order = torch.randperm(images.shape[0], generator=gen)
    steps = math.ceil(images.shape[0] / batch_size)
    model.train()
    losses = []
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        keep = random_keep(len(idx), model.patch_embed.num_patches, mask_ratio, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch + i / steps, lr=lr, warmup=warmup_epochs, total=epochs)
        x = to_model_input(images[idx].to(device, non_blocking=True), model.config)
        with autocast(device):
            loss, _, _ = model(x, keep.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
        losses.append(loss.detach())
    state.epoch += 1
    yield from (torch.stack(losses).tolist() if losses else [])


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach: one kernel per step for all tensors; the per-tensor loop dominates small models on CPU
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), foreach=True)


# --------------------------------------------------------------------------------------------------
# Reconstruction
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


def pixel_keep(keep: np.ndarray, patch_size: int, image_size: int) -> np.ndarray:
    """keep bool [N, L] -> bool [N, H, W]: True on the pixels of kept patches."""
    g = image_size // patch_size
    grid = np.asarray(keep, dtype=bool).reshape(-1, g, g)
    return grid.repeat(patch_size, axis=1).repeat(patch_size, axis=2)


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


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: np.ndarray, keep: np.ndarray, patch_size: int, *,
                batch_size: int = 256, device: torch.device | str | None = None,
                progress: bool = True) -> np.ndarray:
    """Fill the dropped patches of `images` with the MAE's prediction.

    images uint8 [N, H, W, 3] (dropped pixels arbitrary), keep bool [N, L] on the stored grid of
    `patch_size` -> uint8 [N, H, W, 3] where every kept pixel equals the input exactly.
    """
    from tqdm import tqdm

    images = np.asarray(images)
    keep = np.asarray(keep, dtype=bool)
    n, h, w, c = images.shape if images.ndim == 4 else (0, 0, 0, 0)
    if images.ndim != 4 or h != w or c != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, S, S, 3], got {images.dtype} {list(images.shape)}")
    if h % patch_size or keep.shape != (n, (h // patch_size) ** 2):
        raise ValueError(f"keep must be bool [N, {(h // patch_size) ** 2}] for {patch_size}-px patches on "
                         f"{h}-px images, got {list(keep.shape)}")
    cfg = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    keep_m = map_keep(keep, h, patch_size, cfg.img_size, cfg.patch_size)
    kept_px = pixel_keep(keep, patch_size, h)
    out = images.copy()
    batches = _batches_by_count(keep_m.sum(axis=1), batch_size)
    for rows in tqdm(batches, desc="mae reconstruct", unit="batch", disable=not progress, leave=False):
        x = to_model_input(torch.from_numpy(images[rows]).to(device, non_blocking=True), cfg)
        with autocast(device):
            filled = predict_images(model, x, torch.from_numpy(keep_m[rows]).to(device, non_blocking=True))
        filled = resize(filled.float(), h).clamp_(0.0, 1.0)
        filled = (filled * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out[rows] = np.where(kept_px[rows, :, :, None], images[rows], filled)
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
    err = (pred.astype(np.float64) - target.astype(np.float64)) ** 2
    values = []
    for i in range(pred.shape[0]):
        if dropped[i].any():
            mse = err[i][dropped[i]].mean()
            values.append(min(100.0, 10.0 * math.log10(255.0**2 / max(mse, 1e-30))))
    return float(np.mean(values)) if values else float("nan")


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, size: int = 11,
             sigma: float = 1.5) -> np.ndarray:
    """float64 [N, H, W]: SSIM (Wang et al. 2004) per pixel, averaged over channels, of [N, H, W, C]
    images. Gaussian window (size, sigma), K1 = 0.01, K2 = 0.03, population (co)variances, borders
    reflected."""
    from scipy.ndimage import correlate1d

    g = gaussian_window(size, sigma)

    def blur(v):
        for axis in (1, 2):
            v = correlate1d(v, g, axis=axis, mode="reflect")
        return v

    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(axis=-1)


def ssim_dropped(pred: np.ndarray, target: np.ndarray, dropped: np.ndarray) -> float:
    """Mean over images of the full-image SSIM map averaged over the dropped pixels."""
    s = ssim_map(pred, target)
    values = [s[i][dropped[i]].mean() for i in range(pred.shape[0]) if dropped[i].any()]
    return float(np.mean(values)) if values else float("nan")


def eval_keep(n: int, num_patches: int, drop: float, seed: int) -> np.ndarray:
    """bool [N, L]: round(drop * L) dropped patches per row, drawn from `seed` alone."""
    rng = np.random.default_rng(seed)
    num_drop = int(round(drop * num_patches))
    keep = np.ones((n, num_patches), dtype=bool)
    for i in range(n):
        keep[i, rng.permutation(num_patches)[:num_drop]] = False
    return keep


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
