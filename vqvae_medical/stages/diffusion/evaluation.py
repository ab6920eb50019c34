"""Evaluation of diffusion samples against real images."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.metrics import MMDMetric

from vqvae_medical.evaluation.sample_report import (
    load_real_images,
    real_image_count,
    sample_classes,
    save_samples_vs_real,
    score_samples,
)
from vqvae_medical.stages.diffusion.sampling import LatentSampler
from vqvae_medical.training.runtime import SettingError
from vqvae_medical.utils.io import atomic_write_json

__all__ = ["evaluate_samples"]

logger = logging.getLogger(__name__)


def evaluate_samples(
    sampler: LatentSampler,
    real_data: Sequence[Mapping[str, Any]],
    transform: Any,
    output_dir: str | os.PathLike,
    n_samples: int = 128,
    seed: int = 0,
    image_key: str = "image",
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
    power_check: bool = True,
    c2st_settings: Mapping[str, Any] | None = None,
    label_key: str | None = "label",
    models: Mapping[str, Any] | None = None,
    memorisation: Any = None,
) -> dict[str, Any]:
    """Sample quality, diversity and distribution metrics of generated samples against held-out real images;
    writes ``<output_dir>/metrics.json`` and ``samples_vs_real.png``.

    The sample-quality keys come from :func:`~vqvae_medical.evaluation.sample_report.score_samples` (the yardstick
    shared with the prior bundle): ``c2st_accuracy`` (0.5: indistinguishable from the real images; ``null`` with a
    ``c2st_skipped`` reason below 64 images per set), ``c2st_power_blurred_real`` (from 128 real images),
    ``c2st_n_per_set``, ``ms_ssim_diversity_samples`` / ``ms_ssim_diversity_real`` / ``ms_ssim_diversity_ratio``
    (mean pairwise MS-SSIM over up to 32 images of each set; lower is more diverse, the target ratio is 0.8-1.2),
    ``ms_ssim_kernel_size``, ``ms_ssim_weights``, ``n_real``, ``n_generated``. Added here:

    - ``mmd``: MONAI ``MMDMetric`` between real and generated images (pixel space, linear kernel: an unbiased
      estimate of the squared distance between the mean images);
    - ``mmd_real_reference``: the same between the real images and a disjoint set of real images (the value
      an ideal generator would reach up to sampling noise; NaN when the test set is too small);
    - ``n_samples``, ``samples_per_class`` (class-conditioned model), ``seconds_per_sample``,
      ``cpu_seconds_per_sample`` (process CPU time of sampling and decoding per image), ``num_inference_steps``,
      ``scheduler`` (the sampling scheduler's class: DDIM or rectified flow);
    - ``models``: the checkpoint and autoencoder evaluated (:func:`~vqvae_medical.stages.provenance.models_used`).

    ``metrics.json`` is written once, atomically, when everything is computed; the settings and the size of the
    test split are checked before anything is sampled.

    The real images are :func:`~vqvae_medical.evaluation.sample_report.real_image_count` test items (as many as
    the samples, at least 128, at most the whole split) drawn with ``seed``; a class-conditioned model samples the
    classes in proportion to the labels of the test split (equally when it has none).

    Args:
        sampler: the :class:`LatentSampler`.
        real_data: datalist items of real images (e.g. the test section).
        transform: their preprocessing (the training preprocessing without augmentation).
        output_dir: folder of ``metrics.json``.
        n_samples: samples to generate.
        seed: sampling and selection seed.
        image_key: key of the images.
        kernel_size: MS-SSIM kernel, default fitted to the image size.
        weights: MS-SSIM scale weights, default fitted too.
        power_check: run the two-sample test's power check (real against blurred real images) when possible.
        c2st_settings: the two-sample tests and their settings
            (:func:`~vqvae_medical.evaluation.sample_report.split_c2st_settings`).
        label_key: key of the class labels in ``real_data`` (used for a class-conditioned model).
        models: what to record as ``models``.
        memorisation: the memorisation audit (:class:`~vqvae_medical.stages.memorisation.MemorisationAudit`:
            ``copy_rate``, ``copy_threshold``, ``nearest_train_distance_median``, ...), or ``None``.

    Raises:
        SettingError: ``n_samples`` below 2, or a test split of fewer than 2 images.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise SettingError(f"n_samples is {n_samples!r}: pass --n_samples <at least 2> (pairwise diversity and MMD).")
    n_real = real_image_count(len(real_data), n_samples)
    if n_real < 2:
        count = f"{len(real_data)} image{'' if len(real_data) == 1 else 's'}"
        raise SettingError(
            f"the test split has {count}, and the evaluation compares samples with at least 2 real images: train "
            "the autoencoder with a larger --test_fraction (its split is the one evaluated)."
        )
    n_ref = min(n_real, len(real_data) - n_real)  # a disjoint real set, for a real-vs-real MMD reference
    real_all = load_real_images(real_data, transform, n_real + n_ref, image_key, seed)
    real, reference = real_all[:n_real], real_all[n_real:]
    classes = None
    num_classes = sampler.network.diffusion.num_class_embeds
    if num_classes:
        labels = [item.get(label_key) for item in real_data] if label_key else []
        classes = sample_classes(labels, int(n_samples), int(num_classes))
    samples, _ = sampler.sample(int(n_samples), class_label=classes, seed=seed)
    if real.shape[1:] != samples.shape[1:]:
        raise ValueError(
            f"real images {list(real.shape[1:])} and samples {list(samples.shape[1:])} differ in size; evaluate with "
            "the preprocessing (spatial_size) the model was trained with."
        )
    metrics = score_samples(
        real, samples, seed, power_check, kernel_size=kernel_size, weights=weights, c2st_settings=c2st_settings
    )
    if memorisation is not None:
        metrics.update(memorisation(samples, real))
    m = min(len(real), len(samples))
    metrics["mmd"] = float(MMDMetric()(real[:m], samples[:m]))
    metrics["mmd_real_reference"] = (
        float(MMDMetric()(real[: len(reference)], reference)) if len(reference) >= 2 else float("nan")
    )
    metrics.update(
        {
            "n_samples": int(n_samples),
            "samples_per_class": None
            if classes is None
            else {str(int(c)): int((classes == c).sum()) for c in classes.unique()},
            "seconds_per_sample": sampler.last_seconds_per_sample,
            "cpu_seconds_per_sample": sampler.last_cpu_seconds_per_sample,
            "num_inference_steps": sampler.num_inference_steps,
            "scheduler": sampler.scheduler_name,
            "models": None if models is None else dict(models),
        }
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics, out / "metrics.json")
    save_samples_vs_real(out / "samples_vs_real.png", samples, real)
    logger.info(f"evaluation: {metrics} -> {output_dir}")
    return metrics
