"""What the prior bundle's configs call around the engines: the code maps of a data section, the handlers of a rank."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from vqvae_medical.stages.encodings import cached_section
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.stages.prior.codes import CodeMapDataset, code_map_dataset
from vqvae_medical.stages.prior.generate import PriorSampleWriter
from vqvae_medical.training import workflow

__all__ = ["WRITERS", "code_maps", "handlers_of_rank"]

#: the prior's own handler types that write files (beside ``vqvae_medical.training.workflow.WRITERS``)
WRITERS: tuple[type, ...] = (PriorSampleWriter,)

#: ``handlers_of_rank(handlers, rank)``: :func:`vqvae_medical.training.workflow.handlers_of_rank` with :data:`WRITERS`
handlers_of_rank = workflow.handlers_of_rank_with(WRITERS)


def code_maps(
    autoencoder: FrozenAutoencoder,
    datalist: Mapping[str, list[dict]],
    section_name: str,
    cache_dir: str | os.PathLike,
    num_embeddings: int | Sequence[int],
    num_classes: int | None = 0,
    max_items: int | None = None,
) -> CodeMapDataset:
    """The code maps (:func:`~vqvae_medical.stages.prior.codes.code_map_dataset`) of a section of ``datalist``,
    cached in ``<cache_dir>/codes_<section_name>.pt`` (:func:`~vqvae_medical.stages.encodings.cached_section`: the
    other arguments).

    Args:
        autoencoder: the frozen stage-1 autoencoder that encodes the images.
        num_embeddings: codebook size (``[top, bottom]`` for a VQ-VAE-2).
        num_classes: classes of a class-conditioned prior; ``0`` or ``None``: labels are not kept.
    """
    items, cache_path = cached_section(datalist, section_name, cache_dir, "codes", max_items)
    return code_map_dataset(autoencoder, items, cache_path, num_embeddings, num_classes or None)
