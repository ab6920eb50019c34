"""The prior's ``network_def``: a one-tensor wrapper of the PixelCNN, and loading it (the VQ-VAE-2's two-level
``network_def`` is :class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vqvae_medical.networks.pixelcnn import GatedPixelCNN
from vqvae_medical.networks.transformer_prior import TransformerPrior
from vqvae_medical.stages.autoencoder.record import weights_of
from vqvae_medical.stages.prior.hierarchical import HierarchicalPrior
from vqvae_medical.training.checkpoints import safe_load  # noqa: E402
from vqvae_medical.training.steps import unwrap  # noqa: E402

__all__ = ["PriorNetwork", "pack_inputs", "prior_of", "load_prior"]


class PriorNetwork(nn.Module):
    """``forward(x) -> logits``: a gated PixelCNN or transformer prior behind a one-tensor interface.

    ``x`` is a float ``[B, C, H, W]`` tensor: channel 0 holds the codes (cast with ``.long()``), and for a
    class-conditioned prior channel 1 holds the class index (read at the top-left position, see
    :func:`pack_inputs`). The output is the prior's logits ``[B, K, H, W]``. Training reaches the prior through
    ``model``; the state-dict keys are ``model.*``.

    Args:
        model: the prior, a :class:`~vqvae_medical.networks.GatedPixelCNN` or a
            :class:`~vqvae_medical.networks.TransformerPrior` (class conditioning allowed, spatial conditioning not).
    """

    def __init__(self, model: GatedPixelCNN | TransformerPrior) -> None:
        super().__init__()
        if model.spatially_conditioned:
            raise ValueError("PriorNetwork supports class conditioning only, not a spatially conditioned prior.")
        self.model = model
        self.class_conditioned: bool = bool(model.class_conditioned)
        self.in_channels: int = 2 if self.class_conditioned else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError("expected [B, C, H, W] input with C = 1 (codes) or 2 (codes, class) channels.")
        codes = x[:, 0].long()
        class_label: torch.Tensor | None = None
        if self.class_conditioned:
            class_label = x[:, 1, 0, 0].long()
        return self.model(codes, class_label)


def pack_inputs(codes: torch.Tensor, class_label: torch.Tensor | None = None) -> torch.Tensor:
    """The :class:`PriorNetwork` input of codes ``[B, H, W]`` and optional classes ``[B]``: float ``[B, 1|2, H, W]``."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, H, W], got {list(codes.shape)}.")
    x = codes.float()[:, None]
    if class_label is None:
        return x
    label = class_label.to(x.device, torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, *codes.shape[1:])
    return torch.cat([x, label], dim=1)


def prior_of(network: nn.Module) -> GatedPixelCNN | TransformerPrior | HierarchicalPrior:
    """The :class:`GatedPixelCNN` or :class:`TransformerPrior` inside a :class:`PriorNetwork` (or DDP wrapper), a
    :class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior` itself (top and bottom priors of a
    VQ-VAE-2), or ``network`` itself."""
    network = unwrap(network)
    if isinstance(network, HierarchicalPrior):
        return network
    network = getattr(network, "model", network)
    if not isinstance(network, (GatedPixelCNN, TransformerPrior)):
        raise ValueError(
            f"expected a GatedPixelCNN, a TransformerPrior, a PriorNetwork or a HierarchicalPrior, got "
            f"{type(network).__name__}."
        )
    return network


def load_prior(network: nn.Module, ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a prior's ``model.pt`` (state dict of ``network_def``, or a ``{"model": ...}`` checkpoint) with
    ``weights_only=True``; returns ``network`` on ``device`` in eval mode."""
    if not Path(ckpt_path).is_file():
        raise ValueError(f"prior checkpoint {ckpt_path} does not exist. Train the prior first or set ckpt_path.")
    network.load_state_dict(weights_of(safe_load(ckpt_path)))
    return network.to(device).eval()
