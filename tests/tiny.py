"""Tiny settings of the bundles, one home for each, for the tests and the benchmarks that build tiny models: a
test takes seconds with them. Command-line overrides of ``python -m monai.bundle`` (``run_bundle``'s ``overrides``);
a test adds its own run settings (epochs, batch size, data) on top.

``bundle_runner`` re-exports ``TINY_VQVAE_2D`` and ``TINY_VQVAE2_2D`` for the tests that import them from there.
``cpu_trainer`` is the MONAI trainer of the tests that train a tiny network in process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "TINY_DIFFUSION",
    "TINY_PRIOR",
    "TINY_UNET",
    "TINY_VQVAE",
    "TINY_VQVAE2_2D",
    "TINY_VQVAE_2D",
    "TINY_VQVAE_3D",
    "cpu_trainer",
    "vqvae_settings",
]


def vqvae_settings(
    channels: list[int], res_channels: list[int], num_embeddings: int, embedding_dim: int = 8
) -> dict[str, Any]:
    """Overrides of the vqvae bundle's network: ``channels`` and ``res_channels`` per level, one residual unit per
    level, ``num_embeddings`` codes of dimension ``embedding_dim``."""
    return {
        "network_def#model#channels": channels,
        "network_def#model#res_channels": res_channels,
        "network_def#model#num_res_units": 1,
        "num_embeddings": num_embeddings,
        "embedding_dim": embedding_dim,
    }


def cpu_trainer(
    network: torch.nn.Module,
    data: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_function: torch.nn.Module,
    max_epochs: int,
    **kwargs: Any,
):
    """MONAI's ``SupervisedTrainer`` on the CPU over ``data``, batches not decollated; ``kwargs`` go to it."""
    from monai.engines import SupervisedTrainer

    # SupervisedTrainer(device, max_epochs, train_data_loader, network, optimizer, loss_function, ...)
    cpu = torch.device("cpu")
    return SupervisedTrainer(cpu, max_epochs, data, network, optimizer, loss_function, decollate=False, **kwargs)

#: the vqvae bundle's network, tiny: channels 8/16, one residual unit of 8 channels, 16 codes of dimension 8
TINY_VQVAE = vqvae_settings([8, 16], [8, 8], 16)
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
