"""Figures without a screen, saved as PNGs whose bytes depend only on what they show."""
from __future__ import annotations

from pathlib import Path

from dq.core.io import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, *, dpi: int = 100) -> None:
    """Write `fig` atomically and close it; no 'Software' stamp, so equal figures give equal bytes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    pyplot().close(fig)
