"""Latents of the training images through the frozen autoencoder (cached by
:func:`~vqvae_medical.stages.encodings.encode_cached`), and their scale factor."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vqvae_medical.stages.encodings import Encoded, encode_cached
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.utils.io import safe_load

__all__ = ["LatentSet", "extract_latents"]

logger = logging.getLogger(__name__)


class LatentSet:
    """Latents of a set of images (``[N, D, *spatial]``, float32 on the CPU) with optional class labels.

    Args:
        latents: the latents.
        labels: ``[N]`` int64 class labels, or ``None``.
        image_size: spatial size of the images they were encoded from.
        fingerprint: identifies the autoencoder, files and preprocessing they came from.
    """

    def __init__(
        self, latents: torch.Tensor, labels: torch.Tensor | None, image_size: Sequence[int], fingerprint: str = ""
    ) -> None:
        if latents.ndim < 4:
            raise ValueError(f"latents must be [N, D, *spatial], got shape {list(latents.shape)}.")
        if labels is not None and labels.shape != (latents.shape[0],):
            raise ValueError(f"labels must have shape [{latents.shape[0]}], got {list(labels.shape)}.")
        self.latents = latents
        self.labels = labels
        self.image_size = [int(s) for s in image_size]
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def latent_shape(self) -> list[int]:
        """``[D, *spatial]`` of one latent."""
        return [int(s) for s in self.latents.shape[1:]]

    @property
    def std(self) -> float:
        """Standard deviation over all latent values."""
        return float(self.latents.double().std())

    @property
    def mean(self) -> float:
        return float(self.latents.double().mean())

    @property
    def scale_factor(self) -> float:
        """``1 / std`` of the latents: multiplied by it, they have unit variance as the diffusion prior assumes."""
        std = self.std
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"the latents have standard deviation {std}; cannot scale them to unit variance.")
        return 1.0 / std

    def items(self, latent_key: str = "latent", label_key: str = "label") -> list[dict[str, Any]]:
        """Datalist items ``{latent_key: [D, ...], label_key: int}`` for a MONAI ``Dataset``."""
        out: list[dict[str, Any]] = []
        for i in range(len(self)):
            item: dict[str, Any] = {latent_key: self.latents[i]}
            if self.labels is not None:
                item[label_key] = int(self.labels[i])
            out.append(item)
        return out

    @classmethod
    def from_encoded(cls, encoded: Encoded, use_labels: bool = True) -> LatentSet:
        """The latents of :func:`~vqvae_medical.stages.encodings.encode_cached`; labels only when every item has one."""
        labels = encoded.labels if use_labels and bool((encoded.labels >= 0).all()) else None
        return cls(encoded.values, labels, encoded.image_size, encoded.fingerprint)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentSet:
        """The latents of a cache file written by :func:`extract_latents`."""
        cached = safe_load(path, map_location="cpu")
        if not isinstance(cached, dict) or cached.get("kind") != "latents":
            raise ValueError(f"{path} is not a latent cache.")
        labels = cached["labels"]
        labels = labels if bool((labels >= 0).all()) else None
        return cls(cached["values"], labels, cached["image_size"], cached["fingerprint"])


def extract_latents(
    autoencoder: FrozenAutoencoder,
    data: Sequence[Mapping[str, Any]],
    cache_path: str | os.PathLike | None = None,
    transform: Any = None,
    settings: Any = None,
    batch_size: int = 16,
    label_key: str | None = "label",
    num_workers: int = 0,
) -> LatentSet:
    """The latents of every item of ``data`` through the frozen autoencoder, encoded once and cached at
    ``cache_path`` (see :func:`~vqvae_medical.stages.encodings.encode_cached`).

    Args:
        autoencoder: the frozen VQ-VAE.
        data: datalist items with ``"image"`` (and ``label_key`` when present).
        cache_path: the cache file, or ``None`` to encode in memory every time.
        transform: the image preprocessing; ``None``: the autoencoder's own (stage 1's).
        settings: JSON-able description of a custom ``transform``.
        batch_size: images encoded at once.
        label_key: key of the int class label, or ``None`` to ignore labels.
        num_workers: data loader workers.
    """
    encoded = encode_cached(
        autoencoder,
        data,
        "latents",
        cache_path,
        transform,
        settings,
        batch_size,
        label_key=label_key,
        num_workers=num_workers,
    )
    out = LatentSet.from_encoded(encoded, use_labels=label_key is not None)
    if label_key is not None and out.labels is None:
        raise ValueError(f"class conditioning needs a {label_key!r} for every image; some images have none.")
    if encoded.extracted:
        logger.info(f"latents: mean {out.mean:.4f}, std {out.std:.4f}, scale factor {out.scale_factor:.4f}")
    return out
