"""Ancestral sampling of code maps from a gated PixelCNN or a causal transformer prior.

Positions are drawn in raster order, each with ``torch.multinomial`` on ``softmax(logits / temperature)`` (van den
Oord et al. 2016, arXiv 1606.05328), optionally truncated to the ``top_k`` most likely codes (Fan et al. 2018, arXiv
1805.04833) or to the nucleus of cumulative probability ``top_p`` (Holtzman et al. 2020, arXiv 1904.09751): both cut
the unlikely tail whose draws put stray codes into a sample. The naive sampler runs the full network for every
position (``H * W`` forward passes); the cached sampler evaluates one position at a time:
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
from vqvae_medical.training.runtime import SettingError

__all__ = ["sample", "draw_codes", "check_truncation", "prior_device"]


def prior_device(model: nn.Module) -> torch.device:
    """The device of a prior's parameters."""
    return next(model.parameters()).device


def check_truncation(top_k: int = 0, top_p: float = 1.0) -> None:
    """Raises :class:`~vqvae_medical.training.runtime.SettingError` (a ``ValueError``) unless ``top_k`` is a whole
    number ``>= 0`` (0: off) and ``0 < top_p <= 1`` (1: off)."""
    plain = "Pass --top_k 0 and --top_p 1.0 for the plain draw."
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SettingError(f"top_k must be a whole number, 0 (off) or more, got {top_k!r}. {plain}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise SettingError(f"top_p must be in (0, 1] (1 is off), got {top_p!r}. {plain}")


def draw_codes(
    logits: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """One code per row of ``logits`` ``[B, K]``: ``torch.multinomial(softmax(logits / temperature), 1)``, over the
    ``top_k`` most likely codes when ``top_k > 0`` and over the smallest set of codes whose probability adds up to
    ``top_p`` when ``top_p < 1`` (the most likely code is always kept). With both off the draw is the plain one."""
    probs = torch.softmax(logits.float().contiguous() / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, dim=-1, descending=True)
        before = ordered.cumsum(dim=-1) - ordered  # the probability of the codes ranked above each one
        kept = ordered.masked_fill(before >= top_p * ordered.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, kept)  # back to the codes' own order
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample(
    model: GatedPixelCNN | TransformerPrior,
    shape: Sequence[int],
    class_label: torch.Tensor | int | None = None,
    condition: torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cached: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
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
        top_k: draw each code from the ``top_k`` most likely ones (0: all; see :func:`draw_codes`).
        top_p: draw each code from the nucleus of cumulative probability ``top_p`` (1: all).

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
    check_truncation(top_k, top_p)
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
                    new = draw_codes(cache.next_logits(), temperature, generator, top_k, top_p)
                    cache.append(new)
                    codes[:, r, c] = new
        else:
            for r in range(height):
                for c in range(width):
                    logits = model(codes, class_label, condition)[:, :, r, c]
                    codes[:, r, c] = draw_codes(logits, temperature, generator, top_k, top_p)
    return codes
