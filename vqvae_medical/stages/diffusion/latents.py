"""Latents of the training images through the frozen autoencoder, cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset

from vqvae_medical.stages.frozen import FrozenAutoencoder, state_fingerprint
from vqvae_medical.training.checkpoints import atomic_save, safe_load
from vqvae_medical.training.distributed import rank_zero_first

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "latents": self.latents,
            "labels": self.labels if self.labels is not None else torch.zeros(0, dtype=torch.long),
            "has_labels": self.labels is not None,
            "image_size": list(self.image_size),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentSet:
        s = safe_load(path, map_location="cpu")
        return cls(s["latents"], s["labels"] if s["has_labels"] else None, s["image_size"], s["fingerprint"])

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_save(self.state_dict(), path)


def _item_key(item: Mapping[str, Any], image_key: str, label_key: str | None) -> list:
    image = item[image_key]
    files = [os.fspath(f) for f in image] if isinstance(image, (list, tuple)) else [os.fspath(image)]
    stamps = [os.stat(f).st_mtime_ns if os.path.exists(f) else 0 for f in files]
    label = item.get(label_key) if label_key else None
    return [files, stamps, None if label is None else int(label)]


def extract_latents(
    autoencoder: FrozenAutoencoder,
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    key: Any = None,
    image_key: str = "image",
    label_key: str | None = "label",
    num_workers: int = 0,
    name: str = "latents",
) -> LatentSet:
    """Latents of every item of ``data``, computed once and cached as ``<cache_dir>/<name>_<hash>.pt``.

    The hash covers the autoencoder's weights (:func:`state_fingerprint`), the latent kind, the file paths and
    modification times, the labels and ``key`` (put the preprocessing settings there), so a changed VQ-VAE,
    data set or preprocessing is re-encoded instead of read stale from the cache.

    Args:
        autoencoder: the frozen VQ-VAE.
        data: datalist items with ``image_key`` (and ``label_key`` when present).
        transform: the image preprocessing (deterministic; all images must come out with one size).
        cache_dir: folder of the cache, or ``None`` to encode in memory every time.
        batch_size: images encoded at once.
        key: JSON-serialisable settings that change the images (e.g. spatial size, channels).
        image_key: key of the image path in the items.
        label_key: key of the int class label, or ``None`` to ignore labels.
        num_workers: data loader workers.
        name: file name prefix of the cache.
    """
    if not data:
        raise ValueError("no images to encode: the datalist section is empty.")
    has_labels = label_key is not None and all(label_key in item for item in data)
    spec = {
        "autoencoder": state_fingerprint(autoencoder),
        "latent": autoencoder.latent,
        "items": [_item_key(item, image_key, label_key if has_labels else None) for item in data],
        "key": key,
    }
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir) / f"{name}_{fingerprint[:16]}.pt" if cache_dir is not None else None
    label_key = label_key if has_labels else None
    if path is None:
        return _encode(autoencoder, data, transform, fingerprint, batch_size, image_key, label_key, num_workers)
    # under torch.distributed, rank 0 encodes and writes the cache first; the other ranks then read that file, so
    # every rank trains on the same latents (and the same scale factor) without encoding them again
    with rank_zero_first():
        if path.is_file():
            cached = LatentSet.load(path)
            if cached.fingerprint == fingerprint:
                logger.info(f"read {len(cached)} cached latents {cached.latent_shape} from {path}")
                return cached
        out = _encode(autoencoder, data, transform, fingerprint, batch_size, image_key, label_key, num_workers)
        out.save(path)
        return out


def _encode(
    autoencoder: FrozenAutoencoder,
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    fingerprint: str,
    batch_size: int,
    image_key: str,
    label_key: str | None,
    num_workers: int,
) -> LatentSet:
    """The latents of ``data`` (labels from ``label_key`` unless ``None``), encoded in batches."""
    device = autoencoder.device
    loader = DataLoader(Dataset(list(data), transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    latents, labels, image_size = [], [], None
    start = time.perf_counter()
    for batch in loader:
        images = batch[image_key]
        size = [int(s) for s in images.shape[2:]]
        if image_size is not None and size != image_size:
            raise ValueError(f"images of different sizes ({image_size} and {size}); set spatial_size in the config.")
        image_size = size
        latents.append(autoencoder.encode(images.to(device)).cpu())
        if label_key is not None:
            labels.append(torch.as_tensor(batch[label_key]).long().reshape(-1))
    try:
        out = LatentSet(torch.cat(latents), torch.cat(labels) if label_key is not None else None, image_size or [], fingerprint)
    except RuntimeError as e:
        raise ValueError(f"images of different sizes give latents of different sizes ({e}); set spatial_size.") from e
    logger.info(
        f"encoded {len(out)} images {image_size} -> latents {out.latent_shape} in {time.perf_counter() - start:.1f} s "
        f"(mean {out.mean:.4f}, std {out.std:.4f}, scale factor {out.scale_factor:.4f})"
    )
    return out
