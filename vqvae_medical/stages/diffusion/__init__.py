"""Stage 2b: latent diffusion with MONAI's diffusion UNet and schedulers on VQ-VAE latents."""
