"""VQ code maps for the prior: extraction through the frozen autoencoder, on-disk cache, dataset."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from vqvae_medical.data import image_transforms_2d
from vqvae_medical.stages.frozen import file_sha256, state_digest
from vqvae_medical.training.checkpoints import atomic_save, safe_load
from vqvae_medical.training.distributed import rank_zero_first

__all__ = ["CACHE_VERSION", "NO_LABEL", "CodeMaps", "codes_fingerprint", "extract_codes", "cached_code_maps", "CodeMapDataset", "code_map_dataset"]

logger = logging.getLogger(__name__)


CACHE_VERSION = 1


NO_LABEL = -1


_INT16_MAX_CODES = 32768


class CodeMaps(NamedTuple):
    """Code maps of a datalist section.

    Attributes:
        codes: int16 ``[N, H, W]`` code indices.
        labels: int64 ``[N]`` class labels, :data:`NO_LABEL` where an item has none.
        paths: the image of each map.
        fingerprint: hash of the checkpoint file, datalist and preprocessing the maps come from.
        extracted: ``True`` when the maps were computed by this call, ``False`` when read from the cache.
    """

    codes: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    fingerprint: str
    extracted: bool


def codes_fingerprint(
    ckpt_path: str | os.PathLike, items: Sequence[Mapping[str, Any]], settings: Mapping[str, Any] | None = None
) -> str:
    """Hash of the checkpoint file's bytes, each item's image path, label, file size and modification time, and
    the extraction ``settings`` (preprocessing): equal fingerprints mean equal code maps."""
    entries = []
    for item in items:
        path = os.path.abspath(str(item["image"]))
        stat = os.stat(path)
        entries.append([path, item.get("label"), stat.st_size, stat.st_mtime_ns])
    record = {"version": CACHE_VERSION, "ckpt": file_sha256(ckpt_path), "items": entries, "settings": settings or {}}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _labels(items: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    return torch.tensor([int(i["label"]) if i.get("label") is not None else NO_LABEL for i in items], dtype=torch.long)


def extract_codes(
    vqvae: nn.Module,
    items: Sequence[Mapping[str, Any]],
    transform: Callable[[dict], dict],
    batch_size: int = 16,
    image_key: str = "image",
) -> torch.Tensor:
    """Code maps ``[N, H, W]`` (int16) of the images of ``items`` through ``vqvae.encode_to_indices`` in eval mode.

    The autoencoder's state is not changed: the module is put in eval mode for the extraction (its previous mode
    is restored) and its state dict is checked to be bit-identical afterwards.

    Args:
        vqvae: a VQ-VAE with ``encode_to_indices`` and ``num_embeddings``.
        items: datalist items with an image path under ``image_key``.
        transform: preprocessing of one item (e.g. :func:`~vqvae_medical.data.image_transforms_2d`).
        batch_size: images per encoder call.
        image_key: key of the image in the items.
    """
    if not items:
        raise ValueError("no images to extract code maps from.")
    if int(vqvae.num_embeddings) > _INT16_MAX_CODES:
        raise ValueError(f"code maps are stored as int16: at most {_INT16_MAX_CODES} codes, got {vqvae.num_embeddings}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    device = next(vqvae.parameters()).device
    before = state_digest(vqvae)
    was_training = vqvae.training
    vqvae.eval()
    maps: list[torch.Tensor] = []
    shape: tuple[int, ...] | None = None
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                images = []
                for item in items[start : start + batch_size]:
                    image = transform(dict(item))[image_key]
                    image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
                    if shape is None:
                        shape = tuple(image.shape)
                    elif tuple(image.shape) != shape:
                        raise ValueError(
                            f"{item[image_key]}: image shape {list(image.shape)} differs from {list(shape)}; code maps "
                            "of one data set must have one size. Set spatial_size to resize or pad every image."
                        )
                    images.append(image)
                batch = torch.stack(images).float().to(device)
                maps.append(vqvae.encode_to_indices(batch).to("cpu", torch.int16))
    finally:
        vqvae.train(was_training)
    if state_digest(vqvae) != before:
        raise RuntimeError("the VQ-VAE state changed during code extraction; its codebook must stay frozen.")
    return torch.cat(maps)


def cached_code_maps(
    cache_path: str | os.PathLike,
    vqvae: nn.Module,
    ckpt_path: str | os.PathLike,
    items: Sequence[Mapping[str, Any]],
    transform: Callable[[dict], dict],
    settings: Mapping[str, Any] | None = None,
    batch_size: int = 16,
) -> CodeMaps:
    """Code maps of ``items`` from the cache file when its fingerprint matches, else extracted and cached.

    Args:
        cache_path: the ``.pt`` cache file (written atomically, read with ``weights_only=True``).
        vqvae: the autoencoder loaded from ``ckpt_path``.
        ckpt_path: its checkpoint file (hashed into the fingerprint).
        items: datalist items (``image`` path, optional int ``label``).
        transform: preprocessing of one item.
        settings: JSON-able description of the preprocessing (hashed into the fingerprint).
        batch_size: images per encoder call.
    """
    items = list(items)
    fingerprint = codes_fingerprint(ckpt_path, items, settings)
    cache_path = Path(cache_path)
    if cache_path.is_file():
        try:
            cached = safe_load(cache_path)
        except Exception as e:  # a broken cache is rebuilt, never trusted
            logger.warning(f"{cache_path}: unreadable code cache ({e}); extracting again")
            cached = None
        if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
            logger.info(f"loaded {len(cached['paths'])} cached code maps from {cache_path}")
            return CodeMaps(cached["codes"], cached["labels"], list(cached["paths"]), fingerprint, False)
        logger.info(f"{cache_path}: checkpoint, datalist or preprocessing changed; extracting the code maps again")
    codes = extract_codes(vqvae, items, transform, batch_size)
    paths = [os.path.abspath(str(i["image"])) for i in items]
    labels = _labels(items)
    atomic_save(
        {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "codes": codes,
            "labels": labels,
            "paths": paths,
            "num_embeddings": int(vqvae.num_embeddings),
        },
        cache_path,
    )
    logger.info(f"extracted {len(paths)} code maps {list(codes.shape[1:])} to {cache_path}")
    return CodeMaps(codes, labels, paths, fingerprint, True)


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
    vqvae: nn.Module,
    vqvae_ckpt: str | os.PathLike,
    items: Sequence[Mapping[str, Any]],
    cache_path: str | os.PathLike,
    num_embeddings: int,
    num_classes: int | None = None,
    spatial_size: Sequence[int] | int | None = None,
    batch_size: int = 16,
) -> CodeMapDataset:
    """A :class:`CodeMapDataset` of the images of ``items`` through a frozen VQ-VAE, cached at ``cache_path``.

    Images are preprocessed like the VQ-VAE bundle's inputs (:func:`~vqvae_medical.data.image_transforms_2d` with
    the autoencoder's ``in_channels`` and ``spatial_size``).

    Args:
        vqvae: the autoencoder (see :func:`load_vqvae`).
        vqvae_ckpt: its checkpoint file.
        items: datalist items.
        cache_path: the cache file.
        num_embeddings: the prior's number of codes; must equal the autoencoder's codebook size.
        num_classes: number of classes of a class-conditioned prior, else ``None``.
        spatial_size: image size for the preprocessing, ``None`` to keep each file's size.
        batch_size: images per encoder call.
    """
    if int(num_embeddings) != int(vqvae.num_embeddings):
        raise ValueError(
            f"the prior has num_embeddings={num_embeddings} but the VQ-VAE codebook has {vqvae.num_embeddings} codes."
        )
    channels = int(vqvae.in_channels)
    transform = image_transforms_2d(channels=channels, spatial_size=spatial_size)
    settings = {"channels": channels, "spatial_size": spatial_size, "transform": "image_transforms_2d"}
    # under torch.distributed, rank 0 extracts and caches the maps first; the other ranks then read that cache
    with rank_zero_first():
        maps = cached_code_maps(cache_path, vqvae, vqvae_ckpt, items, transform, settings, batch_size)
    return CodeMapDataset(maps.codes, maps.labels, int(num_embeddings), num_classes)
