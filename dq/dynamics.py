"""Training-dynamics difficulty scores: AUM, EL2N and forgetting events from short runs of the project's trainer.

Each of `scores.seeds` runs trains `scores.model` (dq.classifier, smallnet by default) on the whole prepared
training set for `scores.steps` optimizer steps with train's recipe (dq.train.optimizer_and_schedule: Nesterov
SGD, one-cycle, label smoothing, crop and flip augmentation), run seed s = 0, 1, ... (never the pipeline's
`seed`: the scores serve every selection seed). It reads its batches as train does (dq.row_sources through a
DataLoader) and holds a few scalars per sample, never the images:

- AUM (Pleiss et al. 2020): every time a sample is in a batch, its margin z_y - max_{j != y} z_j on the
  logits of that training forward pass (the augmented image, before the step); AUM is their mean.
- forgetting events (Toneva et al. 2019): the same passes, classified right then wrong at the next
  presentation; a sample never classified right gets its number of presentations, more than it could forget.
- EL2N (Paul et al. 2021): after step `scores.el2n_step`, ||softmax(z) - onehot(y)||_2 on the un-augmented
  images in eval mode, one extra pass over the set.

The scores are averaged over the runs (float64 [N] each). Every sample must be seen, so `scores.steps` is at
least one epoch.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dq import row_sources
from dq.classifier import create_classifier
from dq.errors import DQError
from dq.params import ScoresParams, TrainParams
from dq.row_sources import as_rows
from dq.runtime import autocast
from dq.train import (EVAL_BATCH_SIZE, apply_augment, channel_stats, data_sample, forward_batch, normalisation,
                      optimizer_and_schedule, scheduled_batches, to_input, training_schedule)


@dataclass
class RunDynamics:
    """What one run records, float64 [N] each but `train_acc` (on the augmented batches of its last epoch)."""

    aum: np.ndarray
    el2n: np.ndarray
    forgetting: np.ndarray
    train_acc: float


def recipe(config: ScoresParams) -> TrainParams:
    """train's recipe at the scores stage's model, steps, batch and learning rate (no EMA, no evaluation)."""
    return TrainParams(model=config.model, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                       eval_every=None, ema=0.0, tta="none")


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j, float [b], of logits [b, C] and labels [b]."""
    z = logits.float()
    own = z.gather(1, y[:, None])[:, 0]
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return own - other


def el2n_scores(model, images, labels: np.ndarray, norm, num_classes: int, device, num_workers: int = 0) -> np.ndarray:
    """||softmax(z) - onehot(y)||_2 of every image (un-augmented, eval mode), float64 [N], read in batches."""
    source = as_rows(images)
    out = np.empty(len(labels), np.float64)
    reads = row_sources.consecutive(0, len(labels), forward_batch(EVAL_BATCH_SIZE, source.image_shape, device))
    model.eval()
    with torch.inference_mode(), autocast(device):
        for rows, batch in zip(reads, row_sources.batches(source, reads, num_workers)):
            p = model(to_input(batch, norm, device)).float().softmax(1)
            y = torch.from_numpy(labels[rows]).to(device)
            out[rows] = (p - F.one_hot(y, num_classes).float()).norm(dim=1).double().cpu().numpy()
    model.train()
    return out


def one_run(images, labels: np.ndarray, num_classes: int, config: ScoresParams, mean, std, *, seed: int,
            device, num_workers: int = 0) -> RunDynamics:
    """Train once from seed `seed` and record every sample's margins and correctness at each presentation."""
    source, labels, device = as_rows(images), np.asarray(labels, np.int64), torch.device(device)
    n, train = len(labels), recipe(config)
    schedule = training_schedule(n, train)
    if schedule.total < schedule.steps_per_epoch:
        raise DQError(f"scores.steps = {config.steps} is less than one epoch ({schedule.steps_per_epoch} steps of "
                      f"{config.batch_size} over {n} images); expected at least {schedule.steps_per_epoch}")
    torch.manual_seed(seed)
    net = create_classifier(config.model, num_classes, source.image_shape[0]).to(device)
    net = net.to(memory_format=torch.channels_last)
    if hasattr(net, "init_from_data"):
        net.init_from_data(data_sample(source, mean, std, seed, device))
    optimizer, scheduler = optimizer_and_schedule(net, train, schedule.total)
    norm = normalisation(mean, std, device)
    margin_sum, seen = np.zeros(n), np.zeros(n, np.int64)
    correct_before, ever_right, forgot = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, np.int64)
    el2n, epoch_right, epoch_seen = None, 0, 0
    batches = scheduled_batches(schedule, n, train, seed, 0, schedule.total)
    reads = [idx.numpy() for idx, _ in batches]
    net.train()
    loaded = row_sources.batches(source, reads, num_workers)
    for step, ((_, draws), rows, raw) in enumerate(zip(batches, reads, loaded)):
        x = to_input(apply_augment(raw, draws, train.crop_padding), norm, device)
        y = torch.from_numpy(labels[rows]).to(device)
        with autocast(device):
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        m = margins(logits.detach(), y).double().cpu().numpy()  # [b]: rows of a step are distinct
        right = m > 0  # the label's logit beats every other: classified right
        margin_sum[rows] += m
        seen[rows] += 1
        forgot[rows] += correct_before[rows] & ~right
        correct_before[rows] = right
        ever_right[rows] |= right
        if step >= schedule.total - schedule.steps_per_epoch:
            epoch_right, epoch_seen = epoch_right + int(right.sum()), epoch_seen + len(rows)
        if step + 1 == config.el2n_step:
            el2n = el2n_scores(net, source, labels, norm, num_classes, device, num_workers)
    forgetting = np.where(ever_right, forgot, seen).astype(np.float64)
    return RunDynamics(margin_sum / seen, el2n, forgetting, epoch_right / max(epoch_seen, 1))


def training_dynamics(images, labels: np.ndarray, num_classes: int, config: ScoresParams, *, device,
                      num_workers: int = 0, progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """({aum, el2n, forgetting}: float64 [N] averaged over `config.seeds` runs, metrics of the runs)."""
    source, device = as_rows(images), torch.device(device)
    start = time.perf_counter()
    mean, std = channel_stats(source, num_workers=num_workers, device=device)
    totals = {name: np.zeros(len(labels)) for name in ("aum", "el2n", "forgetting")}
    accuracies = []
    for seed in range(config.seeds):
        run = one_run(source, labels, num_classes, config, mean, std, seed=seed, device=device,
                      num_workers=num_workers)
        for name in totals:
            totals[name] += getattr(run, name)
        accuracies.append(run.train_acc)
        if progress:
            print(f"scores: run {seed + 1} of {config.seeds}: {config.steps} steps, last-epoch train accuracy "
                  f"{run.train_acc:.3f}, {time.perf_counter() - start:.0f} s so far", file=sys.stderr, flush=True)
    return ({name: total / config.seeds for name, total in totals.items()},
            {"train_acc_last_epoch": accuracies, "steps": config.steps, "seeds": config.seeds})
