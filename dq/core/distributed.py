"""The few collective operations the distributed stages (features, the compress CAM pass, train) need, and the row shards.

torchrun starts one process per GPU (or per CPU slot) and tells each its place through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). `process_group(device)` joins the group when
WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU) and leaves it afterwards; in a plain single process it
does nothing, and every helper here degrades to the identity, so the stages have one code path.

Rank 0 is the main process: it alone writes outputs. The helpers keep the others in step with it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration (a no-op in a single process).

    On CUDA each process first binds to its own GPU (`device`, chosen from LOCAL_RANK by
    dq.core.runtime.device_for): NCCL's collectives run on the current device.
    """
    if launched_world_size() == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def gather_rows(rows: np.ndarray) -> np.ndarray | None:
    """Every rank's rows [n_r, ...] concatenated in rank order on rank 0; None on the other ranks."""
    if world_size() == 1:
        return rows
    shards = [None] * world_size() if is_main() else None
    dist.gather_object(rows, shards, dst=0)
    return np.concatenate(shards) if is_main() else None


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable object; tensors arrive on the CPU as they left)."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks, in place (the tensor lives on this rank's device)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DistributedDataParallel keeps parameters equal on all ranks, but each rank's last training batch
    moves its own running statistics; after this every rank holds the model rank 0 saves.
    """
    if world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def shard(n: int, batch_size: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous rows of [0, n): whole batches, so every batch is a single process's batch."""
    batches = -(-n // batch_size)
    per_rank = -(-batches // world)
    start = min(n, rank * per_rank * batch_size)
    return slice(start, min(n, (rank + 1) * per_rank * batch_size))


def split(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous part of [0, n) when n is split into `world` parts differing by at most 1."""
    return slice(n * rank // world, n * (rank + 1) // world)
