"""Write reconstructions and code maps next to each other, in the format of each input file.

MONAI's ``SaveImaged`` writes every item with one fixed extension and writer; a folder of mixed PNG, JPEG and NIfTI
inputs should come back in the same formats, with NIfTI outputs carrying the input's header and affine. This
handler undoes the spatial preprocessing (``Compose.inverse`` on the MetaTensor's applied operations) and writes:

- PNG/JPEG/BMP/TIFF inputs -> ``<name>_recon.png`` (8-bit) and ``<name>_codes.png`` (16-bit code indices);
- NIfTI inputs -> ``<name>_recon.nii.gz`` with the input's affine and header, intensities mapped back to the
  input's range, and ``<name>_codes.nii.gz`` (int16, affine scaled to the code grid; for 3D volumes the affine of
  the preprocessed network grid, reoriented/resampled, scaled by the downsampling factor);
- other formats -> NIfTI through the same path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from PIL import Image

__all__ = ["ReconstructionWriter", "output_stem"]

logger = logging.getLogger(__name__)
_RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def output_stem(path: str | os.PathLike) -> str:
    """File name without its image extension (``.nii.gz`` counts as one)."""
    name = os.path.basename(os.fspath(path))
    for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mha", ".mhd", ".nrrd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


class ReconstructionWriter:
    """Handler of an inference evaluator that writes each reconstruction and its code map(s).

    Args:
        output_dir: folder of the outputs.
        transform: the preprocessing ``Compose``, inverted on the prediction so it returns to the input's grid.
        image_key: batch key of the (MetaTensor) inputs.
    """

    def __init__(self, output_dir: str | os.PathLike, transform: Any = None, image_key: str = "image") -> None:
        self.output_dir = Path(output_dir)
        self.transform = transform
        self.image_key = image_key
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _invert(self, pred: torch.Tensor, image: MetaTensor) -> torch.Tensor:
        if self.transform is None or not isinstance(image, MetaTensor) or not image.applied_operations:
            return pred
        restored = MetaTensor(pred.detach().cpu(), meta=dict(image.meta), applied_operations=list(image.applied_operations))
        return self.transform.inverse({self.image_key: restored})[self.image_key]

    def __call__(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        batch_images = engine.state.batch[self.image_key]
        out = engine.state.output
        preds, indices = out["pred"], out["indices"]
        for b in range(preds.shape[0]):
            image = batch_images[b]
            src = str(image.meta.get("filename_or_obj", f"image_{engine.state.iteration}_{b}"))
            pred = self._invert(preds[b], image)
            codes = [idx[b].cpu().numpy() for idx in indices]
            if src.lower().endswith(_RASTER):
                self._write_raster(src, np.asarray(pred, dtype=np.float32), codes)
            else:
                self._write_nifti(src, np.asarray(pred, dtype=np.float32), codes, self._grid(image))

    @staticmethod
    def _grid(image: Any) -> tuple[np.ndarray, tuple[int, ...]] | None:
        """Affine and spatial shape of the preprocessed (network input) grid of a 3D volume, else ``None``."""
        if not isinstance(image, MetaTensor) or image.ndim != 4:
            return None
        return np.asarray(image.affine, dtype=np.float64), tuple(int(s) for s in image.shape[1:])

    @staticmethod
    def _code_affine(grid: tuple[np.ndarray, tuple[int, ...]], code_shape: tuple[int, ...]) -> np.ndarray:
        """World affine of a 3D code map: code voxel ``i`` covers voxels ``f*i .. f*i+f-1`` of the network input."""
        affine, shape = grid
        factors = [int(np.ceil(s / max(c, 1))) for s, c in zip(shape, code_shape)]
        voxel_to_grid = np.diag([*factors, 1.0])
        voxel_to_grid[:3, 3] = [(f - 1) / 2.0 for f in factors]
        return affine @ voxel_to_grid

    def _code_names(self, n: int) -> list[str]:
        return ["codes"] if n == 1 else ["codes_top", "codes_bottom"] if n == 2 else [f"codes_{i}" for i in range(n)]

    def _write_raster(self, src: str, pred: np.ndarray, codes: list[np.ndarray]) -> None:
        stem = output_stem(src)
        img = np.clip(pred, 0.0, 1.0)
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
        path = self.output_dir / f"{stem}_recon.png"
        Image.fromarray(np.round(img * 255.0).astype(np.uint8)).save(path)
        self.written.append(path)
        for name, c in zip(self._code_names(len(codes)), codes):
            cpath = self.output_dir / f"{stem}_{name}.png"
            Image.fromarray(c.astype(np.uint16)).save(cpath)
            self.written.append(cpath)

    def _write_nifti(self, src: str, pred: np.ndarray, codes: list[np.ndarray], grid=None) -> None:
        stem = output_stem(src)
        data = pred[0] if pred.shape[0] == 1 else np.moveaxis(pred, 0, -1)
        affine, header = np.eye(4), None
        if os.path.isfile(src) and src.lower().endswith((".nii", ".nii.gz")):
            ref = nib.load(src)
            affine, header = ref.affine, ref.header.copy()
            ref_data = np.asarray(ref.dataobj, dtype=np.float32)
            lo, hi = float(np.nanmin(ref_data)), float(np.nanmax(ref_data))
            data = data * (hi - lo) + lo
            if data.size == int(np.prod(ref.shape)) and data.shape != tuple(ref.shape):
                data = data.reshape(ref.shape)
            header.set_data_dtype(np.float32)
            header["scl_slope"], header["scl_inter"] = np.nan, np.nan
        path = self.output_dir / f"{stem}_recon.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine, header), path)
        self.written.append(path)
        for name, c in zip(self._code_names(len(codes)), codes):
            scale = np.ones(4)
            scale[: c.ndim] = [d / max(cs, 1) for d, cs in zip(data.shape[: c.ndim], c.shape)]
            code_affine = affine @ np.diag(scale)
            if grid is not None and c.ndim == 3:  # 3D codes live on the reoriented/resampled network grid
                code_affine = self._code_affine(grid, c.shape)
            cpath = self.output_dir / f"{stem}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(c.astype(np.int16), code_affine), cpath)
            self.written.append(cpath)
