"""Single-tensor wrappers that bundles expose as ``network_def``.

MONAI's ``verify_net_in_out`` and ``ckpt_export`` (TorchScript) need a network whose ``forward`` takes one tensor and
returns one tensor. Our autoencoders return a structured result while training, so the bundles expose these
wrappers; training reaches the wrapped model (its loss and codes) through the ``model`` attribute, and the
state-dict keys stay the same for training, inference and export.
"""

from __future__ import annotations

import torch
from torch import nn

from vqvae_medical.networks.config import recorded

__all__ = ["ReconstructionNetwork"]


@recorded
class ReconstructionNetwork(nn.Module):
    """``forward(image) -> reconstruction`` through the codebook, for any autoencoder of this package.

    Args:
        model: a :class:`~vqvae_medical.networks.VQVAE` or :class:`~vqvae_medical.networks.VQVAE2`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(x)
