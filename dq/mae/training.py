"""Training the MAE on the prepared training set, resumable after every epoch.

The recipe is the reference pre-training's: AdamW (betas 0.9, 0.95) without weight decay on biases,
norms and tokens, a linear warmup then half-cosine learning rate set per step, and a random mask of
`mae.mask_ratio` per image drawn afresh every step.

Determinism. Each epoch's shuffle and masks come from `mae_epoch_generator(seed, epoch)` alone, so a run
resumed after epoch e draws what an uninterrupted run draws. After every epoch the model, optimizer,
epoch and per-epoch history are saved (`dq.core.checkpoint.save_atomic`) to the resume state,
`data/mae_ckpt/last.pt` in the pipeline; `mae.resume: true` continues from it, and a state another run
saved is refused (`dq.core.checkpoint.resume_state`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from dq.core.checkpoint import resume_state, save_atomic
from dq.core.errors import DQError
from dq.core.io import rounded
from dq.data.prepared import Store, image_loader, open_store
from dq.core.live import live_logger
from dq.mae.model import (MaskedAutoencoderViT, create_mae_for_input, load_state_strict, random_keep,
                    read_checkpoint, to_model_input)
from dq.params import MaeParams
from dq.core.runtime import autocast


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


def adamw_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach: one kernel per step for all tensors; the per-tensor loop dominates small models on CPU
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), foreach=True)


def mae_epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Each epoch's shuffle and masks come from (seed, epoch) alone, so a resumed run matches a straight one.

    Not the classifier's `dq.train.schedule.classifier_epoch_generator`: the two derive their seeds differently,
    and either one changing would change its trained model's bytes.
    """
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(state)


@dataclass
class TrainState:
    model: MaskedAutoencoderViT
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs finished


def train_mae_epoch(state: TrainState, images: torch.Tensor | Store, p: MaeParams, *, seed: int,
                    device: torch.device, progress=None, num_workers: int = 0) -> Iterator[float]:
    """Train one epoch of `p`'s recipe (mask ratio, batch size, learning rate and its schedule over `p.epochs`)
    over uint8 images [N, H, W, 3] (a tensor, or the prepared store streamed through a DataLoader of
    `num_workers` workers); yields each batch's loss, once the epoch is done.

    The losses stay on the device until then: reading one per step would stall the GPU every step.
    """
    model, opt, epoch = state.model, state.optimizer, state.epoch
    gen = mae_epoch_generator(seed, epoch)
    n = images_shape(images)[0]
    order = torch.randperm(n, generator=gen)
    steps = math.ceil(n / p.batch_size)
    model.train()
    losses = []
    for i, batch in zip(range(steps), image_batches(images, order, p.batch_size, num_workers)):
        keep = random_keep(len(batch), model.patch_embed.num_patches, p.mask_ratio, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch + i / steps, lr=p.lr, warmup=p.warmup_epochs, total=p.epochs)
        x = to_model_input(batch.to(device, non_blocking=True), model.config)
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


def images_shape(images: torch.Tensor | Store) -> tuple[int, ...]:
    return tuple(images.shape) if isinstance(images, torch.Tensor) else (len(images),) + images.image_shape


def image_batches(images: torch.Tensor | Store, order: torch.Tensor, batch_size: int,
                  num_workers: int) -> Iterator[torch.Tensor]:
    """uint8 [b, H, W, 3] batches of the rows `order`, in order: tensor slices, or read from the store's
    shards by DataLoader workers (never the whole split in memory)."""
    if isinstance(images, torch.Tensor):
        for start in range(0, len(order), batch_size):
            yield images[order[start:start + batch_size]]
        return
    for batch, _labels, _rows in image_loader(images, order.numpy(), batch_size=batch_size,
                                               num_workers=num_workers):
        yield batch


@dataclass(frozen=True)
class MaeFiles:
    """What the MAE trains on and keeps while it trains."""

    train_images: Path  # the prepared training split (a store), streamed
    resume: Path  # the resume state, saved after every epoch
    live: Path  # DVCLive's folder


