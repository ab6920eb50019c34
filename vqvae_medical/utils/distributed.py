"""Rank-zero-first: a cached computation done once by rank 0 under ``torch.distributed``, then read by the others."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["rank_zero_first"]


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Under ``torch.distributed`` (more than one process): rank 0 runs the block first while the other ranks wait
    at a barrier, then the other ranks run it. Wrap a cached computation in it (datalists, code maps, latents):
    rank 0 computes and writes the cache once, every other rank then reads the same file, so all ranks hold
    identical data and the work is not repeated. Without a process group it is a no-op.

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
