"""Anomaly maps from a code prior trained on healthy images: per-code likelihoods, healing, residual maps.

The method of Pinaya et al. (MIDL 2021, arXiv 2102.11650; Medical Image Analysis 2022, arXiv 2201.06706): a VQ-VAE
and an autoregressive prior over its codes, both trained on healthy scans only.

1. **Likelihoods.** One teacher-forced forward pass of the prior gives the negative log-likelihood (nats) of every
   code of the input's code map given the codes before it (:func:`code_nll`).
2. **Resampling mask.** Codes whose NLL is above a threshold, calibrated on held-out healthy images (the
   ``quantile``-th percentile of their per-code NLL, :mod:`~vqvae_medical.stages.prior.anomaly_calibration`), are marked
   (:func:`resample_masks`). VQ-VAE-2: a top code is marked if its own NLL is above the top threshold; a bottom
   code if its own NLL is above the bottom threshold **or** its parent top code is marked.
3. **Healing.** The marked codes are redrawn from the prior in raster order, every other code kept
   (:func:`heal_codes`, on the cached incremental evaluation of :mod:`~vqvae_medical.stages.prior.sampling`);
   VQ-VAE-2: the top map first, then the bottom map given the healed top map.
4. **Map.** The healed code map is decoded by the frozen VQ-VAE; the anomaly map is ``|x - healed(x)|`` (mean over
   channels) times the resampling mask upsampled to the image (nearest) and, with ``mask_sigma > 0``, smoothed by
   a Gaussian of that many pixels (:func:`anomaly_maps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import nn

from vqvae_medical.networks.pixelcnn import GatedPixelCNN, PixelCNNCache
from vqvae_medical.networks.transformer_prior import TransformerPrior, TransformerPriorCache
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.stages.prior.hierarchical import HierarchicalPrior, pack_hierarchical_inputs
from vqvae_medical.stages.prior.network import prior_of
from vqvae_medical.stages.prior.sampling import draw_codes, prior_device

__all__ = [
    "IMAGE_SCORES",
    "AnomalyResult",
    "anomaly_maps",
    "code_nll",
    "heal_codes",
    "image_scores",
    "pixel_mask",
    "resample_masks",
]

IMAGE_SCORES: tuple[str, ...] = ("map_top", "nll_excess")
"""Image scores: ``map_top`` the mean of the largest ``top_fraction`` of the map's pixels; ``nll_excess`` the sum
over codes of the NLL above the threshold (nats; of both levels for a VQ-VAE-2)."""


def _codes_tuple(codes: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(c.long() for c in codes) if isinstance(codes, (tuple, list)) else (codes.long(),)


def _class_tensor(class_label: int | torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor | None:
    if class_label is None or isinstance(class_label, torch.Tensor):
        return class_label
    return torch.full((b,), int(class_label), dtype=torch.long, device=device)


@torch.no_grad()
def code_nll(
    network: nn.Module, codes: torch.Tensor | Sequence[torch.Tensor], class_label: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Negative log-likelihood (nats) of every code under the prior, from one teacher-forced forward pass.

    Args:
        network: the prior's ``network_def`` (``PriorNetwork`` or ``HierarchicalPrior``) or the prior itself.
        codes: code maps ``[B, H, W]``, or ``(top, bottom)`` for the hierarchical prior of a VQ-VAE-2.
        class_label: class of a class-conditioned prior (``[B]`` or one int).

    Returns:
        ``(nll [B, H, W],)`` or ``(nll_top, nll_bottom)``, float32.
    """
    prior = prior_of(network)
    levels = _codes_tuple(codes)
    device = prior_device(prior)
    levels = tuple(c.to(device) for c in levels)
    label = _class_tensor(class_label, levels[0].shape[0], device)
    if isinstance(prior, HierarchicalPrior):
        if len(levels) != 2:
            raise ValueError("the hierarchical prior of a VQ-VAE-2 needs (top, bottom) code maps.")
        logits = prior(pack_hierarchical_inputs(levels[0], levels[1], label, prior.scale_factor))
        pairs = zip(prior.split_logits(logits), levels, strict=True)
    else:
        if len(levels) != 1:
            raise ValueError("a one-level prior needs one code map [B, H, W], got a (top, bottom) pair.")
        pairs = zip([prior(levels[0], label)], levels, strict=True)
    return tuple(F.cross_entropy(lg.float(), c, reduction="none") for lg, c in pairs)


