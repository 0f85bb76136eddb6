"""Training-dynamics difficulty scores: AUM, EL2N and forgetting events, recorded during dq.train.loop's own loop.

A `DynamicsRecorder` rides along one training run (`dq.train.loop.train_batches(..., recorder)`): after every
optimizer step it sees the logits of that step's forward pass and holds a few scalars per sample, never the
images. Two runs feed it (`scores.dynamics`):

- `teacher` (the default): the teacher stage's training of `train.model` on the whole set (dq.labels.teacher,
  `teacher.kind: trained`) records while it trains, so difficulty costs no training of its own; the teacher
  stage writes data/teacher/dynamics.h5 and the scores stage reads it. EL2N is scored after its first epoch.
- `runs`: `scores.seeds` short runs of train's recipe (`training_dynamics`), for a pipeline without a trained
  teacher; run seeds 0, 1, ... (never the pipeline's `seed`: the scores serve every selection seed),
  `scores.steps` steps each, EL2N after `scores.el2n_step`; the scores are averaged over the runs.

What is recorded:

- AUM (Pleiss et al. 2020): every time a sample is in a batch, its margin z_y - max_{j != y} z_j on the
  logits of that training forward pass (the augmented image, before the step); AUM is their mean.
- forgetting events (Toneva et al. 2019): the same passes, classified right then wrong at the next
  presentation; a sample never classified right gets its number of presentations, more than it could forget.
- EL2N (Paul et al. 2021): once, after step `el2n_step`, ||softmax(z) - onehot(y)||_2 on the un-augmented
  images in eval mode, one extra pass over the set.

Under torchrun every rank trains on its part of each batch; the margins of the whole batch are summed over
the ranks (a [b] vector a step), so every rank records the same. A checkpoint of the run carries the
recorder's state (`state_dict`), so a resumed run records what an uninterrupted one does.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dq.core import distributed
from dq.core.errors import DQError
from dq.core.runtime import autocast
from dq.data import rows as row_sources
from dq.data.rows import as_rows
from dq.params import ScoresParams, TrainParams
from dq.scores.file import DYNAMICS_SCORES
from dq.train.data import EVAL_BATCH_SIZE, TrainFeed, channel_stats, forward_batch, normalisation, to_input
from dq.train.loop import new_learner, train_batches
from dq.train.schedule import scheduled_batches, steps_per_epoch, training_schedule


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


class DynamicsRecorder:
    """Every sample's margins and correctness at each presentation of one run, and its EL2N once.

    `el2n` computes float64 [N] EL2N of a model (an `el2n_pass`); it runs after optimizer step `el2n_step`.
    """

    def __init__(self, n: int, el2n_step: int, el2n: Callable[[torch.nn.Module], np.ndarray]):
        self.el2n_step, self.el2n_pass = el2n_step, el2n
        self.steps = 0
        self.margin_sum, self.seen = np.zeros(n), np.zeros(n, np.int64)
        self.right_before, self.ever_right = np.zeros(n, bool), np.zeros(n, bool)
        self.forgot = np.zeros(n, np.int64)
        self.el2n: np.ndarray | None = None

    def record(self, rows: np.ndarray, part: slice, logits: torch.Tensor, y: torch.Tensor, model) -> None:
        """After one optimizer step: `rows` int [b] the whole batch's, `logits` [b_part, C] and `y` [b_part] this
        rank's `part` of it (the forward pass before the step), `model` the (possibly DDP-wrapped) network."""
        m = margins(logits.detach(), y).double()
        if distributed.world_size() > 1:
            whole = torch.zeros(len(rows), dtype=torch.float64, device=m.device)
            whole[part] = m
            m = distributed.all_reduce_sum(whole)
        self.observe(rows, m.cpu().numpy())
        self.steps += 1
        if self.steps == self.el2n_step:
            self.el2n = self.el2n_pass(getattr(model, "module", model))

    def observe(self, rows: np.ndarray, m: np.ndarray) -> None:
        """One presentation of `rows` (distinct) with margins `m` float [b]."""
        right = m > 0  # the label's logit beats every other: classified right
        self.margin_sum[rows] += m
        self.seen[rows] += 1
        self.forgot[rows] += self.right_before[rows] & ~right
        self.right_before[rows] = right
        self.ever_right[rows] |= right

    def scores(self) -> dict[str, np.ndarray]:
        """{aum, el2n, forgetting}: float64 [N] each."""
        if self.el2n is None or (self.seen == 0).any():
            raise DQError(f"training dynamics: {int((self.seen == 0).sum())} sample(s) never seen or EL2N never "
                          f"scored ({self.steps} steps, EL2N after step {self.el2n_step}); expected a run of at "
                          "least one epoch")
        return {"aum": self.margin_sum / self.seen, "el2n": self.el2n,
                "forgetting": np.where(self.ever_right, self.forgot, self.seen).astype(np.float64)}

    _STATE = ("margin_sum", "seen", "right_before", "ever_right", "forgot")

    def state_dict(self) -> dict:
        """Tensors only, so a checkpoint loads with torch.load(weights_only=True)."""
        state = {name: torch.from_numpy(getattr(self, name).copy()) for name in self._STATE}
        return state | {"steps": self.steps, "el2n": None if self.el2n is None else torch.from_numpy(self.el2n)}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state[name].numpy().copy())
        self.steps = int(state["steps"])
        self.el2n = None if state["el2n"] is None else state["el2n"].numpy().copy()


