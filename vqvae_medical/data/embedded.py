"""Default data that a plain ``pip install`` brings: the MNI152 T1 template shipped inside ``nilearn``.

This is ONE brain image (the ICBM 2009a nonlinear symmetric average of 152 adults, 1 mm, 197x233x189).
Its slices and augmented copies are good for smoke tests, demos and a first training run on a fresh machine;
they are not independent subjects, so validation/test scores on them say little about generalisation.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vqvae_medical.data.checks import DataError

__all__ = [
    "MNI152_T1_FILE",
    "PLANES",
    "mni152_slices",
    "mni152_volume_path",
    "mni152_volumes",
]

MNI152_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
"""File name of the template inside ``nilearn/datasets/data``."""

_GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")  # locate the package without importing it (slow)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "nilearn is not installed, so the embedded MNI152 template is missing. Run pip install nilearn."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def mni152_volume_path() -> str:
    """Path of the MNI152 T1 template (197x233x189, 1 mm, uint8, RAS) shipped with nilearn.

    Raises:
        DataError: nilearn or the file is missing.
    """
    path = _nilearn_data_dir() / MNI152_T1_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing from the nilearn install. Reinstall nilearn (pip install -U nilearn).")
    return str(path)


#: the planes :func:`mni152_slices` can cut: name -> (RAS axis held fixed, letter of the file name)
PLANES = {"axial": (2, "z"), "coronal": (1, "y"), "sagittal": (0, "x")}


def _brain_area_per_slice(axis: int = 2) -> np.ndarray:
    """Number of voxels with grey+white matter probability above one half, per slice along RAS ``axis``."""
    import nibabel as nib

    base = _nilearn_data_dir()
    gm, wm = (np.asarray(nib.load(str(base / f)).dataobj, dtype=np.float32) for f in (_GM_FILE, _WM_FILE))
    top = max(float(gm.max()), float(wm.max()), 1e-6)
    return ((gm + wm) > 0.5 * top).sum(axis=tuple(a for a in range(3) if a != axis))


def _view(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One slice of a RAS ``[x, y, z]`` volume, rows first, in neurological convention: axial rows run anterior
    (top) to posterior, coronal and sagittal rows superior (top) to inferior; columns run from the patient's left
    to right (axial, coronal) or posterior to anterior (sagittal)."""
    if plane == "axial":
        return volume[:, :, index].T[::-1, :]
    if plane == "coronal":
        return volume[:, index, :].T[::-1, :]
    return volume[index, :, :].T[::-1, :]


def _interleaved_split(items: list[dict], every: int = 8) -> dict[str, list[dict]]:
    """Item ``i`` goes to validation when ``i % every == every // 2 - 1``, test when ``i % every == every - 1``."""
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for i, item in enumerate(items):
        r = i % every
        section = "validation" if r == every // 2 - 1 else "test" if r == every - 1 else "training"
        out[section].append(item)
    return {k: v for k, v in out.items() if v}


def _png_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (im.height, im.width) if im.mode == "L" else None
    except Exception:
        return None


