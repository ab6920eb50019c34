"""Pairwise MS-SSIM of generated images: a diversity measure."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import MultiScaleSSIMMetric

__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim_settings", "pairwise_ms_ssim"]


MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_settings(
    spatial_size: Sequence[int], weights: Sequence[float] = MS_SSIM_WEIGHTS, max_kernel: int = 11
) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights of ``MultiScaleSSIMMetric`` that fit images of ``spatial_size``.

    MONAI requires ``size // (n_scales - 1) ** 2 > kernel_size - 1`` for every dimension, and the coarsest scale
    (``size / 2 ** (n_scales - 1)``) must hold a kernel. The largest odd kernel up to ``max_kernel`` (at least 3)
    with all scales is taken; when none fits, the coarsest scales are dropped (weights renormalised).
    """
    smallest = min(int(s) for s in spatial_size)
    w = [float(x) for x in weights]
    while w:
        n = len(w)
        k = min(max_kernel, smallest // max(1, n - 1) ** 2, smallest // 2 ** (n - 1))
        if k % 2 == 0:
            k -= 1
        if k >= 3:
            total = sum(w)
            return k, tuple(x / total for x in w)
        w = w[:-1]
    raise ValueError(f"images of size {list(spatial_size)} are too small for MS-SSIM (need at least 3 pixels).")


def pairwise_ms_ssim(
    images: torch.Tensor,
    spatial_dims: int,
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
    chunk: int = 32,
) -> float:
    """Mean MS-SSIM over all pairs ``i < j`` of ``images`` ``[N, C, ...]`` in [0, 1] (MONAI's metric); lower means
    more diverse. Kernel size and weights default to :func:`ms_ssim_settings` for the image size."""
    n = images.shape[0]
    if n < 2:
        raise ValueError("pairwise MS-SSIM needs at least two images.")
    if kernel_size is None or weights is None:
        k, w = ms_ssim_settings(images.shape[2:])
        kernel_size = kernel_size or k
        weights = weights or w
    metric = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=1.0, kernel_size=kernel_size, weights=weights)
    i, j = torch.triu_indices(n, n, offset=1)
    values = []
    images = images.float()
    for s in range(0, i.numel(), chunk):
        values.append(metric(images[i[s : s + chunk]], images[j[s : s + chunk]]).reshape(-1))
    return float(torch.cat(values).mean())
