"""The masked autoencoder that rebuilds dropped patches: the model and the `data/mae/model.pt` file.

The model is the reference MAE (facebookresearch/mae, `models_mae.py`: MaskedAutoencoderViT) built from
timm's ViT `Block` and `PatchEmbed`, so its `state_dict` has exactly the reference names and shapes and
the official checkpoints (`{'model': state_dict}`) load strictly. The one change: the mask is given, a
bool `keep` [N, L] (True = the encoder sees the patch), instead of drawn inside `forward_encoder`;
training draws it with `random_keep` (the reference `random_masking`), the reconstruction derives it from
the stored patches (`dq.mae.reconstruct`). The architectures (`mae.arch`) are dq.mae.archs' registry.

Pixel convention. Every model, small or reference, takes RGB in [0, 1] normalised with the ImageNet
mean/std (`MaeConfig.mean/std`), as the reference checkpoints expect; for the small MAE this is just a
fixed affine map, and one convention means one code path (`to_model_input`, `from_model_output`).

Training lives in `dq.mae.training`, the reconstruction and its evaluation in `dq.mae.reconstruct`.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from dq.core.checkpoint import read_torch, save_atomic
from dq.core.errors import DQError
from dq.mae.archs import MaeConfig, mae_config


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
# Building a registered architecture (dq.mae.archs)
# --------------------------------------------------------------------------------------------------
def create_mae(name: str, **overrides) -> "MaskedAutoencoderViT":
    """Build a registered MAE, e.g. `create_mae('mae_vit_tiny_patch4', norm_pix_loss=True)`."""
    return MaskedAutoencoderViT(mae_config(name, **overrides))


def create_mae_for_input(name: str, input_size: int, norm_pix_loss: bool) -> "MaskedAutoencoderViT":
    """The MAE `mae.arch` names, built for `mae.input_size`-px images; a DQError if its patches do not tile them."""
    config = mae_config(name, img_size=input_size, norm_pix_loss=norm_pix_loss)
    if input_size % config.patch_size:
        raise DQError(f"params.yaml: mae.input_size = {input_size} is not allowed; expected a multiple "
                      f"of the patch size of {name} ({config.patch_size})")
    return MaskedAutoencoderViT(config)


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

    def keep_tokens(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, L, D], keep bool [N, L] -> the kept tokens [N, K, D] in raster order, ids_restore [N, L].

        The reference `random_masking`, with the mask given instead of drawn."""
        ids_shuffle, ids_restore, len_keep = self.keep_order(keep)
        ids_keep = ids_shuffle[:, :len_keep]
        return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2])), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [N, 3, H, W], keep bool [N, L] -> latent [N, 1+K, D] of the kept tokens, ids_restore [N, L]"""
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, ids_restore = self.keep_tokens(x, keep)

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


def save_mae(path: str | Path, model: MaskedAutoencoderViT, arch: str) -> None:
    """Write `data/mae/model.pt` atomically, its archive named after the file as it always was (save_atomic)."""
    save_atomic(path, checkpoint_dict(model, arch), archive_from_path=True)


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict with key 'model' (a state dict); a DQError naming the file otherwise."""
    ckpt = read_torch(path, "MAE checkpoint")
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
# Pixel convention: uint8 images in, [0, 1] images out
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
    """[N, C, H, W] -> [N, C, size, size], bilinear without antialiasing (the footprint `dq.mae.reconstruct.map_keep` assumes)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
