"""Prepare-batch of the latent diffusion trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import DiffusionPrepareBatch

from vqvae_medical.stages.diffusion.flow import FLOW, check_flow_scheduler, flow_timesteps
from vqvae_medical.stages.diffusion.network import PREDICTION_TYPES, LatentDiffusionNetwork
from vqvae_medical.stages.frozen import FrozenAutoencoder

__all__ = ["LatentDiffusionPrepareBatch", "min_snr_probs"]


def min_snr_probs(scheduler: Any, prediction_type: str, gamma: float) -> torch.Tensor:
    """Probabilities of the training timesteps proportional to their Min-SNR-``gamma`` loss weight (Hang et al.,
    ICCV 2023) for a loss on ``prediction_type``; see :class:`LatentDiffusionPrepareBatch`.

    Args:
        scheduler: a MONAI noise scheduler with ``alphas_cumprod`` (DDPM/DDIM).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        gamma: the SNR cap, ``> 0`` (the paper's default is 5).
    """
    if gamma is None or not gamma > 0:
        raise ValueError(f"min_snr_gamma must be a positive number, got {gamma!r}.")
    if scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError("min_snr_gamma needs the training scheduler (a DDPM/DDIM scheduler with alphas_cumprod).")
    alpha_bar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    snr = alpha_bar / (1.0 - alpha_bar)
    capped = snr.clamp(max=float(gamma))
    weight = {"epsilon": capped / snr, "v_prediction": capped / (snr + 1.0), "sample": capped}[prediction_type]
    return (weight / weight.sum()).float()


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
        scheduler: the training scheduler, needed for ``prediction_type="v_prediction"`` and ``"flow"``.
        prediction_type: ``"epsilon"`` (target: the noise), ``"v_prediction"``, ``"sample"`` or ``"flow"``
            (rectified flow with MONAI's ``RFlowScheduler``: target ``latent - noise``, timesteps drawn as the
            scheduler's ``sample_method`` says, see :func:`~vqvae_medical.stages.diffusion.flow.flow_timesteps`).
        latent_key: batch key of pre-extracted latents.
        image_key: batch key of images to encode.
        label_key: batch key of int class labels for a class-conditioned UNet, or ``None``.
        seed: draw noise and timesteps from a generator re-seeded at every epoch start (attach this object to
            the engine as a handler): the same noise every validation, comparable across epochs.
        min_snr_gamma: ``None`` draws timesteps uniformly (MONAI's ``DiffusionPrepareBatch``); a value ``gamma``
            draws timestep ``t`` with probability proportional to the Min-SNR-gamma weight of Hang et al.,
            "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023 (arXiv:2303.09556), written
            for the prediction type's loss: ``min(SNR, gamma) / SNR`` (epsilon), ``min(SNR, gamma) / (SNR + 1)``
            (v) or ``min(SNR, gamma)`` (sample), with ``SNR = alpha_bar / (1 - alpha_bar)`` of ``scheduler``.
            Drawing ``t`` in proportion to the weight gives the weighted loss's expected gradient while MONAI's
            trainer keeps its plain ``MSELoss`` (the loss never sees the timesteps, so it cannot weight them).
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
        min_snr_gamma: float | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=None)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if prediction_type != network.prediction_type:
            raise ValueError(
                f"prediction_type {prediction_type!r} differs from the network's {network.prediction_type!r}."
            )
        if prediction_type == "v_prediction" and scheduler is None:
            raise ValueError("prediction_type='v_prediction' needs the scheduler (for get_velocity).")
        if scheduler is not None or prediction_type == FLOW:
            check_flow_scheduler(scheduler, prediction_type)
        self.network = network
        self.autoencoder = autoencoder
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.latent_key, self.image_key, self.label_key = latent_key, image_key, label_key  # keys of the batch
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.timestep_probs = None
        if min_snr_gamma is not None:
            self.timestep_probs = min_snr_probs(scheduler, prediction_type, min_snr_gamma)

    def attach(self, engine: Engine) -> None:
        if self.seed is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)

    def reset(self, engine: Engine | None = None) -> None:
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape, generator=self.generator, dtype=images.dtype).to(images.device)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == FLOW:
            return flow_timesteps(self.scheduler, images.shape[0], images.shape[2:], self.generator).to(images.device)
        if self.timestep_probs is not None:
            t = torch.multinomial(self.timestep_probs, images.shape[0], replacement=True, generator=self.generator)
        else:
            t = torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=self.generator)
        return t.long().to(images.device)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        if self.prediction_type == "sample":
            return images
        if self.prediction_type == FLOW:
            return images - noise
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
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
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
