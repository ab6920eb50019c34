"""What the autoencoder bundles' configs (``vqvae`` 2D and 3D, ``vqvae2``) call to build their workflows.

One function per decision a config would otherwise spell out in ``$`` expressions: which datalist and which size
checks (:func:`datalist`), the training transforms (:func:`train_transforms`), the validation metrics of one or two
code levels (:func:`key_metric`, :func:`validation_metrics`), the inference items of 2D images or 3D volumes
(:func:`inference_datalist`) and the handlers of a rank under ``torchrun`` (:func:`handlers_of_rank`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ignite.metrics import Metric
from monai.handlers import IgniteMetricHandler, MeanSquaredError, PeakSignalToNoiseRatio, from_engine
from monai.transforms import Compose

from vqvae_medical.data import make_dataset
from vqvae_medical.data.lists import inference_datalist as image_inference_datalist
from vqvae_medical.data.lists import section
from vqvae_medical.data.volumes import volume_inference_datalist
from vqvae_medical.evaluation.metrics import CodebookPerplexity, CodebookUsage, SeparableSSIMMetric
from vqvae_medical.stages.autoencoder.record import AutoencoderRecordWriter, preprocessing_transforms, record_datalist
from vqvae_medical.training import workflow
from vqvae_medical.training.handlers import level_names

__all__ = [
    "WRITERS",
    "datalist",
    "dataset",
    "handlers_of_rank",
    "inference_datalist",
    "key_metric",
    "train_transforms",
    "validation_metrics",
]

#: the autoencoder's own writers, beside :data:`vqvae_medical.training.workflow.WRITERS`
WRITERS: tuple[type, ...] = (AutoencoderRecordWriter,)

#: ``handlers_of_rank(handlers, rank)``: :func:`vqvae_medical.training.workflow.handlers_of_rank` with :data:`WRITERS`
handlers_of_rank = workflow.handlers_of_rank_with(WRITERS)

#: smallest side of a 2D image taken whole (no ``spatial_size``): the SSIM window
MIN_IMAGE_SIZE = 11


def datalist(
    spatial_dims: int,
    channels: int,
    data: Mapping[str, Any],
    cache_dir: str | os.PathLike,
    spatial_size: Sequence[int] | None,
    batch_size: int,
    train_transform_args: Mapping[str, Any] | None = None,
) -> dict[str, list[dict]]:
    """The training/validation/test datalist of the data settings ``data``
    (:func:`~vqvae_medical.stages.autoencoder.record.record_datalist`), checked for what the training needs: when
    images are taken whole (no ``spatial_size``, no training ``patch_size``), all of one size for batches of more than
    one, and 2D images at least :data:`MIN_IMAGE_SIZE` on each side.

    Args:
        spatial_dims: 2 (images) or 3 (volumes).
        channels: channels the network expects.
        data: data settings (:func:`~vqvae_medical.stages.autoencoder.record.data_settings`).
        cache_dir: where the datalist is cached.
        spatial_size: the preprocessing's size, or ``None`` for images taken whole.
        batch_size: training batch size.
        train_transform_args: the training-only transform arguments (a 3D ``patch_size``).
    """
    whole = spatial_size is None and (train_transform_args or {}).get("patch_size") is None
    return record_datalist(
        spatial_dims,
        channels,
        data,
        cache_dir,
        require_same_size=whole and int(batch_size) > 1,
        min_size=MIN_IMAGE_SIZE if whole else None,
    )


def dataset(
    datalist: Mapping[str, list[dict]],
    name: str,
    transform: Compose,
    limit: int | None = None,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> Any:
    """The dataset of the section ``name`` of ``datalist`` (``"training"``, ``"validation"``, ``"test"``), its first
    ``limit`` items when given: :func:`~vqvae_medical.data.make_dataset` with ``cache``, ``cache_dir`` and
    ``num_workers``."""
    items = section(datalist, name, limit)
    return make_dataset(items, transform, cache=cache, cache_dir=cache_dir, num_workers=num_workers, name=name)


def train_transforms(settings: Mapping[str, Any], train_transform_args: Mapping[str, Any] | None = None) -> Compose:
    """The training transforms: the recorded preprocessing ``settings`` with the training-only arguments
    (``augment``; a 3D ``patch_size``), which the record leaves out."""
    return preprocessing_transforms(settings, **dict(train_transform_args or {}))


def key_metric(spatial_dims: int, win_size: int = 11) -> dict[str, IgniteMetricHandler]:
    """``{"ssim": ...}``: SSIM of the clipped reconstruction (data range 1, Gaussian window of ``win_size``,
    computed separably: :class:`~vqvae_medical.evaluation.metrics.SeparableSSIMMetric`), details kept for the report."""
    metric = SeparableSSIMMetric(spatial_dims, data_range=1.0, win_size=win_size)
    return {"ssim": IgniteMetricHandler(metric, output_transform=from_engine(["pred", "label"]), save_details=True)}


def validation_metrics(num_embeddings: int | Sequence[int]) -> dict[str, Metric]:
    """PSNR, MSE, and per code level the fraction of codes used and the perplexity over an epoch: ``codebook_usage``
    and ``perplexity`` for one level (``num_embeddings`` an int), ``_top``/``_bottom`` suffixed for two."""
    sizes = [int(num_embeddings)] if isinstance(num_embeddings, int) else [int(k) for k in num_embeddings]
    pair = from_engine(["pred", "label"])
    metrics: dict[str, Metric] = {
        "psnr": PeakSignalToNoiseRatio(max_val=1.0, output_transform=pair),
        "mse": MeanSquaredError(output_transform=pair),
    }
    levels = list(enumerate(zip(level_names(len(sizes)), sizes, strict=True)))
    metrics.update({f"codebook_usage{name}": CodebookUsage(k, level=i) for i, (name, k) in levels})
    metrics.update({f"perplexity{name}": CodebookPerplexity(k, level=i) for i, (name, k) in levels})
    return metrics


def inference_datalist(
    input_dir: str | os.PathLike | Sequence[str], spatial_dims: int = 2, channels: int = 1, skip_bad: bool = False
) -> list[dict]:
    """Items to reconstruct: 2D images (:func:`~vqvae_medical.data.lists.inference_datalist`) or 3D volumes, whose
    ``dataset.json`` may list a file per channel (:func:`~vqvae_medical.data.volumes.volume_inference_datalist`)."""
    if int(spatial_dims) == 3:
        return volume_inference_datalist(input_dir, channels=channels, skip_bad=skip_bad)
    return image_inference_datalist(input_dir, spatial_dims=spatial_dims, channels=channels, skip_bad=skip_bad)
