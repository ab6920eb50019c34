"""Datalists for a bundle run: the training/validation/test split of a data set and the inference inputs."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vqvae_medical.data import DataError, build_datalist, check_datalist, list_images, mni152_slices, mni152_volumes
from vqvae_medical.utils.distributed import rank_zero_first

__all__ = ["training_datalist", "section", "inference_datalist"]

logger = logging.getLogger(__name__)


def training_datalist(
    dataset_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    spatial_dims: int = 2,
    channels: int = 1,
    layout: str = "auto",
    expected_size: Sequence[int] | None = None,
    skip_bad: bool = False,
    check: bool = True,
    require_same_size: bool = False,
    min_size: int | None = None,
    **kwargs: Any,
) -> dict[str, list[dict]]:
    """Datalist with ``training``, ``validation`` and ``test`` sections, checked file by file.

    With ``dataset_dir=None`` the embedded default is used: axial slices of the MNI152 template shipped in the
    nilearn wheel (2D) or augmented copies of it (3D), written once under ``cache_dir``. Sections missing from the
    data set are filled by the builders (a validation split carved from training; test falls back to validation).

    Args:
        dataset_dir: data folder, ``dataset.json`` file, or ``None`` for the embedded default.
        cache_dir: where the embedded default data is written.
        spatial_dims: 2 or 3.
        channels: channels the network expects.
        layout: datalist layout (see :func:`vqvae_medical.data.build_datalist`).
        expected_size: required image size, if the config needs one.
        skip_bad: skip unusable files with a warning instead of stopping with one error listing them.
        check: open every file once to report bad input before training starts.
        require_same_size: within each section, images of a size other than the most common one are unusable (set
            it when the config batches images at their own size, i.e. ``spatial_size`` is null: a batch of mixed
            sizes would otherwise fail in the data loader, without naming any file).
        min_size: smallest side an image may have (the SSIM window when images keep their own size).
        kwargs: passed to the datalist builder (e.g. ``val_fraction``, ``test_fraction``, ``seed``).
    """
    if dataset_dir in (None, "", "None"):
        with rank_zero_first():  # under torchrun, rank 0 writes the files and the other ranks find them
            if spatial_dims == 2:
                # three planes (192 slices, 144/24/24): more varied shapes than one plane's 64
                datalist = mni152_slices(Path(cache_dir) / "mni152_slices", planes=("axial", "coronal", "sagittal"))
            else:
                datalist = mni152_volumes(Path(cache_dir) / "mni152_volumes")
        logger.info("no dataset_dir given: using the embedded MNI152 template data under %s", cache_dir)
    else:
        datalist = build_datalist(dataset_dir, layout=layout, **kwargs)
    datalist = {k: list(v) for k, v in datalist.items() if k in ("training", "validation", "test")}
    if not datalist.get("training"):
        raise DataError(f"{dataset_dir}: no training images found. Point dataset_dir at a folder of images.")
    if not datalist.get("validation"):
        raise DataError(
            f"{dataset_dir}: no validation images. Add a validation split or set val_fraction > 0 for a flat folder."
        )
    datalist.setdefault("test", datalist["validation"])
    if not datalist["test"]:
        datalist["test"] = datalist["validation"]
    if check:
        for name, items in datalist.items():
            report = check_datalist(
                items,
                spatial_dims=spatial_dims,
                channels=channels,
                expected_size=expected_size,
                skip_bad=skip_bad,
                require_same_size=require_same_size,
                source=f"{dataset_dir or cache_dir} ({name})",
                min_size=min_size,
            )
            datalist[name] = list(report.items)
    return datalist


def section(datalist: Mapping[str, list[dict]], name: str, limit: int | None = None) -> list[dict]:
    """One section of a datalist, optionally its first ``limit`` items (quick runs and tests)."""
    if name not in datalist:
        raise DataError(f"the datalist has no {name!r} section (it has {sorted(datalist)}).")
    items = list(datalist[name])
    return items[:limit] if limit else items


def inference_datalist(
    input_path: str | os.PathLike | Sequence[str], spatial_dims: int = 2, channels: int = 1, skip_bad: bool = False
) -> list[dict]:
    """Items ``{"image": path}`` for inference: every image under a folder, a ``dataset.json`` (its ``test``
    section, else all sections), or an explicit list of paths; checked like the training data."""
    if input_path in (None, "", "None"):
        raise DataError("no input given: pass --input_dir <a folder of images, one image file, or a dataset.json>.")
    if isinstance(input_path, (list, tuple)):
        items = [{"image": os.path.abspath(p)} for p in input_path]
    elif str(input_path).endswith(".json"):
        datalist = build_datalist(input_path, layout="decathlon")
        items = datalist.get("test") or [i for v in datalist.values() for i in v]
    elif Path(input_path).is_dir():
        items = [{"image": p} for p in list_images(input_path)]
    elif Path(input_path).is_file():
        items = [{"image": os.path.abspath(input_path)}]
    else:
        raise DataError(f"{input_path}: no such file or folder to run inference on.")
    if not items:
        raise DataError(f"{input_path}: no images found (PNG, JPEG, NIfTI, ...).")
    return list(
        check_datalist(items, spatial_dims=spatial_dims, channels=channels, skip_bad=skip_bad, source=input_path).items
    )
