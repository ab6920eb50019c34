"""``torch.distributed`` set-up for ``torchrun`` (rank-zero-first, which data uses too, is
:func:`vqvae_medical.utils.distributed.rank_zero_first`; re-exported here).

Which handlers run on which rank: each bundle's ``multi_gpu_train.json`` hands its trainer and evaluator
``handlers_of_rank(handlers, rank)`` of the stage's workflow module
(:func:`vqvae_medical.training.workflow.handlers_of_rank` with the stage's own writer types): rank 0 runs every
handler; the other ranks run all but the writers (files and logs: :data:`vqvae_medical.training.workflow.WRITERS`
and the stage's), chosen by type, not by place in the list, so resume, validation, learning-rate schedule, time
budget and EMA run on every rank."""

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
