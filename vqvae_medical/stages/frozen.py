"""The frozen stage-1 autoencoder that every stage-2 bundle builds on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from vqvae_medical.training.checkpoints import safe_load

__all__ = ["model_state_dict", "load_vqvae", "file_sha256", "state_digest", "LATENT_KINDS", "FrozenAutoencoder", "state_fingerprint", "load_autoencoder"]


def model_state_dict(state: Any) -> Mapping[str, torch.Tensor]:
    """The network state dict of a ``model.pt`` (a state dict) or of a training checkpoint (``{"model": ...}``)."""
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        return state["model"]
    if not isinstance(state, Mapping):
        raise ValueError("the VQ-VAE checkpoint must hold a state dict or a {'model': state dict} checkpoint.")
    return state


def load_vqvae(
    bundle_dir: str | os.PathLike,
    ckpt_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    config_file: str = "inference.json",
    net_id: str = "network_def",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The trained autoencoder of a VQ-VAE bundle, in eval mode, with gradients off.

    The network definition is read from the bundle's own config with :class:`monai.bundle.ConfigParser`, so the
    architecture is not repeated in the prior's config; ``overrides`` change it as on that bundle's command line
    (e.g. ``{"in_channels": 3, "network_def#model#channels": [32, 64]}``). The weights are loaded with
    ``weights_only=True``. Relative paths resolve against the working directory.

    Args:
        bundle_dir: the VQ-VAE bundle folder (with ``configs/<config_file>``).
        ckpt_path: its checkpoint (default ``<bundle_dir>/models/model.pt``): the state dict of ``net_id`` or a
            training checkpoint ``{"model": state dict, ...}``.
        overrides: config id -> value, applied before the network is built.
        config_file: config file of the bundle holding the network definition.
        net_id: id of the network definition.
        device: device of the returned module.

    Returns:
        the autoencoder (the ``model`` inside a :class:`~vqvae_medical.networks.ReconstructionNetwork`).
    """
    bundle_dir = Path(bundle_dir).absolute()
    config = bundle_dir / "configs" / config_file
    if not config.is_file():
        raise ValueError(f"{config} does not exist: vqvae_bundle_dir must be a VQ-VAE bundle folder.")
    ckpt = Path(ckpt_path) if ckpt_path is not None else bundle_dir / "models" / "model.pt"
    if not ckpt.is_file():
        raise ValueError(f"VQ-VAE checkpoint {ckpt} does not exist. Train the VQ-VAE bundle first or set vqvae_ckpt.")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    net = parser.get_parsed_content(net_id, instantiate=True)
    try:
        net.load_state_dict(model_state_dict(safe_load(ckpt)))
    except RuntimeError as e:
        raise ValueError(
            f"{ckpt} does not fit the network of {config} with overrides {dict(overrides or {})}: pass the "
            f"overrides the VQ-VAE was trained with (vqvae_overrides). {e}"
        ) from e
    model = getattr(net, "model", net)
    if not hasattr(model, "encode_to_indices") or not hasattr(model, "decode_from_indices"):
        raise ValueError(f"{net_id} of {config} is not a VQ-VAE (no encode_to_indices/decode_from_indices).")
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


LATENT_KINDS: tuple[str, ...] = ("encoder", "quantized")
"""``"encoder"``: continuous encoder output before quantization; ``"quantized"``: its nearest codebook vectors."""


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
