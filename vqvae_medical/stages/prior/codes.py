"""VQ code maps for the prior: the cached codes of a datalist section through the frozen autoencoder, as a dataset."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from vqvae_medical.stages.frozen import FrozenAutoencoder, encode_cached

__all__ = ["NO_LABEL", "CodeMapDataset", "code_map_dataset"]


NO_LABEL = -1
"""Label of a code map whose image has no class."""


class CodeMapDataset(Dataset):
    """Items ``{"codes": int64 [H, W], "label": int64 []}`` of cached code maps, for a PixelCNN prior.

    Args:
        codes: ``[N, H, W]`` code indices.
        labels: ``[N]`` labels (:data:`NO_LABEL` for none).
        num_embeddings: codebook size; every code must be below it.
        num_classes: with class conditioning, the number of classes: every map needs a label in
            ``[0, num_classes)``; ``None`` for an unconditioned prior (labels are then passed on but unused).
    """

    def __init__(
        self, codes: torch.Tensor, labels: torch.Tensor, num_embeddings: int, num_classes: int | None = None
    ) -> None:
        if codes.dim() != 3 or labels.shape != codes.shape[:1]:
            raise ValueError(f"expected codes [N, H, W] and labels [N], got {list(codes.shape)} and {list(labels.shape)}.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_embeddings):
            raise ValueError(
                f"code maps hold indices outside [0, {num_embeddings}): the prior's num_embeddings must equal the "
                "VQ-VAE's codebook size."
            )
        if num_classes is not None:
            missing = int(((labels < 0) | (labels >= num_classes)).sum())
            if missing:
                raise ValueError(
                    f"{missing} of {len(labels)} code maps have no class label in [0, {num_classes}); use a data set "
                    "with labels (ISIC metadata, class folders) or set num_classes to null."
                )
        self.codes = codes
        self.labels = labels
        self.num_embeddings = num_embeddings
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"codes": self.codes[index].long(), "label": self.labels[index]}


def code_map_dataset(
    autoencoder: FrozenAutoencoder,
    items: Sequence[Mapping[str, Any]],
    cache_path: str | os.PathLike | None,
    num_embeddings: int,
    num_classes: int | None = None,
    batch_size: int = 16,
) -> CodeMapDataset:
    """A :class:`CodeMapDataset` of the images of ``items`` through the frozen autoencoder, cached at ``cache_path``
    (see :func:`~vqvae_medical.stages.frozen.encode_cached`; the images are preprocessed as stage 1 did).

    Args:
        autoencoder: the frozen autoencoder (:func:`~vqvae_medical.stages.frozen.load_autoencoder`).
        items: datalist items.
        cache_path: the cache file, or ``None`` to encode in memory.
        num_embeddings: the prior's number of codes; must equal the autoencoder's codebook size.
        num_classes: number of classes of a class-conditioned prior, else ``None``.
        batch_size: images per encoder call.
    """
    if autoencoder.levels != 1:
        raise ValueError(
            f"the PixelCNN prior models one code map per image; the autoencoder of {autoencoder.directory} has "
            f"{autoencoder.levels} code levels (VQ-VAE-2), which needs a hierarchical prior."
        )
    if int(num_embeddings) != int(autoencoder.num_embeddings):
        raise ValueError(
            f"the prior has num_embeddings={num_embeddings} but the autoencoder's codebook has "
            f"{autoencoder.num_embeddings} codes; set num_embeddings to {autoencoder.num_embeddings}."
        )
    maps = encode_cached(autoencoder, items, "codes", cache_path, batch_size=batch_size)
    return CodeMapDataset(maps.values, maps.labels, int(num_embeddings), num_classes)
