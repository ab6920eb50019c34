"""What the prior bundle's configs call around the engines: the code maps of a data section, the handlers of a rank."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from vqvae_medical.data.lists import section
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.stages.prior.codes import CodeMapDataset, code_map_dataset
from vqvae_medical.stages.prior.generate import PriorSampleWriter
from vqvae_medical.training import workflow

__all__ = ["WRITERS", "code_maps", "handlers_of_rank"]

#: the prior's own handler types that write files (beside ``vqvae_medical.training.workflow.WRITERS``)
WRITERS: tuple[type, ...] = (PriorSampleWriter,)


def code_maps(
    autoencoder: FrozenAutoencoder,
    datalist: Mapping[str, list[dict]],
    section_name: str,
    cache_dir: str | os.PathLike,
    num_embeddings: int | Sequence[int],
    num_classes: int | None = 0,
    max_items: int | None = None,
) -> CodeMapDataset:
    """The code maps of one section of ``datalist`` (:func:`~vqvae_medical.stages.prior.codes.code_map_dataset`),
    cached in ``<cache_dir>/codes_<section_name>.pt``.

    Args:
        autoencoder: the frozen stage-1 autoencoder that encodes the images.
        datalist: ``{"training": [...], "validation": [...], "test": [...]}``.
        section_name: the section to encode.
        cache_dir: folder of the code-map caches.
        num_embeddings: codebook size (``[top, bottom]`` for a VQ-VAE-2).
        num_classes: classes of a class-conditioned prior; ``0`` or ``None``: labels are not kept.
        max_items: the first ``max_items`` items of the section only (``None``: all).
    """
    items = section(datalist, section_name, max_items)
    cache_path = os.path.join(cache_dir, f"codes_{section_name}.pt")
    return code_map_dataset(autoencoder, items, cache_path, num_embeddings, num_classes or None)


def handlers_of_rank(handlers: Sequence[Any], rank: int) -> list[Any]:
    """The handlers rank ``rank`` attaches (:func:`vqvae_medical.training.workflow.handlers_of_rank`): all on rank 0,
    the others leave out the writers, the prior's sample grids (:data:`WRITERS`) included."""
    return workflow.handlers_of_rank(handlers, rank, writers=WRITERS)
