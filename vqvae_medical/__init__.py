"""vqvae-medical: discrete latent generative models of medical images, packaged as MONAI bundles."""

from __future__ import annotations

__version__ = "0.6.0"

__all__ = ["__version__"]

# Every bundle command (run, ckpt_export, verify_net_in_out, ...) imports this package through its configs: under
# ``python -m monai.bundle`` alone, this package's user errors then end in one line instead of a traceback (embedded
# use keeps the host's hook; see install_error_hook).
from vqvae_medical.training.runtime import install_error_hook as _install_error_hook

_install_error_hook()
