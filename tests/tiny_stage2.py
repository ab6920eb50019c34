"""Tiny stage-1 and stage-2 output folders built in seconds, without training, for the tests of what stage-2
inference and evaluation do with them (the files a user's runs leave: ``models/model.pt`` and
``models/autoencoder.json`` of stage 1, ``models/model.pt`` of the prior or of latent diffusion).

The networks are the bundles' own ``network_def`` (built from their configs with tiny settings) with their initial
weights: what is tested is what the bundles do around the networks (checks, files, messages), not sample quality.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from bundle_runner import bundle_network

from vqvae_medical.networks import VQVAE, ReconstructionNetwork
from vqvae_medical.stages.autoencoder.record import data_settings, write_record
from vqvae_medical.training.checkpoints import atomic_save

__all__ = ["SIZE", "TINY_DIFFUSION", "TINY_PRIOR", "diffusion_folder", "prior_folder", "slice_folder", "stage_one"]

SIZE = [32, 32]  # images -> 8 x 8 codes (downsampling factor 4)
#: the prior bundle's default network (a transformer), tiny: 64 positions, 2 layers of 8 channels, 2 heads
TINY_PRIOR = {"num_embeddings": 16, "channels": 8, "num_layers": 2, "num_heads": 2, "max_seq_len": 64}
#: the latent diffusion bundle's UNet, tiny, on the 8 latent channels, 2 DDIM steps
TINY_DIFFUSION = {
    "unet_def#channels": [16, 32],
    "unet_def#attention_levels": [False, False],
    "unet_def#num_res_blocks": 1,
    "unet_def#norm_num_groups": 8,
    "unet_def#num_head_channels": 8,
    "num_inference_steps": 2,
    "embedding_dim": 8,
}


def slice_folder(files: Sequence[Path], folder: Path) -> Path:
    """Real 2D images copied into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name.replace(" ", "_"))
    return folder


def stage_one(folder: Path, data: Path | None, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Path:
    """``folder`` as the vqvae bundle leaves it (``models/model.pt`` and its record), for grey ``SIZE`` images of
    the ``data`` folder (flat layout) split with these fractions: a tiny VQ-VAE, 16 codes of dimension 8."""
    torch.manual_seed(0)
    model = VQVAE(2, 1, channels=(8, 16), num_res_units=1, res_channels=(8, 8), num_embeddings=16, embedding_dim=8)
    network = ReconstructionNetwork(model)
    path = atomic_save(network.state_dict(), folder / "models" / "model.pt")
    preprocessing = {"transforms": "image_transforms_2d", "channels": 1, "spatial_size": SIZE}
    data_set = data_settings(data, "folder" if data else "auto", val_fraction, test_fraction)
    write_record(path, network, preprocessing, data_set, SIZE)
    return folder


def prior_folder(folder: Path, autoencoder_dir: Path, num_classes: int = 0, seed: int = 0) -> Path:
    """``folder/models/model.pt``: the prior bundle's ``network_def`` (``TINY_PRIOR``) with its initial weights."""
    torch.manual_seed(seed)
    overrides = {**TINY_PRIOR, "num_classes": num_classes, "autoencoder_dir": autoencoder_dir}
    network = bundle_network("pixelcnn_prior", overrides)
    atomic_save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def diffusion_folder(folder: Path, autoencoder_dir: Path, num_class_embeds: int | None = None, seed: int = 0) -> Path:
    """``folder/models/model.pt``: the latent diffusion bundle's generator (``TINY_DIFFUSION``) with its initial UNet
    weights, the autoencoder's decoder and codebook, latents ``[8, 8, 8]`` of ``SIZE`` images, scale factor 1."""
    torch.manual_seed(seed)
    overrides = {**TINY_DIFFUSION, "num_class_embeds": num_class_embeds, "autoencoder_dir": autoencoder_dir}
    generator = bundle_network("latent_diffusion", overrides)
    vqvae = torch.load(autoencoder_dir / "models" / "model.pt", weights_only=True)
    for part in ("decoder", "quantizer"):
        getattr(generator, part).load_state_dict({k[len(f"model.{part}.") :]: v for k, v in vqvae.items() if k.startswith(f"model.{part}.")})
    generator.diffusion.set_latent_shape([8, SIZE[0] // 4, SIZE[1] // 4], SIZE)
    generator.diffusion.scale_factor.fill_(1.0)
    atomic_save(generator.state_dict(), folder / "models" / "model.pt")
    return folder
