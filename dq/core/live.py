"""The DVCLive logger of the training stages (mae, train): per-epoch plots and a summary, nothing else."""
from __future__ import annotations

from pathlib import Path


def live_logger(path: str | Path):
    """A dvclive.Live writing under `path`; never dvc.yaml, never a DVC experiment, no report.

    dvc.yaml declares the plots itself, and `dvc exp run` makes the experiments: a logger that did
    either would fight the pipeline's own files.
    """
    from dvclive import Live

    return Live(dir=str(path), save_dvc_exp=False, dvcyaml=None, report=None)
