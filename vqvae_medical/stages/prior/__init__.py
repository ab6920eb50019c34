"""Stage 2a: an autoregressive prior over the VQ codes, its training steps, sampling and report."""
