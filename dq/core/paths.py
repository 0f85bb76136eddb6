"""Where every pipeline artifact lives under the data root: the one place these paths are spelled.

`dvc.yaml` declares the same paths as outputs and deps; `tests/test_dvc_yaml.py` checks that the two
agree. Stages build a `DataPaths` from `--data` and pass its fields to the owner modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    """The artifacts of one pipeline run, relative to `root` (`data/` by default)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # prepare
    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def prepared_split(self, split: str) -> Path:
        """The store folder of one split (version 2: index.json and shard-NNNNN.h5 files)."""
        return self.prepared / split

    # features
    @property
    def features(self) -> Path:
        return self.root / "features" / "train.h5"

    # scores
    @property
    def scores(self) -> Path:
        return self.root / "scores" / "scores.h5"

    @property
    def scores_metrics(self) -> Path:
        return self.root / "scores_metrics.json"

    # teacher
    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher_logits(self) -> Path:
        return self.teacher / "logits.h5"

    @property
    def teacher_model(self) -> Path:
        return self.teacher / "model.pt"

    @property
    def teacher_dynamics(self) -> Path:
        """Training dynamics recorded while a trained teacher trains (dq.scores.dynamics), in the scores file's format."""
        return self.teacher / "dynamics.h5"

    @property
    def teacher_metrics(self) -> Path:
        return self.root / "teacher_metrics.json"

    @property
    def teacher_resume(self) -> Path:
        """Not a DVC output, like `train_resume`."""
        return self.root / "teacher_ckpt" / "last.pt"

    # select
    @property
    def selection(self) -> Path:
        return self.root / "selection"

    @property
    def selection_metrics(self) -> Path:
        return self.root / "selection_metrics.json"

    @property
    def selection_figure(self) -> Path:
        return self.root / "selection_plots" / "bins.png"

    # compress
    @property
    def compact(self) -> Path:
        return self.root / "compact" / "dataset.h5"

    @property
    def compact_metrics(self) -> Path:
        return self.root / "compact_metrics.json"

    @property
    def compact_figure(self) -> Path:
        return self.root / "compact_plots" / "patches.png"

    # mae
    @property
    def mae_model(self) -> Path:
        return self.root / "mae" / "model.pt"

    @property
    def mae_metrics(self) -> Path:
        return self.root / "mae_metrics.json"

    @property
    def mae_figure(self) -> Path:
        return self.root / "mae_plots" / "reconstruction.png"

    @property
    def mae_live(self) -> Path:
        return self.root / "mae_live"

    @property
    def mae_resume(self) -> Path:
        """Not a DVC output on purpose: DVC deletes outputs before a stage runs, and this must survive."""
        return self.root / "mae_ckpt" / "last.pt"

    # train
    @property
    def classifier(self) -> Path:
        return self.root / "train" / "model.pt"

    @property
    def evaluation(self) -> Path:
        return self.root / "train" / "evaluation.json"

    @property
    def train_metrics(self) -> Path:
        return self.root / "train_metrics.json"

    @property
    def train_live(self) -> Path:
        return self.root / "train_live"

    @property
    def train_resume(self) -> Path:
        """Not a DVC output, like `mae_resume`."""
        return self.root / "train_ckpt" / "last.pt"

    # the rebuilt compact set, read by train and export
    @property
    def rebuilt_cache(self) -> Path:
        """The rebuilt cache: the compact set with its dropped patches reconstructed by the MAE, kept across runs
        and stages (dq.mae.rebuilt); not a DVC output, like `train_resume`: DVC would delete it before every run
        of train or export. The folder keeps its name `fill/`."""
        return self.root / "fill"

    # export
    @property
    def export(self) -> Path:
        return self.root / "export"

    # report
    @property
    def report(self) -> Path:
        return self.root / "report"
