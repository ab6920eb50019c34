"""Write 2D NIfTI axial slices through the brain of the IXI T1 volumes, in the HIPMRI split-folder layout.

Input: ``../shared/data/ixi_t1_2mm/t1/IXI*_T1.nii.gz`` (120 x 120 x 90 at 2 mm, not skull-stripped). Output::

    <output_dir>/keras_slices_train/IXI012-HH-1211_T1_slice_071.nii.gz
    <output_dir>/keras_slices_validate/...
    <output_dir>/keras_slices_test/...

the layout of the HIPMRI prostate slices (``keras_slices_{train,validate,test}`` of 2D ``.nii.gz``), which
``vqvae_medical.data.build_datalist`` detects as ``"split"``; the subject id (``IXI012``) is parsed from the name.

Each volume is brought to RAS (``nibabel.as_closest_canonical``). The axial slices kept are those from
``top_margin_mm`` to ``top_margin_mm + depth_mm`` below the top of the head (the highest axial slice with more
than 5% of its area above 10% of the volume's 99th percentile), so every subject contributes slices from just
under the vertex down to the upper cerebellum, whatever the head's position in the field of view. A slice is
stored as a 2D float32 array in radiological display order: rows run anterior -> posterior, columns patient
right -> left; the left-right axis is zero-padded (centred) to ``pad_to`` so both sizes are multiples of 8
(90 -> 96, giving 120 x 96 slices). The slice's affine maps its pixels to the same world (scanner RAS)
coordinates as the source voxels: ``affine_2d = affine_ras @ M`` where ``M`` maps ``(row, col, 0)`` to the
source voxel index (padding shifts the origin, it does not rescale), so the slices overlay the source volume.

Subjects are shuffled with ``--seed`` and split into ``--n-test`` test and ``--n-val`` validation subjects, the
rest training; no subject has slices in two folders.

Usage::

    python benchmarks/make_ixi_slices.py --output-dir $TMPDIR/ixi_slices
    python benchmarks/make_ixi_slices.py --output-dir out --n-test 6 --n-val 4 --stride 2
"""

from __future__ import annotations

import argparse
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from vqvae_medical.utils.io import atomic_write_json

__all__ = ["DEFAULT_SOURCE", "SPLIT_FOLDERS", "head_top", "axial_slices", "split_subjects", "make_slices", "main"]

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi_t1_2mm"
SPLIT_FOLDERS = {"training": "keras_slices_train", "validation": "keras_slices_validate", "test": "keras_slices_test"}


def head_top(volume: np.ndarray, fraction: float = 0.05) -> int:
    """Index of the highest axial slice (last axis of a RAS volume) with more than ``fraction`` of head voxels."""
    threshold = 0.1 * np.percentile(volume, 99)
    area = (volume > threshold).mean(axis=(0, 1))
    rows = np.nonzero(area > fraction)[0]
    if rows.size == 0:
        raise ValueError("no head found in the volume (empty or constant image).")
    return int(rows.max())


