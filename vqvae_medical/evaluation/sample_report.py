"""The sample-quality report of every generative bundle's evaluate: generated images against held-out real images.

One implementation for both generators: the prior's evaluate
(:class:`~vqvae_medical.stages.prior.report.PriorSampleQuality`) and latent diffusion's
(:func:`~vqvae_medical.stages.diffusion.evaluation.evaluate_samples`) draw the real images with
:func:`load_real_images` (the test split through the frozen autoencoder's preprocessing), the classes of a
class-conditioned generator with :func:`sample_classes`, score with :func:`score_samples` (the yardstick of
:mod:`vqvae_medical.evaluation.sample_quality`, which skips the classifier two-sample test with a stated reason
when there are too few images) and draw ``samples_vs_real.png`` with :func:`save_samples_vs_real`; each stage
writes the metrics into its ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqvae_medical.evaluation.diversity import ms_ssim_settings
from vqvae_medical.evaluation.figures import save_sample_grid
from vqvae_medical.evaluation.sample_quality import (
    C2ST_TESTS,
    DEFAULT_TESTS,
    MIN_C2ST_IMAGES,
    diversity_pair,
    sample_quality,
)

__all__ = [
    "load_real_images",
    "real_image_count",
    "sample_classes",
    "save_samples_vs_real",
    "score_samples",
    "split_c2st_settings",
]

logger = logging.getLogger(__name__)


def real_image_count(n_available: int, n_samples: int) -> int:
    """Real images to score ``n_samples`` against: as many as the samples and at least ``2 * MIN_C2ST_IMAGES``
    (enough for the power check), at most ``n_available`` (the size of the test split)."""
    return min(int(n_available), max(int(n_samples), 2 * MIN_C2ST_IMAGES))


def load_real_images(
    data: Sequence[Mapping[str, Any]], transform: Any, n: int, image_key: str = "image", seed: int = 0
) -> torch.Tensor:
    """``n`` items of ``data`` drawn without replacement with ``seed``, preprocessed by ``transform`` (a dictionary
    transform, e.g. the frozen autoencoder's ``transforms()``) and stacked: float ``[n, C, ...]`` on the CPU."""
    if not 1 <= int(n) <= len(data):
        raise ValueError(f"cannot draw {n} real images from a data section of {len(data)} items.")
    order = np.random.default_rng(int(seed)).permutation(len(data))[: int(n)]
    items = [transform(dict(data[int(i)]))[image_key] for i in order]
    return torch.stack([torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x).float() for x in items])


def sample_classes(labels: Sequence[Any], n: int, num_classes: int) -> torch.Tensor:
    """Class labels ``[n]`` (sorted) for ``n`` samples of a class-conditioned generator: in proportion to the
    class frequencies of ``labels`` (the test split's labels; largest-remainder rounding, ties to the lower class),
    or the classes in turn (equally) when no label lies in ``[0, num_classes)``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    valid = [int(c) for c in labels if c is not None and 0 <= int(c) < num_classes]
    if not valid:
        return (torch.arange(int(n)) % int(num_classes)).sort().values
    counts = np.bincount(valid, minlength=num_classes).astype(np.float64)
    quota = counts / counts.sum() * int(n)
    per_class = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - per_class), kind="stable")
    per_class[order[: int(n) - int(per_class.sum())]] += 1
    return torch.repeat_interleave(torch.arange(num_classes), torch.as_tensor(per_class))


def split_c2st_settings(
    c2st_settings: Mapping[str, Any] | None,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The tests and per-test settings of a bundle's ``c2st_settings``: ``tests`` (names of
    :data:`~vqvae_medical.evaluation.sample_quality.C2ST_TESTS`, default
    :data:`~vqvae_medical.evaluation.sample_quality.DEFAULT_TESTS`), a sub-dictionary per test name (its settings),
    and any other key a setting of :func:`~vqvae_medical.evaluation.sample_quality.c2st_accuracy` for both CNN
    tests (``downsampled`` and ``full``; a test's own sub-dictionary wins)."""
    settings = dict(c2st_settings or {})
    tests = list(settings.pop("tests", DEFAULT_TESTS))
    unknown = [t for t in tests if t not in C2ST_TESTS]
    if unknown:
        raise ValueError(f"c2st_settings: unknown tests {unknown}; choose from {list(C2ST_TESTS)}.")
    own = {t: dict(settings.pop(t) or {}) for t in list(C2ST_TESTS) if t in settings}
    per_test = {t: {**(settings if t != "stats" else {}), **own.get(t, {})} for t in tests}
    return tests, per_test


