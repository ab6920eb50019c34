"""Metrics MONAI does not have: codebook usage and perplexity over a whole evaluation set, and bits per code; and
MONAI's SSIM metric computed with a separable window (:class:`SeparableSSIMMetric`).

MONAI's ``VectorQuantizer`` computes perplexity of one batch only; here the code histogram is accumulated over the
evaluation epoch (and summed across ranks under ``torch.distributed``), so ``codebook_usage`` is the fraction of
the ``K`` codes used anywhere in the evaluation set and ``perplexity`` is ``exp(entropy)`` of that histogram.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.metrics import SSIMMetric

from vqvae_medical.evaluation.losses import SeparableSSIMLoss
from vqvae_medical.networks.pixelcnn import bits_per_code
from vqvae_medical.networks.quantizers import perplexity

__all__ = [
    "CodeHistogram",
    "CodebookUsage",
    "CodebookPerplexity",
    "SeparableSSIMMetric",
    "code_histogram_stats",
    "bits_per_code",
]


class SeparableSSIMMetric(SSIMMetric):
    """MONAI's ``SSIMMetric`` (Gaussian window) computed with the separable window of
    :class:`~vqvae_medical.evaluation.losses.SeparableSSIMLoss`: the same per-image values to float32 rounding
    (tested), without the dense ``win_size^3`` convolution that made MONAI's metric most of a 3D validation's time
    (on a 128³ volume, see ``docs/benchmarks.md``). Arguments as MONAI's; only the Gaussian window is supported.
    """

    def __init__(
        self,
        spatial_dims: int,
        data_range: float = 1.0,
        win_size: int = 11,
        kernel_sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            spatial_dims, data_range=data_range, win_size=win_size, kernel_sigma=kernel_sigma, k1=k1, k2=k2, **kwargs
        )
        self._ssim = SeparableSSIMLoss(
            spatial_dims, data_range=data_range, win_size=win_size, kernel_sigma=kernel_sigma, k1=k1, k2=k2
        )

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # shapes and dims are checked by ssim_per_image; unlike the loss, the metric never shrinks its window
        if min(y_pred.shape[2:]) < self._ssim.win_size:
            raise ValueError(
                f"images of shape {list(y_pred.shape[2:])} are smaller than the SSIM window ({self._ssim.win_size})."
            )
        return self._ssim.ssim_per_image(y_pred, y)


def code_histogram_stats(counts: torch.Tensor) -> tuple[float, float]:
    """``(fraction of codes used, perplexity)`` of a code histogram
    (:func:`~vqvae_medical.networks.quantizers.perplexity`)."""
    counts = counts.double()
    return float((counts > 0).double().mean()), float(perplexity(counts))


class CodeHistogram(Metric):
    """Accumulates the histogram of one level's code indices over an epoch.

    Args:
        num_embeddings: codebook size ``K``.
        level: which code level of ``output["indices"]`` to count (0 for a VQ-VAE; 0 = top, 1 = bottom for a
            VQ-VAE-2).
        output_transform: maps the engine output to the tuple of index maps.
        device: where to accumulate.
    """

    def __init__(
        self,
        num_embeddings: int,
        level: int = 0,
        output_transform: Callable[[Any], Any] = lambda out: out["indices"],
        device: str | torch.device = "cpu",
    ) -> None:
        if num_embeddings < 1:
            raise ValueError(f"num_embeddings must be positive, got {num_embeddings}.")
        self.num_embeddings = num_embeddings
        self.level = level
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros(self.num_embeddings, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        indices = output[self.level] if isinstance(output, (tuple, list)) else output
        self._counts += torch.bincount(indices.reshape(-1).long(), minlength=self.num_embeddings).to(
            self._counts.device, torch.float64
        )

    @sync_all_reduce("_counts")
    def compute(self) -> torch.Tensor:
        return self._counts.clone()


class CodebookUsage(CodeHistogram):
    """Fraction of codes used anywhere in the epoch (see :class:`CodeHistogram` for the arguments)."""

    def compute(self) -> float:  # type: ignore[override]
        return code_histogram_stats(super().compute())[0]


class CodebookPerplexity(CodeHistogram):
    """``exp(entropy)`` of the epoch's code histogram (see :class:`CodeHistogram` for the arguments)."""

    def compute(self) -> float:  # type: ignore[override]
        return code_histogram_stats(super().compute())[1]
