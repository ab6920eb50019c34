"""The VQ-VAE-2 prior: a top prior over the top code map and a bottom prior conditioned on the top codes.

Razavi, van den Oord, Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2", NeurIPS 2019
(arXiv 1906.00446), Sec. 3.2: ``p(top, bottom | y) = p(top | y) p(bottom | top, y)``. The top prior models the top
code map in raster order (a :class:`~vqvae_medical.networks.GatedPixelCNN` or a
:class:`~vqvae_medical.networks.TransformerPrior`; the paper's has self-attention); the bottom prior is a gated
PixelCNN over the bottom code map whose gates also receive the embedded top codes, nearest-upsampled to the bottom
grid as a spatial condition (the whole top map: no causality applies to it). Both may be class-conditioned.

The two networks share no parameters, so training them jointly on the sum of their losses is training each on its
own loss; sampling draws the top map, then the bottom map given it (both cached, see
:mod:`vqvae_medical.stages.prior.sampling`), and the frozen VQ-VAE-2 decodes the pair.

:class:`HierarchicalPrior` keeps the prior bundle's one-tensor ``network_def`` interface (for ``SupervisedTrainer``,
``SupervisedEvaluator`` and the Model Zoo tools): the input packs both code maps on the bottom grid
(:func:`pack_hierarchical_inputs`), the output both levels' logits (:func:`split_hierarchical_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vqvae_medical.networks.pixelcnn import GatedPixelCNN
from vqvae_medical.networks.transformer_prior import TransformerPrior
from vqvae_medical.stages.prior.sampling import sample

__all__ = [
    "LEVELS",
    "LEVEL_KEYS",
    "HierarchicalPrior",
    "pack_hierarchical_inputs",
    "sample_hierarchical",
    "split_hierarchical_logits",
]

LEVELS: tuple[str, str] = ("top", "bottom")
"""The code levels of a VQ-VAE-2, in sampling order."""

LEVEL_KEYS: dict[str, str] = {"top": "top", "bottom": "codes"}
"""Key of each level's code map in the code-map dataset's items and in the prior steps' outputs."""


def _upsample(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Nearest upsampling of the last two dims of ``x`` by an integer factor (each value repeated ``s x s``)."""
    return x.repeat_interleave(scale_factor, dim=-2).repeat_interleave(scale_factor, dim=-1)


class HierarchicalPrior(nn.Module):
    """``forward(x) -> logits``: the top and bottom priors of a VQ-VAE-2 behind one tensor (Razavi et al. 2019).

    ``x`` is a float ``[B, C, Hb, Wb]`` tensor on the bottom grid (see :func:`pack_hierarchical_inputs`): channel 0
    holds the bottom codes, channel 1 the top codes repeated ``scale_factor x scale_factor`` (nearest upsampling),
    and for a class-conditioned prior channel 2 the class index (read at the top-left position). The top prior sees
    the top codes (read back at every ``scale_factor``-th position) and the class; the bottom prior sees the bottom
    codes, the class, and the whole top map as its spatial condition. The output is ``[B, Kt + Kb, Hb, Wb]``: the
    top logits repeated to the bottom grid, then the bottom logits (see :func:`split_hierarchical_logits`), so the
    logits of a code depend only on the codes before it in its own level's raster order (the bottom's also on the
    top map). State-dict keys are ``top.*`` and ``bottom.*``; the forward is TorchScript-scriptable.

    Args:
        top: prior over the top code map: a :class:`~vqvae_medical.networks.GatedPixelCNN` or a
            :class:`~vqvae_medical.networks.TransformerPrior` without spatial conditioning.
        bottom: prior over the bottom code map with ``conditioning_num_embeddings`` equal to the top's
            ``num_embeddings`` (the top codes are its spatial condition); the same class conditioning as ``top``.
        scale_factor: bottom grid size over top grid size (2 for the VQ-VAE-2: codes at 1/4 and 1/8).
    """

    def __init__(
        self, top: GatedPixelCNN | TransformerPrior, bottom: GatedPixelCNN | TransformerPrior, scale_factor: int = 2
    ) -> None:
        super().__init__()
        if not isinstance(top, (GatedPixelCNN, TransformerPrior)) or not isinstance(
            bottom, (GatedPixelCNN, TransformerPrior)
        ):
            raise TypeError("top and bottom must each be a GatedPixelCNN or a TransformerPrior.")
        if top.spatially_conditioned:
            raise ValueError("the top prior models the top codes alone: it must have no spatial conditioning.")
        if bottom.conditioning_num_embeddings is None or int(bottom.conditioning_num_embeddings) != int(
            top.num_embeddings
        ):
            raise ValueError(
                f"the bottom prior must be conditioned on the top codes: set its conditioning_num_embeddings to the "
                f"top codebook size {top.num_embeddings}, got {bottom.conditioning_num_embeddings}."
            )
        if top.num_classes != bottom.num_classes:
            raise ValueError(
                f"top and bottom priors need the same class conditioning, got num_classes {top.num_classes} and "
                f"{bottom.num_classes}."
            )
        if int(scale_factor) < 1:
            raise ValueError(f"scale_factor must be a positive integer, got {scale_factor}.")
        self.top = top
        self.bottom = bottom
        self.spatial_dims: int = 2
        self.scale_factor: int = int(scale_factor)
        self.num_embeddings: tuple[int, int] = (int(top.num_embeddings), int(bottom.num_embeddings))
        self.num_top_embeddings: int = int(top.num_embeddings)
        self.num_classes = top.num_classes
        self.class_conditioned: bool = bool(top.class_conditioned)
        self.in_channels: int = 3 if self.class_conditioned else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_factor
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                "expected [B, C, H, W] input with C = 2 (bottom codes, top codes) or 3 (and class) channels."
            )
        if x.shape[2] % s != 0 or x.shape[3] % s != 0:
            raise ValueError("the bottom grid must be a multiple of scale_factor in both dims.")
        bottom_codes = x[:, 0].long()
        top_codes = x[:, 1, ::s, ::s].long()
        class_label: torch.Tensor | None = None
        if self.class_conditioned:
            class_label = x[:, 2, 0, 0].long()
        top_logits = self.top(top_codes, class_label, None)
        bottom_logits = self.bottom(bottom_codes, class_label, top_codes)
        return torch.cat([_upsample(top_logits, s), bottom_logits], dim=1)

    @torch.jit.unused
    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``[B, Kt, Ht, Wt]`` and bottom ``[B, Kb, Hb, Wb]`` logits of a :meth:`forward` output."""
        return split_hierarchical_logits(logits, self.num_top_embeddings, self.scale_factor)


