"""vqvae-medical: discrete latent generative models of medical images, packaged as MONAI bundles."""

from __future__ import annotations

__version__ = "0.4.0"

__all__ = ["__version__"]
