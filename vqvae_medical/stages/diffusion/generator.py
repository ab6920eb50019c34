"""The latent diffusion bundle's ``network_def``: deterministic DDIM sampling and decoding, latent noise in, image
out."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler
from torch import nn

from vqvae_medical.networks.vqvae import crop_to
from vqvae_medical.stages.diffusion.flow import FLOW, flow_steps
from vqvae_medical.stages.diffusion.network import (
    PREDICTION_TYPES,
    LatentDiffusionNetwork,
)
from vqvae_medical.stages.diffusion.torchscript import scriptable_copy
from vqvae_medical.training.mismatch import describe_mismatch
from vqvae_medical.utils.io import CheckpointError, MissingCheckpointError, safe_load
from vqvae_medical.utils.modules import unwrap

__all__ = ["LatentDiffusionGenerator", "check_class_embeds", "load_generator"]


class LatentDiffusionGenerator(nn.Module):
    """``forward(noise) -> images``: the deterministic DDIM sampler (eta = 0) in the latent space of a frozen VQ-VAE,
    followed by its decoder (Song et al., DDIM, ICLR 2021, arXiv:2010.02502; Rombach et al., LDM, CVPR 2022).

    ``noise`` is ``x_T`` ``[B, D, *latent_spatial]`` (standard normal, the size of the scaled latents); every one of
    the scheduler's ``num_inference_steps`` timesteps runs the UNet of ``diffusion`` and MONAI's ``DDIMScheduler.step``
    update with ``eta = 0``, written out here with the same operations so that TorchScript compiles the whole loop.
    With MONAI's ``RFlowScheduler`` (a rectified-flow UNet, prediction type ``"flow"``) each step is its Euler
    step ``x + v dt`` (``RFlowScheduler.step``; :mod:`~vqvae_medical.stages.diffusion.flow`).
    The final latent is divided by ``scale_factor``, snapped to the codebook (``snap_to_codebook``), decoded,
    cropped to the training image size (the ``image_size`` buffer, when set) and clipped. A class-conditioned UNet
    takes ``class_labels`` ``[B]`` as an optional second argument. The same noise gives the same images, in eager
    mode and from the TorchScript module (``monai.bundle ckpt_export``).

    State-dict keys (``models/model.pt`` of the bundle): ``diffusion.*`` (the :class:`LatentDiffusionNetwork`
    trained by ``train.json``, with the averaged weights: ``diffusion.unet.*``, ``diffusion.scale_factor``,
    ``diffusion.latent_shape``, ``diffusion.image_size``, ``diffusion.prediction_code``), ``decoder.*`` and
    ``quantizer.*`` (the frozen VQ-VAE's decoder and codebook, as in its own checkpoint under ``model.``). The
    scheduler's tables are derived from the scheduler settings of the config and are not saved.

    Args:
        diffusion: the noise-prediction network.
        autoencoder: the frozen VQ-VAE (a :class:`~vqvae_medical.networks.VQVAE`, its ``ReconstructionNetwork`` or
            a :class:`~vqvae_medical.stages.frozen.FrozenAutoencoder`); its decoder and quantizer are shared, not
            copied.
        scheduler: MONAI ``DDIMScheduler`` with the training schedule (betas, ``prediction_type``, clipping), or
            ``RFlowScheduler`` for a rectified-flow UNet.
        num_inference_steps: DDIM (or Euler) steps.
        snap_to_codebook: replace each final latent vector by its nearest codebook vector before decoding.
        clip: range the images are clipped to, or ``None``.
    """

    def __init__(
        self,
        diffusion: LatentDiffusionNetwork,
        autoencoder: nn.Module,
        scheduler: DDIMScheduler | RFlowScheduler,
        num_inference_steps: int = 50,
        snap_to_codebook: bool = True,
        clip: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, (DDIMScheduler, RFlowScheduler)):
            name = type(scheduler).__name__
            raise ValueError(f"scheduler must be a MONAI DDIMScheduler or RFlowScheduler, got {name}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        if clip is not None and len(clip) != 2:
            raise ValueError(f"clip must be (min, max) or None, got {clip}.")
        vqvae = unwrap(autoencoder, wrappers=True)  # the VQVAE of a FrozenAutoencoder or ReconstructionNetwork
        for name in ("decoder", "quantizer"):
            if not isinstance(getattr(vqvae, name, None), nn.Module):
                raise ValueError(f"the autoencoder must be a VQVAE with a {name}; got {type(vqvae).__name__}.")
        self.diffusion = diffusion
        self.decoder = vqvae.decoder
        self.quantizer = vqvae.quantizer
        self.decoder.requires_grad_(False).eval()
        self.quantizer.requires_grad_(False).eval()
        self.snap_to_codebook = bool(snap_to_codebook)
        self.clip = clip is not None
        self.clip_min, self.clip_max = (0.0, 0.0) if clip is None else (float(clip[0]), float(clip[1]))
        self.scheduler_name = type(scheduler).__name__
        self.num_inference_steps = int(num_inference_steps)
        if isinstance(scheduler, RFlowScheduler):
            self.prediction_code = PREDICTION_TYPES.index(FLOW)
            self.clip_sample, self.clip_sample_min, self.clip_sample_max = False, -1.0, 1.0
            spatial = [int(s) for s in diffusion.latent_shape[1:]]
            timesteps, step = flow_steps(scheduler, self.num_inference_steps, spatial)
            alpha = alpha_prev = torch.zeros_like(step)  # DDIM's tables: unused by the flow's Euler steps
        else:
            self.prediction_code = PREDICTION_TYPES.index(str(scheduler.prediction_type))
            self.clip_sample = bool(scheduler.clip_sample)
            self.clip_sample_min, self.clip_sample_max = (float(v) for v in scheduler.clip_sample_values)
            # the DDIMScheduler's own timesteps and alphas (set_timesteps and step), tabulated per step
            scheduler.set_timesteps(self.num_inference_steps)
            timesteps = scheduler.timesteps.long().cpu()
            previous = timesteps - scheduler.num_train_timesteps // scheduler.num_inference_steps
            table = scheduler.alphas_cumprod.float().cpu()
            alpha = table[timesteps]
            alpha_prev = torch.stack(
                [table[int(p)] if p >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod) for p in previous]
            ).float()
            step = torch.zeros_like(alpha)  # the flow's Euler steps: unused by DDIM
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.register_buffer("alpha", alpha, persistent=False)
        self.register_buffer("alpha_prev", alpha_prev, persistent=False)
        self.register_buffer("step_size", step, persistent=False)

    def train(self, mode: bool = True) -> LatentDiffusionGenerator:
        """The generator is never trained: it stays in eval mode (the VQ-VAE's EMA codebook must not move)."""
        return super().train(False)

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: a copy with MONAI's UNet pieces made scriptable (see
        :func:`~vqvae_medical.stages.diffusion.torchscript.scriptable_copy`); this module stays as it is."""
        return scriptable_copy(self)

    def denoise(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The DDIM (or rectified-flow Euler) loop: ``x_T`` (scaled latent space) -> ``x_0``."""
        if int(self.diffusion.prediction_code) != self.prediction_code:
            raise ValueError("the network was trained with another prediction_type than the sampling scheduler's.")
        batch = x.shape[0]
        for i in range(self.timesteps.shape[0]):
            out = self.diffusion(x, self.timesteps[i].expand([batch]), None, class_labels)
            if self.prediction_code == 3:  # flow: the velocity x_0 - noise, one Euler step towards t = 0
                x = x + self.step_size[i] * out
                continue
            alpha, alpha_prev = self.alpha[i], self.alpha_prev[i]
            beta = 1 - alpha
            if self.prediction_code == 0:  # epsilon
                x0 = (x - (beta**0.5) * out) / (alpha**0.5)
                eps = out
            elif self.prediction_code == 2:  # sample
                x0 = out
                eps = (x - (alpha**0.5) * x0) / (beta**0.5)
            else:  # v_prediction
                x0 = (alpha**0.5) * x - (beta**0.5) * out
                eps = (alpha**0.5) * out + (beta**0.5) * x
            if self.clip_sample:
                x0 = torch.clamp(x0, self.clip_sample_min, self.clip_sample_max)
            x = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
        return x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images: ``/ scale_factor``, codebook snap, decoder, crop, clip; returned in the standard
        (contiguous) memory format even when the decoder runs channels-last, since consumers such as MONAI's
        ``MMDMetric`` flatten images with ``view``, which fails on a channels-last image of more than one channel."""
        z = x / self.diffusion.scale_factor
        if self.snap_to_codebook:
            z = self.quantizer.embed(self.quantizer.quantize_indices(z))
        images = self.decoder(z)
        size: list[int] = self.diffusion.image_size.tolist()
        if len(size) > 0 and min(size) > 0:
            images = crop_to(images, size)
        if self.clip:
            images = images.clamp(self.clip_min, self.clip_max)
        return images.contiguous()

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.denoise(x, class_labels))


def check_class_embeds(generator: LatentDiffusionGenerator, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise a :class:`CheckpointError` naming ``--num_class_embeds`` when the classes of the UNet in ``state``
    (``diffusion.unet.class_embedding.weight``: one row per class) are not those of the generator built now."""
    key = "diffusion.unet.class_embedding.weight"
    saved = int(state[key].shape[0]) if key in state else None
    wanted = generator.diffusion.num_class_embeds
    wanted = int(wanted) if wanted else None
    if saved == wanted:
        return
    if wanted is None:
        fix = f"it is a class-conditioned model ({saved} classes): pass --num_class_embeds {saved}"
    elif saved is None:
        fix = f"it is an unconditioned model, and num_class_embeds is {wanted}: leave out --num_class_embeds"
    else:
        fix = f"it has {saved} classes, and num_class_embeds is {wanted}: pass --num_class_embeds {saved}"
    raise CheckpointError(f"{path} does not fit the network: {fix}.")


def load_generator(
    generator: LatentDiffusionGenerator,
    ckpt_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    autoencoder: nn.Module | None = None,
) -> LatentDiffusionGenerator:
    """Load ``models/model.pt`` into ``generator`` (``weights_only``), check it is trained, return it in eval mode.

    A ``models/model.pt`` of bundle version 0.1.x holds the UNet's keys only (no ``diffusion.`` prefix): it loads
    into ``generator.diffusion`` when ``autoencoder`` (the frozen VQ-VAE it was trained on, e.g. from
    :func:`~vqvae_medical.stages.frozen.load_autoencoder`) gives the decoder and codebook.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingCheckpointError(
            f"{path}: no diffusion checkpoint; train the latent_diffusion bundle first, or pass --ckpt_path <its "
            "models/model.pt>."
        )
    state = safe_load(path, map_location="cpu")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if any(k.startswith("diffusion.") for k in state):
        check_class_embeds(generator, state, path)
        try:
            generator.load_state_dict(state)
        except RuntimeError:
            why = describe_mismatch(generator, state)
            if why is None:
                raise
            raise CheckpointError(f"{path} does not fit the network: {why}.") from None
    elif autoencoder is None:
        raise ValueError(
            f"{path} holds the diffusion UNet only (a model.pt of bundle version 0.1.x): pass the frozen VQ-VAE it "
            "was trained on as autoencoder=, or re-save it with the decoder (see the bundle's changelog)."
        )
    else:
        generator.diffusion.load_state_dict(state)
        vqvae = unwrap(autoencoder, wrappers=True)
        generator.decoder.load_state_dict(vqvae.decoder.state_dict())
        generator.quantizer.load_state_dict(vqvae.quantizer.state_dict())
    generator.diffusion.check_ready()
    return generator.to(device).eval()
