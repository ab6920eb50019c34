"""``torch.distributed`` set-up for ``torchrun`` (rank-zero-first, which data uses too, is
:func:`vqvae_medical.utils.distributed.rank_zero_first`; re-exported here).

Which handlers run on which rank is said in each bundle's ``multi_gpu_train.json``, as in the Model Zoo: rank 0
runs ``train#handlers``; the other ranks run ``train#every_rank_handlers``, the handlers that must run on every
rank (resume, validation, learning-rate schedule, time budget, EMA), not those that write files or logs."""

from __future__ import annotations

import os

import torch

from vqvae_medical.utils.distributed import rank_zero_first

__all__ = ["init_distributed", "rank_zero_first"]


def init_distributed() -> int:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on the CPU) once; returns this process's rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank()
