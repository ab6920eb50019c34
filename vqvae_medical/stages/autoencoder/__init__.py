"""Stage 1: VQ-VAE / VQ-VAE-2 training steps, sliding-window inference and the evaluation report."""

# the autoencoder's hints on checkpoints that do not fit (describe_mismatch) are registered whenever the stage is used
from vqvae_medical.stages.autoencoder import checkpoint_settings as checkpoint_settings
