"""What the two priors over a VQ code map share (:class:`~vqvae_medical.networks.GatedPixelCNN`,
:class:`~vqvae_medical.networks.TransformerPrior`): the settings both take, the conditioning checks, the spatial
condition map, and the base of their one-position-at-a-time caches for sampling. No parameters live here, so the
networks' state dicts are their own."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CodePrior", "CodePriorCache"]


class CodePrior(nn.Module):
    """Base of a prior over a 2D map of code indices ``[B, H, W]``: ``forward(codes, class_label, condition)``
    gives logits ``[B, K, H, W]``, position ``(r, c)`` from the codes before it in raster order. A subclass calls
    :meth:`set_conditioning` in its constructor (before it builds its layers) and owns ``cond_embedding`` (an
    ``nn.Embedding`` of an integer spatial condition, or ``None``)."""

    def set_conditioning(
        self,
        name: str,
        spatial_dims: int,
        num_embeddings: int,
        channels: int,
        num_layers: int,
        num_classes: int | None,
        conditioning_channels: int | None,
        conditioning_num_embeddings: int | None,
    ) -> int | None:
        """Check the settings both priors take, keep them as attributes, and return ``conditioning_channels``
        (``channels`` when an integer condition is embedded and no width was given)."""
        if spatial_dims != 2:
            raise ValueError(f"{name} is 2D only, got spatial_dims={spatial_dims}.")
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be at least 2, got {num_embeddings}.")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}.")
        if conditioning_num_embeddings is not None and conditioning_channels is None:
            conditioning_channels = channels
        self.spatial_dims = spatial_dims
        self.num_embeddings = num_embeddings
        self.channels = channels
        self.num_layers = num_layers
        # class conditioning
        self.num_classes = num_classes
        self.class_conditioned = num_classes is not None
        # spatial conditioning
        self.conditioning_channels = conditioning_channels
        self.conditioning_num_embeddings = conditioning_num_embeddings
        self.spatially_conditioned = conditioning_channels is not None
        return conditioning_channels

    def check_class_label(self, class_label: torch.Tensor | None) -> None:
        """``class_label`` is required by a class-conditioned prior and refused by another."""
        if self.class_conditioned and class_label is None:
            raise ValueError("this prior is class-conditioned: class_label is required.")
        if not self.class_conditioned and class_label is not None:
            raise ValueError("this prior has no class conditioning but a class_label was given.")

    def spatial_features(
        self, condition: torch.Tensor | None, height: int, width: int, contiguous: bool
    ) -> torch.Tensor | None:
        """The spatial condition as a float map ``[B, C_cond, height, width]`` (``None`` if not conditioned): an
        integer condition ``[B, Hc, Wc]`` through ``cond_embedding``, nearest-upsampled to the code map; a float
        map checked for its size. ``contiguous`` copies the embedded map to channels-first (the gated PixelCNN's
        convolutions); without it the map stays channels-last, which the transformer flattens into its sequence
        without a copy."""
        if not self.spatially_conditioned:
            if condition is not None:
                raise ValueError("this prior has no spatial conditioning but a condition was given.")
            return None
        if condition is None:
            raise ValueError("this prior is spatially conditioned: condition is required.")
        cond_embedding = self.cond_embedding
        if cond_embedding is not None:
            if condition.dim() != 3 or condition.dtype != torch.long:
                raise ValueError("condition must be an int64 code map [B, Hc, Wc].")
            features = cond_embedding(condition).permute(0, 3, 1, 2)
            if contiguous:
                features = features.contiguous()
            if features.shape[2] != height or features.shape[3] != width:
                features = F.interpolate(features, size=[height, width], mode="nearest")
            return features
        if condition.dim() != 4 or condition.shape[2] != height or condition.shape[3] != width:
            raise ValueError("condition must be a float map [B, C_cond, H, W] of the code map's spatial size.")
        return condition


class CodePriorCache:
    """Base of the incremental evaluation of a :class:`CodePrior`, one position at a time in raster order.

    Use :meth:`next_logits` then :meth:`append` for each position (see
    :func:`vqvae_medical.stages.prior.sampling.sample`).

    Args:
        model: the prior.
        batch_size: batch size ``B``.
        height: code map height.
        width: code map width.
        class_label: ``[B]`` class indices for a class-conditioned prior.
        condition: spatial condition for a spatially conditioned prior (as for the prior's ``forward``).
    """

    def __init__(
        self,
        model: Any,
        batch_size: int,
        height: int,
        width: int,
        class_label: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.height = height
        self.width = width
        self.start(class_label, condition)

    def start(self, class_label: torch.Tensor | None, condition: torch.Tensor | None) -> None:
        """Set up the cache for an empty code map (subclasses)."""
        raise NotImplementedError

    def next_logits(self) -> torch.Tensor:
        """Logits ``[B, K]`` at the current position, from the codes appended so far."""
        raise NotImplementedError

    def append(self, codes: torch.Tensor) -> None:
        """Set the codes ``[B]`` at the current position and move to the next one."""
        raise NotImplementedError
