"""The codes or latents of a datalist section through the frozen stage-1 autoencoder, cached on disk under a
fingerprint of the weights, the preprocessing and every file (:func:`encode_cached`): the prior's code maps, the
diffusion model's latents, the memorisation audit's training codes and the anomaly calibration's codes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from monai.data import DataLoader, Dataset

from vqvae_medical.data.lists import section
from vqvae_medical.stages.autoencoder.record import state_fingerprint
from vqvae_medical.utils.distributed import rank_zero_first
from vqvae_medical.utils.io import atomic_save, safe_load

if TYPE_CHECKING:
    from vqvae_medical.stages.frozen import FrozenAutoencoder

__all__ = ["ENCODINGS", "Encoded", "cached_section", "encode_cached"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 2
_INT16_MAX_CODES = 32768

ENCODINGS: tuple[str, ...] = ("codes", "latents")
"""What :func:`encode_cached` stores: code indices (the prior) or latents (diffusion)."""


def cached_section(
    datalist: Mapping[str, list[dict]],
    section_name: str,
    cache_dir: str | os.PathLike,
    kind: str,
    max_items: int | None = None,
) -> tuple[list[dict], str]:
    """The items of one section of a datalist and the file that caches their encodings.

    Args:
        datalist: ``{"training": [...], "validation": [...], "test": [...]}``.
        section_name: the section to encode.
        cache_dir: folder of the caches.
        kind: one of :data:`ENCODINGS`; the cache is ``<cache_dir>/<kind>_<section_name>.pt``.
        max_items: the first ``max_items`` items of the section only (``None``: all).
    """
    return section(datalist, section_name, max_items), os.path.join(cache_dir, f"{kind}_{section_name}.pt")


class Encoded(NamedTuple):
    """Encodings of a datalist section.

    Attributes:
        values: latents ``[N, D, *grid]`` (float32) or codes ``[N, *grid]`` (int16); a tuple per level for the
            codes of a VQ-VAE-2.
        labels: ``[N]`` int64 labels, ``-1`` where an item has none.
        paths: the image of each item.
        image_size: spatial size of the preprocessed images.
        fingerprint: hash of the weights, encoding, preprocessing and files the values come from.
        extracted: ``True`` when encoded by this call, ``False`` when read from the cache.
    """

    values: torch.Tensor | tuple[torch.Tensor, ...]
    labels: torch.Tensor
    paths: list[str]
    image_size: list[int]
    fingerprint: str
    extracted: bool


def _item_key(item: Mapping[str, Any], image_key: str, label_key: str | None) -> list:
    image = item[image_key]
    files = [os.path.abspath(os.fspath(f)) for f in (image if isinstance(image, (list, tuple)) else [image])]
    stamps = [[os.stat(f).st_size, os.stat(f).st_mtime_ns] if os.path.exists(f) else None for f in files]
    label = item.get(label_key) if label_key else None
    return [files, stamps, None if label is None else int(label)]


def _encode(
    autoencoder: FrozenAutoencoder,
    items: Sequence[Mapping[str, Any]],
    kind: str,
    transform: Any,
    batch_size: int,
    image_key: str,
    label_key: str | None,
    num_workers: int,
) -> tuple[Any, torch.Tensor, list[int]]:
    """Values, labels and image size of ``items``, in batches through the frozen autoencoder."""
    device = autoencoder.device
    loader = DataLoader(Dataset(list(items), transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    parts: list[Any] = []
    image_size: list[int] | None = None
    for batch in loader:
        images = batch[image_key]
        size = [int(s) for s in images.shape[2:]]
        if image_size is not None and size != image_size:
            raise ValueError(
                f"images come out of the preprocessing in different sizes ({image_size} and {size}), so they cannot "
                "be encoded to one size; all images must have one size or the autoencoder a spatial_size."
            )
        image_size = size
        images = images.to(device)
        if kind == "latents":
            parts.append(autoencoder.encode(images).cpu())
        else:
            out = autoencoder.encode_to_indices(images)
            parts.append(
                tuple(o.to("cpu", torch.int16) for o in out) if isinstance(out, tuple) else out.to("cpu", torch.int16)
            )
    values = (
        tuple(torch.cat(level) for level in zip(*parts, strict=True))
        if isinstance(parts[0], tuple)
        else torch.cat(parts)
    )
    labels = [item.get(label_key) if label_key else None for item in items]
    return values, torch.tensor([-1 if v is None else int(v) for v in labels], dtype=torch.long), image_size or []


def encode_cached(
    autoencoder: FrozenAutoencoder,
    items: Sequence[Mapping[str, Any]],
    kind: str = "codes",
    cache_path: str | os.PathLike | None = None,
    transform: Any = None,
    settings: Any = None,
    batch_size: int = 16,
    image_key: str = "image",
    label_key: str | None = "label",
    num_workers: int = 0,
) -> Encoded:
    """The codes or latents of every item, read from ``cache_path`` when its fingerprint matches, else encoded (in
    eval mode, the weights checked unchanged afterwards) and written there atomically.

    The fingerprint covers the autoencoder's weights, ``kind`` and latent kind, the preprocessing ``settings``,
    each file's path, size and modification time, and the labels, so a changed autoencoder, data set or
    preprocessing is encoded again instead of read stale. Under ``torch.distributed`` rank 0 encodes and writes
    first; the other ranks then read its file.

    Args:
        autoencoder: the frozen autoencoder.
        items: datalist items with ``image_key`` (and ``label_key`` when present).
        kind: ``"codes"`` (int16 indices, for the prior) or ``"latents"`` (float32, for diffusion).
        cache_path: the ``.pt`` cache file (read with ``weights_only=True``), or ``None`` to encode in memory.
        transform: the preprocessing; ``None``: the autoencoder's own (:meth:`FrozenAutoencoder.transforms`).
        settings: JSON-able description of ``transform`` (required with a ``transform``).
        batch_size: images per encoder call.
        image_key: key of the image in the items.
        label_key: key of the int class label, or ``None`` to ignore labels.
        num_workers: data loader workers.
    """
    if kind not in ENCODINGS:
        raise ValueError(f"kind must be one of {ENCODINGS}, got {kind!r}.")
    items = list(items)
    if not items:
        raise ValueError("no images to encode: the datalist section is empty.")
    if transform is None:
        transform, settings = autoencoder.transforms(), autoencoder.preprocessing
    elif settings is None:
        raise ValueError("give the settings that describe a custom transform (they key the cache).")
    codebooks = autoencoder.num_embeddings
    if kind == "codes" and max(codebooks if isinstance(codebooks, tuple) else (codebooks,)) > _INT16_MAX_CODES:
        raise ValueError(f"codes are stored as int16: at most {_INT16_MAX_CODES} codes, got {codebooks}.")
    spec = {
        "version": _CACHE_VERSION,
        "autoencoder": autoencoder.fingerprint,
        "kind": kind,
        "latent": autoencoder.latent if kind == "latents" else None,
        "settings": settings,
        "items": [_item_key(item, image_key, label_key) for item in items],
    }
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_path) if cache_path is not None else None
    with rank_zero_first():
        if path is not None and path.is_file():
            try:
                cached = safe_load(path)
            except Exception as e:  # a broken cache is rebuilt, never trusted
                logger.warning(f"{path}: unreadable cache ({e}); encoding again")
                cached = None
            if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
                values = cached["values"]
                values = tuple(values) if isinstance(values, (list, tuple)) else values
                logger.info(f"read {len(cached['paths'])} cached {kind} from {path}")
                return Encoded(
                    values, cached["labels"], list(cached["paths"]), list(cached["image_size"]), fingerprint, False
                )
            logger.info(f"{path}: autoencoder, data or preprocessing changed; encoding the {kind} again")
        start = time.perf_counter()
        values, labels, image_size = _encode(
            autoencoder, items, kind, transform, batch_size, image_key, label_key, num_workers
        )
        if state_fingerprint(autoencoder.autoencoder) != autoencoder.fingerprint:
            raise RuntimeError("the autoencoder's weights changed while encoding; its codebook must stay frozen.")
        paths = [
            str(_item_key(item, image_key, None)[0])
            if isinstance(item[image_key], (list, tuple))
            else os.path.abspath(os.fspath(item[image_key]))
            for item in items
        ]
        grids = [list(v.shape[1:]) for v in values] if isinstance(values, tuple) else list(values.shape[1:])
        logger.info(
            f"encoded {len(items)} images {image_size} -> {kind} {grids} in {time.perf_counter() - start:.1f} s"
        )
        if path is not None:
            state = {
                "version": _CACHE_VERSION,
                "fingerprint": fingerprint,
                "kind": kind,
                "values": list(values) if isinstance(values, tuple) else values,
                "labels": labels,
                "paths": paths,
                "image_size": image_size,
            }
            atomic_save(state, path)
        return Encoded(values, labels, paths, image_size, fingerprint, True)
