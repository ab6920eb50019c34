"""The prior's ``network_def``: a one-tensor wrapper of the transformer or gated PixelCNN prior, loading it, and the
check of a transformer's sequence length against the code map (the VQ-VAE-2's two-level ``network_def`` is
:class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from vqvae_medical.networks.pixelcnn import GatedPixelCNN
from vqvae_medical.networks.transformer_prior import TransformerPrior
from vqvae_medical.stages.frozen import grid_size
from vqvae_medical.stages.prior.checkpoint_settings import check_prior_checkpoint
from vqvae_medical.stages.prior.hierarchical import HierarchicalPrior
from vqvae_medical.stages.provenance import check_dims
from vqvae_medical.training.runtime import SettingError
from vqvae_medical.training.weights import load_weights
from vqvae_medical.utils.modules import unwrap

__all__ = ["PriorNetwork", "pack_inputs", "prior_of", "load_prior", "check_sequence_length"]


class PriorNetwork(nn.Module):
    """``forward(x) -> logits``: a gated PixelCNN or transformer prior behind a one-tensor interface.

    ``x`` is a float ``[B, C, H, W]`` tensor: channel 0 holds the codes (cast with ``.long()``), and for a
    class-conditioned prior channel 1 holds the class index (read at the top-left position, see
    :func:`pack_inputs`). The output is the prior's logits ``[B, K, H, W]``. Training reaches the prior through
    ``model``; the state-dict keys are ``model.*``.

    Args:
        model: the prior, a :class:`~vqvae_medical.networks.GatedPixelCNN` or a
            :class:`~vqvae_medical.networks.TransformerPrior` (class conditioning allowed, spatial conditioning not).
    """

    def __init__(self, model: GatedPixelCNN | TransformerPrior) -> None:
        super().__init__()
        if model.spatially_conditioned:
            raise ValueError("PriorNetwork supports class conditioning only, not a spatially conditioned prior.")
        self.model = model
        self.class_conditioned: bool = bool(model.class_conditioned)
        self.in_channels: int = 2 if self.class_conditioned else 1
        # a checkpoint of other settings (e.g. in ckpt_export): one error naming the settings to pass
        self.register_load_state_dict_pre_hook(check_prior_checkpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError("expected [B, C, H, W] input with C = 1 (codes) or 2 (codes, class) channels.")
        codes = x[:, 0].long()
        class_label: torch.Tensor | None = None
        if self.class_conditioned:
            class_label = x[:, 1, 0, 0].long()
        return self.model(codes, class_label)


def pack_inputs(codes: torch.Tensor, class_label: torch.Tensor | None = None) -> torch.Tensor:
    """The :class:`PriorNetwork` input of codes ``[B, H, W]`` and optional classes ``[B]``: float ``[B, 1|2, H, W]``."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, H, W], got {list(codes.shape)}.")
    x = codes.float()[:, None]
    if class_label is None:
        return x
    label = class_label.to(x.device, torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, *codes.shape[1:])
    return torch.cat([x, label], dim=1)


def prior_of(network: nn.Module) -> GatedPixelCNN | TransformerPrior | HierarchicalPrior:
    """The :class:`GatedPixelCNN` or :class:`TransformerPrior` inside a :class:`PriorNetwork` (or DDP wrapper), a
    :class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior` itself (top and bottom priors of a
    VQ-VAE-2), or ``network`` itself."""
    network = unwrap(network)
    if isinstance(network, HierarchicalPrior):
        return network
    network = unwrap(network, wrappers=True)
    if not isinstance(network, (GatedPixelCNN, TransformerPrior)):
        raise ValueError(
            f"expected a GatedPixelCNN, a TransformerPrior, a PriorNetwork or a HierarchicalPrior, got "
            f"{type(network).__name__}."
        )
    return network


def load_prior(network: nn.Module, ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a prior's ``model.pt`` (state dict of ``network_def``, or a ``{"model": ...}`` checkpoint) with
    ``weights_only=True``; returns ``network`` on ``device`` in eval mode.

    Raises:
        CheckpointError: no such file, or a checkpoint of another network (e.g. a gated PixelCNN prior loaded
            without ``configs/gated.json``, or another ``max_seq_len``); the message names the file and the fix.
    """
    load_weights(network, ckpt_path)
    return network.to(device).eval()


def check_sequence_length(network: nn.Module, autoencoder: nn.Module, image_size: Sequence[int] | None = None) -> bool:
    """Stop before training or sampling when a transformer prior's ``max_seq_len`` is shorter than the code map it
    must model (e.g. the default 1,024 positions, 32 x 32 codes of 128 x 128 images, against the 64 x 64 codes of
    256 x 256 photos). The learnt position table has ``max_seq_len`` rows, so the setting has to be the same for
    training, evaluation and inference. A gated PixelCNN has no such limit. Returns ``True`` (for config
    expressions).

    Args:
        network: the prior's ``network_def`` (:class:`PriorNetwork` or
            :class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior`).
        autoencoder: the frozen stage-1 autoencoder whose codes the prior models.
        image_size: image size; ``None`` for the autoencoder's record's.

    Raises:
        SettingError: naming ``max_seq_len`` (the top prior's, for a VQ-VAE-2), the code map, and the value to
            set; or saying that the autoencoder is 3D, which the prior does not model.
    """
    # a 3D autoencoder: say so before anything is encoded (the priors are 2D only)
    dims = getattr(autoencoder, "spatial_dims", None)
    if dims is not None:
        check_dims(int(dims), 2, "pixelcnn_prior", getattr(autoencoder, "directory", None))
    prior = prior_of(network)
    if isinstance(prior, HierarchicalPrior):
        model, level, gated = prior.top, 0, "a gated top prior (configs/vqvae2_gated_top.json)"
    else:
        model, level, gated = prior, None, "the gated PixelCNN prior (configs/gated.json)"
    size = image_size if image_size is not None else getattr(autoencoder, "image_size", None)
    # no size known (images of several sizes): the prior checks each batch
    if not isinstance(model, TransformerPrior) or size is None:
        return True
    grids = grid_size(autoencoder, size)
    # a prior for the other kind of autoencoder (one level against two): codes.check_codebooks stops the run when the
    # codes are read, with a message naming configs/vqvae2.json
    if isinstance(grids, tuple) != (level is not None):
        return True
    grid = grids[level] if level is not None else grids
    needed = math.prod(int(g) for g in grid)
    if needed > model.max_seq_len:
        raise SettingError(
            f"max_seq_len is {model.max_seq_len}, but the code map of this autoencoder is "
            f"{' x '.join(str(int(g)) for g in grid)} = {needed} positions: set --max_seq_len {needed} (the same value "
            f"for training, evaluation and inference), or use {gated}, which has no such limit."
        )
    return True
