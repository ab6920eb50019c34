"""Tiny settings of the bundles, one home for each, for the tests and the benchmarks that build tiny models: a
test takes seconds with them. Command-line overrides of ``python -m monai.bundle`` (``run_bundle``'s ``overrides``);
a test adds its own run settings (epochs, batch size, data) on top.

``bundle_runner`` re-exports ``TINY_VQVAE_2D`` and ``TINY_VQVAE2_2D`` for the tests that import them from there.
"""

from __future__ import annotations

__all__ = [
    "TINY_DIFFUSION",
    "TINY_PRIOR",
    "TINY_UNET",
    "TINY_VQVAE",
    "TINY_VQVAE2_2D",
    "TINY_VQVAE_2D",
    "TINY_VQVAE_3D",
]

#: the vqvae bundle's network, tiny: channels 8/16, one residual unit of 8 channels, 16 codes of dimension 8
TINY_VQVAE = {
    "network_def#model#channels": [8, 16],
    "network_def#model#res_channels": [8, 8],
    "network_def#model#num_res_units": 1,
    "num_embeddings": 16,
    "embedding_dim": 8,
}
#: the vqvae bundle (2D), tiny, two images a batch
TINY_VQVAE_2D = {**TINY_VQVAE, "batch_size": 2}
#: the vqvae bundle with configs/3d.json, tiny: 24^3 crops, the SSIM window fitted to them
TINY_VQVAE_3D = {**TINY_VQVAE, "spatial_size": [24, 24, 24], "ssim_win_size": 7}
#: the vqvae2 bundle, tiny: the vqvae's channels, a top codebook of 8 codes and a bottom one of 16, both 4-dimensional
TINY_VQVAE2_2D = {**TINY_VQVAE, "num_embeddings": [8, 16], "embedding_dim": [4, 4]}

#: the prior bundle's default network (a transformer), tiny: 16 codes, 64 positions (the 8 x 8 codes of 32 x 32
#: images), 2 layers of 8 channels, 2 heads
TINY_PRIOR = {"num_embeddings": 16, "channels": 8, "num_layers": 2, "num_heads": 2, "max_seq_len": 64}

#: the latent diffusion bundle's UNet, tiny: channels 16/32, no attention, one residual block per level
TINY_UNET = {
    "unet_def#channels": [16, 32],
    "unet_def#attention_levels": [False, False],
    "unet_def#num_res_blocks": 1,
    "unet_def#norm_num_groups": 8,
    "unet_def#num_head_channels": 8,
}

#: the latent diffusion bundle, tiny: ``TINY_UNET`` on the 8 latent channels of a tiny VQ-VAE, 2 DDIM steps
TINY_DIFFUSION = {**TINY_UNET, "num_inference_steps": 2, "embedding_dim": 8}
