"""``torch.distributed`` set-up for ``torchrun`` and rank-zero helpers.

Which handlers run on which rank is said in each bundle's ``multi_gpu_train.json``, as in the Model Zoo: rank 0
runs ``train#handlers``; the other ranks run ``train#every_rank_handlers``, the handlers that must run on every
rank (resume, validation, learning-rate schedule, time budget, EMA), not those that write files or logs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["init_distributed", "rank_zero_first"]


def init_distributed() -> int:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on the CPU) once; returns this process's rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Under ``torch.distributed`` (more than one process): rank 0 runs the block first while the other ranks wait
    at a barrier, then the other ranks run it. Wrap a cached computation in it (code maps, latents): rank 0
    computes and writes the cache once, every other rank then reads the same file, so all ranks hold identical
    data and the work is not repeated. Without a process group it is a no-op.

    The block must not itself use collectives (it runs on the ranks at different times). Rank 0 reaches its
    barrier even when the block raises, so the other ranks do not hang; they then run the block themselves.
    """
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if active and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if active and dist.get_rank() == 0:
            dist.barrier()
