"""Device choice, seeding and thread settings shared by the stages that run torch."""
from __future__ import annotations

import os
import random

import numpy as np

from dq.core.errors import DQError
from dq.params import RuntimeParams


def device_for(runtime: RuntimeParams):
    """CUDA when present (or asked for), else the CPU."""
    import torch

    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise DQError("runtime.device = 'cuda' but no CUDA device is available; use auto or cpu")
    if runtime.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def autocast(device):
    """bf16 autocast on CUDA GPUs that have it; full precision elsewhere (the CPU stays bit-exact)."""
    import contextlib

    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int, runtime: RuntimeParams | None = None) -> None:
    """Seed Python, NumPy and torch, and make CPU kernels deterministic."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if runtime is not None and runtime.threads:
        torch.set_num_threads(runtime.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
