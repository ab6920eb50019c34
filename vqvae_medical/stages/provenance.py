"""What a stage-2 model was built on: the identity of its frozen stage-1 autoencoder, recorded when it is trained and
checked when it is resumed or used.

:func:`autoencoder_identity` is the identity of a stage-1 folder (its record's ``identity_sha256``: weights,
architecture, preprocessing, image size, data and split; see
:func:`~vqvae_medical.stages.autoencoder.record.record_identity`). A stage-2 training run records it with its data
(:func:`stage2_run_provenance`; written to ``models/provenance.json`` and checked on resume by
:class:`~vqvae_medical.training.provenance.ResumeOrStartFresh`); :func:`check_built_on` refuses, at inference and
evaluation, a stage-2 checkpoint whose recorded autoencoder is not the one given now. :func:`check_spatial_dims`
refuses a 2D stage 2 on a 3D autoencoder (and the other way round) before anything is encoded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vqvae_medical.stages.autoencoder.record import record_identity
from vqvae_medical.stages.frozen import AutoencoderDirError, FrozenAutoencoder, read_record
from vqvae_medical.training.provenance import PROVENANCE_FILE, read_provenance
from vqvae_medical.training.runtime import SettingError

__all__ = [
    "autoencoder_identity",
    "check_built_on",
    "check_dims",
    "check_spatial_dims",
    "file_sha256",
    "models_used",
    "stage2_run_provenance",
]

logger = logging.getLogger(__name__)


def check_dims(autoencoder_dims: int, dims: int, bundle: str, folder: Path | None = None) -> None:
    """Raise a :class:`SettingError` when a stage-2 bundle of ``dims`` spatial dims gets an autoencoder of
    ``autoencoder_dims``: it says "3D" and names ``configs/3d.json`` (or that the prior has no 3D configuration)."""
    if autoencoder_dims == dims:
        return
    of = f" of {folder}" if folder else ""
    if bundle == "pixelcnn_prior":
        raise SettingError(
            f"the autoencoder{of} is a {autoencoder_dims}D VQ-VAE, and the pixelcnn_prior bundle models 2D code maps "
            "only (it has no 3D configuration): for a 3D autoencoder (the vqvae bundle with configs/3d.json) use the "
            "latent_diffusion bundle with "
            "configs/3d.json, or pass the --autoencoder_dir of a 2D one (vqvae, vqvae2)."
        )
    if autoencoder_dims == 3:
        raise SettingError(
            f"the autoencoder{of} is a 3D VQ-VAE but spatial_dims is {dims}: add configs/3d.json after the first "
            "config (--config_file \"['configs/train.json','configs/3d.json']\", the same for inference.json and "
            "evaluate.json)."
        )
    raise SettingError(
        f"the autoencoder{of} is a {autoencoder_dims}D VQ-VAE but spatial_dims is {dims} (configs/3d.json): leave "
        "configs/3d.json out, or pass the --autoencoder_dir of a 3D one (the vqvae bundle with configs/3d.json)."
    )


def check_spatial_dims(autoencoder: FrozenAutoencoder, spatial_dims: int, bundle: str = "latent_diffusion") -> bool:
    """Stop before anything is encoded when a stage-2 bundle of ``spatial_dims`` is given an autoencoder of the other
    dimension: one line that says "3D" and names ``configs/3d.json`` (latent diffusion), or says that the prior has
    no 3D configuration. Returns ``True`` (for config expressions).

    Raises:
        SettingError: naming the folder, both dimensions and what to do.
    """
    check_dims(autoencoder.spatial_dims, int(spatial_dims), bundle, getattr(autoencoder, "directory", None))
    return True


def autoencoder_identity(autoencoder: FrozenAutoencoder | str | os.PathLike) -> dict[str, Any]:
    """``{"identity", "dir", "weights_sha256"}`` of a frozen autoencoder or of a stage-1 folder (read from its
    record, checked by :func:`read_record`; the weights are not loaded). ``identity`` changes whenever stage 1 is
    trained further, replaced, or its record edited."""
    if isinstance(autoencoder, FrozenAutoencoder):
        record, folder = autoencoder.record, autoencoder.directory
        identity = autoencoder.identity
    else:
        folder = Path(autoencoder).absolute()
        record = read_record(folder)
        identity = record_identity(record)
    return {
        "identity": identity,
        "dir": None if folder is None else str(folder),
        "weights_sha256": None if record is None else record.get("weights_sha256"),
    }


def stage2_run_provenance(
    autoencoder: FrozenAutoencoder,
    dataset_dir: str | os.PathLike | None = None,
    layout: str | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    skip_bad_files: bool | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """What a stage-2 training run is built from, for
    :class:`~vqvae_medical.training.provenance.ResumeOrStartFresh`: the autoencoder's identity, the data settings
    it reads (the record's, with the given ones in their place: :meth:`FrozenAutoencoder.data_settings`) and
    ``settings`` that change what is encoded (the diffusion bundle's ``latent``); ``about`` names the folder."""
    found = autoencoder_identity(autoencoder)
    data = autoencoder.data_settings(dataset_dir, layout, val_fraction, test_fraction, skip_bad_files)
    return {
        "identity": {"autoencoder": found["identity"], "data": data, **dict(settings or {})},
        "about": {"autoencoder": {"dir": found["dir"], "weights_sha256": found["weights_sha256"]}},
    }


def check_built_on(
    ckpt_path: str | os.PathLike, autoencoder: FrozenAutoencoder | str | os.PathLike
) -> str | os.PathLike:
    """``ckpt_path`` when the stage-2 model in it was trained on ``autoencoder`` (a frozen autoencoder or a stage-1
    folder) according to ``provenance.json`` next to it; a checkpoint without that record (an earlier version, or a
    file copied on its own) passes with a warning.

    Raises:
        AutoencoderDirError: one line naming both autoencoders (folders and identities) and the fix.
    """
    current = autoencoder_identity(autoencoder)
    folder = Path(ckpt_path).absolute().parent
    recorded = read_provenance(folder)
    if recorded is None or "autoencoder" not in recorded["identity"]:
        logger.warning(
            f"{ckpt_path}: no {PROVENANCE_FILE} next to it records the autoencoder it was trained on (written since "
            f"this version): cannot check that it was trained on {current['dir']}."
        )
        return ckpt_path
    then = recorded["identity"]["autoencoder"]
    if then == current["identity"]:
        return ckpt_path
    then_dir = ((recorded.get("about") or {}).get("autoencoder") or {}).get("dir")
    if then_dir == current["dir"]:
        what = (
            f"the autoencoder in {then_dir} has changed since it was trained (identity {then[:12]} then, "
            f"{current['identity'][:12]} now: trained further, replaced, or its record edited)"
        )
        fix = "put back that autoencoder, or train this bundle again on it (--resume False)"
    else:
        what = (
            f"it was trained on the autoencoder {then_dir} (identity {then[:12]}), not on --autoencoder_dir "
            f"{current['dir']} (identity {current['identity'][:12]})"
        )
        fix = f"pass --autoencoder_dir {then_dir}, or train this bundle again on {current['dir']} (--resume False)"
    raise AutoencoderDirError(f"{ckpt_path}: {what}; its codes or latents mean nothing to another decoder: {fix}.")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def models_used(ckpt_path: str | os.PathLike, autoencoder: FrozenAutoencoder | str | os.PathLike) -> dict[str, Any]:
    """The models a stage-2 result was made with, for its ``sampling.json`` or ``eval/metrics.json``:
    ``{"checkpoint": absolute path, "checkpoint_sha256": its file's SHA-256, "autoencoder": {"dir", "identity",
    "weights_sha256"}}`` (:func:`autoencoder_identity`). Call it when the checkpoint is loaded, before sampling (a
    missing file gives ``None``: its loader says what to do)."""
    path = Path(ckpt_path).absolute()
    digest = file_sha256(path) if path.is_file() else None
    return {"checkpoint": str(path), "checkpoint_sha256": digest, "autoencoder": autoencoder_identity(autoencoder)}