def _upsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(mask[:, None].float(), size=[int(s) for s in size], mode="nearest")[:, 0] > 0.5


def resample_masks(nll: Sequence[torch.Tensor], thresholds: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """Codes to resample: NLL above the threshold of their level; a bottom code also when its parent top code is.

    Args:
        nll: per-level NLL maps (:func:`code_nll`).
        thresholds: one NLL threshold (nats) per level.
    """
    if len(nll) != len(thresholds):
        raise ValueError(f"need one threshold per code level ({len(nll)}), got {len(thresholds)}.")
    masks = [n > float(t) for n, t in zip(nll, thresholds, strict=True)]
    if len(masks) == 2:
        masks[1] = masks[1] | _upsample_mask(masks[0], masks[1].shape[1:])
    return tuple(masks)


@torch.no_grad()
def _heal_level(
    model: GatedPixelCNN | TransformerPrior,
    codes: torch.Tensor,
    mask: torch.Tensor,
    class_label: torch.Tensor | None,
    condition: torch.Tensor | None,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    b, height, width = codes.shape
    out = codes.clone()
    flat_mask = mask.reshape(b, -1)
    marked = flat_mask.any(0).nonzero()
    if marked.numel() == 0:
        return out
    stop = int(marked.max()) + 1  # positions after the last marked one keep their codes: no need to run them
    cache_type = TransformerPriorCache if isinstance(model, TransformerPrior) else PixelCNNCache
    cache = cache_type(model, b, height, width, class_label, condition)
    flat = out.reshape(b, -1)
    for i in range(stop):
        logits = cache.next_logits()
        if bool(flat_mask[:, i].any()):
            drawn = draw_codes(logits, temperature, generator)
            flat[:, i] = torch.where(flat_mask[:, i], drawn, flat[:, i])
        cache.append(flat[:, i])
    return flat.reshape(b, height, width)


def heal_codes(
    network: nn.Module,
    codes: torch.Tensor | Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    class_label: int | torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Redraw the masked codes from the prior in raster order, keeping every other code (the "healing").

    Each position runs the prior's cached incremental evaluation (``TransformerPriorCache`` or ``PixelCNNCache``,
    as :func:`~vqvae_medical.stages.prior.sampling.sample`) with the given code fed back where it is kept and a
    code drawn by :func:`~vqvae_medical.stages.prior.sampling.draw_codes` where it is masked; the run stops after
    the last masked position. VQ-VAE-2: the top map is healed first, then the bottom map conditioned on the healed
    top map.

    Args:
        network: the prior's ``network_def`` or the prior itself, in eval mode.
        codes: ``[B, H, W]`` codes, or ``(top, bottom)``.
        masks: per-level boolean masks of the codes to redraw (:func:`resample_masks`).
        class_label: class of a class-conditioned prior.
        temperature: softmax temperature of the redrawn codes.
        generator: random generator on the prior's device.

    Returns:
        the healed codes, one int64 map per level.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    prior = prior_of(network)
    device = prior_device(prior)
    levels = tuple(c.to(device) for c in _codes_tuple(codes))
    masks = tuple(m.to(device) for m in masks)
    label = _class_tensor(class_label, levels[0].shape[0], device)
    if isinstance(prior, HierarchicalPrior):
        top = _heal_level(prior.top, levels[0], masks[0], label, None, temperature, generator)
        bottom = _heal_level(prior.bottom, levels[1], masks[1], label, top, temperature, generator)
        return top, bottom
    return (_heal_level(prior, levels[0], masks[0], label, None, temperature, generator),)


def pixel_mask(mask: torch.Tensor, image_size: Sequence[int], sigma: float = 0.0) -> torch.Tensor:
    """The code mask ``[B, h, w]`` as a float image mask ``[B, 1, H, W]``: nearest upsampling (each code covers its
    ``H / h x W / w`` pixels), then, with ``sigma > 0``, a Gaussian of ``sigma`` pixels (values in ``[0, 1]``)."""
    up = F.interpolate(mask[:, None].float(), size=[int(s) for s in image_size], mode="nearest")
    if sigma > 0:
        up = GaussianFilter(2, float(sigma)).to(up.device)(up).clamp(0.0, 1.0)
    return up


def image_scores(
    maps: torch.Tensor, nll: Sequence[torch.Tensor], thresholds: Sequence[float], top_fraction: float = 0.01
) -> dict[str, torch.Tensor]:
    """The :data:`IMAGE_SCORES` of each image ``[B]``: ``map_top`` (mean of the largest ``top_fraction`` of the
    map's pixels) and ``nll_excess`` (sum of ``max(0, NLL - threshold)`` over the codes of every level)."""
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}.")
    flat = maps.flatten(1)
    k = max(1, round(top_fraction * flat.shape[1]))
    excess = sum((n - float(t)).clamp_min(0).flatten(1).sum(1) for n, t in zip(nll, thresholds, strict=True))
    return {"map_top": flat.topk(k, dim=1).values.mean(1), "nll_excess": excess}


@dataclass
class AnomalyResult:
    """What :func:`anomaly_maps` returns for a batch (tensors on the CPU).

    Attributes:
        maps: anomaly maps ``[B, 1, H, W]`` (``|x - healed|`` inside the resampling mask, intensity units).
        healed: decoded healed images ``[B, C, H, W]``.
        reconstruction: decoded codes of the input, unhealed ``[B, C, H, W]``.
        nll: per-level NLL maps (nats) of the input's codes.
        masks: per-level resampling masks.
        resampled: share of all codes resampled, per image ``[B]``.
        scores: the :data:`IMAGE_SCORES` per image.
    """

    maps: torch.Tensor
    healed: torch.Tensor
    reconstruction: torch.Tensor
    nll: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]
    resampled: torch.Tensor
    scores: dict[str, torch.Tensor]