def pack_hierarchical_inputs(
    top: torch.Tensor, bottom: torch.Tensor, class_label: torch.Tensor | None = None, scale_factor: int = 2
) -> torch.Tensor:
    """The :class:`HierarchicalPrior` input of top codes ``[B, Ht, Wt]``, bottom codes ``[B, s Ht, s Wt]`` and
    optional classes ``[B]``: float ``[B, 2|3, s Ht, s Wt]`` (bottom codes, top codes repeated ``s x s``, class)."""
    if top.dim() != 3 or bottom.dim() != 3 or top.shape[0] != bottom.shape[0]:
        raise ValueError(f"top and bottom codes must be [B, H, W], got {list(top.shape)} and {list(bottom.shape)}.")
    s = int(scale_factor)
    if list(bottom.shape[1:]) != [s * top.shape[1], s * top.shape[2]]:
        raise ValueError(
            f"the bottom code map must be {s} times the top one in each dim, got top {list(top.shape)} and bottom "
            f"{list(bottom.shape)}."
        )
    x = torch.stack([bottom.float(), _upsample(top.to(bottom.device).float(), s)], dim=1)
    if class_label is None:
        return x
    label = class_label.to(x.device, torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, *bottom.shape[1:])
    return torch.cat([x, label], dim=1)


def split_hierarchical_logits(
    logits: torch.Tensor, num_top_embeddings: int, scale_factor: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top logits ``[B, Kt, Hb / s, Wb / s]`` and bottom logits ``[B, Kb, Hb, Wb]`` of a :class:`HierarchicalPrior`
    output ``[B, Kt + Kb, Hb, Wb]`` (the top logits are read back at every ``s``-th position)."""
    s = int(scale_factor)
    if logits.dim() != 4 or logits.shape[1] <= num_top_embeddings or logits.shape[2] % s or logits.shape[3] % s:
        raise ValueError(
            f"expected logits [B, Kt + Kb, H, W] with Kt = {num_top_embeddings} and H, W multiples of {s}, got "
            f"{list(logits.shape)}."
        )
    return logits[:, :num_top_embeddings, ::s, ::s], logits[:, num_top_embeddings:]


def sample_hierarchical(
    prior: HierarchicalPrior,
    num_samples: int,
    top_size: Sequence[int],
    class_label: torch.Tensor | int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cached: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling of a VQ-VAE-2 code pair: the top map, then the bottom map given it (Razavi et al. 2019).

    Both levels go through :func:`~vqvae_medical.stages.prior.sampling.sample` with the same generator, top first,
    so the cached and the naive sampler (``cached=False``) draw the same codes.

    Args:
        prior: the hierarchical prior (in eval mode if it has dropout).
        num_samples: number of code pairs ``B``.
        top_size: ``(Ht, Wt)`` of the top code map; the bottom map is ``scale_factor`` times it.
        class_label: ``[B]`` class indices, or one ``int``, for a class-conditioned prior.
        temperature: softmax temperature of both levels.
        generator: random generator on the prior's device (``None``: torch's global generator).
        cached: incremental evaluation of both priors; ``False`` runs the full networks at each position.
        top_k: top-k truncation of both levels (0: off; :func:`~vqvae_medical.stages.prior.sampling.draw_codes`).
        top_p: nucleus truncation of both levels (1: off).

    Returns:
        int64 ``(top [B, Ht, Wt], bottom [B, s Ht, s Wt])`` on the prior's device.
    """
    if len(top_size) != 2:
        raise ValueError(f"top_size must be (H, W), got {tuple(top_size)}.")
    h, w = (int(v) for v in top_size)
    s = prior.scale_factor
    top = sample(prior.top, (num_samples, h, w), class_label, None, temperature, generator, cached, top_k, top_p)
    bottom = sample(
        prior.bottom, (num_samples, s * h, s * w), class_label, top, temperature, generator, cached, top_k, top_p
    )
    return top, bottom
