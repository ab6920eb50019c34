"""The anomaly config of the prior bundle: checks of the prior and the inputs against the stage-1 record, and the
run that writes maps, healed images, ``scores.csv`` and a figure (the method: :mod:`.anomaly`; the threshold:
:mod:`.anomaly_calibration`).
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
from monai.transforms import Compose
from PIL import Image
from torch import nn

from vqvae_medical.data.checks import NIFTI_EXTENSIONS, DataError, inspect_image
from vqvae_medical.data.datalists import list_images
from vqvae_medical.data.lists import inference_datalist
from vqvae_medical.evaluation.figures import save_anomaly_figure
from vqvae_medical.evaluation.writers import output_names
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.stages.prior.anomaly import IMAGE_SCORES, anomaly_maps
from vqvae_medical.stages.prior.anomaly_calibration import _where, resolve_thresholds
from vqvae_medical.stages.prior.codes import check_codebooks
from vqvae_medical.stages.prior.network import prior_of
from vqvae_medical.training.runtime import SettingError, check_writable
from vqvae_medical.utils.io import atomic_write

__all__ = ["anomaly_inputs", "check_output_dir", "check_prior", "run_anomaly", "to_input_space"]

logger = logging.getLogger(__name__)


def check_output_dir(path: str | os.PathLike) -> bool:
    """Stop before any work when the anomaly folder cannot be written (one line naming it and ``output_dir``)."""
    return check_writable(path, setting="output_dir")


def check_prior(
    network: nn.Module, autoencoder: FrozenAutoencoder, num_embeddings: int | Sequence[int], class_label: int | None
) -> bool:
    """Stop with one line when the prior cannot score this autoencoder's codes: another codebook size or number of
    levels (:func:`~vqvae_medical.stages.prior.codes.check_codebooks`), or a class-conditioned prior without
    ``class_label`` (the class of the healthy images). Returns ``True`` (for config expressions)."""
    try:
        check_codebooks(autoencoder, num_embeddings)
    except ValueError as e:
        raise SettingError(str(e)) from e
    conditioned = bool(prior_of(network).class_conditioned)
    if conditioned and class_label is None:
        raise SettingError("the prior is class-conditioned: set --class_label to the class of healthy images.")
    if not conditioned and class_label is not None:
        raise SettingError(f"the prior has no class conditioning: leave class_label null (got {class_label}).")
    return True


def anomaly_inputs(
    input_dir: str | os.PathLike | Sequence[str] | None, autoencoder: FrozenAutoencoder, skip_bad: bool = False
) -> list[dict]:
    """Items ``{"image": path}`` of the inputs, checked against the stage-1 record: 2D only, the record's channel
    count, and the record's image size when its preprocessing keeps each image's own size.

    Raises:
        DataError: no input, an empty folder, an unreadable file, a 3D volume, another size or channel count; one
            line naming the file and the fix.
        SettingError: a 3D autoencoder.
    """
    if autoencoder.spatial_dims != 2:
        raise SettingError(
            f"autoencoder_dir {_where(autoencoder)} is a 3D VQ-VAE, but anomaly maps need a 2D prior over its codes "
            "and the prior bundle models 2D code maps only: use a vqvae or vqvae2 stage-1 folder."
        )
    if isinstance(input_dir, (str, os.PathLike)) and Path(input_dir).is_dir():
        paths = list_images(input_dir)
    elif (
        isinstance(input_dir, (str, os.PathLike)) and Path(input_dir).is_file() and not str(input_dir).endswith(".json")
    ):
        paths = [os.fspath(input_dir)]
    else:
        paths = []
    for p in paths:  # a volume gets this line, not the generic "use a 3D config" of the data checks
        if str(p).lower().endswith(NIFTI_EXTENSIONS):
            info = inspect_image(p)
            if len(info.squeezed_shape(2)) > 2:
                raise DataError(
                    f"{p}: is a 3D volume {info.spatial_shape}, but anomaly maps are 2D only (the prior models 2D code "
                    "maps): give 2D slices (e.g. python benchmarks/make_ixi_slices.py writes NIfTI slices of volumes)."
                )
    items = inference_datalist(input_dir, spatial_dims=2, channels=autoencoder.in_channels, skip_bad=skip_bad)
    want_size = autoencoder.image_size if autoencoder.preprocessing.get("spatial_size") is None else None
    kept = []
    for item in items:
        path = os.fspath(item["image"])
        info = inspect_image(path)
        channels = info.channels - (1 if info.alpha == "opaque" else 0)
        problem = None
        if channels != autoencoder.in_channels:
            problem = (
                f"{path}: has {channels} channel(s), but the stage-1 model of {_where(autoencoder)} was trained on "
                f"{autoencoder.in_channels}-channel images: give images of its modality and channel count"
            )
        elif want_size is not None and list(info.squeezed_shape(2)) != list(want_size):
            problem = (
                f"{path}: has size {list(info.squeezed_shape(2))}, but the stage-1 model of {_where(autoencoder)} "
                f"and its prior were trained on {list(want_size)} images: pad/crop or resample it to that size"
            )
        if problem is None:
            kept.append(item)
        elif skip_bad:
            logger.warning(f"skipping {problem}.")
        else:
            raise DataError(f"{problem}, or set skip_bad_files=true to skip it.")
    if not kept:
        raise DataError(f"{input_dir}: none of the {len(items)} images can be used; see the warnings above.")
    return kept


def _png(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    arr = image.clamp(0, 1).numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[:3], 0, -1)
    return np.round(arr * 255.0).astype(np.uint8)


def _nifti(image: torch.Tensor, src: str, path: Path, to_input_range: bool) -> None:
    """``image`` ``[C, H, W]`` (on the input's grid) as NIfTI with the input's affine and header; with
    ``to_input_range`` the [0, 1] intensities are mapped back to the input's own range (undoing the min-max
    scaling of the preprocessing)."""
    ref = nib.load(src)
    arr = image.numpy().astype(np.float32)
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if to_input_range:
        values = np.asarray(ref.dataobj, dtype=np.float32)
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        data = data * (hi - lo) + lo
    if data.size == int(np.prod(ref.shape)) and data.shape != tuple(ref.shape):
        data = data.reshape(ref.shape)  # e.g. an H x W x 1 slice
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    header["scl_slope"], header["scl_inter"] = np.nan, np.nan
    out = type(ref)(data.astype(np.float32), ref.affine, header)
    atomic_write(path, lambda f: f.write(gzip.compress(out.to_bytes(), compresslevel=6)))


def to_input_space(transform: Compose, tensor: torch.Tensor, image: Any) -> torch.Tensor:
    """``tensor`` ``[C, h, w]`` on the stage-1 grid of the preprocessed ``image`` (a MetaTensor) brought back to the
    input's grid: MONAI's ``Compose.inverse`` of the spatial preprocessing it recorded (``ResizeWithPadOrCrop``:
    the cropped-off border comes back as 0; ``Resize``: resampled back). Unchanged when nothing was resized."""
    if not isinstance(image, MetaTensor) or not image.applied_operations:
        return tensor
    ops = copy.deepcopy(image.applied_operations)  # inverting pops from them: the image stays invertible
    restored = MetaTensor(tensor.detach().cpu(), meta=dict(image.meta), applied_operations=ops)
    return torch.as_tensor(transform.inverse({"image": restored})["image"]).float()


def _healthy_percentile(score: float, healthy: Sequence[float]) -> float:
    """Share of the held-out healthy scores below ``score`` (ties count half)."""
    values = np.asarray(healthy, dtype=np.float64)
    return float(((values < score).sum() + 0.5 * (values == score).sum()) / max(len(values), 1))


def run_anomaly(
    autoencoder: FrozenAutoencoder,
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    calibration: Mapping[str, Any],
    input_dir: str | os.PathLike | None = None,
    nll_threshold: float | Sequence[float] | None = None,
    image_score: str = "map_top",
    top_fraction: float = 0.01,
    mask_sigma: float = 0.0,
    temperature: float = 1.0,
    class_label: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    num_figure: int = 4,
    score_calibration: Mapping[str, Any] | None = None,
    score_quantile: float = 0.95,
    max_unlikely_share: float = 0.25,
    skip_bad: bool = False,
) -> Path:
    """Anomaly maps of ``items``, written in each input's space (the stage-1 resizing undone, :func:`to_input_space`):
    per 2D raster input ``<name>_anomaly.png`` (the map, 8-bit, 255 = an intensity difference of 1) and
    ``<name>_healed.png``; per NIfTI input ``<name>_anomaly.nii.gz`` (float32, the same units) and
    ``<name>_healed.nii.gz`` (the input's intensity range) with the input's affine and header. Input folders are
    kept and same-named inputs kept apart (:func:`~vqvae_medical.evaluation.writers.output_names`). ``scores.csv``
    has one row per input: ``path``, ``score`` (``image_score``), every score, ``resampled`` (share of codes
    redrawn), ``map``, ``healed`` and, with ``score_calibration`` (the held-out healthy images' scores,
    :func:`~vqvae_medical.stages.prior.anomaly_calibration.load_score_calibration`), ``healthy_percentile``,
    ``image_threshold`` (their ``score_quantile``-th quantile) and ``anomalous``; then the settings. ``figure.png``:
    input, healed, map, overlay of the first ``num_figure`` inputs. Returns the CSV's path.

    An input with more than ``max_unlikely_share`` of its codes above the NLL threshold is not of the modality and
    preprocessing the models learned (a file cannot say its modality): it stops the run with one line naming it
    (its outputs are not written; earlier inputs' are), or with ``skip_bad`` it is skipped with a warning.
    """
    if image_score not in IMAGE_SCORES:
        raise SettingError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {image_score!r}.")
    if not 0 < score_quantile < 1:
        raise SettingError(f"score_quantile must be in (0, 1), got {score_quantile}.")
    if not 0 < max_unlikely_share <= 1:
        raise SettingError(f"max_unlikely_share must be in (0, 1], got {max_unlikely_share}.")
    levels = 2 if isinstance(autoencoder.num_embeddings, tuple) else 1
    thresholds = resolve_thresholds(calibration, nll_threshold, levels)
    healthy = None
    if score_calibration is not None:
        healthy = list(score_calibration["scores"][image_score])
        image_threshold = float(np.quantile(np.asarray(healthy, dtype=np.float64), score_quantile))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [os.path.abspath(os.fspath(i["image"])) for i in items]
    names = output_names(paths, input_dir)
    transform = autoencoder.transforms()
    loader = DataLoader(Dataset(list(items), transform), batch_size=batch_size, shuffle=False, num_workers=0)
    generator = torch.Generator(device=autoencoder.device).manual_seed(int(seed))
    settings = {
        "quantile": calibration.get("quantile"),
        "nll_threshold": ";".join(f"{t:.4g}" for t in thresholds),
        "image_score": image_score,
        "score_quantile": score_quantile if healthy is not None else None,
        "top_fraction": top_fraction,
        "mask_sigma": mask_sigma,
        "temperature": temperature,
        "seed": seed,
    }
    rows, shown = [], []
    for batch in loader:
        images = batch["image"]
        result = anomaly_maps(
            autoencoder, network, images, thresholds, class_label, temperature, mask_sigma, top_fraction, generator
        )
        for b, item in enumerate(decollate_batch(batch)):
            image = item["image"]
            src = os.path.abspath(str(image.meta["filename_or_obj"]))
            name = names.get(src, Path(src).stem)
            share = float(result.resampled[b])
            if share > max_unlikely_share:
                problem = (
                    f"{src}: {share:.0%} of its codes are unlikely under the prior (more than max_unlikely_share "
                    f"{max_unlikely_share}), so it is not of the modality and preprocessing that the stage-1 model of "
                    f"{_where(autoencoder)} and its prior learned: give such images"
                )
                if not skip_bad:
                    raise DataError(f"{problem}, or set skip_bad_files=true to skip it; max_unlikely_share 1 keeps it.")
                logger.warning(f"skipping {problem}.")
                continue
            amap, healed = (to_input_space(transform, t[b], image) for t in (result.maps, result.healed))
            if src.lower().endswith(NIFTI_EXTENSIONS):
                map_path, healed_path = out / f"{name}_anomaly.nii.gz", out / f"{name}_healed.nii.gz"
                _nifti(amap, src, map_path, to_input_range=False)
                _nifti(healed, src, healed_path, to_input_range=True)
            else:
                map_path, healed_path = out / f"{name}_anomaly.png", out / f"{name}_healed.png"
                _png(_to_uint8(amap), map_path)
                _png(_to_uint8(healed), healed_path)
            scores = {k: float(v[b]) for k, v in result.scores.items()}
            row = {
                "path": src,
                "score": scores[image_score],
                **{f"score_{k}": v for k, v in scores.items()},
                "resampled": float(result.resampled[b]),
                "map": map_path.relative_to(out).as_posix(),
                "healed": healed_path.relative_to(out).as_posix(),
            }
            if healthy is not None:
                row.update(
                    {
                        "healthy_percentile": _healthy_percentile(scores[image_score], healthy),
                        "image_threshold": image_threshold,
                        "anomalous": scores[image_score] > image_threshold,
                    }
                )
            rows.append({**row, **settings})
            if len(shown) < num_figure:
                shown.append((to_input_space(transform, image.as_tensor(), image), healed, amap, Path(src).name))
    if not rows:
        raise DataError(f"{input_dir}: none of the {len(paths)} images can be used; see the warnings above.")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write(out / "scores.csv", lambda f: f.write(buffer.getvalue().encode()))
    if shown:
        save_anomaly_figure(out / "figure.png", *zip(*shown, strict=True))
    logger.info(f"wrote anomaly maps of {len(rows)} images to {out} (scores in {csv_path})")
    return csv_path