def anomaly_maps(
    autoencoder: FrozenAutoencoder,
    network: nn.Module,
    images: torch.Tensor,
    thresholds: Sequence[float],
    class_label: int | torch.Tensor | None = None,
    temperature: float = 1.0,
    mask_sigma: float = 0.0,
    top_fraction: float = 0.01,
    generator: torch.Generator | None = None,
) -> AnomalyResult:
    """Anomaly maps, healed images and image scores of preprocessed images ``[B, C, H, W]`` in ``[0, 1]``.

    Args:
        autoencoder: the frozen stage-1 VQ-VAE (or VQ-VAE-2).
        network: the prior trained on its codes of healthy images.
        images: preprocessed images, as the stage-1 model's transforms give them.
        thresholds: per-level NLL thresholds (nats), from the calibration.
        class_label: class of a class-conditioned prior.
        temperature: softmax temperature of the redrawn codes.
        mask_sigma: Gaussian smoothing of the upsampled mask, in pixels (0: none).
        top_fraction: share of pixels of the ``map_top`` score.
        generator: random generator on the prior's device.
    """
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    images = images.float().to(autoencoder.device)
    size = list(images.shape[2:])
    codes = _codes_tuple(autoencoder.encode_to_indices(images))
    nll = code_nll(network, codes, class_label)
    masks = resample_masks(nll, thresholds)
    healed_codes = heal_codes(network, codes, masks, class_label, temperature, generator)

    def decode(levels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        levels = tuple(c.to(autoencoder.device) for c in levels)
        return autoencoder.decode_from_indices(levels if len(levels) > 1 else levels[0], size).clamp(0, 1)

    healed = decode(healed_codes)
    reconstruction = decode(codes)
    weight = pixel_mask(masks[-1], size, mask_sigma).to(images.device)
    maps = (images - healed).abs().mean(1, keepdim=True) * weight
    total = sum(m[0].numel() for m in masks)
    resampled = sum(m.flatten(1).sum(1) for m in masks).float() / total
    nll_cpu = tuple(n.cpu() for n in nll)
    return AnomalyResult(
        maps=maps.cpu(),
        healed=healed.cpu(),
        reconstruction=reconstruction.cpu(),
        nll=nll_cpu,
        masks=tuple(m.cpu() for m in masks),
        resampled=resampled.cpu(),
        scores={k: v.cpu() for k, v in image_scores(maps, nll_cpu, thresholds, top_fraction).items()},
    )
