"""What the latent diffusion bundle's configs call around the engines: the latents of a data section, the training
dataset (cached latents or images), the handlers of a rank."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch.utils.data import Dataset

from vqvae_medical.data import make_dataset
from vqvae_medical.data.lists import section
from vqvae_medical.stages.diffusion.handlers import ModelWriter, SampleGrid
from vqvae_medical.stages.diffusion.latents import LatentSet, extract_latents
from vqvae_medical.stages.encodings import cached_section
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.training import workflow

__all__ = ["WRITERS", "handlers_of_rank", "section_latents", "training_dataset"]

#: the diffusion stage's own handler types that write files (beside ``vqvae_medical.training.workflow.WRITERS``)
WRITERS: tuple[type, ...] = (SampleGrid, ModelWriter)

#: ``handlers_of_rank(handlers, rank)``: :func:`vqvae_medical.training.workflow.handlers_of_rank` with :data:`WRITERS`
handlers_of_rank = workflow.handlers_of_rank_with(WRITERS)


def section_latents(
    autoencoder: FrozenAutoencoder,
    datalist: Mapping[str, list[dict]],
    section_name: str,
    cache_dir: str | os.PathLike,
    label_key: str | None = None,
    max_items: int | None = None,
) -> LatentSet:
    """The latents (:func:`~vqvae_medical.stages.diffusion.latents.extract_latents`) of a section of ``datalist``,
    cached in ``<cache_dir>/latents_<section_name>.pt`` (:func:`~vqvae_medical.stages.encodings.cached_section`: the
    other arguments).

    Args:
        autoencoder: the frozen stage-1 autoencoder that encodes the images.
        label_key: key of the class label of a class-conditional model; ``None``: labels are not kept.
    """
    items, cache_path = cached_section(datalist, section_name, cache_dir, "latents", max_items)
    return extract_latents(autoencoder, items, cache_path, label_key=label_key)


def training_dataset(
    latents: LatentSet,
    autoencoder: FrozenAutoencoder,
    datalist: Mapping[str, list[dict]],
    cache_latents: bool = True,
    augment: bool = False,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    max_items: int | None = None,
) -> Dataset:
    """The training dataset: the cached ``latents`` (``cache_latents``), else the training images, preprocessed by
    the autoencoder's transforms (``augment``: with its augmentation) and encoded in every step.

    Args:
        latents: the training latents (:func:`section_latents`).
        autoencoder: the frozen stage-1 autoencoder (its transforms).
        datalist: ``{"training": [...], ...}``.
        cache_latents: train on the cached latents.
        augment: augment the images (only without ``cache_latents``).
        cache: image dataset cache mode (:func:`~vqvae_medical.data.make_dataset`; only without ``cache_latents``).
        cache_dir: folder of a persistent image cache.
        num_workers: workers that fill the cache.
        max_items: the first ``max_items`` training images only (``None``: all).
    """
    if cache_latents:
        return make_dataset(latents.items(), None, "none", cache_dir, num_workers, "training")
    items = section(datalist, "training", max_items)
    return make_dataset(items, autoencoder.transforms(augment=augment), cache, cache_dir, num_workers, "training")
