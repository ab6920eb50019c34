"""One sample-quality yardstick for every generator: a classifier two-sample test and MS-SSIM diversity.

- :func:`c2st_accuracy`: the classifier two-sample test of Lopez-Paz and Oquab ("Revisiting classifier two-sample
  tests", ICLR 2017). A small CNN learns to tell real from generated images; its accuracy on held-out folds is
  0.5 when the two sets cannot be told apart and 1.0 when they trivially can.
- :func:`ms_ssim_diversity`: mean pairwise MS-SSIM (Wang et al. 2003) over a seeded set of pairs; lower means more
  diverse. It reuses :func:`vqvae_medical.evaluation.diversity.pairwise_ms_ssim` (one implementation in the package).
- :func:`sample_quality`: both, plus the test's power on the same real images (real against Gaussian-blurred real
  images, a known difference that must score near 1.0), as one ``dict`` for the evaluate config of a bundle.

A classifier two-sample test is only evidence when its power is shown on the same images (``docs/benchmarks.md``,
"Sample-quality yardstick"): a CNN trained from scratch on about a hundred brain slices with early pooling and few
updates calls blurred slices indistinguishable from real ones. The classifier here keeps a full-resolution first
layer (high-frequency texture survives); on 128 + 128 brain slices disjoint real sets score 0.52, sigma-1 blurred
ones 0.95 and noised ones (std 0.05) 1.0, but with 64 + 64 the same blur scores only 0.75: use 128 or more of each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from monai.transforms import GaussianSmooth
from torch import nn

from vqvae_medical.evaluation.diversity import pairwise_ms_ssim
from vqvae_medical.evaluation.image_statistics import image_statistics, logistic_c2st, statistics_comparison

__all__ = [
    "C2ST_IMAGE_SIZE",
    "C2ST_TESTS",
    "C2ST_TEST_DEFAULTS",
    "DEFAULT_TESTS",
    "MIN_C2ST_IMAGES",
    "blur_images",
    "c2st_accuracy",
    "c2st_classifier",
    "c2st_test_settings",
    "diversity_pair",
    "ms_ssim_diversity",
    "sample_quality",
    "stats_c2st_accuracy",
]

#: side of the images the two-sample classifier sees, per number of spatial dimensions (area-downsampled).
C2ST_IMAGE_SIZE = {2: 64, 3: 32}
#: fewest images per set for a classifier two-sample test.
MIN_C2ST_IMAGES = 64
#: the two-sample tests of :func:`sample_quality`, by name, and the prefix of their keys in ``metrics.json``.
C2ST_TESTS = {"downsampled": "c2st", "full": "c2st_full", "stats": "c2st_stats"}
#: the default settings of each test (``downsampled`` and ``full``: :func:`c2st_accuracy`; ``stats``:
#: :func:`stats_c2st_accuracy`).
C2ST_TEST_DEFAULTS: dict[str, dict[str, Any]] = {
    "downsampled": {},
    "full": {"image_size": None, "crop_size": 128},
    "stats": {},
}
#: the tests a bundle's evaluate runs by default: ``full`` costs about 160 CPU-s for 128 + 128 brain slices (plus
#: its power check) and called background speckle indistinguishable (0.53) where ``stats`` scored 1.0
#: (``docs/benchmarks.md``, "Strict yardstick and memorisation audit"), so it is asked for by name.
DEFAULT_TESTS = ("downsampled", "stats")


def c2st_classifier(spatial_dims: int, in_channels: int, channels: Sequence[int] = (8, 16, 32, 64)) -> nn.Sequential:
    """The small CNN of :func:`c2st_accuracy`: MONAI conv-BN-ReLU blocks, the first at full resolution (stride 1)
    and the others with stride 2, then global average pooling and one logit.

    Written here rather than ``monai.networks.nets.Classifier`` because that one downsamples in its first block,
    which throws away the pixel-level texture (blur, noise) a generator most often gets wrong.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if not channels:
        raise ValueError("channels must name at least one block.")
    layers: list[nn.Module] = []
    prev = in_channels
    for i, ch in enumerate(channels):
        layers.append(
            Convolution(spatial_dims, prev, ch, strides=1 if i == 0 else 2, kernel_size=3, act="RELU", norm="BATCH")
        )
        prev = ch
    layers += [Pool[Pool.ADAPTIVEAVG, spatial_dims](1), nn.Flatten(), nn.Linear(prev, 1)]
    return nn.Sequential(*layers)


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim not in (4, 5):
        raise ValueError(f"{name} must be [N, C, H, W] or [N, C, D, H, W], got shape {list(x.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} must be scaled to [0, 1], its values span [{lo:.3g}, {hi:.3g}].")