def axial_slices(
    image: nib.Nifti1Image,
    top_margin_mm: float = 8.0,
    depth_mm: float = 116.0,
    stride: int = 1,
    pad_to: int | None = 96,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Axial slices through the brain of one volume.

    Args:
        image: a 3D NIfTI image (any orientation).
        top_margin_mm: start this far below the top of the head (skips the scalp and skull cap).
        depth_mm: extent of the slab, downwards from the start.
        stride: keep every ``stride``-th slice.
        pad_to: zero-pad the left-right axis (centred) to this many columns; ``None`` keeps it.

    Returns:
        ``(k, slice, affine)`` for each slice, ``k`` the axial index in the RAS volume, ``slice`` a float32
        ``rows x cols`` array (rows anterior -> posterior, columns right -> left) and ``affine`` its 4x4 affine.
    """
    ras = nib.as_closest_canonical(image)
    volume = np.asarray(ras.get_fdata(dtype=np.float32))
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}.")
    nx, ny, nz = volume.shape
    dz = float(np.linalg.norm(ras.affine[:3, 2]))
    top = head_top(volume)
    start = top - int(round(top_margin_mm / dz))
    stop = max(start - int(round(depth_mm / dz)), -1)
    cols = nx if pad_to is None else max(int(pad_to), nx)
    offset = (cols - nx) // 2
    out = []
    for k in range(start, stop, -int(stride)):
        if not 0 <= k < nz:
            continue
        # slice[row, col] = volume[x = nx - 1 - (col - offset), y = ny - 1 - row, z = k]
        data = np.zeros((ny, cols), dtype=np.float32)
        data[:, offset : offset + nx] = volume[::-1, ::-1, k].T
        to_voxel = np.array(
            [
                [0.0, -1.0, 0.0, nx - 1 + offset],  # x from col
                [-1.0, 0.0, 0.0, ny - 1],  # y from row
                [0.0, 0.0, 1.0, k],  # z fixed (third index 0)
                [0.0, 0.0, 0.0, 1.0],
            ]
        )
        out.append((k, data, ras.affine @ to_voxel))
    return out


def split_subjects(subjects: Sequence[str], n_test: int, n_val: int, seed: int = 0) -> dict[str, list[str]]:
    """Shuffle sorted subjects with ``seed``; the first ``n_test`` are test, the next ``n_val`` validation."""
    order = sorted(subjects)
    if n_test + n_val >= len(order):
        raise ValueError(f"{len(order)} subjects are too few for {n_test} test and {n_val} validation subjects.")
    random.Random(seed).shuffle(order)
    return {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test : n_test + n_val]),
        "training": sorted(order[n_test + n_val :]),
    }


def make_slices(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    n_test: int = 6,
    n_val: int = 4,
    seed: int = 0,
    max_subjects: int | None = None,
    **slice_kwargs,
) -> dict[str, list[str]]:
    """Slice every ``IXI*_T1.nii.gz`` under ``source_dir`` (or its ``t1/`` folder) into the split folders.

    Args:
        source_dir: the IXI folder (``t1/`` inside it is used when present).
        output_dir: where the three split folders are written (existing slices are overwritten).
        n_test: test subjects.
        n_val: validation subjects.
        seed: seed of the subject split.
        max_subjects: use only the first subjects (sorted by name), for quick tests.
        slice_kwargs: passed to :func:`axial_slices`.

    Returns:
        the subject ids of each section (``training``, ``validation``, ``test``).
    """
    source = Path(source_dir)
    if (source / "t1").is_dir():
        source = source / "t1"
    files = sorted(source.glob("IXI*_T1.nii.gz"))
    if max_subjects:
        files = files[:max_subjects]
    if not files:
        raise FileNotFoundError(f"no IXI*_T1.nii.gz files in {source}.")
    by_subject = {re.match(r"IXI\d+", f.name).group(0): f for f in files}
    splits = split_subjects(list(by_subject), n_test, n_val, seed)
    output = Path(output_dir)
    for section, subjects in splits.items():
        folder = output / SPLIT_FOLDERS[section]
        folder.mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            path = by_subject[subject]
            stem = path.name[: -len(".nii.gz")]
            for k, data, affine in axial_slices(nib.load(path), **slice_kwargs):
                nib.save(nib.Nifti1Image(data, affine), folder / f"{stem}_slice_{k:03d}.nii.gz")
    atomic_write_json(splits, output / "subjects.json")
    return splits


def main(argv: Sequence[str] | None = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-dir", default=str(DEFAULT_SOURCE), help="IXI T1 2 mm folder")
    parser.add_argument("--output-dir", required=True, help="folder of the keras_slices_* split folders")
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--n-val", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-margin-mm", type=float, default=8.0)
    parser.add_argument("--depth-mm", type=float, default=116.0)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--pad-to", type=int, default=96)
    parser.add_argument("--max-subjects", type=int, default=None)
    args = parser.parse_args(argv)
    splits = make_slices(
        args.source_dir,
        args.output_dir,
        n_test=args.n_test,
        n_val=args.n_val,
        seed=args.seed,
        max_subjects=args.max_subjects,
        top_margin_mm=args.top_margin_mm,
        depth_mm=args.depth_mm,
        stride=args.stride,
        pad_to=args.pad_to,
    )
    for section, subjects in splits.items():
        n = len(list((Path(args.output_dir) / SPLIT_FOLDERS[section]).glob("*.nii.gz")))
        print(f"{SPLIT_FOLDERS[section]}: {len(subjects)} subjects, {n} slices")
    return splits


if __name__ == "__main__":
    main()