def recorder_for(images, labels: np.ndarray, num_classes: int, el2n_step: int, *, device,
                 num_workers: int = 0) -> DynamicsRecorder:
    """A recorder for a run on `images` (a row source) and `labels`: its EL2N pass normalises as train does
    (the same exact channel statistics)."""
    source, labels, device = as_rows(images), np.asarray(labels, np.int64), torch.device(device)

    def el2n(model) -> np.ndarray:
        mean, std = channel_stats(source, num_workers=num_workers, device=device)
        return el2n_scores(model, source, labels, normalisation(mean, std, device), num_classes, device, num_workers)

    return DynamicsRecorder(len(labels), el2n_step, el2n)


def teacher_el2n_step(n: int, config: TrainParams) -> int:
    """The step after which the teacher's recorder scores EL2N: the end of its first epoch."""
    return steps_per_epoch(n, config.batch_size, distributed.world_size())


def recipe(config: ScoresParams) -> TrainParams:
    """train's recipe at the scores stage's model, steps, batch and learning rate (no EMA, no evaluation)."""
    return TrainParams(model=config.model, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                       eval_every=None, ema=0.0, tta="none")


def one_run(feed: TrainFeed, num_classes: int, config: ScoresParams, *, seed: int,
            device) -> tuple[dict[str, np.ndarray], float]:
    """Train once from seed `seed` through dq.train.loop.train_batches with a recorder; (its scores, the
    accuracy on the augmented batches of its last epoch)."""
    device = torch.device(device)
    n, train = len(feed.labels), recipe(config)
    schedule = training_schedule(n, train)
    if schedule.total < schedule.steps_per_epoch:
        raise DQError(f"scores.steps = {config.steps} is less than one epoch ({schedule.steps_per_epoch} steps of "
                      f"{config.batch_size} over {n} images); expected at least {schedule.steps_per_epoch}")
    learner = new_learner(train, feed, num_classes, seed, device, schedule.total)
    recorder = recorder_for(feed.images, feed.labels, num_classes, config.el2n_step, device=device,
                            num_workers=feed.num_workers)
    last_epoch = schedule.total - schedule.steps_per_epoch
    accuracy = 0.0
    for first, last in ((0, last_epoch), (last_epoch, schedule.total)):
        batches = scheduled_batches(schedule, n, train, seed, first, last)
        _, accuracy = train_batches(learner, feed, batches, train, device, recorder)
    return recorder.scores(), accuracy


def training_dynamics(images, labels: np.ndarray, num_classes: int, config: ScoresParams, *, device,
                      num_workers: int = 0, progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """({aum, el2n, forgetting}: float64 [N] averaged over `config.seeds` runs, metrics of the runs)."""
    source, device = as_rows(images), torch.device(device)
    start = time.perf_counter()
    mean, std = channel_stats(source, num_workers=num_workers, device=device)
    feed = TrainFeed(source, np.asarray(labels, np.int64), mean, std, None, num_workers)
    totals = {name: np.zeros(len(labels)) for name in DYNAMICS_SCORES}
    accuracies = []
    for seed in range(config.seeds):
        scores, accuracy = one_run(feed, num_classes, config, seed=seed, device=device)
        for name in totals:
            totals[name] += scores[name]
        accuracies.append(accuracy)
        if progress:
            print(f"scores: run {seed + 1} of {config.seeds}: {config.steps} steps, last-epoch train accuracy "
                  f"{accuracy:.3f}, {time.perf_counter() - start:.0f} s so far", file=sys.stderr, flush=True)
    return ({name: total / config.seeds for name, total in totals.items()},
            {"train_acc_last_epoch": accuracies, "steps": config.steps, "seeds": config.seeds})
