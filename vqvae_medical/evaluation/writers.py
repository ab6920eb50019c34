"""Write reconstructions and code maps next to each other, in the format of each input file.

MONAI's ``SaveImaged`` writes every item with one fixed extension and writer; a folder of mixed PNG, JPEG and NIfTI
inputs should come back in the same formats, with NIfTI outputs carrying the input's header and affine. This
handler undoes the spatial preprocessing (``Compose.inverse`` on the MetaTensor's applied operations) and writes:

- PNG/JPEG/BMP/TIFF inputs -> ``<name>_recon.png`` (8-bit) and ``<name>_codes.png`` (16-bit code indices);
- NIfTI inputs -> ``<name>_recon.nii.gz`` with the input's affine and header, intensities mapped back to the
  input's range, and ``<name>_codes.nii.gz`` (int16, affine scaled to the code grid; for 3D volumes the affine of
  the preprocessed network grid, reoriented/resampled, scaled by the downsampling factor);
- other formats -> NIfTI through the same path.

Every input gets its own outputs: the input's folder below ``input_dir`` is kept under ``output_dir``
(``sub1/x.jpg`` -> ``sub1/x_recon.png``), and inputs that would still share a name (``y.jpg`` and ``y.png``) keep
their extension in it (``y_jpg_recon.png``, ``y_png_recon.png``). ``manifest.csv`` in ``output_dir`` maps each
input to its outputs.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from PIL import Image

__all__ = ["ReconstructionWriter", "output_stem", "output_names"]

logger = logging.getLogger(__name__)
_RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def output_stem(path: str | os.PathLike) -> str:
    """File name without its image extension (``.nii.gz`` counts as one)."""
    name = os.path.basename(os.fspath(path))
    for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mha", ".mhd", ".nrrd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _relative_stem(src: str, root: str | None) -> str:
    """``src``'s stem, under its folder relative to ``root`` when it lies below ``root`` (``/``-separated)."""
    stem = output_stem(src)
    if root:
        rel = os.path.relpath(os.path.dirname(os.path.abspath(src)), os.path.abspath(root))
        if rel != "." and not rel.startswith(".."):
            return Path(rel, stem).as_posix()
    return stem


def _extension(src: str) -> str:
    name = os.path.basename(src).lower()
    stem = output_stem(src)
    return name[len(stem) :].lstrip(".").replace(".", "_") or "file"


def _first(path: Any) -> str:
    """A datalist entry's file (the first one of a multi-file volume)."""
    return os.fspath(path[0] if isinstance(path, (list, tuple)) else path)


def output_names(inputs: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> dict[str, str]:
    """Unique output stem (relative path without suffix) of every input file.

    The input's folder below ``root`` is kept; inputs that still share a stem (``y.jpg`` and ``y.png``) get their
    extension appended (``y_jpg``, ``y_png``), and any clash left after that a counter. The result depends on the
    set of inputs only, not on their order.
    """
    root = os.fspath(root) if root not in (None, "", "None") and os.path.isdir(os.fspath(root)) else None
    srcs = sorted({os.fspath(p) for p in inputs})
    stems = {s: _relative_stem(s, root) for s in srcs}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    names: dict[str, str] = {}
    taken: set[str] = set()
    for s in srcs:
        name = stems[s] if counts[stems[s].lower()] == 1 else f"{stems[s]}_{_extension(s)}"
        base, i = name, 1
        while name.lower() in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name.lower())
        names[s] = name
    return names