def trained_mae(p: MaeParams, seed: int, files: MaeFiles, *, device: torch.device,
                num_workers: int = 0) -> tuple[MaskedAutoencoderViT, float | None]:
    """The MAE of `mae.arch` and its final training loss: trained on `files.train_images` (the prepared split,
    streamed), or loaded strictly from `mae.checkpoint` (loss None)."""
    model = create_mae_for_input(p.arch, p.input_size, p.norm_pix_loss)
    if p.checkpoint:
        load_state_strict(model, read_checkpoint(p.checkpoint)["model"], p.checkpoint, p.arch)
        return model, None
    return model, train_mae(model, p, seed, files, device=device, num_workers=num_workers)


def train_mae(model: MaskedAutoencoderViT, p: MaeParams, seed: int, files: MaeFiles, *, device: torch.device,
              num_workers: int = 0) -> float:
    """Train `model` in place; save the resume state after every epoch; log to DVCLive. The last epoch's
    mean loss."""
    from tqdm import tqdm

    images = open_store(files.train_images)  # read batch by batch in each epoch's order, never whole
    model.to(device)
    state = TrainState(model, adamw_optimizer(model, p.lr, p.weight_decay))
    fingerprint = resume_fingerprint(p, seed, images)
    history = _resumed_history(p, files.resume, state, fingerprint)
    steps = math.ceil(len(images) / p.batch_size)
    with live_logger(files.live) as live, \
            tqdm(total=p.epochs * steps, initial=state.epoch * steps, desc="mae train", unit="step") as bar:
        for record in history:
            log_epoch(live, record)
        while state.epoch < p.epochs:
            record = _epoch_record(state, images, p, seed, device=device, progress=bar, num_workers=num_workers)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            log_epoch(live, record)
            save_resume(files.resume, state, fingerprint, history)
    model.eval()
    return history[-1]["loss"] if history else float("nan")


def _resumed_history(p: MaeParams, path: Path, state: TrainState, fingerprint: dict) -> list[dict]:
    """The epochs a resume state at `path` holds, loaded into `state` (with `mae.resume`); else []."""
    if not p.resume:
        return []
    history = load_resume(path, state, fingerprint)
    if history:
        print(f"mae: resuming after epoch {state.epoch} from {path}", file=sys.stderr)
    return history


def _epoch_record(state: TrainState, images: Store, p: MaeParams, seed: int, *, device: torch.device, progress,
                  num_workers: int) -> dict:
    """Train the next epoch; its record: epoch, mean loss, the last step's learning rate."""
    epoch = state.epoch
    losses = list(train_mae_epoch(state, images, p, seed=seed, device=device, progress=progress,
                                  num_workers=num_workers))
    record = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": state.optimizer.param_groups[0]["lr"]}
    if not math.isfinite(record["loss"]):
        raise DQError(f"params.yaml: mae.lr = {p.lr} made the MAE loss diverge (epoch {epoch}); "
                      "expected a smaller learning rate")
    return record


def resume_fingerprint(p: MaeParams, seed: int, images: torch.Tensor | Store) -> dict:
    """What a resume state must match: the mae params but `resume` and `eval_images`, the seed, the
    training set's shape."""
    return {"seed": seed, "mae": dataclasses.asdict(p) | {"resume": None, "eval_images": None},
            "images": list(images_shape(images))}


def log_epoch(live, record: dict) -> None:
    live.step = record["epoch"]
    live.log_metric("train/loss", rounded(record["loss"]))  # DVCLive's files are metrics files too
    live.log_metric("train/lr", rounded(record["lr"]))
    live.next_step()


def save_resume(path: Path, state: TrainState, fingerprint: dict, history: list[dict]) -> None:
    save_atomic(path, {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                      "epoch": state.epoch, "fingerprint": fingerprint, "history": history})


def load_resume(path: Path, state: TrainState, fingerprint: dict) -> list[dict]:
    """Load the resume state at `path` into `state`; its history ([] when there is no file)."""
    saved = resume_state(path, fingerprint, section="mae", what="MAE")
    if saved is None:
        return []
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.epoch = int(saved["epoch"])
    return list(saved["history"])
