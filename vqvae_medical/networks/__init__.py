"""Networks: VQ-VAE, VQ-VAE-2, gated PixelCNN and transformer priors, and the single-tensor export wrappers."""

from __future__ import annotations

from vqvae_medical.networks.export import ReconstructionNetwork
from vqvae_medical.networks.pixelcnn import (
    GatedPixelCNN,
    PixelCNNCache,
    bits_per_code,
    prior_cross_entropy,
)
from vqvae_medical.networks.transformer_prior import TransformerPrior, TransformerPriorCache
from vqvae_medical.networks.vqvae import (
    VQVAE,
    CheckpointedSequential,
    VQOutput,
    crop_to,
    make_quantizer,
    pad_to_multiple,
)
from vqvae_medical.networks.vqvae2 import VQVAE2

__all__ = [
    "VQVAE",
    "VQVAE2",
    "GatedPixelCNN",
    "PixelCNNCache",
    "TransformerPrior",
    "TransformerPriorCache",
    "bits_per_code",
    "prior_cross_entropy",
    "VQOutput",
    "ReconstructionNetwork",
    "CheckpointedSequential",
    "make_quantizer",
    "pad_to_multiple",
    "crop_to",
]