def _check_pair(real: torch.Tensor, generated: torch.Tensor) -> None:
    _check_images(real, "real")
    _check_images(generated, "generated")
    if real.shape[1:] != generated.shape[1:]:
        raise ValueError(
            f"real images {list(real.shape[1:])} and generated images {list(generated.shape[1:])} differ in shape; "
            "give both the same preprocessing."
        )


def _resize(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    if image_size is None or all(int(s) == image_size for s in x.shape[2:]):
        return x
    return F.interpolate(x, size=(image_size,) * (x.ndim - 2), mode="area")


def _centre_crop(x: torch.Tensor, crop_size: int | None) -> torch.Tensor:
    """The central ``crop_size`` pixels of each spatial axis longer than that (native pixels, no resampling)."""
    if crop_size is None:
        return x
    for axis in range(2, x.ndim):
        n = int(x.shape[axis])
        if n > crop_size:
            x = x.narrow(axis, (n - crop_size) // 2, int(crop_size))
    return x


def blur_images(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-blurred copies (MONAI ``GaussianSmooth``, ``sigma`` in pixels, each image and channel on its own)
    of images ``[N, C, ...]``: the known difference of the power check."""
    flat = images.detach().float().cpu().reshape(-1, *images.shape[2:])  # channels-first for GaussianSmooth
    out = torch.as_tensor(GaussianSmooth(sigma=float(sigma))(flat))
    return out.reshape(images.shape).clamp(0, 1)


def c2st_accuracy(
    real: torch.Tensor,
    generated: torch.Tensor,
    image_size: int | None = -1,
    n_folds: int = 5,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 3e-3,
    channels: Sequence[int] = (8, 16, 32, 64),
    seed: int = 0,
    crop_size: int | None = None,
) -> float:
    """Classifier two-sample test (Lopez-Paz and Oquab, ICLR 2017): held-out accuracy of a small CNN telling
    ``real`` from ``generated`` images; 0.5 when indistinguishable, 1.0 when trivially distinguishable.

    The larger set is subsampled (seeded) to the size of the smaller, so both classes are equally many; each must
    then hold at least :data:`MIN_C2ST_IMAGES` images. Images are area-downsampled to ``image_size`` per spatial
    dimension (default :data:`C2ST_IMAGE_SIZE`: 64 px in 2D, 32 voxels in 3D), a fresh :func:`c2st_classifier` is
    trained on the CPU for each of ``n_folds`` stratified folds (Adam, binary cross-entropy, random flips of the
    last axis) and the accuracy over all held-out images is returned. Real image ``i`` and generated image ``i``
    share a fold. Runs on the CPU with a private random state seeded by ``seed``: the same inputs give the same
    number (for a fixed number of torch threads); the caller's random state is left untouched.

    Args:
        real: real images ``[N, C, H, W]`` or ``[N, C, D, H, W]`` in [0, 1] (held-out, same preprocessing).
        generated: generated images, same shape after the first axis, in [0, 1].
        image_size: side the classifier sees; ``-1`` for :data:`C2ST_IMAGE_SIZE`, ``None`` for the input size.
        n_folds: number of cross-validation folds (at least 2).
        epochs: training epochs per fold.
        batch_size: training batch size.
        lr: Adam learning rate.
        channels: channels of the classifier blocks.
        seed: seed of the subsampling, fold split, initialisation and training order.
        crop_size: before resizing, keep the central ``crop_size`` pixels of each longer axis (native pixels; use
            with ``image_size=None`` for a test at full resolution that costs less than the whole image).
    """
    _check_pair(real, generated)
    if crop_size is not None and int(crop_size) < 8:
        raise ValueError(f"crop_size must be at least 8 pixels or None, got {crop_size}.")
    n = min(len(real), len(generated))
    if n < MIN_C2ST_IMAGES:
        raise ValueError(
            f"the two-sample test needs at least {MIN_C2ST_IMAGES} real and {MIN_C2ST_IMAGES} generated images, got "
            f"{len(real)} and {len(generated)}."
        )
    if n_folds < 2 or n_folds > n:
        raise ValueError(f"n_folds must be between 2 and the number of images per set ({n}), got {n_folds}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}.")
    spatial_dims = real.ndim - 2
    if image_size == -1:
        image_size = C2ST_IMAGE_SIZE[spatial_dims]
    g = torch.Generator().manual_seed(int(seed))
    real = real[torch.randperm(len(real), generator=g)[:n]] if len(real) > n else real
    generated = generated[torch.randperm(len(generated), generator=g)[:n]] if len(generated) > n else generated
    x = _resize(_centre_crop(torch.cat([real, generated]).detach().float().cpu(), crop_size), image_size) * 2 - 1
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    order = torch.randperm(n, generator=g)
    correct = 0
    with torch.random.fork_rng(devices=[]):
        for fold in range(n_folds):
            held = order[fold::n_folds]
            test = torch.cat([held, held + n])
            keep = torch.ones(2 * n, dtype=torch.bool)
            keep[test] = False
            train = torch.nonzero(keep).flatten()
            torch.manual_seed(int(seed) * 1000 + fold)
            net = c2st_classifier(spatial_dims, x.shape[1], channels)
            opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
            net.train()
            for _ in range(epochs):
                perm = train[torch.randperm(len(train), generator=g)]
                for s in range(0, len(perm), batch_size):
                    idx = perm[s : s + batch_size]
                    if len(idx) < 2:  # batch norm needs two images
                        continue
                    xb = x[idx]
                    flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, *([1] * (x.ndim - 1)))
                    xb = torch.where(flip, xb.flip(-1), xb)
                    loss = F.binary_cross_entropy_with_logits(net(xb).squeeze(1), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            net.eval()
            with torch.no_grad():
                pred = (net(x[test]).squeeze(1) > 0).float()
            correct += int((pred == y[test]).sum())
    return correct / (2 * n)


def ms_ssim_diversity(
    images: torch.Tensor,
    max_images: int = 32,
    seed: int = 0,
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
) -> float:
    """Mean pairwise MS-SSIM (Wang et al. 2003) among images ``[N, C, ...]`` in [0, 1]; lower means more diverse.

    The pairs are all pairs among ``min(N, max_images)`` images drawn with ``seed`` (all pairs of all images
    costs ``N^2``); the value is :func:`vqvae_medical.evaluation.diversity.pairwise_ms_ssim` on them, with its
    kernel size and weights fitted to the image size unless given.
    """
    _check_images(images, "images")
    if len(images) < 2:
        raise ValueError("MS-SSIM diversity needs at least two images.")
    if max_images < 2:
        raise ValueError(f"max_images must be at least 2, got {max_images}.")
    if len(images) > max_images:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(seed)))[:max_images]
        images = images[pick.sort().values]
    return pairwise_ms_ssim(images.detach().float().cpu(), images.ndim - 2, kernel_size, weights)


def diversity_pair(
    real: torch.Tensor,
    generated: torch.Tensor,
    max_images: int = 32,
    seed: int = 0,
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """``ms_ssim_diversity_samples`` and ``ms_ssim_diversity_real``: :func:`ms_ssim_diversity` of ``generated`` and
    of ``real`` with the same ``max_images``, ``seed``, kernel size and weights (lower is more diverse)."""
    return {
        "ms_ssim_diversity_samples": ms_ssim_diversity(generated, max_images, seed, kernel_size, weights),
        "ms_ssim_diversity_real": ms_ssim_diversity(real, max_images, seed, kernel_size, weights),
    }


def stats_c2st_accuracy(
    real: torch.Tensor, generated: torch.Tensor, seed: int = 0, n_folds: int = 5, l2: float = 1.0
) -> float:
    """Two-sample test on per-image statistics: :func:`~vqvae_medical.evaluation.image_statistics.logistic_c2st`
    on :func:`~vqvae_medical.evaluation.image_statistics.image_statistics` of both sets (background speckle, detail
    at several scales, gradients, foreground intensities); 0.5 indistinguishable, 1.0 trivially told apart. Same
    input rules as :func:`c2st_accuracy` (at least :data:`MIN_C2ST_IMAGES` per set, equalised with ``seed``)."""
    _check_pair(real, generated)
    n = min(len(real), len(generated))
    if n < MIN_C2ST_IMAGES:
        raise ValueError(
            f"the two-sample test needs at least {MIN_C2ST_IMAGES} real and {MIN_C2ST_IMAGES} generated images, got "
            f"{len(real)} and {len(generated)}."
        )
    return logistic_c2st(image_statistics(real), image_statistics(generated), n_folds=n_folds, l2=l2, seed=seed)


def _run_test(
    test: str, real: torch.Tensor, generated: torch.Tensor, seed: int, settings: Mapping[str, Any], features: Any = None
) -> float:
    if test == "stats" and features is not None:  # the statistics of both sets, computed once
        if min(len(real), len(generated)) < MIN_C2ST_IMAGES:
            raise ValueError(
                f"the two-sample test needs at least {MIN_C2ST_IMAGES} real and {MIN_C2ST_IMAGES} generated images, "
                f"got {len(real)} and {len(generated)}."
            )
        return logistic_c2st(*features, seed=seed, **settings)
    if test == "stats":
        return stats_c2st_accuracy(real, generated, seed=seed, **settings)
    return c2st_accuracy(real, generated, seed=seed, **settings)


def c2st_test_settings(test: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings of one of :data:`C2ST_TESTS`: its defaults (:data:`C2ST_TEST_DEFAULTS`) updated by
    ``settings``."""
    if test not in C2ST_TESTS:
        raise ValueError(f"unknown two-sample test {test!r}; choose from {list(C2ST_TESTS)}.")
    return {**C2ST_TEST_DEFAULTS[test], **dict(settings or {})}


def sample_quality(
    real: torch.Tensor,
    generated: torch.Tensor,
    seed: int = 0,
    power_check: bool = True,
    power_blur_sigma: float = 1.0,
    max_diversity_images: int = 32,
    ms_ssim_kernel_size: int | None = None,
    ms_ssim_weights: Sequence[float] | None = None,
    tests: Sequence[str] = ("downsampled",),
    test_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **c2st_kwargs,
) -> dict[str, Any]:
    """The sample-quality yardstick of every generative bundle: generated images against held-out real images
    (test split, same preprocessing, both in [0, 1], ``[N, C, H, W]`` or ``[N, C, D, H, W]``).

    Every two-sample test of ``tests`` (:data:`C2ST_TESTS`) is run, each with its power check:

    - ``downsampled``: :func:`c2st_accuracy` at its default 64 px (``c2st_accuracy``, ``c2st_power_blurred_real``;
      the keys of earlier versions);
    - ``full``: the same CNN on native pixels, the central :data:`C2ST_TEST_DEFAULTS` ``crop_size`` px
      (``c2st_full_accuracy``, ``c2st_full_power_blurred_real``): speckle and fine detail survive;
    - ``stats``: :func:`stats_c2st_accuracy`, a logistic regression on per-image statistics
      (``c2st_stats_accuracy``, ``c2st_stats_power_blurred_real``), plus ``image_statistics``: per statistic the
      samples' ``effect_sd`` (mean difference in pooled standard deviations) and ``spread_ratio`` (their spread
      between images over the real images'; a generator whose samples vary less than real images do is below 1),
      and ``image_statistics_spread_ratio_median``.

    Returns:
        the keys above; ``c2st_strictest`` (the highest accuracy of the tests run, the one to judge by) and
        ``c2st_strictest_test`` (its name); ``ms_ssim_diversity_samples`` and ``ms_ssim_diversity_real``
        (:func:`ms_ssim_diversity`, lower is more diverse; a good generator matches the real value); ``n_real``,
        ``n_generated`` (images given) and ``c2st_n_per_set`` (images per set after equalising). Each power
        check runs the test between one half of the real images and Gaussian-blurred copies (``power_blur_sigma``
        pixels) of the other half, a known difference that must score near 1.0 for the accuracy to mean anything;
        with half the images per set it under-states the power (``None`` when ``power_check`` is off).

    Args:
        real: held-out real images.
        generated: generated images.
        seed: seed of every random choice.
        power_check: also run each test on real against blurred real images (needs at least
            ``2 * MIN_C2ST_IMAGES`` real images; adds about half the time).
        power_blur_sigma: Gaussian sigma of the power check, in pixels of the given images.
        max_diversity_images: images per set for the pairwise MS-SSIM.
        ms_ssim_kernel_size: MS-SSIM kernel size, default fitted to the image size.
        ms_ssim_weights: MS-SSIM scale weights, default fitted to the image size.
        tests: the two-sample tests to run, names of :data:`C2ST_TESTS`.
        test_overrides: per test name, settings that replace its defaults (:func:`c2st_test_settings`).
        c2st_kwargs: settings of the ``downsampled`` test (:func:`c2st_accuracy`).
    """
    _check_pair(real, generated)
    tests = list(dict.fromkeys(tests))
    if not tests:
        raise ValueError(f"name at least one two-sample test of {list(C2ST_TESTS)}.")
    overrides = {k: dict(v) for k, v in (test_overrides or {}).items()}
    overrides["downsampled"] = {**overrides.get("downsampled", {}), **c2st_kwargs}
    settings = {t: c2st_test_settings(t, overrides.get(t)) for t in tests}
    halves = None
    if power_check:
        if len(real) < 2 * MIN_C2ST_IMAGES:
            raise ValueError(
                f"the power check needs at least {2 * MIN_C2ST_IMAGES} real images (two disjoint halves), got "
                f"{len(real)}; give more real images or set power_check=False."
            )
        half = torch.randperm(len(real), generator=torch.Generator().manual_seed(int(seed)))
        kept, to_blur = real[half[: len(real) // 2]], real[half[len(real) // 2 : 2 * (len(real) // 2)]]
        halves = (kept, blur_images(to_blur, power_blur_sigma))
    out: dict[str, Any] = {}
    features = (image_statistics(real), image_statistics(generated)) if "stats" in tests else None
    for t in tests:
        prefix = C2ST_TESTS[t]
        out[f"{prefix}_accuracy"] = _run_test(t, real, generated, seed, settings[t], features if t == "stats" else None)
        out[f"{prefix}_power_blurred_real"] = None if halves is None else _run_test(t, *halves, seed, settings[t])
    if "downsampled" not in tests:
        out.update({"c2st_accuracy": None, "c2st_power_blurred_real": None})
    accuracies = {t: out[f"{C2ST_TESTS[t]}_accuracy"] for t in tests}
    strictest = max(accuracies, key=lambda t: accuracies[t])
    out["c2st_strictest"] = accuracies[strictest]
    out["c2st_strictest_test"] = strictest
    if "stats" in tests:
        comparison = statistics_comparison(*features)
        ratios = [v["spread_ratio"] for v in comparison.values() if v["spread_ratio"] is not None]
        out["image_statistics"] = comparison
        out["image_statistics_spread_ratio_median"] = float(np.median(ratios)) if ratios else None
    return {
        **out,
        **diversity_pair(real, generated, max_diversity_images, seed, ms_ssim_kernel_size, ms_ssim_weights),
        "n_real": len(real),
        "n_generated": len(generated),
        "c2st_n_per_set": int(min(len(real), len(generated))),
    }
