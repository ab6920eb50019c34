"""Networks: VQ-VAE, VQ-VAE-2, gated PixelCNN and the single-tensor export wrappers."""

from __future__ import annotations

from vqvae_medical.networks.export import ReconstructionNetwork
from vqvae_medical.networks.vqvae import VQVAE, VQOutput, make_quantizer, pad_to_multiple

__all__ = ["VQVAE", "VQOutput", "ReconstructionNetwork", "make_quantizer", "pad_to_multiple"]