class ReconstructionWriter:
    """Handler of an inference evaluator that writes each reconstruction and its code map(s).

    Args:
        output_dir: folder of the outputs.
        transform: the preprocessing ``Compose``, inverted on the prediction so it returns to the input's grid.
        image_key: batch key of the (MetaTensor) inputs.
        inputs: the datalist (items with ``image_key``, or paths) of the run, to name the outputs before the first
            one is written (see :func:`output_names`); without it names are made unique as inputs arrive.
        input_dir: folder whose sub-folder structure is kept under ``output_dir``.
        manifest: file name of the input -> outputs table in ``output_dir`` (``None``: none).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        transform: Any = None,
        image_key: str = "image",
        inputs: Sequence[Any] | None = None,
        input_dir: str | os.PathLike | None = None,
        manifest: str | None = "manifest.csv",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.transform = transform
        self.image_key = image_key
        self.input_dir = input_dir
        self.manifest = manifest
        self.written: list[Path] = []
        self.outputs: dict[str, list[Path]] = {}
        paths = [os.path.abspath(_first(i[image_key] if isinstance(i, dict) else i)) for i in (inputs or [])]
        self.names = output_names(paths, input_dir) if paths else {}
        self._taken = {n.lower() for n in self.names.values()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write_manifest)

    def _name(self, src: str) -> str:
        """Output stem of ``src``, unique within this run."""
        src = os.path.abspath(src)
        if src not in self.names:
            base = _relative_stem(src, self.input_dir if self.input_dir and os.path.isdir(self.input_dir) else None)
            name, i = base, 1
            while name.lower() in self._taken:
                i += 1
                name = f"{base}_{_extension(src)}" if i == 2 else f"{base}_{_extension(src)}_{i - 1}"
            self._taken.add(name.lower())
            self.names[src] = name
        return self.names[src]

    def _target(self, src: str, suffix: str) -> Path:
        path = self.output_dir / f"{self._name(src)}_{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.outputs.setdefault(src, []).append(path)
        self.written.append(path)
        return path

    def write_manifest(self, engine: Engine | None = None) -> Path | None:
        """``<output_dir>/<manifest>``: one row per input with its reconstruction and code map files (relative)."""
        if not self.manifest or not self.outputs:
            return None
        path = self.output_dir / self.manifest
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["input", "reconstruction", "codes"])
            for src, outs in self.outputs.items():
                rel = [p.relative_to(self.output_dir).as_posix() for p in outs]
                writer.writerow([src, rel[0], ";".join(rel[1:])])
        logger.info(f"wrote {len(self.outputs)} reconstructions to {self.output_dir} (inputs listed in {path})")
        return path

    def _invert(self, pred: torch.Tensor, image: MetaTensor) -> torch.Tensor:
        if self.transform is None or not isinstance(image, MetaTensor) or not image.applied_operations:
            return pred
        restored = MetaTensor(
            pred.detach().cpu(), meta=dict(image.meta), applied_operations=list(image.applied_operations)
        )
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
        factors = [int(np.ceil(s / max(c, 1))) for s, c in zip(shape, code_shape, strict=False)]
        voxel_to_grid = np.diag([*factors, 1.0])
        voxel_to_grid[:3, 3] = [(f - 1) / 2.0 for f in factors]
        return affine @ voxel_to_grid

    def _code_names(self, n: int) -> list[str]:
        return ["codes"] if n == 1 else ["codes_top", "codes_bottom"] if n == 2 else [f"codes_{i}" for i in range(n)]

    def _write_raster(self, src: str, pred: np.ndarray, codes: list[np.ndarray]) -> None:
        img = np.clip(pred, 0.0, 1.0)
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
        Image.fromarray(np.round(img * 255.0).astype(np.uint8)).save(self._target(src, "recon.png"))
        for name, c in zip(self._code_names(len(codes)), codes, strict=True):
            Image.fromarray(c.astype(np.uint16)).save(self._target(src, f"{name}.png"))

    def _write_nifti(self, src: str, pred: np.ndarray, codes: list[np.ndarray], grid=None) -> None:
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
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine, header), self._target(src, "recon.nii.gz"))
        for name, c in zip(self._code_names(len(codes)), codes, strict=True):
            scale = np.ones(4)
            scale[: c.ndim] = [d / max(cs, 1) for d, cs in zip(data.shape[: c.ndim], c.shape, strict=True)]
            code_affine = affine @ np.diag(scale)
            if grid is not None and c.ndim == 3:  # 3D codes live on the reoriented/resampled network grid
                code_affine = self._code_affine(grid, c.shape)
            nib.save(nib.Nifti1Image(c.astype(np.int16), code_affine), self._target(src, f"{name}.nii.gz"))
