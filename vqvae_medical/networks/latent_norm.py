"""Normalisation of the encoder's latent vectors before quantization (``normalize_latents`` of the VQ-VAEs).

Without it (and before the training step's ``range_weight``) the encoder's output vectors drifted outwards in long
runs: with an EMA codebook and the straight-through estimator nothing in the loss fixes their scale, the codebook
follows them, and the commitment loss grows until reconstruction falls (measured in
``bundles/vqvae/docs/README.md``, "Convergence"). What pushed them was found later: the losses score the
reconstruction clamped to [0, 1], so the decoder's black background could sink below zero at no cost and kept
sinking; :class:`~vqvae_medical.stages.autoencoder.steps.VQTrainStep`'s ``range_weight`` now stops that at the
source, and these modes stay as options that bound the latents themselves:

- ``True``: every vector projected onto the sphere of radius ``sqrt(D)`` (l2-normalised codes, Yu et
  al., "Vector-quantized Image Modeling with Improved VQGAN", ICLR 2022, arXiv 2110.04627). It throws the norm
  away, which on grey images carries intensity.
- ``"tanh"``: the norm squashed radially, ``z * R tanh(|z| / R) / |z|`` with ``R = sqrt(D)``. Vectors well inside
  the radius keep their norm (about linear up to ``R / 2``), the cloud is bounded by the ball of radius ``R``, and
  the outward push on a vector fades as it nears the rim instead of moving it without limit.

MONAI's VQ-VAE has no such option. A per-batch rescaling (the whole tensor divided by its running RMS) was
measured too and is not offered: it fixes the average scale but not the tail, which kept growing until the bulk
of the vectors was squeezed (validation SSIM fell from 0.92 to 0.84 on the demo data at batch size 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["latent_norm_mode", "l2_latents", "tanh_latents", "normalize_latents"]


def latent_norm_mode(value: bool | str | None) -> str:
    """``"none"``, ``"l2"`` or ``"tanh"`` for a ``normalize_latents`` setting (``False``/``None``, ``True``,
    ``"tanh"``).

    Raises:
        ValueError: any other value, with the accepted ones.
    """
    if value is None or value is False:
        return "none"
    if value is True:
        return "l2"
    if value == "tanh":
        return "tanh"
    raise ValueError(
        f"normalize_latents must be false, true (l2 projection onto a sphere) or 'tanh' (norm squashed below a "
        f"radius), got {value!r}."
    )


def l2_latents(z: torch.Tensor) -> torch.Tensor:
    """Latent vectors ``[B, D, ...]`` scaled to the l2 norm ``sqrt(D)`` along the channels (components of about
    unit size): the codebook then lives on (or, as EMA cluster means, just inside) that sphere."""
    return F.normalize(z, dim=1, eps=1e-6) * float(z.shape[1]) ** 0.5


def tanh_latents(z: torch.Tensor) -> torch.Tensor:
    """Latent vectors ``[B, D, ...]`` with their norm ``n`` mapped to ``R tanh(n / R)``, ``R = sqrt(D)``, direction
    kept; computed in fp32 (the norm of a bf16 vector loses the small ones)."""
    radius = float(z.shape[1]) ** 0.5
    zf = z.float()
    norm = torch.linalg.vector_norm(zf, ord=2, dim=1, keepdim=True).clamp_min(1e-6)
    return (zf * (radius * torch.tanh(norm / radius) / norm)).to(z.dtype)


def normalize_latents(z: torch.Tensor, mode: str) -> torch.Tensor:
    """``z`` normalised by ``mode``: ``"none"``, ``"l2"`` or ``"tanh"``, as :func:`latent_norm_mode` returns."""
    if mode == "l2":
        return l2_latents(z)
    if mode == "tanh":
        return tanh_latents(z)
    return z
