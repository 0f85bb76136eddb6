"""Training states that survive a killed run: the one atomic save and the one resume policy.

Both trainers (the MAE in `dq.mae.training`, the classifier in `dq.train.loop`) write their state after
every epoch with `save_atomic` and read it back with `resume_state`. The policy is the same for both:
no file means a fresh start; a file that cannot be read, or that another run wrote (its fingerprint
differs: other params, seed or data), is refused with one DQError line that names the file and says
how to go on. Silently training from scratch instead would hide a mistake and throw the epochs away.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from dq.core.errors import DQError, first_line
from dq.core.io import atomic_path


def read_torch(path: str | Path, what: str, *, fix: str = "") -> Any:
    """torch.load a file on the CPU (tensors only, no code), or one DQError line naming it, `what` it is, how
    to go on (`fix`) and torch's own reason. The one way dq loads a torch file."""
    path = Path(path)
    if not path.is_file():
        raise DQError(f"{path}: {what} not found{fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise DQError(f"{path}: not a readable {what}{fix} ({first_line(exc, 160)})") from None


def save_atomic(path: str | Path, state: dict, *, archive_from_path: bool = False) -> None:
    """torch.save `state` to `path` atomically: resume states, the classifier's and the MAE's model.pt.

    torch names the zip archive inside after the file it writes to. Through a buffer (the default) the name
    is `archive`, so the bytes depend on `state` alone. `archive_from_path` writes the temporary file itself,
    whose archive torch names `.model.pt` for `.model.pt.tmp-<pid>` (the name up to its last suffix, so no
    pid gets in): the MAE's model.pt has always been written so, and its bytes are pinned in dvc.lock.
    """
    with atomic_path(path) as tmp:
        if archive_from_path:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        tmp.write_bytes(buffer.getvalue())


def resume_state(path: str | Path, fingerprint: Any, *, section: str, what: str) -> dict | None:
    """The state saved at `path` when its fingerprint equals `fingerprint`; None when there is no file.

    `section` is the params section whose `resume` flag asked for it (`mae`, `train`) and `what` names
    the model in the message (`MAE`, `classifier`).
    """
    path = Path(path)
    if not path.is_file():
        return None
    how = f"delete it or set {section}.resume: false"
    state = read_torch(path, f"{what} training state", fix=f"; {how}")
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise DQError(f"{path}: was saved with other {section} params, seed or training data; {how}")
    return state
