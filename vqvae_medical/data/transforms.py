"""MONAI transform chains for 2D images and 3D volumes (datasets: :mod:`vqvae_medical.data.caching`).

Orientation convention of 2D images: every 2D image comes out as ``[C, H, W]`` with rows first, exactly the
array that ``numpy.asarray(PIL.Image.open(path))`` (PNG/JPEG/BMP) or ``itk.GetArrayFromImage`` (TIFF/MHA/NRRD)
gives, moved channel-first; a 2D NIfTI slice comes out in the array order nibabel stores it
(``nib.load(path).get_fdata()``, ``H x W`` or ``H x W x 1`` -> ``[C, H, W]``). MONAI's PIL and ITK readers
return 2D images as ``(W, H)`` (x first), so :class:`ToRowMajord` swaps the two spatial axes of those files.
Hence ``PIL.Image.fromarray(uint8(255 * image[0]))`` writes a PNG that looks like the input (not transposed).

3D volumes keep MONAI's convention: reoriented by ``Orientationd`` (``"RAS"`` by default), ``[C, X, Y, Z]``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from functools import partial

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandRotated,
    RandSpatialCropd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import ImageMetaKey, ensure_tuple_rep

from vqvae_medical.data.caching import make_dataset  # re-exported: it lived here before
from vqvae_medical.data.checks import NIFTI_EXTENSIONS, image_extension

__all__ = [
    "AdaptChannelsd",
    "CommonMetad",
    "SqueezeSpatialDimsd",
    "ToRowMajord",
    "image_transforms_2d",
    "make_dataset",
    "volume_transforms_3d",
]


class CommonMetad(MapTransform):
    """Keep only the metadata every image reader provides (file name, affine, shape, space), so that a batch of
    files read by different readers collates.

    MONAI's NIfTI reader returns nibabel's header fields, its ITK reader the MetaImage/NRRD fields (``dim[0]``,
    ``NRRD_kinds[0]``, ``Modality``, ...); ``list_data_collate`` takes the keys of the first item and fails on the
    others (``new(): invalid data type 'str'``), so a folder mixing NIfTI with ``.mha``/``.nrrd`` could not be
    batched. The reader-specific header fields are not used after loading.

    Args:
        keys: image keys.
        keep: metadata keys to keep (besides MONAI's own, which it re-creates).
        allow_missing_keys: don't raise for missing keys.
    """

    KEEP = ("filename_or_obj", "affine", "original_affine", "spatial_shape", "original_channel_dim", "space")

    def __init__(self, keys: KeysCollection, keep: Sequence[str] = KEEP, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.keep = tuple(keep)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, MetaTensor):
                img.meta = {k: v for k, v in img.meta.items() if str(k) in self.keep}
        return d


class ToRowMajord(MapTransform):
    """Swap the two spatial axes of 2D images that MONAI's PIL/ITK/NRRD readers returned as ``(W, H)``.

    The file is known from the MetaTensor's ``filename_or_obj``; NIfTI files (read by nibabel in stored order)
    and 3D images are left unchanged. The affine's first two columns are swapped too, so that world
    coordinates stay right.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise ValueError(
                    f"{key!r} must be a MetaTensor loaded by LoadImaged to know its file format; "
                    "do not disable meta tracking (monai.data.set_track_meta(False)) for 2D images."
                )
            filename = str(img.meta.get(ImageMetaKey.FILENAME_OR_OBJ, ""))
            if img.ndim != 3 or image_extension(filename) in NIFTI_EXTENSIONS:
                continue
            affine = img.affine.clone()
            out = img.transpose(1, 2).contiguous()
            affine[:, [0, 1]] = affine[:, [1, 0]]
            out.affine = affine
            d[key] = out
        return d


class SqueezeSpatialDimsd(MapTransform):
    """Drop singleton spatial dimensions (last first) until ``spatial_dims`` are left, e.g. an ``H x W x 1`` slice.

    Args:
        keys: keys of the channel-first images.
        spatial_dims: number of spatial dimensions wanted.
        allow_missing_keys: don't raise for missing keys.

    Raises:
        ValueError: more than ``spatial_dims`` non-singleton spatial dimensions, or fewer than ``spatial_dims``.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            shape = list(img.shape[1:])
            while len(shape) > self.spatial_dims and 1 in shape:
                dim = len(shape) - 1 - shape[::-1].index(1)
                img = _squeeze(img, dim + 1)
                shape = list(img.shape[1:])
            if len(shape) != self.spatial_dims:
                name = getattr(img, "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ, key)
                raise ValueError(
                    f"{name}: spatial size {tuple(data[key].shape[1:])} is not {self.spatial_dims}D. "
                    f"Use a {len(shape)}D config for it, or run check_datalist first."
                )
            d[key] = img
        return d


def _squeeze(img: torch.Tensor, dim: int) -> torch.Tensor:
    """Squeeze channel-first ``img`` at ``dim`` (>0).

    The affine keeps its size (MONAI gives 2D PNG/JPEG a 4x4 affine too); the squeezed axis' column moves
    behind the remaining spatial axes so that column ``i`` still belongs to spatial axis ``i``.
    """
    out = img.squeeze(dim)
    if isinstance(img, MetaTensor) and img.affine.ndim == 2 and dim - 1 < img.affine.shape[1] - 1:
        n = img.affine.shape[1] - 1
        order = [i for i in range(n) if i != dim - 1] + [dim - 1, n]
        out.affine = img.affine[:, order]
    return out


class AdaptChannelsd(MapTransform):
    """Map a channel-first image to ``channels`` channels.

    A last alpha channel of a 2- or 4-channel image (PIL ``LA``/``RGBA``) is dropped when ``channels`` is 1 or 3;
    then RGB becomes grey by the mean over channels, and grey becomes RGB by repetition. Transparent alpha is
    not composited: :func:`~vqvae_medical.data.checks.check_datalist` rejects such files beforehand.

    Args:
        keys: keys of the channel-first images.
        channels: channels wanted.
        allow_missing_keys: don't raise for missing keys.

    Raises:
        ValueError: any other channel count.
    """

    def __init__(self, keys: KeysCollection, channels: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}.")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            n = img.shape[0]
            if n != self.channels and self.channels in (1, 3) and n in (2, 4):
                img, n = img[: n - 1], n - 1
            if n == self.channels:
                pass
            elif n == 3 and self.channels == 1:
                img = img.float().mean(dim=0, keepdim=True)
            elif n == 1 and self.channels == 3:
                img = img.repeat(3, *([1] * (img.ndim - 1)))
            else:
                name = getattr(img, "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ, key)
                raise ValueError(
                    f"{name}: {d[key].shape[0]} channels cannot be mapped to {self.channels}. "
                    "Convert the image to grey or RGB, or set channels to match."
                )
            d[key] = img
        return d


def _size(spatial_size: Sequence[int] | int, dims: int) -> tuple[int, ...]:
    size = tuple(int(s) for s in ensure_tuple_rep(spatial_size, dims))
    if any(s < 1 for s in size):
        raise ValueError(f"spatial_size must be positive, got {spatial_size}.")
    return size


def image_transforms_2d(
    keys: Sequence[str] = ("image",),
    channels: int = 1,
    spatial_size: Sequence[int] | int | None = None,
    divisible_by: int = 1,
    augment: bool = False,
    rotate_degrees: float = 30.0,
    resize_mode: str = "pad",
    flip_axes: Sequence[int] = (0, 1),
    prob: float = 0.5,
) -> Compose:
    """Transforms for 2D images (PNG/JPEG/BMP/TIFF or 2D NIfTI slices) to ``[channels, H, W]`` float32 in ``[0, 1]``.

    Chain: ``LoadImaged`` (image only) -> ``EnsureChannelFirstd`` -> :class:`CommonMetad` ->
    :class:`SqueezeSpatialDimsd` (``H x W x 1`` NIfTI -> ``H x W``) -> :class:`ToRowMajord` (rows first, see the
    module docstring) -> :class:`AdaptChannelsd`
    (RGB -> grey by mean, grey -> RGB by repetition, opaque alpha dropped) -> ``ScaleIntensityd`` (min-max to
    ``[0, 1]`` per image, over all channels) -> ``ResizeWithPadOrCropd`` (``resize_mode="pad"``, centred, zero
    padding) or ``Resized`` (``"resize"``, bilinear with anti-aliasing) to ``spatial_size`` when given ->
    ``DivisiblePadd(divisible_by)`` when above 1 -> with ``augment``: ``RandFlipd`` per axis in ``flip_axes``
    and ``RandRotated`` by up to ``rotate_degrees`` either way (each with probability ``prob``) ->
    ``EnsureTyped(float32)``.

    Args:
        keys: image keys of the datalist items.
        channels: output channels (1 grey, 3 RGB).
        spatial_size: output ``(H, W)`` (an int for square), or ``None`` to keep the file's size.
        divisible_by: pad (centred, zeros) so that H and W are multiples of it.
        augment: add random flips and rotation (training only).
        rotate_degrees: largest rotation angle, in degrees.
        resize_mode: ``"pad"`` (pad/crop, keeps pixel scale) or ``"resize"`` (interpolate, changes aspect).
        flip_axes: spatial axes to flip at random (0: up-down, 1: left-right).
        prob: probability of each random transform.
    """
    keys = list(keys)
    if resize_mode not in ("pad", "resize"):
        raise ValueError(f"resize_mode must be 'pad' or 'resize', got {resize_mode!r}.")
    if divisible_by < 1:
        raise ValueError(f"divisible_by must be at least 1, got {divisible_by}.")
    xforms: list = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        CommonMetad(keys),
        SqueezeSpatialDimsd(keys, spatial_dims=2),
        ToRowMajord(keys),
        AdaptChannelsd(keys, channels=channels),
        ScaleIntensityd(keys, minv=0.0, maxv=1.0),
    ]
    if spatial_size is not None:
        size = _size(spatial_size, 2)
        if resize_mode == "pad":
            xforms.append(ResizeWithPadOrCropd(keys, spatial_size=size))
        else:
            xforms.append(Resized(keys, spatial_size=size, mode="bilinear", anti_aliasing=True))
    if divisible_by > 1:
        xforms.append(DivisiblePadd(keys, k=divisible_by))
    if augment:
        xforms.extend(RandFlipd(keys, prob=prob, spatial_axis=axis) for axis in flip_axes)
        if rotate_degrees > 0:
            angle = math.radians(rotate_degrees)
            xforms.append(
                RandRotated(keys, range_x=angle, prob=prob, keep_size=True, mode="bilinear", padding_mode="zeros")
            )
    xforms.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(xforms)


def _above_fraction_of_max(x: torch.Tensor, fraction: float = 0.0) -> torch.Tensor:
    """Foreground selector for ``CropForegroundd``: values above ``fraction`` of the image maximum."""
    return x > fraction * x.max()


def volume_transforms_3d(
    keys: Sequence[str] = ("image",),
    channels: int = 1,
    pixdim: Sequence[float] | float | None = None,
    spatial_size: Sequence[int] | int | None = (128, 128, 128),
    orientation: str | None = "RAS",
    scaling: str = "minmax",
    lower: float = 0.5,
    upper: float = 99.5,
    crop_foreground: bool = False,
    patch_size: Sequence[int] | int | None = None,
    augment: bool = False,
    resize_mode: str = "resize",
    foreground_fraction: float = 0.0,
    rotate_degrees: float = 10.0,
    prob: float = 0.5,
) -> Compose:
    """Transforms for 3D volumes to ``[channels, X, Y, Z]`` float32 in ``[0, 1]``.

    Chain: ``LoadImaged`` -> ``EnsureChannelFirstd`` -> :class:`CommonMetad` -> :class:`AdaptChannelsd` ->
    ``Orientationd(orientation)`` -> ``Spacingd(pixdim)`` when given -> ``CropForegroundd`` (voxels above
    ``foreground_fraction`` of the maximum) when ``crop_foreground`` -> ``Resized`` (trilinear, anti-aliased when
    shrinking; ``resize_mode="resize"``) or ``ResizeWithPadOrCropd`` (``"pad"``) to ``spatial_size`` when given ->
    ``ScaleIntensityd`` (``scaling="minmax"``) or ``ScaleIntensityRangePercentilesd(lower, upper)`` clipped to
    ``[0, 1]`` (``"percentile"``) -> ``RandSpatialCropd(patch_size)`` when given -> with ``augment``: left-right
    ``RandFlipd`` (axis 0, RAS) and ``RandRotated`` by up to ``rotate_degrees`` about each axis ->
    ``EnsureTyped(float32)``.

    Args:
        keys: image keys of the datalist items.
        channels: output channels.
        pixdim: voxel size in mm to resample to, or ``None`` to keep the file's spacing.
        spatial_size: output size (before ``patch_size``), an int for a cube, or ``None`` to keep the size.
        orientation: axis codes for ``Orientationd`` or ``None`` to keep the file's orientation.
        scaling: ``"minmax"`` or ``"percentile"``.
        lower: lower percentile for ``"percentile"``.
        upper: upper percentile for ``"percentile"``.
        crop_foreground: crop to the bounding box of the foreground first.
        patch_size: random patch size for training, or ``None`` for the whole volume.
        augment: add random flips and rotations (training only).
        resize_mode: ``"resize"`` (interpolate) or ``"pad"`` (pad/crop, keeps voxel size).
        foreground_fraction: foreground threshold as a fraction of the volume maximum (0: any positive voxel).
        rotate_degrees: largest rotation angle about each axis, in degrees.
        prob: probability of each random transform.
    """
    keys = list(keys)
    if scaling not in ("minmax", "percentile"):
        raise ValueError(f"scaling must be 'minmax' or 'percentile', got {scaling!r}.")
    if resize_mode not in ("pad", "resize"):
        raise ValueError(f"resize_mode must be 'pad' or 'resize', got {resize_mode!r}.")
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower} and {upper}.")
    xforms: list = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        CommonMetad(keys),
        AdaptChannelsd(keys, channels=channels),
    ]
    if orientation:
        xforms.append(Orientationd(keys, axcodes=orientation, labels=None))
    if pixdim is not None:
        xforms.append(Spacingd(keys, pixdim=ensure_tuple_rep(pixdim, 3), mode="bilinear"))
    if crop_foreground:
        select = partial(_above_fraction_of_max, fraction=foreground_fraction)
        xforms.append(
            CropForegroundd(
                keys, source_key=keys[0], select_fn=select, allow_smaller=True, start_coord_key=None, end_coord_key=None
            )
        )
    if spatial_size is not None:
        size = _size(spatial_size, 3)
        if resize_mode == "resize":
            xforms.append(Resized(keys, spatial_size=size, mode="trilinear", anti_aliasing=True))
        else:
            xforms.append(ResizeWithPadOrCropd(keys, spatial_size=size))
    if scaling == "minmax":
        xforms.append(ScaleIntensityd(keys, minv=0.0, maxv=1.0))
    else:
        xforms.append(ScaleIntensityRangePercentilesd(keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True))
    if patch_size is not None:
        xforms.append(RandSpatialCropd(keys, roi_size=_size(patch_size, 3), random_size=False))
    if augment:
        xforms.append(RandFlipd(keys, prob=prob, spatial_axis=0))
        if rotate_degrees > 0:
            angle = math.radians(rotate_degrees)
            xforms.append(
                RandRotated(
                    keys,
                    range_x=angle,
                    range_y=angle,
                    range_z=angle,
                    prob=prob,
                    keep_size=True,
                    mode="bilinear",
                    padding_mode="zeros",
                )
            )
    xforms.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(xforms)