def score_samples(
    real: torch.Tensor,
    generated: torch.Tensor,
    seed: int = 0,
    power_check: bool = True,
    max_diversity_images: int = 32,
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
    c2st_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`~vqvae_medical.evaluation.sample_quality.sample_quality` of ``generated`` against ``real`` (both
    ``[N, C, ...]`` in [0, 1], same preprocessing), with the rules of a bundle's evaluate:

    - fewer than ``MIN_C2ST_IMAGES`` images in either set: no two-sample test; every test's accuracy and power
      (``c2st_accuracy``, ``c2st_full_accuracy``, ``c2st_stats_accuracy``, ... and ``c2st_strictest``) are
      ``None`` and ``c2st_skipped`` says why (one warning is logged);
    - the power check runs when ``power_check`` is set and there are at least ``2 * MIN_C2ST_IMAGES`` real
      images, else ``c2st_power_blurred_real`` is ``None`` and ``c2st_power_skipped`` says why.

    Besides the keys of ``sample_quality``: ``ms_ssim_diversity_ratio`` (samples / real; 1 is as diverse as the
    real images), ``ms_ssim_kernel_size`` and ``ms_ssim_weights`` (fitted to the image size unless given).

    Args:
        real: held-out real images.
        generated: generated images.
        seed: seed of every random choice.
        power_check: run the power check when there are enough real images.
        max_diversity_images: images per set for the pairwise MS-SSIM.
        kernel_size: MS-SSIM kernel size.
        weights: MS-SSIM scale weights.
        c2st_settings: the two-sample tests and their settings (:func:`split_c2st_settings`): ``tests`` (default
            ``downsampled`` and ``stats``; ``full`` on request), per-test sub-dictionaries, and keyword arguments of
            :func:`~vqvae_medical.evaluation.sample_quality.c2st_accuracy` (``image_size``, ``n_folds``,
            ``epochs``, ``batch_size``, ``lr``, ``channels``, ``crop_size``) for both CNN tests.
    """
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(
            f"sample quality needs at least two real and two generated images, got {len(real)} and {len(generated)}."
        )
    if real.shape[1:] != generated.shape[1:]:
        raise ValueError(
            f"real images {list(real.shape[1:])} and generated images {list(generated.shape[1:])} differ in shape; "
            "score them with the preprocessing (spatial_size) the generator was trained with."
        )
    if kernel_size is None or weights is None:
        k, w = ms_ssim_settings(generated.shape[2:])
        kernel_size, weights = kernel_size or k, weights or w
    tests, per_test = split_c2st_settings(c2st_settings)
    n = min(len(real), len(generated))
    if n >= MIN_C2ST_IMAGES:
        power = bool(power_check) and len(real) >= 2 * MIN_C2ST_IMAGES
        metrics: dict[str, Any] = sample_quality(
            real,
            generated,
            seed=seed,
            power_check=power,
            max_diversity_images=max_diversity_images,
            ms_ssim_kernel_size=kernel_size,
            ms_ssim_weights=weights,
            tests=tests,
            test_overrides=per_test,
        )
        if power_check and not power:
            metrics["c2st_power_skipped"] = (
                f"the power check needs at least {2 * MIN_C2ST_IMAGES} real images (two halves of "
                f"{MIN_C2ST_IMAGES}), the test split gave {len(real)}"
            )
            logger.warning(f"sample quality: no power check: {metrics['c2st_power_skipped']}.")
    else:
        metrics = {
            **{f"{C2ST_TESTS[t]}_{k}": None for t in tests for k in ("accuracy", "power_blurred_real")},
            "c2st_accuracy": None,
            "c2st_power_blurred_real": None,
            "c2st_strictest": None,
            "c2st_strictest_test": None,
            **diversity_pair(real, generated, max_diversity_images, seed, kernel_size, weights),
            "n_real": len(real),
            "n_generated": len(generated),
            "c2st_n_per_set": None,
            "c2st_skipped": (
                f"the classifier two-sample test needs at least {MIN_C2ST_IMAGES} real and {MIN_C2ST_IMAGES} generated "
                f"images, got {len(real)} real (test split) and {len(generated)} generated"
            ),
        }
        logger.warning(f"sample quality: no two-sample test: {metrics['c2st_skipped']}.")
    div_real = metrics["ms_ssim_diversity_real"]
    metrics["ms_ssim_diversity_ratio"] = metrics["ms_ssim_diversity_samples"] / div_real if div_real > 0 else None
    metrics["ms_ssim_kernel_size"] = int(kernel_size)
    metrics["ms_ssim_weights"] = [float(x) for x in weights]
    return metrics


def save_samples_vs_real(path: str | os.PathLike, samples: torch.Tensor, real: torch.Tensor, n_shown: int = 8) -> Path:
    """The first ``n_shown`` samples above as many real images, as a PNG grid (3D: mid-slices, a volume a row).

    Args:
        path: the PNG file.
        samples: generated images ``[N, C, ...]`` in [0, 1].
        real: real images, same shape after the first axis.
        n_shown: samples (and real images) in the grid.
    """
    k = min(int(n_shown), len(samples), len(real))
    both = torch.cat([samples[:k], real[:k]])
    names = [f"sample {i}" for i in range(k)] + [f"real {i}" for i in range(k)]
    return save_sample_grid(path, both, ncols=k if samples.ndim == 4 else None, names=names)