def mni152_slices(
    out_dir: str | os.PathLike,
    n_slices: int = 64,
    size: Sequence[int] = (128, 128),
    min_brain_fraction: float = 0.25,
    planes: Sequence[str] = ("axial",),
) -> dict[str, list[dict]]:
    """Write slices of the MNI152 T1 template as 8-bit grey PNGs and return their datalist.

    For each of ``planes`` (``"axial"``, ``"coronal"``, ``"sagittal"``): slices whose grey+white matter area is
    below ``min_brain_fraction`` of that plane's largest are skipped; of the rest ``n_slices`` evenly spaced ones
    (all when fewer) are taken. Each slice is shown rows first (axial: anterior at the top; coronal and sagittal:
    superior at the top; patient's left on the image's left), padded to a square with zeros and resized with area
    averaging to ``size``; intensities are the template's (0..255, one scale for all slices). Files are named
    ``mni152_{plane}_{axis}{index:03d}.png`` (e.g. ``mni152_axial_z070.png``); existing files of the right size
    are reused, so calling again is cheap.

    The split is interleaved by slice position within each plane: of every 8 consecutive chosen slices the 4th
    goes to validation and the 8th to test (64 slices -> 48/8/8 per plane). Neighbouring slices of one brain are
    similar, so validation/test are not independent of training.

    Args:
        out_dir: folder for the PNGs (created).
        n_slices: number of slices to write per plane.
        size: PNG size ``(H, W)``.
        min_brain_fraction: brain area threshold relative to the plane's largest slice.
        planes: planes to cut, in this order in the datalist.

    Returns:
        datalist with ``"training"``, ``"validation"``, ``"test"``; items have ``"image"`` and ``"subject"``
        (``"MNI152"``).
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}.")
    unknown = [p for p in planes if p not in PLANES]
    if unknown or not planes:
        raise ValueError(f"planes must be a non-empty selection of {sorted(PLANES)}, got {list(planes)}.")
    height, width = (int(s) for s in size)
    out = Path(out_dir).absolute()
    split: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for plane in planes:
        axis, letter = PLANES[plane]
        area = _brain_area_per_slice(axis)
        eligible = np.nonzero(area >= min_brain_fraction * area.max())[0]
        chosen = eligible[
            np.unique(np.round(np.linspace(0, len(eligible) - 1, min(n_slices, len(eligible)))).astype(int))
        ]
        paths = [out / f"mni152_{plane}_{letter}{int(i):03d}.png" for i in chosen]
        if not all(p.is_file() and _png_size(p) == (height, width) for p in paths):
            _write_slices(out, plane, chosen, paths, (height, width))
        for section, items in _interleaved_split([{"image": str(p), "subject": "MNI152"} for p in paths]).items():
            split[section] += items
    return {k: v for k, v in split.items() if v}


def _write_slices(out: Path, plane: str, chosen: np.ndarray, paths: list[Path], size: tuple[int, int]) -> None:
    import nibabel as nib
    import torch
    from monai.transforms import Resize, SpatialPad
    from PIL import Image

    volume = np.asarray(nib.load(mni152_volume_path()).dataobj, dtype=np.float32)  # RAS, [x, y, z]
    scale = 255.0 / max(float(volume.max()), 1e-6)
    stack = np.stack([_view(volume, plane, int(i)) for i in chosen]) * scale
    side = max(stack.shape[1:])
    stack = SpatialPad(spatial_size=(side, side))(torch.from_numpy(np.ascontiguousarray(stack)))
    stack = Resize(spatial_size=size, mode="area")(stack)
    pixels = np.clip(np.rint(np.asarray(stack)), 0, 255).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    for path, array in zip(paths, pixels, strict=True):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(array, mode="L").save(tmp, format="PNG")
        os.replace(tmp, path)  # atomic, so parallel callers never read a half-written file


def mni152_volumes(
    out_dir: str | os.PathLike,
    n_volumes: int = 8,
    pixdim: float = 2.0,
    crop_fraction: float = 0.9,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Write augmented copies of the MNI152 T1 template as NIfTI volumes and return their datalist.

    The template is resampled to ``pixdim`` mm (area averaging); volume 0 is its centred crop of
    ``crop_fraction`` of each side, the others are crops of the same size at random (seeded) offsets, with the
    odd ones mirrored left-right (data flipped, affine kept, so the anatomy is mirrored). These are copies of
    ONE brain, not independent subjects: a tiny default for smoke tests and demos of the 3D models only.
    Files are ``mni152_aug{i:02d}.nii.gz`` (uint8, RAS); existing files of the right shape are reused.

    The last volume is the test set, the one before it validation, the rest training (8 -> 6/1/1).

    Args:
        out_dir: folder for the volumes (created).
        n_volumes: number of volumes, at least 3.
        pixdim: voxel size in mm.
        crop_fraction: crop size as a fraction of the resampled size, in ``(0, 1]``.
        seed: seed of the crop offsets.

    Returns:
        datalist with ``"training"``, ``"validation"``, ``"test"``; items have ``"image"`` and ``"subject"``
        (``"MNI152"``).
    """
    import nibabel as nib

    if n_volumes < 3:
        raise ValueError(f"n_volumes must be at least 3 (training, validation, test), got {n_volumes}.")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    if pixdim <= 0:
        raise ValueError(f"pixdim must be positive, got {pixdim}.")
    template = nib.load(mni152_volume_path())
    zooms = np.asarray(template.header.get_zooms()[:3], dtype=float)
    full = tuple(max(1, int(round(s * z / pixdim))) for s, z in zip(template.shape[:3], zooms, strict=False))
    crop = tuple(max(1, int(s * crop_fraction)) for s in full)
    out = Path(out_dir).absolute()
    paths = [out / f"mni152_aug{i:02d}.nii.gz" for i in range(n_volumes)]
    if not all(p.is_file() and tuple(nib.load(str(p)).shape) == crop for p in paths):
        _write_volumes(template, full, crop, paths, seed)
    items = [{"image": str(p), "subject": "MNI152"} for p in paths]
    return {"training": items[:-2], "validation": [items[-2]], "test": [items[-1]]}


def _write_volumes(template, full: tuple, crop: tuple, paths: list[Path], seed: int) -> None:
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Resize

    data = np.asarray(template.dataobj, dtype=np.float32)[None]
    img = MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(template.affine, dtype=torch.float64))
    img = Orientation(axcodes="RAS", labels=None)(img)
    img = Resize(spatial_size=full, mode="area")(img)
    volume, affine = np.asarray(img[0]), np.asarray(img.affine, dtype=np.float64)
    volume = np.clip(np.rint(volume * 255.0 / max(float(volume.max()), 1e-6)), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        slack = [f - c for f, c in zip(full, crop, strict=True)]
        start = [s // 2 for s in slack] if i == 0 else [int(rng.integers(0, s + 1)) for s in slack]
        block = volume[tuple(slice(b, b + c) for b, c in zip(start, crop, strict=True))]
        if i % 2 == 1:
            block = block[::-1]  # mirror the anatomy left-right; the affine is kept on purpose
        shift = np.eye(4)
        shift[:3, 3] = start
        nii = nib.Nifti1Image(np.ascontiguousarray(block), affine @ shift)
        nii.header.set_xyzt_units("mm")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
        nib.save(nii, str(tmp))
        os.replace(tmp, path)
