"""A two-sample test on per-image statistics: what a reader sees (background speckle, fine detail, gradients,
brightness) as numbers, and a logistic regression that tells two image sets apart by them.

- :func:`image_statistics`: ``[N, F]`` statistics of images ``[N, C, ...]`` in [0, 1] (2D or 3D), named by
  :data:`STATISTIC_NAMES`: the foreground (head, lesion) is the Gaussian-smoothed grey image above
  :data:`FOREGROUND_THRESHOLD`; inside it the intensity quantiles, the mean ``|Laplacian of Gaussian|`` at
  :data:`LOG_SIGMAS` px and the gradient magnitude; outside it the share of pixels above 0.01 (speckle).
- :func:`logistic_c2st`: held-out accuracy of an L2-regularised logistic regression (standardised features and
  their absolute values, so that a set that varies less than the other is a tell too) over stratified folds.
- :func:`statistics_comparison`: per statistic, the samples' mean minus the real mean in pooled standard deviations
  (``effect_sd``) and the ratio of their spreads between images (``spread_ratio``, samples / real; 1 for a generator
  that varies as much as real images do).

Written with torch alone (no scikit-learn): the same numbers for the same inputs and seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

__all__ = [
    "FOREGROUND_THRESHOLD",
    "LOG_SIGMAS",
    "SPECKLE_LEVEL",
    "STATISTIC_NAMES",
    "image_statistics",
    "logistic_c2st",
    "statistics_comparison",
]

#: a pixel is foreground where the grey image smoothed with a 2-pixel Gaussian exceeds this.
FOREGROUND_THRESHOLD = 0.1
#: a background pixel above this intensity counts as speckle.
SPECKLE_LEVEL = 0.01
#: scales (Gaussian sigma in pixels) of the Laplacian-of-Gaussian detail statistics.
LOG_SIGMAS = (0.7, 1.4, 2.8)
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)

#: the columns of :func:`image_statistics`.
STATISTIC_NAMES: tuple[str, ...] = (
    "foreground_fraction",
    "background_speckle_share",
    "background_mean",
    "foreground_mean",
    "foreground_std",
    *(f"foreground_q{int(q * 100)}" for q in _QUANTILES),
    *(f"foreground_log_sigma{s}" for s in LOG_SIGMAS),
    "background_log_sigma0.7",
    "foreground_gradient_mean",
    "foreground_gradient_std",
    "foreground_gradient_q90",
)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return GaussianFilter(x.ndim - 2, sigma=float(sigma), truncated=3.0)(x)


def _laplacian_of_gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``sigma^2 * Laplacian(Gaussian(x))`` (scale-normalised) of ``[N, 1, ...]``."""
    g = _smooth(x, sigma)
    dims = g.ndim - 2
    padded = F.pad(g, (1, 1) * dims, mode="replicate")
    out = -2.0 * dims * g
    for d in range(dims):
        axis = 2 + d
        inner = [slice(None), slice(None)] + [slice(1, -1)] * dims
        lo, hi = list(inner), list(inner)
        lo[axis], hi[axis] = slice(0, -2), slice(2, None)
        out = out + padded[tuple(lo)] + padded[tuple(hi)]
    return out * sigma**2


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient magnitude of ``[N, 1, ...]`` (per pixel)."""
    grads = torch.gradient(x, dim=tuple(range(2, x.ndim)))
    return torch.sqrt(sum(g**2 for g in grads))


def _masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (v * m).sum(1) / m.sum(1).clamp_min(1)


def image_statistics(images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-image statistics ``[N, len(STATISTIC_NAMES)]`` (float64) of images ``[N, C, H, W]`` or
    ``[N, C, D, H, W]`` in [0, 1], computed on the grey image (mean over channels); see :data:`STATISTIC_NAMES`.

    Foreground: Gaussian-smoothed (sigma 2 px) grey image above :data:`FOREGROUND_THRESHOLD`. An image without
    background (or foreground) gets 0 for the statistics of the empty region.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be [N, C, H, W] or [N, C, D, H, W], got shape {list(images.shape)}.")
    rows = []
    for s in range(0, len(images), int(batch_size)):
        x = images[s : s + int(batch_size)].detach().float().cpu().mean(1, keepdim=True)
        n = len(x)
        fg = (_smooth(x, 2.0) > FOREGROUND_THRESHOLD).reshape(n, -1).float()
        bg = 1.0 - fg
        flat = x.reshape(n, -1)
        cols = [fg.mean(1), _masked_mean((flat > SPECKLE_LEVEL).float(), bg), _masked_mean(flat, bg)]
        mean = _masked_mean(flat, fg)
        cols += [mean, torch.sqrt(_masked_mean((flat - mean[:, None]) ** 2, fg))]
        # quantiles of the foreground: background pixels set to NaN are ignored by nanquantile
        fg_values = torch.where(fg > 0, flat, torch.full_like(flat, float("nan")))
        q = torch.nanquantile(fg_values, torch.tensor(_QUANTILES), dim=1).T
        cols += list(torch.nan_to_num(q, nan=0.0).T)
        for sigma in LOG_SIGMAS:
            cols.append(_masked_mean(_laplacian_of_gaussian(x, sigma).abs().reshape(n, -1), fg))
        cols.append(_masked_mean(_laplacian_of_gaussian(x, LOG_SIGMAS[0]).abs().reshape(n, -1), bg))
        grad = _gradient_magnitude(x).reshape(n, -1)
        g_mean = _masked_mean(grad, fg)
        cols += [g_mean, torch.sqrt(_masked_mean((grad - g_mean[:, None]) ** 2, fg))]
        g_values = torch.where(fg > 0, grad, torch.full_like(grad, float("nan")))
        cols.append(torch.nan_to_num(torch.nanquantile(g_values, 0.9, dim=1), nan=0.0))
        rows.append(torch.stack(cols, 1))
    return torch.cat(rows).double()


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(steps), line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w**2).sum() / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _design(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised features and their absolute values, with the mean and spread of ``train``."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-12)
    zs = [((v - mean) / std).clamp(-10, 10) for v in (train, test)]
    return tuple(torch.cat([z, z.abs()], 1) for z in zs)  # type: ignore[return-value]


def logistic_c2st(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    n_folds: int = 5,
    l2: float = 1.0,
    steps: int = 200,
    seed: int = 0,
) -> float:
    """Classifier two-sample test with a logistic regression: held-out accuracy (0.5 when the two sets of
    per-image features cannot be told apart, 1.0 when they trivially can).

    The larger set is subsampled (seeded) to the size of the smaller; row ``i`` of both sets shares a fold. In
    each of ``n_folds`` folds the features are standardised with the training rows' mean and standard deviation,
    their absolute values are appended (a linear boundary on ``|z|`` catches a set that varies less than the other)
    and an L2-regularised logistic regression (``l2`` on the summed squared weights, LBFGS, float64) is fitted.

    Args:
        features_a: ``[N, F]`` features of one set (e.g. :func:`image_statistics` of the real images).
        features_b: ``[M, F]`` features of the other.
        n_folds: stratified folds (at least 2, at most the rows per set).
        l2: ridge penalty (in units of one image's loss).
        steps: LBFGS iterations per fold.
        seed: seed of the subsampling and folds.
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"features must be [N, F] with the same F, got {list(features_a.shape)} and {list(features_b.shape)}."
        )
    n = min(len(features_a), len(features_b))
    if n_folds < 2 or n_folds > n:
        raise ValueError(f"n_folds must be between 2 and the number of rows per set ({n}), got {n_folds}.")
    g = torch.Generator().manual_seed(int(seed))
    a = features_a.double()[torch.randperm(len(features_a), generator=g)[:n]] if len(features_a) > n else features_a
    b = features_b.double()[torch.randperm(len(features_b), generator=g)[:n]] if len(features_b) > n else features_b
    x = torch.nan_to_num(torch.cat([a, b]).double())
    y = torch.cat([torch.zeros(n), torch.ones(n)]).double()
    order = torch.randperm(n, generator=g)
    correct = 0
    for fold in range(n_folds):
        held = order[fold::n_folds]
        test = torch.cat([held, held + n])
        keep = torch.ones(2 * n, dtype=torch.bool)
        keep[test] = False
        xtr, xte = _design(x[keep], x[test])
        with torch.enable_grad():
            w, b0 = _fit_logistic(xtr, y[keep], l2, steps)
        correct += int((((xte @ w + b0) > 0).double() == y[test]).sum())
    return correct / (2 * n)


def statistics_comparison(
    real: torch.Tensor, generated: torch.Tensor, names: Sequence[str] = STATISTIC_NAMES
) -> dict[str, dict[str, float | None]]:
    """Per statistic (columns of ``real`` and ``generated``, ``[N, F]`` and ``[M, F]``): ``effect_sd``, the
    generated mean minus the real mean in pooled standard deviations, and ``spread_ratio``, the standard deviation
    between generated images over that between real images (``None`` where the real images do not vary)."""
    out: dict[str, dict[str, float | None]] = {}
    for j, name in enumerate(names):
        r, s = real[:, j].double(), generated[:, j].double()
        sd_r, sd_s = float(r.std()), float(s.std())
        pooled = math.sqrt((sd_r**2 + sd_s**2) / 2)
        out[name] = {
            "effect_sd": (float(s.mean() - r.mean()) / pooled) if pooled > 0 else None,
            "spread_ratio": sd_s / sd_r if sd_r > 0 else None,
        }
    return out
