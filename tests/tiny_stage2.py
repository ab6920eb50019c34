"""Tiny stage-1 and stage-2 output folders built in seconds, without training, for the tests of what stage-2
inference and evaluation do with them (the files a user's runs leave: ``models/model.pt`` and
``models/autoencoder.json`` of stage 1, ``models/model.pt`` of the prior or of latent diffusion).

The networks are the bundles' own ``network_def`` (built from their configs with tiny settings) with their initial
weights: what is tested is what the bundles do around the networks (checks, files, messages), not sample quality.
The tiny settings are those of ``tests/tiny.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from bundle_runner import bundle_network
from tiny import TINY_DIFFUSION, TINY_PRIOR

from vqvae_medical.networks import VQVAE, ReconstructionNetwork
from vqvae_medical.stages.autoencoder.record import data_settings, write_record
from vqvae_medical.utils.io import atomic_save

__all__ = [
    "SIZE",
    "TINY_DIFFUSION",
    "TINY_PRIOR",
    "diffusion_folder",
    "prior_folder",
    "slice_folder",
    "stage_one",
    "tiny_unet",
    "train_steps",
]

SIZE = [32, 32]  # images -> 8 x 8 codes (downsampling factor 4)


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


def train_steps(model: VQVAE, images: torch.Tensor, steps: int = 3) -> VQVAE:
    """``model`` trained ``steps`` Adam steps (L1 + quantizer loss) on ``images`` (the EMA codebook initialised from
    them), in eval mode: a tiny VQ-VAE that has seen the data, without a training run."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(steps):
        out = model(images)
        loss = (out.reconstruction - images).abs().mean() + out.quantizer_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_unet(spatial_dims: int = 2, num_class_embeds: int | None = None, attention: bool = False, seed: int = 0):
    """MONAI's diffusion UNet, tiny (``tests/tiny.py`` ``TINY_UNET``) on 4 latent channels, with attention at the
    second level if asked, seeded."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(seed)
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=4,
        out_channels=4,
        channels=(16, 32),
        attention_levels=(False, attention),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=8,
        num_class_embeds=num_class_embeds,
    )


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
    state = torch.load(autoencoder_dir / "models" / "model.pt", weights_only=True)
    for part in ("decoder", "quantizer"):
        prefix = f"model.{part}."
        weights = {k[len(prefix) :]: w for k, w in state.items() if k.startswith(prefix)}
        getattr(generator, part).load_state_dict(weights)
    generator.diffusion.set_latent_shape([8, SIZE[0] // 4, SIZE[1] // 4], SIZE)
    generator.diffusion.scale_factor.fill_(1.0)
    atomic_save(generator.state_dict(), folder / "models" / "model.pt")
    return folder
