"""Stage 2a: an autoregressive prior over the VQ codes, its training steps, sampling and report."""

# the prior's hints on checkpoints that do not fit (describe_mismatch) are registered whenever the stage is used
from vqvae_medical.stages.prior import checkpoint_settings as checkpoint_settings
