"""The trained network of the latent diffusion bundle: the noise-prediction UNet and what sampling needs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from vqvae_medical.stages.diffusion.torchscript import scriptable_copy
from vqvae_medical.training.mismatch import class_embedding_hint, register_mismatch_hint
from vqvae_medical.utils.io import safe_load

__all__ = ["PREDICTION_TYPES", "LatentDiffusionNetwork", "class_embeds_hint", "load_diffusion_network"]


PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample", "flow")
"""What the UNet predicts (MONAI schedulers' ``prediction_type``; ``"flow"``: the rectified-flow velocity of
:mod:`~vqvae_medical.stages.diffusion.flow`); stored in the checkpoint as an index."""


class LatentDiffusionNetwork(nn.Module):
    """The bundle's ``network_def``: a noise-prediction UNet on scaled latents plus what sampling needs.

    ``forward(x, timesteps, context=None, class_labels=None)`` is the UNet's: ``x`` is a noisy latent already
    multiplied by ``scale_factor``, ``timesteps`` a ``[B]`` tensor (or one int for the batch), and it returns the
    prediction (noise for ``prediction_type="epsilon"``) with ``x``'s shape. This is the network the trainer trains
    (``network_def`` of ``train.json``); the bundle's single-tensor ``network_def`` for inference and export is
    :class:`~vqvae_medical.stages.diffusion.generator.LatentDiffusionGenerator`, which holds it as ``diffusion``.

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
        self.register_buffer(
            "scale_factor", torch.tensor(float("nan") if scale_factor is None else float(scale_factor))
        )
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

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` (and ``monai.bundle ckpt_export``) compiles: a copy of this network in which
        the MONAI UNet modules that TorchScript cannot compile are replaced by subclasses with the same
        parameters and the same computation; this network itself is left as it is."""
        return scriptable_copy(self)

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


#: the diffusion UNet's class embeddings (``class_embedding``) of another number of classes: the ``num_class_embeds``
#: to pass (registered when the stage is imported)
class_embeds_hint = register_mismatch_hint(class_embedding_hint("class_embedding", "num_class_embeds", "None"))
