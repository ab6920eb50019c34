"""Checks that turn bad input images into one clear error (or a skipped file) before training starts."""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vqvae_medical.utils.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "PIL_EXTENSIONS",
    "CheckReport",
    "DataError",
    "ImageInfo",
    "check_datalist",
    "image_extension",
    "inspect_image",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".nii",
    ".nii.gz",
    ".mha",
    ".mhd",
    ".nrrd",
)
"""File name endings treated as images (matched case-insensitively)."""

PIL_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
"""Endings read by MONAI's ``PILReader`` (all other image endings go to nibabel or ITK)."""

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz")
"""Endings read by MONAI's ``NibabelReader``."""

# PIL modes and the number of channels MONAI's PILReader returns for them
_PIL_GREY_MODES = {"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_PIL_ALPHA_MODES = {"LA": 2, "La": 2, "RGBA": 4, "RGBa": 4}
_PIL_FIX = {
    "P": "Convert it to RGB or grey (e.g. PIL's Image.convert('RGB')), since a palette image loads as colour indices",
    "PA": "Convert it to RGB or grey (e.g. PIL's Image.convert('RGB')), since a palette image loads as colour indices",
    "CMYK": "Convert it to RGB (e.g. PIL's Image.convert('RGB'))",
    "YCbCr": "Convert it to RGB (e.g. PIL's Image.convert('RGB'))",
    "LAB": "Convert it to RGB (e.g. PIL's Image.convert('RGB'))",
    "HSV": "Convert it to RGB (e.g. PIL's Image.convert('RGB'))",
}


class DataError(UserError, ValueError):
    """Raised when a data set folder, datalist or image file cannot be used as given."""


@dataclass
class ImageInfo:
    """What :func:`inspect_image` found in one file.

    Attributes:
        path: the file.
        spatial_shape: spatial size in the order the transforms of :mod:`vqvae_medical.data.transforms`
            return it: ``(H, W)`` rows first for PNG/JPEG/BMP/TIFF/MHA/NRRD 2D images, the stored array order
            for NIfTI, with singleton spatial dimensions kept (see ``spatial_dims``).
        channels: number of channels as loaded (alpha included).
        alpha: ``"opaque"`` when the file has an alpha channel that is fully opaque, ``"transparent"`` when it
            has one with varying or partial transparency, ``None`` without alpha.
        mode: PIL mode for PIL formats, else ``None``.
        stored_shape: the full array shape of a NIfTI file (e.g. 4D ``X x Y x Z x T``), else ``None``.
    """

    path: str
    spatial_shape: tuple[int, ...]
    channels: int
    alpha: str | None = None
    mode: str | None = None
    stored_shape: tuple[int, ...] | None = None

    def squeezed_shape(self, spatial_dims: int) -> tuple[int, ...]:
        """Spatial shape with singleton dimensions dropped (last first) until ``spatial_dims`` are left."""
        shape = list(self.spatial_shape)
        while len(shape) > spatial_dims and 1 in shape:
            del shape[len(shape) - 1 - shape[::-1].index(1)]
        return tuple(shape)


@dataclass
class CheckReport:
    """Result of :func:`check_datalist`.

    Attributes:
        items: the usable datalist items, in input order.
        skipped: one message per skipped file (empty unless ``skip_bad=True``).
        sizes: number of usable images per spatial size (after dropping singleton dimensions).
    """

    items: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sizes: dict[tuple[int, ...], int] = field(default_factory=dict)

    @property
    def n_checked(self) -> int:
        """Number of files checked."""
        return len(self.items) + len(self.skipped)

    @property
    def n_skipped(self) -> int:
        """Number of files skipped."""
        return len(self.skipped)


class _Problem(Exception):
    """One problem with one file: what is wrong and how to fix it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


def image_extension(path: str | os.PathLike) -> str | None:
    """Return the image ending of ``path`` in lower case (e.g. ``".nii.gz"``), or ``None`` when it is not an image.

    Args:
        path: file name or path.
    """
    name = os.fspath(path).lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def _pil_info(path: str) -> ImageInfo:
    from PIL import Image, ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, whatever another module set
    kind = (image_extension(path) or "").lstrip(".").upper().replace("JPG", "JPEG")
    try:
        with Image.open(path) as im:
            kind = im.format or kind
            im.load()
            mode, width, height = im.mode, im.width, im.height
            alpha = None
            if mode in _PIL_ALPHA_MODES:
                low, high = im.getchannel("A").getextrema()
                alpha = "opaque" if low == high == 255 else "transparent"
            if mode == "F" and not np.isfinite(np.asarray(im)).all():
                raise _Problem("contains NaN or Inf values", "Replace the non-finite pixels or remove the file")
    except _Problem:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise _Problem(f"truncated or corrupt {kind} ({e})", "Remove or replace the file") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if mode in _PIL_FIX:
        raise _Problem(f"has PIL mode {mode!r}", _PIL_FIX[mode])
    if mode in _PIL_GREY_MODES:
        channels = 1
    elif mode in _PIL_ALPHA_MODES:
        channels = _PIL_ALPHA_MODES[mode]
    elif mode in ("RGB", "RGBX"):
        channels = 3
    else:
        raise _Problem(f"has unsupported PIL mode {mode!r}", "Convert it to grey ('L') or RGB")
    return ImageInfo(path=path, spatial_shape=(height, width), channels=channels, alpha=alpha, mode=mode)


def _nifti_info(path: str) -> ImageInfo:
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        data = img.get_fdata(dtype=np.float32)
    except Exception as e:  # nibabel raises many types for bad headers, short or broken gzip streams
        raise _Problem(f"truncated or corrupt NIfTI ({type(e).__name__}: {e})", "Remove or replace the file") from e
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum() - n_nan)
        raise _Problem(
            f"contains {n_nan} NaN and {n_inf} Inf values",
            "Replace the non-finite voxels (e.g. numpy.nan_to_num) or remove the file",
        )
    if len(shape) < 2:
        raise _Problem(f"has shape {shape}, which is not an image", "Remove or replace the file")
    spatial, channels = shape[:3], int(np.prod(shape[3:], dtype=int)) if len(shape) > 3 else 1
    return ImageInfo(path=path, spatial_shape=spatial, channels=channels, stored_shape=shape)


def _itk_info(path: str) -> ImageInfo:
    import torch
    from monai.transforms import LoadImage

    try:
        img, meta = LoadImage(image_only=False)(path)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _Problem(f"unreadable or corrupt image ({reason})", "Remove or replace the file") from e
    if torch.is_floating_point(img) and not torch.isfinite(img).all():
        raise _Problem("contains NaN or Inf values", "Replace the non-finite values or remove the file")
    spatial = tuple(int(s) for s in np.asarray(meta.get("spatial_shape", img.shape)).tolist())
    channel_dim = meta.get("original_channel_dim", "no_channel")  # "no_channel", NaN (ITK) or an int
    channels = int(img.shape[int(channel_dim)]) if isinstance(channel_dim, (int, np.integer)) else 1
    if len(spatial) == 2:
        spatial = spatial[::-1]  # MONAI returns (x, y); the 2D transforms give rows first
    return ImageInfo(path=path, spatial_shape=spatial, channels=channels)


def inspect_image(path: str | os.PathLike) -> ImageInfo:
    """Open one image file completely and return its size and channels.

    PNG/JPEG/BMP are decoded with PIL (``Image.open(...).load()``, which catches truncation), NIfTI is read
    fully with nibabel (``get_fdata``, which catches truncation and NaN/Inf), other endings with MONAI's
    ``LoadImage`` (ITK).

    Args:
        path: image file.

    Raises:
        DataError: the file is missing, has no image ending, or cannot be decoded, with a message naming the
            file, the problem and a fix.
    """
    path = os.fspath(path)
    try:
        return _inspect(path)
    except _Problem as p:
        raise DataError(f"{path}: {p.what}. {p.fix}.") from p


def _inspect(path: str) -> ImageInfo:
    if not os.path.exists(path):
        raise _Problem("file not found", "Check the path in the datalist or the dataset folder setting")
    if os.path.isdir(path):
        raise _Problem("is a folder, not an image file", "List image files, not folders, in the datalist")
    ext = image_extension(path)
    if ext is None:
        raise _Problem(
            f"unsupported file type {Path(path).suffix!r}",
            f"Use one of {', '.join(IMAGE_EXTENSIONS)} or remove the file from the datalist",
        )
    if os.path.getsize(path) == 0:
        raise _Problem("empty file (0 bytes)", "Remove or replace the file")
    if ext in PIL_EXTENSIONS:
        return _pil_info(path)
    if ext in NIFTI_EXTENSIONS:
        return _nifti_info(path)
    return _itk_info(path)


def _check_layout(info: ImageInfo, spatial_dims: int, channels: int) -> None:
    shape = info.squeezed_shape(spatial_dims)
    stored = info.stored_shape or ()
    if spatial_dims == 2 and len(stored) > 3 and len(shape) == 3:
        raise _Problem(
            f"is a {len(stored)}D image of shape {stored} (a 3D volume with {info.channels} channels or time "
            "points) but the config is 2D",
            "Use a 3D config (4D NIfTI files are read as channels last), or extract 2D slices from it",
        )
    if spatial_dims == 2 and len(shape) == 3:
        raise _Problem(
            f"is a 3D volume of size {info.spatial_shape} but the config is 2D",
            "Use a 3D config for volumes, or extract 2D slices from it",
        )
    if spatial_dims == 3 and sum(1 for s in info.spatial_shape if s > 1) < 3:
        raise _Problem(
            f"is a 2D image of size {info.spatial_shape} but the config is 3D",
            "Use a 2D config for slices, or stack slices into a volume",
        )
    if len(shape) != spatial_dims:
        raise _Problem(f"has spatial size {info.spatial_shape}, expected {spatial_dims}D", "Remove or replace the file")
    if info.alpha == "transparent":
        raise _Problem(
            f"has a transparent alpha channel (PIL mode {info.mode!r})",
            "Flatten it onto a background and save it as grey or RGB",
        )
    usable = info.channels - 1 if info.alpha == "opaque" else info.channels
    if usable != channels and not (usable in (1, 3) and channels in (1, 3)):
        raise _Problem(
            f"has {info.channels} channels, which cannot be mapped to the {channels} channels of the config",
            "Convert it to grey or RGB, or set the config's channels to match",
        )


def _message(path: str, problem: _Problem) -> str:
    return f"{path}: {problem.what}. {problem.fix}"


def _item_path(item: Mapping | str | os.PathLike, key: str) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if not isinstance(item, Mapping) or key not in item:
        raise DataError(f"datalist item {item!r} has no {key!r} entry. Give each item a {key!r} path.")
    value = item[key]
    if not isinstance(value, (str, os.PathLike)):
        raise DataError(f"datalist item {item!r}: {key!r} must be one file path, got {type(value).__name__}.")
    return os.fspath(value)


def check_datalist(
    datalist_items: Sequence[Mapping | str | os.PathLike],
    spatial_dims: int = 2,
    channels: int = 1,
    expected_size: Sequence[int] | None = None,
    require_same_size: bool = False,
    skip_bad: bool = False,
    key: str = "image",
    source: str | os.PathLike | None = None,
    min_size: int | None = None,
) -> CheckReport:
    """Open every image of a datalist once and report unusable files.

    Detected: missing file; unsupported ending; unreadable, corrupt or truncated file; NaN/Inf values;
    a 3D volume in a 2D config or a 2D image in a 3D config (a NIfTI slice stored as ``H x W x 1`` counts as
    2D); channels that cannot be mapped to ``channels`` (grey and RGB convert to each other, a fully opaque
    alpha channel is dropped; a transparent alpha, palette/CMYK modes, or any other channel count is an
    error); a size other than ``expected_size``, or, with ``require_same_size``, a size other than the most
    common one. Sizes are ``(H, W)`` rows first for 2D PNG/JPEG and the stored array order for NIfTI,
    i.e. the order :func:`~vqvae_medical.data.transforms.image_transforms_2d` returns.

    Without ``skip_bad`` all files are checked and ONE :class:`DataError` lists every bad file (each with what
    is wrong and how to fix it). With ``skip_bad`` bad files are dropped, ``warnings.warn`` is called once per
    skipped file, the count is logged, and the returned :class:`CheckReport` holds the messages.

    Args:
        datalist_items: list of datalist dicts (or plain paths).
        spatial_dims: 2 or 3, the dimensionality of the config.
        channels: channels the config expects.
        expected_size: spatial size every image must have (after dropping singleton dimensions).
        require_same_size: when ``expected_size`` is None, require all images to share one size.
        skip_bad: drop bad files with a warning instead of raising.
        key: datalist key holding the image path.
        source: where the list came from (a folder or file), used in the empty-list message.
        min_size: smallest side (pixels/voxels) an image may have, e.g. the SSIM window of the config when images
            are used at their own size; smaller images are unusable, and when all are, ONE one-line
            :class:`DataError` says so with the minimum size.

    Raises:
        DataError: the list is empty, every file is bad, or (without ``skip_bad``) any file is bad.
    """
    where = os.fspath(source) if source is not None else "the datalist"
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if len(datalist_items) == 0:
        raise DataError(f"no images found in {where}. Check the dataset folder and the image file endings.")
    if expected_size is not None and len(expected_size) != spatial_dims:
        raise ValueError(f"expected_size {tuple(expected_size)} must have {spatial_dims} values.")

    good: list[tuple[int, Mapping | str, str, tuple[int, ...]]] = []
    bad: list[tuple[int, str, _Problem]] = []
    for index, item in enumerate(datalist_items):
        path = _item_path(item, key)
        try:
            info = _inspect(path)
            _check_layout(info, spatial_dims, channels)
        except _Problem as p:
            bad.append((index, path, p))
            continue
        good.append((index, item, path, info.squeezed_shape(spatial_dims)))

    if min_size and good:
        small = [g for g in good if min(g[3]) < min_size]
        if len(small) == len(good) and not bad:
            example = small[0]
            raise DataError(
                f"all {len(good)} images in {where} are smaller than the minimum size of {min_size} pixels per side "
                f"(the SSIM window), e.g. {example[2]} has size {example[3]}. Set spatial_size (e.g. "
                f"--spatial_size [{max(min_size, 16)},{max(min_size, 16)}]) to resize them, or use larger images."
            )
        for index, _item, path, shape in small:
            fix = "Set spatial_size to resize every image, or remove the file"
            bad.append(
                (
                    index,
                    path,
                    _Problem(f"has size {shape}, smaller than the minimum {min_size} per side (the SSIM window)", fix),
                )
            )
        good = [g for g in good if min(g[3]) >= min_size]
    reference = tuple(int(s) for s in expected_size) if expected_size is not None else None
    if reference is None and require_same_size and good:
        counts = Counter(shape for *_, shape in good)
        reference = max(counts, key=lambda s: (counts[s], s))
    if reference is not None:
        n_ref = sum(1 for *_, shape in good if shape == reference)
        kept = []
        for index, item, path, shape in good:
            if shape == reference:
                kept.append((index, item, path, shape))
                continue
            if expected_size is not None:
                what = f"has size {shape}, expected {reference}"
            else:
                what = f"has size {shape}, unlike the most common size {reference} ({n_ref} of {len(good)} images)"
            fix = "Set spatial_size in the config to pad/crop or resize every image to one size, or remove the file"
            bad.append((index, path, _Problem(what, fix)))
        good = kept
    bad.sort(key=lambda b: b[0])

    if bad and not skip_bad:
        if len(bad) == 1:
            _, path, problem = bad[0]
            raise DataError(
                f"{_message(path, problem)}, or set skip_bad_files=true (bundle config; skip_bad=True in Python) to "
                "skip it."
            )
        shown = "\n".join(f"  {_message(path, problem)}." for _, path, problem in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more." if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} of {len(datalist_items)} images in {where} are unusable:\n{shown}{more}\n"
            "Fix or remove these files, or set skip_bad_files=true (bundle config; skip_bad=True in Python) to skip "
            "them."
        )
    report = CheckReport(
        items=[item if isinstance(item, Mapping) else {key: path} for _, item, path, _ in good],
        skipped=[_message(path, problem) for _, path, problem in bad],
        sizes=dict(Counter(shape for *_, shape in good)),
    )
    for message in report.skipped:
        warnings.warn(f"skipping {message}.", stacklevel=2)
    if report.skipped:
        logger.warning("skipped %d of %d images in %s", report.n_skipped, report.n_checked, where)
    if not report.items:
        raise DataError(f"all {len(datalist_items)} images in {where} are unusable; see the warnings above.")
    return report
