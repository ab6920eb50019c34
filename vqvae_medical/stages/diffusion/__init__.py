"""Stage 2b: latent diffusion with MONAI's diffusion UNet and schedulers on VQ-VAE latents."""

# diffusion's hint on checkpoints that do not fit (describe_mismatch) is registered whenever the stage is used
from vqvae_medical.stages.diffusion import network as network
