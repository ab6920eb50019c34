"""Ancestral sampling of code maps from a gated PixelCNN or a causal transformer prior.

Positions are drawn in raster order, each with ``torch.multinomial`` on ``softmax(logits / temperature)``
(van den Oord et al. 2016, arXiv 1606.05328). The naive sampler runs the full network for every position
(``H * W`` forward passes); the cached sampler evaluates one position at a time:
:class:`~vqvae_medical.networks.pixelcnn.PixelCNNCache` computes each layer's vertical stack once per row and its
horizontal stack one column per position, :class:`~vqvae_medical.networks.transformer_prior.TransformerPriorCache`
runs one token through the blocks against the cached keys and values of the past positions. Both compute the logits
with the same operations and draw from the same generator in the same order, so they return the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vqvae_medical.networks.pixelcnn import GatedPixelCNN, PixelCNNCache
from vqvae_medical.networks.transformer_prior import TransformerPrior, TransformerPriorCache

__all__ = ["sample", "draw_codes", "prior_device"]


def prior_device(model: nn.Module) -> torch.device:
    """The device of a prior's parameters."""
    return next(model.parameters()).device


def draw_codes(
    logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One code per row of ``logits`` ``[B, K]``: ``torch.multinomial(softmax(logits / temperature), 1)``."""
    probs = torch.softmax(logits.float().contiguous() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample(
    model: GatedPixelCNN | TransformerPrior,
    shape: Sequence[int],
    class_label: torch.Tensor | int | None = None,
    condition: torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cached: bool = True,
) -> torch.Tensor:
    """Sample code maps from a gated PixelCNN or transformer prior in raster order.

    Args:
        model: the prior, in eval mode if it has dropout (a transformer's ``embedding_dropout``).
        shape: ``(B, H, W)`` of the code maps.
        class_label: ``[B]`` class indices, or one ``int`` for the whole batch, for a class-conditioned prior.
        condition: spatial condition for a spatially conditioned prior (see :class:`GatedPixelCNN`).
        temperature: softmax temperature (``> 0``; lower is more conservative).
        generator: random generator on the model's device (``None``: torch's global generator).
        cached: incremental evaluation (:class:`PixelCNNCache` or :class:`TransformerPriorCache`); ``False`` runs
            the full network at each position.

    Returns:
        int64 codes ``[B, H, W]`` on the model's device.

    Note:
        On a CPU the cached sampler runs many tiny operations; ``torch.set_num_threads(1)`` makes it several times
        faster than more threads, by far on a loaded machine (OpenMP synchronisation dominates otherwise).
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be (B, H, W), got {tuple(shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    b, height, width = (int(s) for s in shape)
    device = prior_device(model)
    if isinstance(class_label, int):
        class_label = torch.full((b,), class_label, dtype=torch.long, device=device)
    if class_label is not None and tuple(class_label.shape) != (b,):
        raise ValueError(f"class_label must have shape [{b}], got {list(class_label.shape)}.")
    if condition is not None and condition.shape[0] != b:
        raise ValueError(f"condition must have batch size {b}, got {condition.shape[0]}.")
    codes = torch.zeros(b, height, width, dtype=torch.long, device=device)
    with torch.no_grad():
        if cached:
            cache_type = TransformerPriorCache if isinstance(model, TransformerPrior) else PixelCNNCache
            cache = cache_type(model, b, height, width, class_label, condition)
            for r in range(height):
                for c in range(width):
                    new = draw_codes(cache.next_logits(), temperature, generator)
                    cache.append(new)
                    codes[:, r, c] = new
        else:
            for r in range(height):
                for c in range(width):
                    logits = model(codes, class_label, condition)[:, :, r, c]
                    codes[:, r, c] = draw_codes(logits, temperature, generator)
    return codes
