"""Datalists of 3D volumes whose channels are separate files (e.g. BraTS T1/T1c/T2/FLAIR), for the 3D bundles.

MONAI's ``LoadImaged`` reads an item whose ``"image"`` is a list of files as one multi-channel volume (the files are
stacked on a new first axis and must share one affine), and a 4D NIfTI as channels last. The file checks of
:func:`~vqvae_medical.data.check_datalist` take one path per item; :func:`check_volume_datalist` adds the list
case: every file is checked on its own (readable, finite, 3D), then the files of one item must have one spatial
size, one affine (NIfTI) and together the channels the config expects. Single-file items go through
:func:`~vqvae_medical.data.check_datalist` unchanged. A list of files per item comes from a decathlon-style
``dataset.json``::

    {"training": [{"image": ["BraTS_001_t1.nii.gz", "BraTS_001_t1ce.nii.gz", "BraTS_001_t2.nii.gz",
                             "BraTS_001_flair.nii.gz"]}, ...], "validation": [...], "test": [...]}
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vqvae_medical.data import (
    CheckReport,
    DataError,
    build_datalist,
    check_datalist,
    image_extension,
    inspect_image,
)
from vqvae_medical.data.checks import NIFTI_EXTENSIONS
from vqvae_medical.data.lists import inference_datalist, training_datalist

__all__ = ["check_volume_datalist", "volume_training_datalist", "volume_inference_datalist"]


def _nifti_affine(path: str) -> np.ndarray | None:
    if image_extension(path) not in NIFTI_EXTENSIONS:
        return None
    import nibabel as nib

    return np.asarray(nib.load(path).affine, dtype=np.float64)


def _check_multi_file(files: Sequence[str], channels: int) -> str | None:
    """Problem with one multi-file item, or ``None`` when it is usable."""
    if not files:
        return "an empty list of channel files"
    try:
        infos = [inspect_image(os.fspath(f)) for f in files]
    except DataError as e:
        return str(e)
    for info in infos:
        if sum(1 for s in info.spatial_shape if s > 1) != 3:
            return f"{info.path} has spatial size {info.spatial_shape}, not a 3D volume"
    shapes = {tuple(i.spatial_shape) for i in infos}
    if len(shapes) > 1:
        return f"channel files of different sizes {sorted(shapes)}; resample them onto one grid first"
    total = sum(i.channels for i in infos)
    if total != channels:
        return f"{len(files)} files with {total} channels in all, but the config expects {channels} channels"
    affines = [a for a in (_nifti_affine(os.fspath(f)) for f in files) if a is not None]
    if any(not np.allclose(a, affines[0], atol=1e-3) for a in affines[1:]):
        return "channel files with different affines; MONAI stacks channels of one grid only, resample them first"
    return None


def _item_size(item: Mapping[str, Any], key: str) -> tuple[int, ...]:
    path = item[key][0] if isinstance(item[key], (list, tuple)) else item[key]
    return inspect_image(os.fspath(path)).squeezed_shape(3)


def _other_sizes(good: dict[int, Mapping[str, Any]], key: str) -> list[str]:
    """Remove from ``good`` the items whose size is not the most common one; one message per removed item."""
    sizes = {i: _item_size(item, key) for i, item in good.items()}
    counts = Counter(sizes.values())
    reference = max(counts, key=lambda s: (counts[s], s))
    messages = []
    for i, size in sizes.items():
        if size != reference:
            messages.append(
                f"{good.pop(i)[key]}: has size {size}, unlike the most common size {reference} ({counts[reference]} "
                f"of {len(sizes)} items). Set spatial_size in the config to resize every volume to one size, or "
                "remove it"
            )
    return messages


def check_volume_datalist(
    items: Sequence[Mapping[str, Any]],
    channels: int = 1,
    skip_bad: bool = False,
    key: str = "image",
    source: str | os.PathLike | None = None,
    require_same_size: bool = False,
) -> CheckReport:
    """:func:`~vqvae_medical.data.check_datalist` for 3D volumes that also accepts a list of channel files per item.

    Args:
        items: datalist items; ``item[key]`` is one path (a 3D or 4D volume) or a list of 3D volumes, one per channel.
        channels: channels the config expects.
        skip_bad: drop unusable items with a warning instead of raising one error listing them.
        key: item key of the image path(s).
        source: where the items came from, for messages.
        require_same_size: every usable item must have the most common spatial size (needed when volumes are
            batched without being resized or cropped); the others are unusable.

    Raises:
        DataError: no items, or unusable items without ``skip_bad``, or no usable item at all.
    """
    where = os.fspath(source) if source is not None else "the datalist"
    single = [(i, item) for i, item in enumerate(items) if not isinstance(item.get(key), (list, tuple))]
    multi = [(i, item) for i, item in enumerate(items) if isinstance(item.get(key), (list, tuple))]
    if not multi:
        return check_datalist(
            list(items),
            spatial_dims=3,
            channels=channels,
            skip_bad=skip_bad,
            key=key,
            source=source,
            require_same_size=require_same_size,
        )
    good: dict[int, Mapping[str, Any]] = {}
    skipped: list[str] = []
    if single:
        try:
            report = check_datalist(
                [item for _, item in single],
                spatial_dims=3,
                channels=channels,
                skip_bad=skip_bad,
                key=key,
                source=source,
            )
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))  # every single-file item is unusable; the multi-file ones may still be fine
        else:
            kept = {id(item) for item in report.items}
            good.update((i, item) for i, item in single if id(item) in kept)
            skipped += report.skipped
    bad: list[str] = []
    for i, item in multi:
        problem = _check_multi_file(item[key], channels)
        if problem is None:
            good[i] = item
        else:
            bad.append(f"{[os.fspath(f) for f in item[key]]}: {problem}")
    if require_same_size and good:
        bad += _other_sizes(good, key)
    if bad and not skip_bad:
        shown = "\n".join(f"  {b}." for b in bad[:20])
        raise DataError(
            f"{len(bad)} of {len(items)} items in {where} are unusable:\n{shown}\n"
            "Fix or remove them, or set skip_bad=true to skip them."
        )
    for message in bad:
        warnings.warn(f"skipping {message}.", stacklevel=2)
    skipped += bad
    if not good:
        raise DataError(f"all {len(items)} items in {where} are unusable; see the warnings above.")
    return CheckReport(items=[dict(good[i]) for i in sorted(good)], skipped=skipped)


def volume_training_datalist(
    dataset_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    channels: int = 1,
    skip_bad: bool = False,
    require_same_size: bool = False,
    **kwargs: Any,
) -> dict[str, list[dict]]:
    """:func:`~vqvae_medical.data.lists.training_datalist` for 3D volumes, with multi-file channel items allowed.

    Args:
        dataset_dir: data folder, ``dataset.json`` file, or ``None`` for the embedded MNI152 volumes.
        cache_dir: where the embedded default data is written.
        channels: channels the network expects.
        skip_bad: skip unusable items with a warning instead of stopping with one error listing them.
        require_same_size: within each section, volumes of a size other than the most common one are unusable
            (set it when volumes are batched at their own size, i.e. neither ``spatial_size`` nor ``patch_size``).
        kwargs: passed to ``training_datalist`` (``layout``, ``val_fraction``, ``test_fraction``, ``seed``, ...).
    """
    datalist = training_datalist(dataset_dir, cache_dir, spatial_dims=3, channels=channels, check=False, **kwargs)
    return {
        name: list(
            check_volume_datalist(
                items,
                channels,
                skip_bad,
                source=f"{dataset_dir or cache_dir} ({name})",
                require_same_size=require_same_size,
            ).items
        )
        for name, items in datalist.items()
    }


def volume_inference_datalist(
    input_path: str | os.PathLike | Sequence[str], channels: int = 1, skip_bad: bool = False
) -> list[dict]:
    """:func:`~vqvae_medical.data.lists.inference_datalist` for 3D volumes; a ``dataset.json`` may list channel files.

    Args:
        input_path: a folder of volumes, one volume, a list of paths, or a decathlon-style JSON file (its ``test``
            section, else every section).
        channels: channels the network expects.
        skip_bad: skip unusable items with a warning.
    """
    if isinstance(input_path, (str, os.PathLike)) and os.fspath(input_path).endswith(".json"):
        datalist = build_datalist(input_path, layout="decathlon")
        items = datalist.get("test") or [i for v in datalist.values() for i in v]
        return list(check_volume_datalist(items, channels, skip_bad, source=input_path).items)
    return inference_datalist(input_path, spatial_dims=3, channels=channels, skip_bad=skip_bad)
