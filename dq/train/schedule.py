"""The training budget and recipe: which optimizer steps a run takes, on which rows, at which learning rate.

Training budget (`Schedule`). By default an epoch is one pass over the chosen training set, so
`train.epochs` fixes the number of times each image is seen, whatever the set's size: the same budget per
image seen for `compact`, `selected` and `full` alike (the `full` run simply takes more steps), and a
10% subset gets a tenth of the full run's optimizer steps. `train.steps` fixes the number of optimizer
steps instead, whatever the set's size (the fixed-iteration protocol of CCS, Zheng et al. 2023): epochs
follow one another, each with its own shuffled order, until the steps are done, and the cosine
schedule spans them. The run is scored and checkpointed after every round: an epoch, or
`train.eval_every` steps (a tenth of `train.steps` by default). `train_metrics.json` records the
steps taken and the passes over the set they made.

Recipe (`train.*`). SGD with momentum (Nesterov's by default), weight decay on weights only (never on
biases or normalisation parameters), a schedule stepped per batch (`onecycle`: linear warm-up over
`train.warmup` of the steps, then linear decay to zero, as airbench and Smith's one-cycle policy;
`cosine`), label smoothing, an optional exponential average of the weights (`train.ema`, `WeightAverage`:
what is scored and saved), and flip test-time augmentation (`train.tta`). configs/paper.yaml keeps the
paper's protocol (ResNet-18, 200 epochs, plain SGD, cosine).

Determinism. Each epoch's order and augmentation draw from a generator seeded by (seed, epoch)
(`classifier_epoch_generator`), so a run resumed at any step draws what the uninterrupted run drew.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dq.core.errors import DQError
from dq.train.data import augment_draws

if TYPE_CHECKING:
    from dq.params import TrainParams

MIN_IMAGES_PER_RANK = 2  # BatchNorm cannot train on a single sample
DEFAULT_STEP_ROUNDS = 10  # with train.steps and no train.eval_every: rounds of a tenth of the steps


def classifier_epoch_generator(seed: int, epoch: int):
    """The generator of epoch `epoch`'s order and augmentation; independent of any resume.

    Not the MAE's `dq.mae.training.mae_epoch_generator`: the two derive their seeds differently, and
    either one changing would change its trained model's bytes.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_batches(n: int, config: TrainParams, generator, world: int = 1) -> list[tuple[torch.Tensor, tuple]]:
    """(rows [b], augmentation draws) of every optimizer step of one epoch, drawn from the epoch's generator:
    first the shuffled order, then each step's draws in turn (`augment_draws`). A last batch too small to
    give every rank 2 images is skipped, without draws: BatchNorm cannot train on one sample."""
    order = torch.randperm(n, generator=generator)
    steps = [order[start:start + config.batch_size] for start in range(0, n, config.batch_size)]
    return [(idx, augment_draws(len(idx), generator, config.crop_padding, config.hflip))
            for idx in steps if len(idx) >= MIN_IMAGES_PER_RANK * world]


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch: the full batches, and the last one if every rank gets 2 images."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= MIN_IMAGES_PER_RANK * world else 0)


@dataclass(frozen=True)
class Schedule:
    """The optimizer steps of a run, in rounds: each round ends with a log line and a checkpoint, and the
    rounds that `scored` says end with a test evaluation too.

    `train.steps: null`: `train.epochs` epochs, one round per epoch, each scored. `train.steps: S`: exactly S
    steps whatever the training set's size, in rounds of `train.eval_every` steps, each scored; with no
    `train.eval_every`, rounds of a tenth of S of which only the last is scored (scoring 10,000 test images
    costs a fast trainer as much as a tenth of its run). Epochs follow one another as usual (each its own
    shuffled order), a round may end inside one.
    """

    steps_per_epoch: int
    total: int
    round_steps: int
    score_every_round: bool = True

    def scored(self, r: int) -> bool:
        """Whether round r (0-based) ends with a test evaluation: every round, or the last one only."""
        return self.score_every_round or r == self.rounds - 1

    @property
    def rounds(self) -> int:
        return -(-self.total // self.round_steps)

    def round_end(self, r: int) -> int:
        """Steps done after round r (0-based)."""
        return min((r + 1) * self.round_steps, self.total)

    def epochs_seen(self, step: int) -> float | int:
        """Passes over the training set after `step` steps: an int when whole (every epoch run), else a float."""
        whole, rest = divmod(step, self.steps_per_epoch)
        return whole if rest == 0 else round(step / self.steps_per_epoch, 4)


def training_schedule(n: int, config: TrainParams, world: int = 1) -> Schedule:
    """The run's `Schedule` for `n` training images on `world` processes."""
    per_epoch = steps_per_epoch(n, config.batch_size, world)
    if per_epoch == 0:
        raise DQError(f"train.batch_size = {config.batch_size}: {n} training images give no batch of "
                      f"{MIN_IMAGES_PER_RANK} images per process on {world} processes; raise ratio")
    total = config.epochs * per_epoch if config.steps is None else config.steps
    every = config.eval_every or (per_epoch if config.steps is None else -(-total // DEFAULT_STEP_ROUNDS))
    return Schedule(per_epoch, total, min(every, total),
                    score_every_round=config.steps is None or config.eval_every is not None)


def scheduled_batches(schedule: Schedule, n: int, config: TrainParams, seed: int, first: int, last: int,
                      world: int = 1) -> list[tuple[torch.Tensor, tuple]]:
    """(rows, draws) of global steps [first, last): epoch e's steps come from `classifier_epoch_generator(seed,
    e)`, so a run resumed at any step draws what the uninterrupted run drew."""
    out = []
    per_epoch = schedule.steps_per_epoch
    for epoch in range(first // per_epoch, (last - 1) // per_epoch + 1):
        steps = epoch_batches(n, config, classifier_epoch_generator(seed, epoch), world)
        start = epoch * per_epoch
        out += steps[max(first - start, 0):last - start]
    return out


def optimizer_and_schedule(model, config: TrainParams, total_steps: int):
    """SGD (Nesterov when `train.nesterov`) with weight decay on the weights only, not on biases or
    normalisation parameters (1-D tensors), and the learning-rate schedule stepped once per batch."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov)
    total = max(total_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total, config.schedule, config.warmup))
    return optimizer, scheduler


def learning_rate_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """The share of `train.lr` used at optimizer step `step` (0-based) of `total`.

    cosine: 0.5 (1 + cos(pi step / total)), from 1 down to 0 (SGDR without restarts, Loshchilov & Hutter 2017).
    onecycle: linear from 1/w up to 1 over the first w = round(warmup * total) steps, then linear down to 0 at
    `total` (the triangular schedule of airbench and of Smith's one-cycle policy).
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    up = round(warmup * total)
    if step < up:
        return (step + 1) / up
    return max(0.0, (total - step) / max(total - up, 1))


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging; airbench's EMA), updated after
    every optimizer step: w_avg <- decay * w_avg + (1 - decay) * w. Buffers (BatchNorm's running
    statistics) are copied, not averaged. The average is what is scored and saved."""

    def __init__(self, model, decay: float):
        import copy

        self.decay = decay
        self.source = model
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for avg, new in zip(self.model.parameters(), self.source.parameters()):
            avg.lerp_(new, 1.0 - self.decay)
        for avg, new in zip(self.model.buffers(), self.source.buffers()):
            avg.copy_(new)
