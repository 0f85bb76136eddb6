"""The MAE architectures `mae.arch` names: a registry of configs (`MAE_ARCHS`), without torch.

An architecture is a function that returns its `MaeConfig`, registered under the name `mae.arch` uses;
`dq.params` checks `mae.arch` against the registry when params load, and `dq.mae.model` builds the model.
The reference ones (facebookresearch/mae `models_mae.py`) load the official checkpoints strictly.
To add one:

    from dq.mae.archs import MAE_ARCHS, MaeConfig

    @MAE_ARCHS.register("mae_vit_small_patch8")
    def mae_vit_small_patch8() -> MaeConfig:
        return MaeConfig(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dq.core.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dq.core.registry import Registry

MAE_ARCHS = Registry("MAE architecture", "mae.arch")


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


def mae_config(name: str, **overrides) -> MaeConfig:
    """The config of the registered architecture `name`, with `overrides` (e.g. img_size); one DQError line
    listing the registered names otherwise."""
    return dataclasses.replace(MAE_ARCHS.get(name).obj(), **overrides)


@MAE_ARCHS.register("mae_vit_base_patch16")
def mae_vit_base_patch16() -> MaeConfig:
    return MaeConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@MAE_ARCHS.register("mae_vit_large_patch16")
def mae_vit_large_patch16() -> MaeConfig:
    return MaeConfig(patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@MAE_ARCHS.register("mae_vit_huge_patch14")
def mae_vit_huge_patch14() -> MaeConfig:
    return MaeConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16)


@MAE_ARCHS.register("mae_vit_tiny_patch4")
def mae_vit_tiny_patch4() -> MaeConfig:
    """32x32 images, 8x8 grid: the default MAE trained on the prepared training set (~1.0M parameters,
    sized so that 10 epochs on 6,000 images fit the pipeline's CPU budget)."""
    return MaeConfig(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                     decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4)


@MAE_ARCHS.register("mae_vit_micro_patch4")
def mae_vit_micro_patch4() -> MaeConfig:
    """For tests: a few thousand parameters."""
    return MaeConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)
