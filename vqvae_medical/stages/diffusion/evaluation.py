"""Evaluation of diffusion samples against real images."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import MMDMetric

from vqvae_medical.evaluation.diversity import ms_ssim_settings, pairwise_ms_ssim
from vqvae_medical.evaluation.figures import save_sample_grid
from vqvae_medical.stages.diffusion.sampling import LatentSampler
from vqvae_medical.training.checkpoints import atomic_write_json

__all__ = ["evaluate_samples"]

logger = logging.getLogger(__name__)


def _real_images(data: Sequence[Mapping[str, Any]], transform: Any, n: int, image_key: str, seed: int) -> torch.Tensor:
    order = np.random.default_rng(seed).permutation(len(data))[:n]
    items = [transform(dict(data[int(i)]))[image_key] for i in order]
    return torch.stack([torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x).float() for x in items])


def evaluate_samples(
    sampler: LatentSampler,
    real_data: Sequence[Mapping[str, Any]],
    transform: Any,
    output_dir: str | os.PathLike,
    n_samples: int = 32,
    seed: int = 0,
    image_key: str = "image",
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Diversity and distribution metrics of generated samples against real images; writes
    ``<output_dir>/metrics.json`` and ``samples_vs_real.png``.

    - ``ms_ssim_diversity_samples``: mean pairwise MS-SSIM among ``n_samples`` samples (lower: more diverse);
    - ``ms_ssim_diversity_real``: the same among ``n_samples`` real images (picked at random with ``seed``);
    - ``ms_ssim_diversity_ratio``: samples / real (1 means as diverse as the real images; the target is 0.8-1.2);
    - ``mmd``: MONAI ``MMDMetric`` between real and generated images (pixel space, linear kernel: an unbiased
      estimate of the squared distance between the mean images);
    - ``mmd_real_reference``: the same between the real images and a disjoint set of real images (the value
      an ideal generator would reach up to sampling noise; ``null`` when the test set is too small);
    - ``n_samples``, ``n_real``, ``seconds_per_sample``.

    Args:
        sampler: the :class:`LatentSampler`.
        real_data: datalist items of real images (e.g. the test section).
        transform: their preprocessing (the training preprocessing without augmentation).
        output_dir: folder of ``metrics.json``.
        n_samples: samples to generate (and real images to draw, at most ``len(real_data)``).
        seed: sampling and selection seed.
        image_key: key of the images.
        kernel_size: MS-SSIM kernel, default fitted to the image size (:func:`ms_ssim_settings`).
        weights: MS-SSIM scale weights, default fitted too.
    """
    if n_samples < 2:
        raise ValueError("n_samples must be at least 2 for pairwise diversity and MMD.")
    n_real = min(int(n_samples), len(real_data))
    if n_real < 2:
        raise ValueError(f"at least two real images are needed, the test section has {len(real_data)}.")
    n_ref = min(n_real, len(real_data) - n_real)  # a disjoint real set, for a real-vs-real MMD reference
    real_all = _real_images(real_data, transform, n_real + max(n_ref, 0), image_key, seed)
    real, reference = real_all[:n_real], real_all[n_real:]
    samples, labels = sampler.sample(int(n_samples), seed=seed)
    if real.shape[1:] != samples.shape[1:]:
        raise ValueError(
            f"real images {list(real.shape[1:])} and samples {list(samples.shape[1:])} differ in size; evaluate with "
            "the preprocessing (spatial_size) the model was trained with."
        )
    spatial_dims = samples.ndim - 2
    if kernel_size is None or weights is None:
        k, w = ms_ssim_settings(samples.shape[2:])
        kernel_size, weights = kernel_size or k, weights or w
    div_samples = pairwise_ms_ssim(samples, spatial_dims, kernel_size, weights)
    div_real = pairwise_ms_ssim(real, spatial_dims, kernel_size, weights)
    m = min(len(real), len(samples))
    mmd = float(MMDMetric()(real[:m], samples[:m]))
    mmd_real = float(MMDMetric()(real[: len(reference)], reference)) if len(reference) >= 2 else float("nan")
    metrics = {
        "ms_ssim_diversity_samples": div_samples,
        "ms_ssim_diversity_real": div_real,
        "ms_ssim_diversity_ratio": div_samples / div_real if div_real > 0 else float("nan"),
        "mmd": mmd,
        "mmd_real_reference": mmd_real,
        "n_samples": int(n_samples),
        "n_real": int(n_real),
        "seconds_per_sample": sampler.last_seconds_per_sample,
        "cpu_seconds_per_sample": sampler.last_cpu_seconds_per_sample,
        "num_inference_steps": sampler.num_inference_steps,
        "ms_ssim_kernel_size": int(kernel_size),
        "ms_ssim_weights": [float(x) for x in weights],
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics, out / "metrics.json")
    k = min(8, m)
    both = torch.cat([samples[:k], real[:k]])
    names = [f"sample {i}" for i in range(k)] + [f"real {i}" for i in range(k)]
    save_sample_grid(out / "samples_vs_real.png", both, ncols=k if spatial_dims == 2 else None, names=names)
    logger.info(f"evaluation: {metrics} -> {out}")
    return metrics
