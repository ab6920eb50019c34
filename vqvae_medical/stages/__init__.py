"""The pipeline stages: the autoencoder (stage 1), the frozen autoencoder stage 2 builds on, the prior, diffusion."""
