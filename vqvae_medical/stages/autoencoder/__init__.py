"""Stage 1: VQ-VAE / VQ-VAE-2 training steps, sliding-window inference and the evaluation report."""
