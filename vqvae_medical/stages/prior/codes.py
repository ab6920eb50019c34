"""VQ code maps for the prior: the cached codes of a datalist section through the frozen autoencoder, as a dataset."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from vqvae_medical.stages.encodings import encode_cached
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.utils.modules import unwrap

__all__ = ["NO_LABEL", "CodeMapDataset", "check_codebooks", "code_map_dataset"]


NO_LABEL = -1
"""Label of a code map whose image has no class."""


_OVERLAY = "configs/vqvae2.json"


def _codebooks(network: nn.Module) -> tuple[int, ...]:
    """Codebook size of each code level of an autoencoder (``(top, bottom)`` for a VQ-VAE-2)."""
    model = unwrap(network, wrappers=True)
    n = model.num_embeddings
    return tuple(int(k) for k in n) if isinstance(n, (tuple, list)) else (int(n),)


def check_codebooks(autoencoder: nn.Module, num_embeddings: int | Sequence[int]) -> int | tuple[int, ...]:
    """Check that a prior's ``num_embeddings`` fits the autoencoder's code levels and codebook sizes.

    A single-level VQ-VAE needs one ``int``; a VQ-VAE-2 a ``(top, bottom)`` pair (the hierarchical prior of
    ``configs/vqvae2.json``). The messages name the config or the value to set.

    Args:
        autoencoder: a :class:`~vqvae_medical.stages.frozen.FrozenAutoencoder`, ``VQVAE`` or ``VQVAE2``.
        num_embeddings: the prior's codebook size(s).

    Returns:
        ``num_embeddings`` as an ``int`` (one level) or a tuple of ints (two levels).
    """
    codebooks = _codebooks(autoencoder)
    directory = getattr(autoencoder, "directory", None)
    of = f" of {directory}" if directory else ""
    pair = isinstance(num_embeddings, (list, tuple))
    if len(codebooks) > 1 and not pair:
        raise ValueError(
            f"the autoencoder{of} is a VQ-VAE-2 with {len(codebooks)} code levels (codebooks {list(codebooks)}), but "
            f"num_embeddings={num_embeddings} is a single-level prior's: add {_OVERLAY} after configs/train.json or "
            f"configs/inference.json (--config_file \"['configs/train.json','{_OVERLAY}']\") for the top and bottom "
            "priors."
        )
    if len(codebooks) == 1 and pair:
        raise ValueError(
            f"the autoencoder{of} is a single-level VQ-VAE (one codebook of {codebooks[0]} codes), but "
            f"num_embeddings={list(num_embeddings)} is the hierarchical prior's of {_OVERLAY}: leave {_OVERLAY} out "
            "for a vqvae autoencoder."
        )
    given = tuple(int(k) for k in num_embeddings) if pair else (int(num_embeddings),)
    if given != codebooks:
        want = list(codebooks) if pair else codebooks[0]
        shown = list(given) if pair else given[0]
        has = "codebooks have" if pair else "codebook has"
        raise ValueError(
            f"the prior has num_embeddings={shown} but the autoencoder's {has} {want} codes; set num_embeddings "
            f"to {want}."
        )
    return given if pair else given[0]


class CodeMapDataset(Dataset):
    """Items ``{"codes": int64 [H, W], "label": int64 []}`` of cached code maps, for a PixelCNN prior; with ``top``
    codes (a VQ-VAE-2), items ``{"codes": bottom [H, W], "top": top [H / s, W / s], "label"}`` for the
    :class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior`.

    Args:
        codes: ``[N, H, W]`` code indices (the bottom level of a VQ-VAE-2).
        labels: ``[N]`` labels (:data:`NO_LABEL` for none).
        num_embeddings: codebook size; every code must be below it.
        num_classes: with class conditioning, the number of classes: every map needs a label in
            ``[0, num_classes)``; ``None`` for an unconditioned prior (labels are then passed on but unused).
        top: ``[N, Ht, Wt]`` top code indices of a VQ-VAE-2 (``H``, ``W`` integer multiples of them), or ``None``.
        top_num_embeddings: top codebook size (required with ``top``).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        num_embeddings: int,
        num_classes: int | None = None,
        top: torch.Tensor | None = None,
        top_num_embeddings: int | None = None,
    ) -> None:
        if codes.dim() != 3 or labels.shape != codes.shape[:1]:
            raise ValueError(
                f"expected codes [N, H, W] and labels [N], got {list(codes.shape)} and {list(labels.shape)}."
            )
        _check_range(codes, num_embeddings, "code maps")
        if top is not None:
            if top_num_embeddings is None:
                raise ValueError("give top_num_embeddings with the top codes.")
            if top.dim() != 3 or top.shape[0] != codes.shape[0]:
                raise ValueError(f"expected top codes [N, Ht, Wt] for {codes.shape[0]} maps, got {list(top.shape)}.")
            if codes.shape[1] % top.shape[1] or codes.shape[1] // top.shape[1] * top.shape[2] != codes.shape[2]:
                raise ValueError(
                    f"the bottom code maps {list(codes.shape[1:])} must be an integer multiple of the top ones "
                    f"{list(top.shape[1:])}, the same in both dims."
                )
            _check_range(top, top_num_embeddings, "top code maps")
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
        self.top, self.top_num_embeddings = top, top_num_embeddings  # the top level of a VQ-VAE-2, or None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"codes": self.codes[index].long(), "label": self.labels[index]}
        if self.top is not None:
            item["top"] = self.top[index].long()
        return item


def _check_range(codes: torch.Tensor, num_embeddings: int, what: str) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_embeddings):
        raise ValueError(
            f"{what} hold indices outside [0, {num_embeddings}): the prior's num_embeddings must equal the "
            "VQ-VAE's codebook size."
        )


def code_map_dataset(
    autoencoder: FrozenAutoencoder,
    items: Sequence[Mapping[str, Any]],
    cache_path: str | os.PathLike | None,
    num_embeddings: int | Sequence[int],
    num_classes: int | None = None,
    batch_size: int = 16,
) -> CodeMapDataset:
    """A :class:`CodeMapDataset` of the images of ``items`` through the frozen autoencoder, cached at ``cache_path``
    (see :func:`~vqvae_medical.stages.encodings.encode_cached`; the images are preprocessed as stage 1 did).

    A VQ-VAE gives one code map per image; a VQ-VAE-2 (``num_embeddings`` a ``(top, bottom)`` pair) gives items
    with the bottom map as ``"codes"`` and the top map as ``"top"``.

    Args:
        autoencoder: the frozen autoencoder (:func:`~vqvae_medical.stages.frozen.load_autoencoder`).
        items: datalist items.
        cache_path: the cache file, or ``None`` to encode in memory.
        num_embeddings: the prior's number of codes (a ``(top, bottom)`` pair for a VQ-VAE-2); must equal the
            autoencoder's codebook size(s), see :func:`check_codebooks`.
        num_classes: number of classes of a class-conditioned prior, else ``None``.
        batch_size: images per encoder call.
    """
    codebooks = check_codebooks(autoencoder, num_embeddings)
    maps = encode_cached(autoencoder, items, "codes", cache_path, batch_size=batch_size)
    if isinstance(codebooks, tuple):
        (top, bottom), (k_top, k_bottom) = maps.values, codebooks
        return CodeMapDataset(bottom, maps.labels, k_bottom, num_classes, top=top, top_num_embeddings=k_top)
    return CodeMapDataset(maps.values, maps.labels, codebooks, num_classes)
