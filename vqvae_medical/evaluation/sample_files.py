"""Generated samples written as they come: one image file per sample, arrays streamed into ``.npy`` files, the first
few kept for a grid. Both stage-2 bundles sample through it, so the memory of a sampling run does not grow with the
number of samples and what was drawn before an interruption is on disk.

Every file is whole or absent: each image is written to a temporary name in its folder and renamed, and each
``.npy`` file is written under a temporary name and renamed when its last sample is in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["NpyWriter", "SampleFiles", "sample_digits", "save_sample_image"]


def sample_digits(total: int) -> int:
    """Digits of the sample numbers of a run of ``total`` samples (at least 3: ``sample_000``)."""
    return max(3, len(str(max(int(total) - 1, 0))))


def _temporary(path: Path) -> Path:
    """A temporary name in ``path``'s folder with the same extension (``.x.tmp.png``): readers of the folder skip
    it, and writers that go by the extension still know the format."""
    name = path.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{name[: len(name) - len(ext)]}.{os.getpid()}.tmp{ext}")


def save_sample_image(
    path: str | os.PathLike, image: torch.Tensor, voxel_size: Sequence[float] | float | None = None
) -> Path:
    """Write one sample ``[C, *spatial]`` with values in [0, 1]: 2D -> 8-bit grey or RGB PNG, 3D -> float32 NIfTI with
    affine ``diag(voxel_size)``; atomically (a temporary file in the same folder, then renamed).

    Args:
        path: the file, ``.png`` for a 2D image and ``.nii.gz`` for a volume.
        image: the sample (channels first).
        voxel_size: voxel spacing of a volume (one value or three), default 1.
    """
    import nibabel as nib
    from PIL import Image

    path = Path(path)
    arr = image.detach().float().cpu().numpy()
    tmp = _temporary(path)
    try:
        if arr.ndim == 3:
            pix = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[:3], 0, -1)
            Image.fromarray(np.round(np.clip(pix, 0, 1) * 255.0).astype(np.uint8)).save(tmp, format="PNG")
        elif arr.ndim == 4:
            vs = [1.0, 1.0, 1.0] if voxel_size is None else list(np.broadcast_to(np.asarray(voxel_size, float), (3,)))
            data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
            nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*vs, 1.0])), tmp)
        else:
            raise ValueError(f"a sample must be [C, H, W] or [C, D, H, W], got shape {list(arr.shape)}.")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class NpyWriter:
    """A ``.npy`` file of ``shape`` filled batch by batch (``np.load`` reads it, ``mmap_mode="r"`` without loading
    it): the header is written first, each batch is appended, and the file gets its name when the last row is in.

    Args:
        path: the ``.npy`` file.
        shape: ``[N, *row]`` of the whole array.
        dtype: its NumPy dtype.
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype: Any) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._tmp = _temporary(self.path)
        self._file: BinaryIO | None = open(self._tmp, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, rows: np.ndarray | torch.Tensor) -> None:
        """Append ``rows`` ``[n, *row]`` (cast to the file's dtype)."""
        if self._file is None:
            raise ValueError(f"{self.path} is closed.")
        rows = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if tuple(rows.shape[1:]) != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(
                f"{self.path}: rows of shape {list(rows.shape)} do not fit an array of {list(self.shape)} with "
                f"{self.rows} rows written."
            )
        self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> Path:
        """Flush, sync and rename the complete file to ``path``."""
        if self._file is None:
            return self.path
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written.")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and remove the incomplete file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)


class SampleFiles:
    """The files of one sampling run, written batch by batch: ``<prefix>_<n>.png`` (or ``.nii.gz``) per sample,
    ``<name>.npy`` per array of ``arrays`` (e.g. code maps), and the first ``keep`` images (and labels) kept in
    memory for a grid. Use as a context manager: on an exception the incomplete ``.npy`` files are removed (the
    sample images written so far stay: each is whole).

    Args:
        output_dir: the folder (it must exist and be writable).
        total: number of samples the run will add.
        prefix: file name prefix of the sample images; ``None`` writes no image files.
        keep: images (and labels) kept for the grid.
        voxel_size: voxel spacing of 3D samples.
        arrays: ``{name: (row shape, dtype)}`` of the arrays streamed to ``<output_dir>/<name>.npy``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total: int,
        prefix: str | None = "sample",
        keep: int = 16,
        voxel_size: Sequence[float] | float | None = None,
        arrays: Mapping[str, tuple[Sequence[int], Any]] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.total = int(total)
        self.prefix = prefix
        self.keep = int(keep)
        self.voxel_size = voxel_size
        self.count = 0
        self.kept: list[torch.Tensor] = []
        self.kept_labels: list[int] = []
        self.images: list[Path] = []
        self._digits = sample_digits(self.total)
        self._arrays = {
            name: NpyWriter(self.output_dir / f"{name}.npy", [self.total, *shape], dtype)
            for name, (shape, dtype) in (arrays or {}).items()
        }

    def __enter__(self) -> SampleFiles:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int] | None = None,
        arrays: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    ) -> None:
        """Write a batch: ``images`` ``[B, C, *spatial]`` in [0, 1], their ``labels`` (for the grid), the batch's
        rows of each array."""
        ext = ".png" if images.ndim == 4 else ".nii.gz"
        for i, image in enumerate(images):
            if self.prefix is not None:
                name = f"{self.prefix}_{self.count + i:0{self._digits}d}{ext}"
                self.images.append(save_sample_image(self.output_dir / name, image, self.voxel_size))
            if len(self.kept) < self.keep:
                self.kept.append(image.detach().float().cpu().clone())
                if labels is not None:
                    self.kept_labels.append(int(labels[i]))
        for name, rows in (arrays or {}).items():
            self._arrays[name].write(rows)
        self.count += len(images)

    def close(self) -> list[Path]:
        """Complete the ``.npy`` files; returns every file written (images, then arrays)."""
        return self.images + [writer.close() for writer in self._arrays.values()]

    def abort(self) -> None:
        """Remove the incomplete ``.npy`` files."""
        for writer in self._arrays.values():
            writer.abort()
