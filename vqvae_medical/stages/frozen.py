"""The frozen stage-1 autoencoder that every stage-2 bundle builds on, read from the stage-1 output folder alone.

One loader (:func:`load_autoencoder`: ``models/autoencoder.json`` + ``models/model.pt`` of an autoencoder bundle's
``output_dir``), one weights fingerprint (checked against the record, and keying every cache), one grid size
(:func:`grid_size`) and one error type (:class:`AutoencoderDirError`) whose message names the folder. The codes and
latents it gives, cached, are :mod:`vqvae_medical.stages.encodings`.

What a stage-2 model records of the autoencoder it was built on, and the checks of that record, are in
:mod:`vqvae_medical.stages.provenance`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from vqvae_medical.networks.config import build_network
from vqvae_medical.stages.autoencoder.record import (
    RECORD_FILE,
    edited_sections,
    preprocessing_transforms,
    record_datalist,
    record_identity,
    state_fingerprint,
    weights_of,
)
from vqvae_medical.stages.encodings import ENCODINGS, Encoded, encode_cached  # re-exported (moved there)
from vqvae_medical.utils.errors import UserError
from vqvae_medical.utils.io import safe_load
from vqvae_medical.utils.modules import unwrap

__all__ = [
    "recorded_architecture",
    "ENCODINGS",
    "Encoded",
    "encode_cached",
    "AutoencoderDirError",
    "LATENT_KINDS",
    "read_record",
    "grid_size",
    "code_map_positions",
    "FrozenAutoencoder",
    "load_autoencoder",
]

logger = logging.getLogger(__name__)

_RECORD_KEYS = ("version", "weights_sha256", "network_def", "spatial_dims", "preprocessing", "data")

LATENT_KINDS: tuple[str, ...] = ("encoder", "quantized")
"""``"encoder"``: continuous encoder output before quantization; ``"quantized"``: its nearest codebook vectors."""


_TRAIN_HINT = (
    "Train an autoencoder bundle first (e.g. in bundles/vqvae: python -m monai.bundle run --config_file "
    "configs/train.json) and pass its output_dir as --autoencoder_dir."
)


_REWRITE = "Put back the file the autoencoder bundle wrote, or train it again to rewrite it."


class AutoencoderDirError(UserError, ValueError):
    """``autoencoder_dir`` is not the output of a trained autoencoder bundle, or its checkpoint does not match
    its record. The message names the folder and what is missing."""


def read_record(autoencoder_dir: str | os.PathLike) -> dict[str, Any]:
    """The record (``models/autoencoder.json``) of a stage-1 output folder, checked for what stage 2 needs.

    Raises:
        AutoencoderDirError: no such folder, no ``models/model.pt`` or ``models/autoencoder.json``, or a record
            that is not valid JSON or lacks keys.
    """
    folder = Path(autoencoder_dir).absolute()
    if not folder.is_dir():
        raise AutoencoderDirError(f"autoencoder_dir {folder} does not exist. {_TRAIN_HINT}")
    wanted = [folder / "models" / "model.pt", folder / "models" / RECORD_FILE]
    missing = [str(p.relative_to(folder)) for p in wanted if not p.is_file()]
    if missing:
        raise AutoencoderDirError(
            f"autoencoder_dir {folder} is not the output of a trained autoencoder bundle: it has no "
            f"{' and no '.join(missing)}. {_TRAIN_HINT}"
        )
    try:
        record = json.loads(wanted[1].read_text())
    except (OSError, ValueError) as e:
        raise AutoencoderDirError(f"autoencoder_dir {folder}: models/{RECORD_FILE} is not readable JSON ({e}).") from e
    lacking = [k for k in _RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if lacking:
        raise AutoencoderDirError(
            f"autoencoder_dir {folder}: models/{RECORD_FILE} lacks {', '.join(lacking)}; train the autoencoder "
            "bundle again to rewrite it."
        )
    edited = edited_sections(record)
    if edited:
        raise AutoencoderDirError(
            f"autoencoder_dir {folder}: models/{RECORD_FILE} was edited after training ({', '.join(edited)} no longer "
            "what was written with the weights), so it no longer describes them. Put back the file the autoencoder "
            "bundle wrote, or train it again; to run stage 2 on other data pass --dataset_dir instead."
        )
    _check_record_values(folder, record)
    return record


def _check_record_values(folder: Path, record: Mapping[str, Any]) -> None:
    """One line for a record value of the wrong type (a version-1 record has no hashes to catch an edit)."""
    size, dims = record.get("image_size"), record.get("spatial_dims")
    where = f"autoencoder_dir {folder}: models/{RECORD_FILE}"
    if dims not in (2, 3) or isinstance(dims, bool):
        raise AutoencoderDirError(f"{where} has spatial_dims {json.dumps(dims)}; it must be 2 or 3. {_REWRITE}")
    if size is not None and not (
        isinstance(size, list) and len(size) == dims and all(type(s) is int and s > 0 for s in size)
    ):
        raise AutoencoderDirError(
            f"{where} has image_size {json.dumps(size)}; it must be null or {dims} positive whole numbers. {_REWRITE}"
        )


def grid_size(autoencoder: nn.Module, image_size: Sequence[int]) -> list[int] | tuple[list[int], ...]:
    """Spatial size of the code map (or latent) of an image of ``image_size``.

    Inputs are padded to a multiple of ``downsample_factor``; a level downsampled by ``f`` then has
    ``padded / f`` positions per axis. A VQ-VAE gives one grid; a VQ-VAE-2 a tuple ``(top, bottom)``.
    """
    model = unwrap(autoencoder, wrappers=True)
    pad = int(model.downsample_factor)
    padded = [-(-int(s) // pad) * pad for s in image_size]
    factors = getattr(model, "level_factors", None)
    if factors is None:
        return [p // pad for p in padded]
    return tuple([p // int(f) for p in padded] for f in factors)


def code_map_positions(
    autoencoder: nn.Module, image_size: Sequence[int] | None = None, level: int | None = None
) -> int:
    """Number of positions ``h * w`` of a code map of an image of ``image_size``: the sequence length a transformer
    prior over those codes needs (its ``max_seq_len``).

    Args:
        autoencoder: the (frozen) autoencoder.
        image_size: image size; ``None`` for the size the autoencoder was validated on (its record's ``image_size``).
        level: which map of a VQ-VAE-2 (0 top, 1 bottom); ``None`` for the largest (the single map of a VQ-VAE,
            the bottom map of a VQ-VAE-2).
    """
    if image_size is None:
        image_size = getattr(autoencoder, "image_size", None)
    if image_size is None:
        raise ValueError(
            "image_size is unknown: the autoencoder's record has no image_size (it was trained with spatial_size "
            "null on images of several sizes); set image_size."
        )
    grids = grid_size(autoencoder, image_size)
    grids = grids if isinstance(grids, tuple) else (grids,)
    if level is not None:
        if not 0 <= int(level) < len(grids):
            raise ValueError(
                f"level must be in [0, {len(grids)}) for an autoencoder with {len(grids)} code map(s), got {level}."
            )
        return math.prod(int(s) for s in grids[int(level)])
    return max(math.prod(int(s) for s in g) for g in grids)


class FrozenAutoencoder(nn.Module):
    """A trained VQ-VAE (or VQ-VAE-2) that stays frozen: eval mode whatever ``train()`` is called with, no gradients.

    Only paths that never change state are used: ``encode`` (convolutions), ``encode_to_indices``, the quantizer's
    ``quantize_indices``/``embed`` (look-ups) and ``decode``; the quantizer's ``forward`` (which updates an EMA
    codebook in training mode) is never called.

    Args:
        autoencoder: a :class:`~vqvae_medical.networks.VQVAE` or :class:`~vqvae_medical.networks.VQVAE2` (or a
            wrapper with it as ``model``).
        latent: ``"encoder"`` (pre-quantization output) or ``"quantized"`` (nearest codebook vectors); latents
            are for single-level VQ-VAEs.
        snap_to_codebook: before decoding latents, replace each vector by its nearest codebook vector (always done
            for ``"quantized"``; the decoder was trained on codebook vectors only).
        record: the stage-1 record it was loaded with (preprocessing, data, image size), if any.
        directory: the stage-1 output folder it was loaded from, if any.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        latent: str = "encoder",
        snap_to_codebook: bool = True,
        record: Mapping[str, Any] | None = None,
        directory: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if latent not in LATENT_KINDS:
            raise ValueError(f"latent must be one of {LATENT_KINDS}, got {latent!r}.")
        model = unwrap(autoencoder, wrappers=True)
        for name in ("encode_to_indices", "decode_from_indices", "downsample_factor", "spatial_dims", "in_channels"):
            if not hasattr(model, name):
                raise TypeError(f"the autoencoder must be a VQ-VAE (it has no {name!r}); got {type(model).__name__}.")
        self.autoencoder = model
        self.latent = latent
        self.snap_to_codebook = bool(snap_to_codebook) or latent == "quantized"
        self.record = dict(record) if record is not None else None
        self.directory = Path(directory) if directory is not None else None
        self.requires_grad_(False)
        super().train(False)
        self.fingerprint = state_fingerprint(model)
        """:func:`~vqvae_medical.stages.autoencoder.record.state_fingerprint` of the weights (keys every cache)."""

    def train(self, mode: bool = True) -> FrozenAutoencoder:
        """Stays in eval mode: a trainer calling ``train()`` on its modules cannot unfreeze the autoencoder."""
        return super().train(False)

    @property
    def spatial_dims(self) -> int:
        return int(self.autoencoder.spatial_dims)

    @property
    def in_channels(self) -> int:
        return int(self.autoencoder.in_channels)

    @property
    def levels(self) -> int:
        """Number of code levels: 1 (VQ-VAE) or 2 (VQ-VAE-2)."""
        return len(getattr(self.autoencoder, "level_factors", (1,)))

    @property
    def num_embeddings(self) -> int | tuple[int, ...]:
        """Codebook size (a tuple per level for a VQ-VAE-2)."""
        n = self.autoencoder.num_embeddings
        return tuple(int(k) for k in n) if isinstance(n, (tuple, list)) else int(n)

    @property
    def latent_channels(self) -> int:
        return int(self._single_level("latents").embedding_dim)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)

    @property
    def device(self) -> torch.device:
        return next(iter(self.autoencoder.state_dict().values())).device

    @property
    def image_size(self) -> list[int] | None:
        """Spatial size of the images the autoencoder was validated on (from its record), if known."""
        size = (self.record or {}).get("image_size")
        return None if size is None else [int(s) for s in size]

    @property
    def identity(self) -> str:
        """The autoencoder's identity: its record's (:func:`~vqvae_medical.stages.autoencoder.record.record_identity`),
        or the weights' fingerprint when it was not loaded from a stage-1 folder."""
        return self.fingerprint if self.record is None else record_identity(self.record)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing settings of the record (``{"transforms": name, **arguments}``)."""
        if self.record is None:
            raise ValueError("this autoencoder was not loaded from a stage-1 folder: it has no preprocessing record.")
        return dict(self.record["preprocessing"])

    def grid_size(self, image_size: Sequence[int]) -> list[int] | tuple[list[int], ...]:
        """See :func:`grid_size`."""
        return grid_size(self.autoencoder, image_size)

    def transforms(self, **overrides: Any) -> Compose:
        """The stage-1 preprocessing (``overrides`` e.g. ``augment=True``)."""
        return preprocessing_transforms(self.preprocessing, **overrides)

    def datalist(
        self,
        cache_dir: str | os.PathLike,
        dataset_dir: str | os.PathLike | None = None,
        layout: str | None = None,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        skip_bad_files: bool | None = None,
    ) -> dict[str, list[dict]]:
        """The training/validation/test datalist of the autoencoder's data and split; each argument that is not
        ``None`` replaces the recorded setting (``dataset_dir``: another data set, same preprocessing).

        Args:
            cache_dir: where the embedded MNI152 data is written when the record has no data set folder.
            dataset_dir: data folder instead of the recorded one.
            layout: datalist layout instead of the recorded one.
            val_fraction: validation fraction instead of the recorded one.
            test_fraction: test fraction instead of the recorded one.
            skip_bad_files: skip unusable files instead of the recorded setting.
        """
        data = self.data_settings(dataset_dir, layout, val_fraction, test_fraction, skip_bad_files)
        same_size = self.preprocessing.get("spatial_size") is None
        return record_datalist(self.spatial_dims, self.in_channels, data, cache_dir, require_same_size=same_size)

    def data_settings(
        self,
        dataset_dir: str | os.PathLike | None = None,
        layout: str | None = None,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        skip_bad_files: bool | None = None,
    ) -> dict[str, Any]:
        """The recorded data settings with the given ones (those not ``None``) in their place: what
        :meth:`datalist` reads."""
        if self.record is None:
            raise ValueError("this autoencoder was not loaded from a stage-1 folder: it has no data record.")
        data = dict(self.record["data"])
        if dataset_dir not in (None, "", "None"):
            data["dataset_dir"] = data["source"] = os.path.abspath(os.fspath(dataset_dir))
        given = {"layout": layout, "val_fraction": val_fraction, "test_fraction": test_fraction}
        data.update({k: v for k, v in {**given, "skip_bad_files": skip_bad_files}.items() if v is not None})
        return data

    def _single_level(self, what: str) -> nn.Module:
        if self.levels != 1:
            where = f" of {self.directory}" if self.directory else ""
            raise ValueError(
                f"{what} need a single-level VQ-VAE (the vqvae bundle, 2D or with configs/3d.json); the "
                f"autoencoder{where} is a "
                f"{type(self.autoencoder).__name__} with {self.levels} code levels."
            )
        return self.autoencoder

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, D, *spatial / f]`` (float32, contiguous) of images ``[B, C, *spatial]``."""
        model = self._single_level("latents")
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        z = model.encode(images.float())
        if self.latent == "quantized":
            z = model.quantizer.embed(model.quantizer.quantize_indices(z))
        return z.float().contiguous()

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Code indices ``[B, *grid]`` of images ``[B, C, *spatial]`` (a ``(top, bottom)`` tuple for a VQ-VAE-2)."""
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        return self.autoencoder.encode_to_indices(images.float())

    @torch.no_grad()
    def snap(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest codebook vector of every latent vector."""
        quantizer = self._single_level("latents").quantizer
        return quantizer.embed(quantizer.quantize_indices(latents.float()))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        """Images from (unscaled) latents, snapped to the codebook first when configured so."""
        model = self._single_level("latents")
        z = self.snap(latents) if self.snap_to_codebook else latents.float()
        if getattr(model, "channels_last", False):
            z = z.contiguous(memory_format=torch.channels_last if z.ndim == 4 else torch.channels_last_3d)
        size = None if output_size is None else [int(s) for s in output_size]
        return model.decode(z, size).float().contiguous()

    @torch.no_grad()
    def decode_from_indices(
        self, codes: torch.Tensor | Sequence[torch.Tensor], output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Images from code indices (a ``(top, bottom)`` pair for a VQ-VAE-2)."""
        size = None if output_size is None else [int(s) for s in output_size]
        codes = tuple(c.long() for c in codes) if isinstance(codes, (tuple, list)) else codes.long()
        return self.autoencoder.decode_from_indices(codes, size).float()


def load_autoencoder(
    autoencoder_dir: str | os.PathLike,
    latent: str = "encoder",
    snap_to_codebook: bool = True,
    device: str | torch.device = "cpu",
) -> FrozenAutoencoder:
    """The frozen autoencoder of a stage-1 output folder (an autoencoder bundle's ``output_dir``).

    The network is rebuilt from the record's ``network_def`` with ``monai.bundle.ConfigParser``; ``model.pt`` is
    read with ``weights_only=True`` and must carry the weights the record was written for.

    Args:
        autoencoder_dir: the folder with ``models/model.pt`` and ``models/autoencoder.json``.
        latent: see :class:`FrozenAutoencoder`.
        snap_to_codebook: see :class:`FrozenAutoencoder`.
        device: where the autoencoder runs.

    Raises:
        AutoencoderDirError: the folder is not a stage-1 output, or ``model.pt`` does not match the record.
    """
    folder = Path(autoencoder_dir).absolute()
    record = read_record(folder)
    ckpt = folder / "models" / "model.pt"
    state = weights_of(safe_load(ckpt))
    if state_fingerprint(state) != record["weights_sha256"]:
        raise AutoencoderDirError(
            f"autoencoder_dir {folder}: models/model.pt does not match models/{RECORD_FILE} (the record was written "
            "for other weights, so the checkpoint was replaced after training). Train the autoencoder bundle "
            "again, which rewrites both, or put back the model.pt it wrote."
        )
    try:
        network = build_network(record["network_def"])
        network.load_state_dict(state)
    except Exception as e:  # a record and checkpoint that disagree, whichever way the build or load fails
        raise AutoencoderDirError(
            f"autoencoder_dir {folder}: models/model.pt does not fit the network_def of models/{RECORD_FILE} ({e})."
        ) from e
    frozen = FrozenAutoencoder(network, latent, snap_to_codebook, record=record, directory=folder)
    logger.info(f"loaded the frozen {type(frozen.autoencoder).__name__} of {folder}")
    return frozen.to(device)


def recorded_architecture(autoencoder_dir: str | os.PathLike | None, default: nn.Module) -> nn.Module:
    """The untrained autoencoder network of a stage-1 output folder's record, or ``default`` when the folder has no
    record (for example a Model Zoo check that builds ``network_def`` from the configs alone).

    Stage-2 networks that carry the decoder (the latent diffusion generator) need its architecture before any
    weights are loaded; this reads it from ``models/autoencoder.json`` so it is never typed out twice.
    """
    if autoencoder_dir is None or not (Path(autoencoder_dir) / "models" / RECORD_FILE).is_file():
        return default
    record = read_record(autoencoder_dir)
    dims = getattr(unwrap(default, wrappers=True), "spatial_dims", None)
    if dims is not None:
        from vqvae_medical.stages.provenance import check_dims  # the provenance module builds on this one

        check_dims(int(record["spatial_dims"]), int(dims), "latent_diffusion", Path(autoencoder_dir).absolute())
    network = build_network(record["network_def"])
    return unwrap(network, wrappers=True)
