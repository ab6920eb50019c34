"""Latent diffusion on the latents of a frozen, trained VQ-VAE (Rombach et al. 2022, arXiv 2112.10752).

The pieces the ``latent_diffusion`` bundle wires together, each fixing one known cause of "the samples are noise":

- :class:`FrozenAutoencoder`: the trained VQ-VAE in eval mode for good (``train()`` cannot switch it back),
  ``requires_grad=False``; only its state-free paths run (``encode``, ``quantize_indices``, ``embed``, ``decode``),
  so the codebook never changes. The latent is the encoder output before quantization (``"encoder"``) or its
  quantized embedding (``"quantized"``); decoding snaps a sampled latent to the codebook first, as the decoder
  only ever saw codebook vectors.
- :func:`extract_latents` / :class:`LatentSet`: latents of the training images computed once and cached on disk
  (keyed by the autoencoder's weights, the files and the preprocessing), with the scale factor ``1 / std``.
- :class:`LatentDiffusionNetwork`: ``network_def``, the noise-prediction UNet plus buffers ``scale_factor``,
  ``latent_shape`` and ``image_size``, so a checkpoint carries everything sampling needs.
- :class:`LatentDiffusionPrepareBatch`: MONAI's ``DiffusionPrepareBatch`` for latents: scales them to unit
  variance and draws noise shaped like the latent (never like the image).
- :class:`ClassConditionedDiffusionInferer`: MONAI's ``DiffusionInferer`` passing ``class_labels`` to the UNet's
  class embedding (``DiffusionInferer`` passes only ``context``).
- :class:`LatentSampler`: DDIM sampling in latent space, unscaling, snapping to the codebook and decoding;
  :func:`generate` writes the samples, :func:`evaluate_samples` computes MS-SSIM diversity and MMD.
- :class:`EMAWeights` and :class:`SampleGrid`: Ignite handlers (exponential moving average of the weights, saved
  as ``models/model.pt``; sample grids during training).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer
from monai.metrics import MMDMetric, MultiScaleSSIMMetric
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.nets import diffusion_model_unet as _dmu
from torch import nn

from vqvae_medical.checkpoints import atomic_save, safe_load
from vqvae_medical.figures import save_image_grid
from vqvae_medical.workflows import rank_zero_first

__all__ = [
    "LATENT_KINDS",
    "FrozenAutoencoder",
    "load_autoencoder",
    "state_fingerprint",
    "LatentSet",
    "extract_latents",
    "LatentDiffusionNetwork",
    "load_diffusion_network",
    "LatentDiffusionPrepareBatch",
    "ClassConditionedDiffusionInferer",
    "LatentSampler",
    "EMAWeights",
    "SampleGrid",
    "ms_ssim_settings",
    "pairwise_ms_ssim",
    "generate",
    "write_samples",
    "evaluate_samples",
]

logger = logging.getLogger(__name__)

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
"""What the UNet predicts (MONAI schedulers' ``prediction_type``); stored in the checkpoint as an index."""

LATENT_KINDS: tuple[str, ...] = ("encoder", "quantized")
"""``"encoder"``: continuous encoder output before quantization; ``"quantized"``: its nearest codebook vectors."""


# ---------------------------------------------------------------------------------------------------- autoencoder
class FrozenAutoencoder(nn.Module):
    """A trained VQ-VAE that stays frozen: eval mode whatever ``train()`` is called with, no gradients.

    Only paths that never change state are used: ``encode`` (convolutions), ``quantizer.quantize_indices`` and
    ``quantizer.embed`` (look-ups) and ``decode``; the quantizer's ``forward`` (which updates an EMA codebook in
    training mode) is never called.

    Args:
        autoencoder: a :class:`~vqvae_medical.networks.VQVAE` (or a wrapper with it as ``model``).
        latent: ``"encoder"`` (pre-quantization output) or ``"quantized"`` (nearest codebook vectors).
        snap_to_codebook: before decoding, replace each latent vector by its nearest codebook vector (always done
            for ``"quantized"``; the decoder was trained on codebook vectors only).
    """

    def __init__(self, autoencoder: nn.Module, latent: str = "encoder", snap_to_codebook: bool = True) -> None:
        super().__init__()
        if latent not in LATENT_KINDS:
            raise ValueError(f"latent must be one of {LATENT_KINDS}, got {latent!r}.")
        model = getattr(autoencoder, "model", autoencoder)
        for name in ("encode", "decode", "quantizer", "embedding_dim", "downsample_factor", "spatial_dims"):
            if not hasattr(model, name):
                raise TypeError(f"the autoencoder must be a VQVAE (it has no {name!r}); got {type(model).__name__}.")
        self.autoencoder = model
        self.latent = latent
        self.snap_to_codebook = bool(snap_to_codebook) or latent == "quantized"
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenAutoencoder:
        """Stays in eval mode: a trainer calling ``train()`` on its modules cannot unfreeze the autoencoder."""
        return super().train(False)

    @property
    def spatial_dims(self) -> int:
        return int(self.autoencoder.spatial_dims)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.embedding_dim)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)

    @property
    def device(self) -> torch.device:
        return next(iter(self.autoencoder.state_dict().values())).device

    def latent_size(self, image_size: Sequence[int]) -> list[int]:
        """Spatial size of the latent of an image of ``image_size`` (inputs are padded to a multiple of ``f``)."""
        f = self.downsample_factor
        return [-(-int(s) // f) for s in image_size]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, D, *spatial / f]`` (float32, contiguous) of images ``[B, C, *spatial]``."""
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        z = self.autoencoder.encode(images.float())
        if self.latent == "quantized":
            z = self.autoencoder.quantizer.embed(self.autoencoder.quantizer.quantize_indices(z))
        return z.float().contiguous()

    @torch.no_grad()
    def snap(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest codebook vector of every latent vector."""
        return self.autoencoder.quantizer.embed(self.autoencoder.quantizer.quantize_indices(latents.float()))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        """Images from (unscaled) latents, snapped to the codebook first when configured so."""
        z = self.snap(latents) if self.snap_to_codebook else latents.float()
        if getattr(self.autoencoder, "channels_last", False):
            z = z.contiguous(memory_format=torch.channels_last if z.ndim == 4 else torch.channels_last_3d)
        size = None if output_size is None else [int(s) for s in output_size]
        return self.autoencoder.decode(z, size).float().contiguous()


def state_fingerprint(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and bytes): equal iff the tensors are bit-identical."""
    state = module.state_dict() if isinstance(module, nn.Module) else module
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            h.update(f"{key}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _autoencoder_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The VQ-VAE's own keys from a ``models/model.pt`` (``ReconstructionNetwork``: ``model.*``), a training
    checkpoint (``{"model": {...}, "optimizer": ...}``) or a bare VQ-VAE state dict."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    return dict(state)


def load_autoencoder(
    autoencoder_def: nn.Module,
    ckpt_path: str | os.PathLike,
    latent: str = "encoder",
    snap_to_codebook: bool = True,
    device: torch.device | str = "cpu",
) -> FrozenAutoencoder:
    """Load a trained VQ-VAE checkpoint into ``autoencoder_def`` and freeze it.

    Args:
        autoencoder_def: the VQ-VAE with the architecture the checkpoint was trained with (or its
            ``ReconstructionNetwork`` wrapper).
        ckpt_path: ``models/model.pt`` of a VQ-VAE bundle, one of its training checkpoints, or a bare state dict.
        latent: see :class:`FrozenAutoencoder`.
        snap_to_codebook: see :class:`FrozenAutoencoder`.
        device: where the autoencoder runs.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no VQ-VAE checkpoint. Train a VQ-VAE bundle first (e.g. bundles/vqvae_2d, which writes "
            "models/model.pt) or point autoencoder_ckpt at its model.pt."
        )
    model = getattr(autoencoder_def, "model", autoencoder_def)
    state = _autoencoder_state(safe_load(path, map_location="cpu"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path} does not fit autoencoder_def ({e}). Set autoencoder_def (channels, res_channels, "
            "num_res_units, num_embeddings, embedding_dim, spatial_dims, ...) to the values the VQ-VAE was trained "
            "with: an override --network_def#model#KEY V of the VQ-VAE bundle is --autoencoder_def#KEY V here."
        ) from None
    frozen = FrozenAutoencoder(model, latent=latent, snap_to_codebook=snap_to_codebook)
    return frozen.to(device)


# -------------------------------------------------------------------------------------------------------- latents
class LatentSet:
    """Latents of a set of images (``[N, D, *spatial]``, float32 on the CPU) with optional class labels.

    Args:
        latents: the latents.
        labels: ``[N]`` int64 class labels, or ``None``.
        image_size: spatial size of the images they were encoded from.
        fingerprint: identifies the autoencoder, files and preprocessing they came from.
    """

    def __init__(
        self, latents: torch.Tensor, labels: torch.Tensor | None, image_size: Sequence[int], fingerprint: str = ""
    ) -> None:
        if latents.ndim < 4:
            raise ValueError(f"latents must be [N, D, *spatial], got shape {list(latents.shape)}.")
        if labels is not None and labels.shape != (latents.shape[0],):
            raise ValueError(f"labels must have shape [{latents.shape[0]}], got {list(labels.shape)}.")
        self.latents = latents
        self.labels = labels
        self.image_size = [int(s) for s in image_size]
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def latent_shape(self) -> list[int]:
        """``[D, *spatial]`` of one latent."""
        return [int(s) for s in self.latents.shape[1:]]

    @property
    def std(self) -> float:
        """Standard deviation over all latent values."""
        return float(self.latents.double().std())

    @property
    def mean(self) -> float:
        return float(self.latents.double().mean())

    @property
    def scale_factor(self) -> float:
        """``1 / std`` of the latents: multiplied by it, they have unit variance as the diffusion prior assumes."""
        std = self.std
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"the latents have standard deviation {std}; cannot scale them to unit variance.")
        return 1.0 / std

    def items(self, latent_key: str = "latent", label_key: str = "label") -> list[dict[str, Any]]:
        """Datalist items ``{latent_key: [D, ...], label_key: int}`` for a MONAI ``Dataset``."""
        out: list[dict[str, Any]] = []
        for i in range(len(self)):
            item: dict[str, Any] = {latent_key: self.latents[i]}
            if self.labels is not None:
                item[label_key] = int(self.labels[i])
            out.append(item)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "latents": self.latents,
            "labels": self.labels if self.labels is not None else torch.zeros(0, dtype=torch.long),
            "has_labels": self.labels is not None,
            "image_size": list(self.image_size),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentSet:
        s = safe_load(path, map_location="cpu")
        return cls(s["latents"], s["labels"] if s["has_labels"] else None, s["image_size"], s["fingerprint"])

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_save(self.state_dict(), path)


def _item_key(item: Mapping[str, Any], image_key: str, label_key: str | None) -> list:
    image = item[image_key]
    files = [os.fspath(f) for f in image] if isinstance(image, (list, tuple)) else [os.fspath(image)]
    stamps = [os.stat(f).st_mtime_ns if os.path.exists(f) else 0 for f in files]
    label = item.get(label_key) if label_key else None
    return [files, stamps, None if label is None else int(label)]


def extract_latents(
    autoencoder: FrozenAutoencoder,
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    key: Any = None,
    image_key: str = "image",
    label_key: str | None = "label",
    num_workers: int = 0,
    name: str = "latents",
) -> LatentSet:
    """Latents of every item of ``data``, computed once and cached as ``<cache_dir>/<name>_<hash>.pt``.

    The hash covers the autoencoder's weights (:func:`state_fingerprint`), the latent kind, the file paths and
    modification times, the labels and ``key`` (put the preprocessing settings there), so a changed VQ-VAE,
    data set or preprocessing is re-encoded instead of read stale from the cache.

    Args:
        autoencoder: the frozen VQ-VAE.
        data: datalist items with ``image_key`` (and ``label_key`` when present).
        transform: the image preprocessing (deterministic; all images must come out with one size).
        cache_dir: folder of the cache, or ``None`` to encode in memory every time.
        batch_size: images encoded at once.
        key: JSON-serialisable settings that change the images (e.g. spatial size, channels).
        image_key: key of the image path in the items.
        label_key: key of the int class label, or ``None`` to ignore labels.
        num_workers: data loader workers.
        name: file name prefix of the cache.
    """
    if not data:
        raise ValueError("no images to encode: the datalist section is empty.")
    has_labels = label_key is not None and all(label_key in item for item in data)
    spec = {
        "autoencoder": state_fingerprint(autoencoder),
        "latent": autoencoder.latent,
        "items": [_item_key(item, image_key, label_key if has_labels else None) for item in data],
        "key": key,
    }
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir) / f"{name}_{fingerprint[:16]}.pt" if cache_dir is not None else None
    label_key = label_key if has_labels else None
    if path is None:
        return _encode(autoencoder, data, transform, fingerprint, batch_size, image_key, label_key, num_workers)
    # under torch.distributed, rank 0 encodes and writes the cache first; the other ranks then read that file, so
    # every rank trains on the same latents (and the same scale factor) without encoding them again
    with rank_zero_first():
        if path.is_file():
            cached = LatentSet.load(path)
            if cached.fingerprint == fingerprint:
                logger.info(f"read {len(cached)} cached latents {cached.latent_shape} from {path}")
                return cached
        out = _encode(autoencoder, data, transform, fingerprint, batch_size, image_key, label_key, num_workers)
        out.save(path)
        return out


def _encode(
    autoencoder: FrozenAutoencoder,
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    fingerprint: str,
    batch_size: int,
    image_key: str,
    label_key: str | None,
    num_workers: int,
) -> LatentSet:
    """The latents of ``data`` (labels from ``label_key`` unless ``None``), encoded in batches."""
    device = autoencoder.device
    loader = DataLoader(Dataset(list(data), transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    latents, labels, image_size = [], [], None
    start = time.perf_counter()
    for batch in loader:
        images = batch[image_key]
        size = [int(s) for s in images.shape[2:]]
        if image_size is not None and size != image_size:
            raise ValueError(f"images of different sizes ({image_size} and {size}); set spatial_size in the config.")
        image_size = size
        latents.append(autoencoder.encode(images.to(device)).cpu())
        if label_key is not None:
            labels.append(torch.as_tensor(batch[label_key]).long().reshape(-1))
    try:
        out = LatentSet(torch.cat(latents), torch.cat(labels) if label_key is not None else None, image_size or [], fingerprint)
    except RuntimeError as e:
        raise ValueError(f"images of different sizes give latents of different sizes ({e}); set spatial_size.") from e
    logger.info(
        f"encoded {len(out)} images {image_size} -> latents {out.latent_shape} in {time.perf_counter() - start:.1f} s "
        f"(mean {out.mean:.4f}, std {out.std:.4f}, scale factor {out.scale_factor:.4f})"
    )
    return out


# --------------------------------------------------------------------------------------------------------- network
class _ScriptableSpatialAttentionBlock(SpatialAttentionBlock):
    """MONAI's ``SpatialAttentionBlock`` with the same computation written so TorchScript compiles it (MONAI's
    ``reshape(*shape[:2], -1)`` unpacks a size of unknown length)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        shape = x.shape
        x = self.norm(x)
        x = x.reshape(shape[0], shape[1], -1).transpose(1, 2)  # "b c h w d -> b (h w d) c"
        x = self.attn(x)
        x = x.transpose(1, 2).reshape(shape)  # "b (h w d) c -> b c h w d"
        return x + residual


class _ScriptableWrappedUpsample(_dmu.WrappedUpsample):
    """MONAI's ``WrappedUpsample`` (an ``nn.Sequential``) without the ``super().forward`` TorchScript rejects."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


class _ScriptableDiffusionModelUNet(_dmu.DiffusionModelUNet):
    """MONAI's ``DiffusionModelUNet.forward`` without the ControlNet residual arguments, whose
    ``tuple[torch.Tensor]`` zip TorchScript cannot compile; otherwise the same operations in the same order."""

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.time_embed(_dmu.get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            emb = emb + self.class_embedding(class_labels).to(dtype=x.dtype)
        h = self.conv_in(x)
        if context is not None and self.with_conditioning is False:
            raise ValueError("model should have with_conditioning = True if context is provided")
        down_block_res_samples: list[torch.Tensor] = [h]
        for downsample_block in self.down_blocks:
            h, res_samples = downsample_block(hidden_states=h, temb=emb, context=context)
            for residual in res_samples:
                down_block_res_samples.append(residual)
        h = self.middle_block(hidden_states=h, temb=emb, context=context)
        for upsample_block in self.up_blocks:
            idx: int = -len(upsample_block.resnets)
            res_samples = down_block_res_samples[idx:]
            down_block_res_samples = down_block_res_samples[:idx]
            h = upsample_block(hidden_states=h, res_hidden_states_list=res_samples, temb=emb, context=context)
        return self.out(h)


#: MONAI classes whose ``forward`` TorchScript cannot compile -> subclasses with the same computation that it can
_SCRIPTABLE = {
    _dmu.DiffusionModelUNet: _ScriptableDiffusionModelUNet,
    _dmu.WrappedUpsample: _ScriptableWrappedUpsample,
    SpatialAttentionBlock: _ScriptableSpatialAttentionBlock,
}


class LatentDiffusionNetwork(nn.Module):
    """The bundle's ``network_def``: a noise-prediction UNet on scaled latents plus what sampling needs.

    ``forward(x, timesteps, context=None, class_labels=None)`` is the UNet's: ``x`` is a noisy latent already
    multiplied by ``scale_factor``, ``timesteps`` a ``[B]`` tensor (or one int for the batch), and it returns the
    prediction (noise for ``prediction_type="epsilon"``) with ``x``'s shape. There is no meaningful single-tensor
    forward: a diffusion model is a function of the timestep too. Sampling and decoding are
    :class:`LatentSampler`'s job.

    Buffers (saved in ``models/model.pt`` and every training checkpoint):

    - ``scale_factor``: ``1 / std`` of the training latents (NaN until set);
    - ``latent_shape``: ``[D, *spatial]`` of the latents the model was trained on (zeros until set);
    - ``image_size``: spatial size of the training images, to crop decoded samples to (zeros until set);
    - ``prediction_code``: index of ``prediction_type`` in :data:`PREDICTION_TYPES`, checked against the sampling
      scheduler (a mismatch would turn samples into noise).

    ``torch.jit.script`` compiles it (see :meth:`__prepare_scriptable__`), so ``monai.bundle ckpt_export`` exports
    it in script mode; the TorchScript module takes ``timesteps`` as a tensor or an int like the eager one. UNets
    with cross-attention (``with_conditioning``) and ControlNet residuals are not covered.

    Args:
        unet: e.g. ``monai.networks.nets.DiffusionModelUNet``.
        spatial_dims: 2 or 3.
        scale_factor: ``1 / std`` of the training latents, or ``None`` (loaded from a checkpoint).
        latent_shape: ``[D, *spatial]``, or ``None``.
        image_size: spatial size of the images, or ``None``.
        prediction_type: what the UNet is trained to predict, one of :data:`PREDICTION_TYPES`.
    """

    # sampling-side helpers, not part of the exported (TorchScript) network
    __jit_unused_properties__ = ["num_class_embeds", "prediction_type", "levels"]

    def __init__(
        self,
        unet: nn.Module,
        spatial_dims: int,
        scale_factor: float | None = None,
        latent_shape: Sequence[int] | None = None,
        image_size: Sequence[int] | None = None,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        self.unet = unet
        self.spatial_dims = spatial_dims
        self.register_buffer("scale_factor", torch.tensor(float("nan") if scale_factor is None else float(scale_factor)))
        self.register_buffer("latent_shape", torch.zeros(spatial_dims + 1, dtype=torch.long))
        self.register_buffer("image_size", torch.zeros(spatial_dims, dtype=torch.long))
        self.register_buffer("prediction_code", torch.tensor(PREDICTION_TYPES.index(prediction_type)))
        if latent_shape is not None:
            self.set_latent_shape(latent_shape, image_size)

    @property
    def num_class_embeds(self) -> int | None:
        return getattr(self.unet, "num_class_embeds", None)

    @property
    def prediction_type(self) -> str:
        return PREDICTION_TYPES[int(self.prediction_code)]

    @property
    def levels(self) -> int:
        return len(getattr(self.unet, "block_out_channels", (0,)))

    def set_latent_shape(self, latent_shape: Sequence[int], image_size: Sequence[int] | None = None) -> None:
        """Record the latent (and image) size, checking that the UNet can process it."""
        shape = [int(s) for s in latent_shape]
        if len(shape) != self.spatial_dims + 1:
            raise ValueError(f"latent_shape must be [D, *spatial] with {self.spatial_dims} spatial dims, got {shape}.")
        multiple = 2 ** (self.levels - 1)
        if any(s % multiple for s in shape[1:]):
            raise ValueError(
                f"latent spatial size {shape[1:]} is not a multiple of {multiple}, which the UNet's {self.levels} "
                f"levels need. Choose spatial_size so that size / downsample_factor is a multiple of {multiple}, "
                "or use fewer UNet levels."
            )
        in_channels = getattr(self.unet, "in_channels", shape[0])
        if in_channels != shape[0]:
            raise ValueError(f"the UNet takes {in_channels} channels but the latents have {shape[0]} (embedding_dim).")
        self.latent_shape.copy_(torch.as_tensor(shape))
        if image_size is not None:
            self.image_size.copy_(torch.as_tensor([int(s) for s in image_size]))

    def check_ready(self) -> None:
        """Raise when the scale factor or the latent shape were never set (an untrained, unloaded network)."""
        if not torch.isfinite(self.scale_factor) or int(self.latent_shape.prod()) == 0:
            raise RuntimeError(
                "the diffusion network has no scale factor or latent shape: load a trained checkpoint "
                "(models/model.pt of this bundle) before sampling."
            )

    def __prepare_scriptable__(self) -> LatentDiffusionNetwork:
        """What ``torch.jit.script`` (and ``monai.bundle ckpt_export``) compiles: a copy of this network in which
        the MONAI UNet modules that TorchScript cannot compile are replaced by subclasses with the same
        parameters and the same computation; this network itself is left as it is."""
        scriptable = copy.deepcopy(self)
        for module in scriptable.modules():
            if type(module) in _SCRIPTABLE:
                module.__class__ = _SCRIPTABLE[type(module)]
        return scriptable

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | int,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.full((x.shape[0],), int(timesteps), device=x.device, dtype=torch.long)
        elif timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        return self.unet(x, timesteps, context=context, class_labels=class_labels)


def load_diffusion_network(
    network: LatentDiffusionNetwork, ckpt_path: str | os.PathLike, device: torch.device | str = "cpu"
) -> LatentDiffusionNetwork:
    """Load ``models/model.pt`` (or a training checkpoint's ``model`` entry) into ``network``, in eval mode."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no diffusion checkpoint; train the latent_diffusion bundle first.")
    state = safe_load(path, map_location="cpu")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    network.load_state_dict(state)
    network.check_ready()
    return network.to(device).eval()


# ---------------------------------------------------------------------------------------------------- training
class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """``prepare_batch`` for MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` on latents.

    Returns ``(latents * scale_factor, target, (), {"noise", "timesteps"[, "class_labels"]})``; the noise has the
    latent's shape. Batches of images (no ``latent_key``) are encoded by the frozen ``autoencoder`` on the fly
    (e.g. with augmentation); pre-extracted latents skip the encoder.

    Args:
        num_train_timesteps: timesteps of the training scheduler.
        network: the :class:`LatentDiffusionNetwork`; its ``scale_factor`` buffer is read at every call, so a
            value restored from a checkpoint is the one used.
        autoencoder: the frozen VQ-VAE, needed only for batches of images.
        scheduler: the training scheduler, needed for ``prediction_type="v_prediction"``.
        prediction_type: ``"epsilon"`` (target: the noise), ``"v_prediction"`` or ``"sample"``.
        latent_key: batch key of pre-extracted latents.
        image_key: batch key of images to encode.
        label_key: batch key of int class labels for a class-conditioned UNet, or ``None``.
        seed: draw noise and timesteps from a generator re-seeded at every epoch start (attach this object to
            the engine as a handler): the same noise every validation, comparable across epochs.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        network: LatentDiffusionNetwork,
        autoencoder: FrozenAutoencoder | None = None,
        scheduler: Any = None,
        prediction_type: str = "epsilon",
        latent_key: str = "latent",
        image_key: str = "image",
        label_key: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=None)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}.")
        if prediction_type != network.prediction_type:
            raise ValueError(
                f"prediction_type {prediction_type!r} differs from the network's {network.prediction_type!r}."
            )
        if prediction_type == "v_prediction" and scheduler is None:
            raise ValueError("prediction_type='v_prediction' needs the scheduler (for get_velocity).")
        self.network = network
        self.autoencoder = autoencoder
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.latent_key = latent_key
        self.image_key = image_key
        self.label_key = label_key
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def attach(self, engine: Engine) -> None:
        if self.seed is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)

    def reset(self, engine: Engine | None = None) -> None:
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape, generator=self.generator, dtype=images.dtype).to(images.device)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=self.generator)
        return t.long().to(images.device)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        if self.prediction_type == "sample":
            return images
        return noise

    def latents(self, batchdata: Mapping[str, Any], device: Any = None, non_blocking: bool = False) -> torch.Tensor:
        """Unit-variance latents of the batch: pre-extracted, or encoded by the frozen autoencoder."""
        if self.latent_key in batchdata:
            z = torch.as_tensor(batchdata[self.latent_key]).to(device, non_blocking=non_blocking).float()
        elif self.image_key in batchdata and self.autoencoder is not None:
            images = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking)
            z = self.autoencoder.encode(images)
        else:
            raise KeyError(
                f"the batch has neither {self.latent_key!r} (pre-extracted latents) nor {self.image_key!r} with an "
                f"autoencoder to encode it; it has {sorted(batchdata)}."
            )
        scale = self.network.scale_factor
        if not torch.isfinite(scale):
            raise RuntimeError("the network's scale_factor is not set; build network_def with the training latents.")
        return z * scale.to(z.device)

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        z = self.latents(batchdata, device, non_blocking)
        noise = self.get_noise(z)
        timesteps = self.get_timesteps(z)
        target = self.get_target(z, noise, timesteps)
        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps}
        if self.label_key is not None:
            if self.label_key not in batchdata:
                raise KeyError(
                    f"a class-conditioned model needs {self.label_key!r} labels in every item (e.g. data_layout "
                    "'class' or 'isic'); the batch has none."
                )
            infer_kwargs["class_labels"] = torch.as_tensor(batchdata[self.label_key]).long().reshape(-1).to(device)
        return z, target, (), infer_kwargs


class ClassConditionedDiffusionInferer(DiffusionInferer):
    """MONAI's ``DiffusionInferer`` that also passes ``class_labels`` to the UNet (its class embedding).

    ``__call__`` (training: noise the input with the scheduler and predict) and ``sample`` are MONAI's; a
    ``class_labels`` tensor binds to the network's ``class_labels`` argument.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if noise.shape != inputs.shape:
            raise ValueError(f"noise {list(noise.shape)} must have the latent's shape {list(inputs.shape)}.")
        model = diffusion_model if class_labels is None else partial(diffusion_model, class_labels=class_labels)
        return super().__call__(inputs, model, noise, timesteps, condition=condition, mode=mode)

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        diffusion_model: nn.Module,
        scheduler: Any = None,
        class_labels: torch.Tensor | None = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        model = diffusion_model if class_labels is None else partial(diffusion_model, class_labels=class_labels)
        return super().sample(input_noise, model, scheduler=scheduler, verbose=verbose, **kwargs)


# ---------------------------------------------------------------------------------------------------- sampling
class LatentSampler:
    """Samples images: noise shaped like the latent -> DDIM (or any MONAI scheduler) in latent space ->
    ``/ scale_factor`` -> snap to the codebook -> VQ-VAE decoder -> crop to the training image size.

    Args:
        network: the trained :class:`LatentDiffusionNetwork` (its buffers give scale, latent and image size).
        autoencoder: the frozen VQ-VAE it was trained on.
        scheduler: the sampling scheduler, e.g. ``DDIMScheduler(clip_sample=False)``.
        num_inference_steps: sampling steps (50 for DDIM).
        batch_size: samples generated at once.
        clip: value range of the images (``None`` to keep the decoder's output as it is).
    """

    def __init__(
        self,
        network: LatentDiffusionNetwork,
        autoencoder: FrozenAutoencoder,
        scheduler: Any,
        num_inference_steps: int = 50,
        batch_size: int = 8,
        clip: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        self.network = network
        self.autoencoder = autoencoder
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.batch_size = max(1, int(batch_size))
        self.clip = clip
        self.inferer = ClassConditionedDiffusionInferer(scheduler)
        self.last_seconds_per_sample = float("nan")
        self.last_cpu_seconds_per_sample = float("nan")

    def class_labels(self, n: int, class_label: int | Sequence[int] | None = None) -> torch.Tensor | None:
        """``None`` for an unconditional model; else ``class_label`` for all, or classes in turn when ``None``."""
        k = self.network.num_class_embeds
        if not k:
            if class_label is not None:
                raise ValueError("class_label was given but the model is not class-conditioned (num_class_embeds).")
            return None
        if class_label is None:
            return torch.arange(n) % int(k)
        labels = torch.as_tensor(class_label).long().reshape(-1)
        labels = labels.expand(n) if labels.numel() == 1 else labels
        if labels.numel() != n or int(labels.min()) < 0 or int(labels.max()) >= int(k):
            raise ValueError(f"class_label must be one class or {n} classes in [0, {int(k) - 1}], got {class_label}.")
        return labels

    @torch.no_grad()
    def sample_latents(
        self, n: int, class_labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` latents (unscaled, before snapping) from noise ``[n, *latent_shape]``."""
        net = self.network
        net.check_ready()
        scheduler_type = getattr(self.scheduler, "prediction_type", net.prediction_type)
        if scheduler_type != net.prediction_type:
            raise ValueError(
                f"the model was trained with prediction_type {net.prediction_type!r} but the sampling scheduler uses "
                f"{scheduler_type!r}; set --prediction_type {net.prediction_type}."
            )
        net.eval()
        device = net.scale_factor.device
        shape = [int(n), *[int(s) for s in net.latent_shape]]
        noise = torch.randn(shape, generator=generator).to(device)
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        labels = None if class_labels is None else class_labels.to(device)
        z = self.inferer.sample(noise, net, scheduler=self.scheduler, class_labels=labels, verbose=False)
        return z / net.scale_factor

    @torch.no_grad()
    def sample(
        self, n: int, class_label: int | Sequence[int] | None = None, seed: int | None = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` images ``[n, C, *image_size]`` on the CPU and their class labels (``None`` if unconditional)."""
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        labels = self.class_labels(n, class_label)
        size = [int(s) for s in self.network.image_size] or None
        out = []
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, n, self.batch_size):
            m = min(self.batch_size, n - i)
            z = self.sample_latents(m, None if labels is None else labels[i : i + m], generator)
            images = self.autoencoder.decode(z, size if size and all(size) else None)
            if self.clip is not None:
                images = images.clamp(*self.clip)
            out.append(images.cpu())
        self.last_seconds_per_sample = (time.perf_counter() - start) / max(n, 1)
        self.last_cpu_seconds_per_sample = (time.process_time() - cpu_start) / max(n, 1)
        logger.info(
            f"sampled {n} images in {self.last_seconds_per_sample * n:.1f} s ({self.last_seconds_per_sample:.2f} s per "
            f"sample, {self.last_cpu_seconds_per_sample:.2f} CPU-s of this process per sample, "
            f"{self.num_inference_steps} {type(self.scheduler).__name__} steps, {torch.get_num_threads()} threads)"
        )
        return torch.cat(out), labels


# ---------------------------------------------------------------------------------------------------- handlers
class EMAWeights:
    """Exponential moving average of the network's weights, updated after every iteration.

    The average (not the raw weights) is what sampling uses: diffusion samples are much cleaner from averaged
    weights, most of all after short training. ``save_path`` (``models/model.pt``) receives the averaged
    network's state dict at the end of every epoch. Put this object in the checkpoint's objects to resume it.

    Args:
        network: the trained network (on its device).
        decay: EMA decay; the first updates use ``min(decay, (1 + n) / (10 + n))``.
        save_path: file written at each epoch end, or ``None``.
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, save_path: str | os.PathLike | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        self.network = network
        self.decay = float(decay)
        self.save_path = None if save_path is None else Path(save_path)
        self.ema = copy.deepcopy(network).eval().requires_grad_(False)
        self.num_updates = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        if self.save_path is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    @torch.no_grad()
    def update(self, engine: Engine | None = None) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        ema_p = [p for p in self.ema.parameters()]
        net_p = [p.detach() for p in self.network.parameters()]
        torch._foreach_lerp_(ema_p, net_p, 1.0 - d)
        for b_ema, b in zip(self.ema.buffers(), self.network.buffers()):
            b_ema.copy_(b)

    def save(self, engine: Engine | None = None) -> None:
        atomic_save(self.ema.state_dict(), self.save_path)
        logger.info(f"saved the averaged weights ({self.num_updates} updates) to {self.save_path}")

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.ema.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


class SampleGrid:
    """Writes ``<output_dir>/samples_epoch=N.png`` (a grid; 3D: mid-slices) every ``interval`` epochs.

    Args:
        sampler: the :class:`LatentSampler` (sampling from the averaged weights).
        output_dir: folder of the PNGs.
        n: samples per grid.
        interval: every how many epochs; 0 disables.
        seed: noise seed (the same noise every time, so grids are comparable across epochs).
    """

    def __init__(self, sampler: LatentSampler, output_dir: str | os.PathLike, n: int = 8, interval: int = 5, seed: int = 0):
        self.sampler = sampler
        self.output_dir = Path(output_dir)
        self.n = int(n)
        self.interval = int(interval)
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        if self.interval > 0 and self.n > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        images, labels = self.sampler.sample(self.n, seed=self.seed)
        path = self.output_dir / f"samples_epoch={engine.state.epoch}.png"
        _save_grid(path, images, labels)
        logger.info(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- outputs
def _mid_slices(volume: torch.Tensor) -> list[np.ndarray]:
    v = np.asarray(volume[0], dtype=np.float32)
    x, y, z = (s // 2 for s in v.shape)
    return [np.rot90(v[:, :, z])[None], np.rot90(v[:, y, :])[None], np.rot90(v[x, :, :])[None]]


def _save_grid(
    path: Path,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    ncols: int | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    names = list(names) if names is not None else [f"#{i}" for i in range(len(images))]
    if labels is not None:
        names = [f"{name} class {int(c)}" for name, c in zip(names, labels)]
    if images.ndim == 5:  # 3D: one row of axial, coronal, sagittal mid-slices per sample
        tiles = [s for img in images for s in _mid_slices(img)]
        titles = [f"{name} {v}" for name in names for v in ("ax", "cor", "sag")]
        return save_image_grid(path, tiles, ncols=3, titles=titles)
    return save_image_grid(path, list(images), ncols=ncols or min(8, max(1, len(images))), titles=names)


def write_samples(
    images: torch.Tensor,
    output_dir: str | os.PathLike,
    labels: torch.Tensor | None = None,
    voxel_size: Sequence[float] | float | None = None,
    prefix: str = "sample",
) -> list[Path]:
    """Write samples: 2D -> ``<prefix>_NNN.png`` (8-bit grey or RGB); 3D -> ``<prefix>_NNN.nii.gz`` (float32,
    affine ``diag(voxel_size)``); plus ``samples.png``, a grid of all (3D: mid-slices)."""
    import nibabel as nib
    from PIL import Image

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, img in enumerate(images):
        arr = img.float().numpy()
        if images.ndim == 4:
            pix = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[:3], 0, -1)
            path = out / f"{prefix}_{i:03d}.png"
            Image.fromarray(np.round(np.clip(pix, 0, 1) * 255.0).astype(np.uint8)).save(path)
        else:
            vs = [1.0, 1.0, 1.0] if voxel_size is None else list(np.broadcast_to(np.asarray(voxel_size, float), (3,)))
            data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
            path = out / f"{prefix}_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*vs, 1.0])), path)
        written.append(path)
    written.append(_save_grid(out / "samples.png", images, labels))
    return written


def generate(
    sampler: LatentSampler,
    n: int,
    output_dir: str | os.PathLike,
    class_label: int | Sequence[int] | None = None,
    seed: int = 0,
    voxel_size: Sequence[float] | float | None = None,
) -> dict[str, Any]:
    """Sample ``n`` images, write them (:func:`write_samples`) and ``sampling.json`` (timing); returns the latter."""
    images, labels = sampler.sample(n, class_label=class_label, seed=seed)
    write_samples(images, output_dir, labels, voxel_size)
    info = {
        "n_samples": int(n),
        "seconds_per_sample": sampler.last_seconds_per_sample,
        "cpu_seconds_per_sample": sampler.last_cpu_seconds_per_sample,
        "num_inference_steps": sampler.num_inference_steps,
        "scheduler": type(sampler.scheduler).__name__,
        "batch_size": sampler.batch_size,
        "device": str(sampler.network.scale_factor.device),
        "threads": torch.get_num_threads(),
        "image_size": [int(s) for s in sampler.network.image_size],
        "latent_shape": [int(s) for s in sampler.network.latent_shape],
        "labels": None if labels is None else [int(c) for c in labels],
    }
    (Path(output_dir) / "sampling.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------------------ metrics
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_settings(
    spatial_size: Sequence[int], weights: Sequence[float] = MS_SSIM_WEIGHTS, max_kernel: int = 11
) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights of ``MultiScaleSSIMMetric`` that fit images of ``spatial_size``.

    MONAI requires ``size // (n_scales - 1) ** 2 > kernel_size - 1`` for every dimension, and the coarsest scale
    (``size / 2 ** (n_scales - 1)``) must hold a kernel. The largest odd kernel up to ``max_kernel`` (at least 3)
    with all scales is taken; when none fits, the coarsest scales are dropped (weights renormalised).
    """
    smallest = min(int(s) for s in spatial_size)
    w = [float(x) for x in weights]
    while w:
        n = len(w)
        k = min(max_kernel, smallest // max(1, n - 1) ** 2, smallest // 2 ** (n - 1))
        if k % 2 == 0:
            k -= 1
        if k >= 3:
            total = sum(w)
            return k, tuple(x / total for x in w)
        w = w[:-1]
    raise ValueError(f"images of size {list(spatial_size)} are too small for MS-SSIM (need at least 3 pixels).")


def pairwise_ms_ssim(
    images: torch.Tensor,
    spatial_dims: int,
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
    chunk: int = 32,
) -> float:
    """Mean MS-SSIM over all pairs ``i < j`` of ``images`` ``[N, C, ...]`` in [0, 1] (MONAI's metric); lower means
    more diverse. Kernel size and weights default to :func:`ms_ssim_settings` for the image size."""
    n = images.shape[0]
    if n < 2:
        raise ValueError("pairwise MS-SSIM needs at least two images.")
    if kernel_size is None or weights is None:
        k, w = ms_ssim_settings(images.shape[2:])
        kernel_size = kernel_size or k
        weights = weights or w
    metric = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=1.0, kernel_size=kernel_size, weights=weights)
    i, j = torch.triu_indices(n, n, offset=1)
    values = []
    images = images.float()
    for s in range(0, i.numel(), chunk):
        values.append(metric(images[i[s : s + chunk]], images[j[s : s + chunk]]).reshape(-1))
    return float(torch.cat(values).mean())


def _real_images(data: Sequence[Mapping[str, Any]], transform: Any, n: int, image_key: str, seed: int) -> torch.Tensor:
    order = np.random.default_rng(seed).permutation(len(data))[:n]
    items = [transform(dict(data[int(i)]))[image_key] for i in order]
    return torch.stack([torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x).float() for x in items])


def evaluate_samples(
    sampler: LatentSampler,
    real_data: Sequence[Mapping[str, Any]],
    transform: Any,
    output_dir: str | os.PathLike,
    n_samples: int = 32,
    seed: int = 0,
    image_key: str = "image",
    kernel_size: int | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Diversity and distribution metrics of generated samples against real images; writes
    ``<output_dir>/metrics.json`` and ``samples_vs_real.png``.

    - ``ms_ssim_diversity_samples``: mean pairwise MS-SSIM among ``n_samples`` samples (lower: more diverse);
    - ``ms_ssim_diversity_real``: the same among ``n_samples`` real images (picked at random with ``seed``);
    - ``ms_ssim_diversity_ratio``: samples / real (1 means as diverse as the real images; the target is 0.8-1.2);
    - ``mmd``: MONAI ``MMDMetric`` between real and generated images (pixel space, linear kernel: an unbiased
      estimate of the squared distance between the mean images);
    - ``mmd_real_reference``: the same between the real images and a disjoint set of real images (the value
      an ideal generator would reach up to sampling noise; ``null`` when the test set is too small);
    - ``n_samples``, ``n_real``, ``seconds_per_sample``.

    Args:
        sampler: the :class:`LatentSampler`.
        real_data: datalist items of real images (e.g. the test section).
        transform: their preprocessing (the training preprocessing without augmentation).
        output_dir: folder of ``metrics.json``.
        n_samples: samples to generate (and real images to draw, at most ``len(real_data)``).
        seed: sampling and selection seed.
        image_key: key of the images.
        kernel_size: MS-SSIM kernel, default fitted to the image size (:func:`ms_ssim_settings`).
        weights: MS-SSIM scale weights, default fitted too.
    """
    if n_samples < 2:
        raise ValueError("n_samples must be at least 2 for pairwise diversity and MMD.")
    n_real = min(int(n_samples), len(real_data))
    if n_real < 2:
        raise ValueError(f"at least two real images are needed, the test section has {len(real_data)}.")
    n_ref = min(n_real, len(real_data) - n_real)  # a disjoint real set, for a real-vs-real MMD reference
    real_all = _real_images(real_data, transform, n_real + max(n_ref, 0), image_key, seed)
    real, reference = real_all[:n_real], real_all[n_real:]
    samples, labels = sampler.sample(int(n_samples), seed=seed)
    if real.shape[1:] != samples.shape[1:]:
        raise ValueError(
            f"real images {list(real.shape[1:])} and samples {list(samples.shape[1:])} differ in size; evaluate with "
            "the preprocessing (spatial_size) the model was trained with."
        )
    spatial_dims = samples.ndim - 2
    if kernel_size is None or weights is None:
        k, w = ms_ssim_settings(samples.shape[2:])
        kernel_size, weights = kernel_size or k, weights or w
    div_samples = pairwise_ms_ssim(samples, spatial_dims, kernel_size, weights)
    div_real = pairwise_ms_ssim(real, spatial_dims, kernel_size, weights)
    m = min(len(real), len(samples))
    mmd = float(MMDMetric()(real[:m], samples[:m]))
    mmd_real = float(MMDMetric()(real[: len(reference)], reference)) if len(reference) >= 2 else float("nan")
    metrics = {
        "ms_ssim_diversity_samples": div_samples,
        "ms_ssim_diversity_real": div_real,
        "ms_ssim_diversity_ratio": div_samples / div_real if div_real > 0 else float("nan"),
        "mmd": mmd,
        "mmd_real_reference": mmd_real,
        "n_samples": int(n_samples),
        "n_real": int(n_real),
        "seconds_per_sample": sampler.last_seconds_per_sample,
        "cpu_seconds_per_sample": sampler.last_cpu_seconds_per_sample,
        "num_inference_steps": sampler.num_inference_steps,
        "ms_ssim_kernel_size": int(kernel_size),
        "ms_ssim_weights": [float(x) for x in weights],
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.json.tmp"
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    tmp.write_text(json.dumps(clean, indent=2))
    os.replace(tmp, out / "metrics.json")
    k = min(8, m)
    both = torch.cat([samples[:k], real[:k]])
    names = [f"sample {i}" for i in range(k)] + [f"real {i}" for i in range(k)]
    _save_grid(out / "samples_vs_real.png", both, ncols=k if spatial_dims == 2 else None, names=names)
    logger.info(f"evaluation: {metrics} -> {out}")
    return metrics
