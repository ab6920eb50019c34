"""Rectified flow on the latents with MONAI's ``RFlowScheduler``: training timesteps from a seeded generator and the
sampler's Euler steps as tables.

Rectified flow (Liu et al., "Flow Straight and Fast", ICLR 2023, arXiv:2209.03003; the logit-normal timesteps of
Esser et al., "Scaling Rectified Flow Transformers", ICML 2024, arXiv:2403.03206) noises a latent along the straight
line ``x_t = (1 - t / T) x_0 + (t / T) noise`` (``RFlowScheduler.add_noise``) and trains the UNet to predict the
velocity ``x_0 - noise`` (prediction type ``"flow"``); sampling integrates it from ``t = T`` to ``0`` in Euler steps
(``RFlowScheduler.step``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.schedulers import RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform

__all__ = ["FLOW", "check_flow_scheduler", "flow_steps", "flow_timesteps"]

FLOW = "flow"
"""The prediction type of a rectified-flow UNet: the velocity ``x_0 - noise``."""


def check_flow_scheduler(scheduler: Any, prediction_type: str) -> None:
    """Raise a ``ValueError`` unless ``prediction_type`` is ``"flow"`` exactly when ``scheduler`` is MONAI's
    ``RFlowScheduler`` (its ``add_noise`` interpolates; a DDPM/DDIM scheduler's does not)."""
    is_flow = isinstance(scheduler, RFlowScheduler)
    if is_flow and prediction_type != FLOW:
        raise ValueError(f"an RFlowScheduler trains prediction_type 'flow', got {prediction_type!r}.")
    if not is_flow and prediction_type == FLOW:
        raise ValueError(
            f"prediction_type 'flow' needs MONAI's RFlowScheduler, got {type(scheduler).__name__} "
            "(add configs/rflow.json to the config files)."
        )


def flow_timesteps(
    scheduler: RFlowScheduler, batch: int, spatial_shape: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """``batch`` training timesteps in ``[0, T)`` drawn as ``RFlowScheduler.sample_timesteps`` draws them (its
    ``sample_method``, discrete or not, its timestep transform), but from ``generator``.

    Written here because MONAI's ``sample_timesteps`` draws from the global random state: with a seeded generator
    the validation loss sees the same timesteps at every epoch, as it does for the DDPM bundle.

    Args:
        scheduler: the training ``RFlowScheduler``.
        batch: number of timesteps.
        spatial_shape: spatial shape of the latents (for the timestep transform).
        generator: random generator, or ``None`` for the global one.
    """
    total = scheduler.num_train_timesteps
    if scheduler.sample_method == "uniform":
        t = torch.rand(batch, generator=generator) * total
    elif scheduler.sample_method == "logit-normal":  # the scheduler's LogisticNormal of one variable: sigmoid(normal)
        normal = scheduler.distribution.base_dist.base_dist  # LogisticNormal(Independent(Normal(loc, scale)))
        t = torch.sigmoid(normal.loc[0] + normal.scale[0] * torch.randn(batch, generator=generator)) * total
    else:
        raise ValueError(f"sample_method must be 'uniform' or 'logit-normal', got {scheduler.sample_method!r}.")
    if scheduler.use_discrete_timesteps:
        t = t.long()
    if scheduler.use_timestep_transform:
        numel = math.prod(int(s) for s in spatial_shape)
        t = timestep_transform(
            t,
            input_img_size_numel=numel,
            base_img_size_numel=scheduler.base_img_size_numel,
            num_train_timesteps=total,
            spatial_dim=len(spatial_shape),
        )
    return t


def flow_steps(
    scheduler: RFlowScheduler, num_inference_steps: int, spatial_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's timesteps ``[n]`` (``RFlowScheduler.set_timesteps``) and the Euler step of each, ``(t_i -
    t_{i+1}) / T`` with ``t_n = 0`` (what ``RFlowScheduler.step`` adds ``v * dt`` with), as float tensors."""
    numel = math.prod(int(s) for s in spatial_shape)
    if scheduler.use_timestep_transform and numel < 1:
        raise ValueError("the RFlowScheduler's timestep transform needs the latent shape; build the network with it.")
    scheduler.set_timesteps(int(num_inference_steps), input_img_size_numel=numel)
    timesteps = scheduler.timesteps.float().cpu()
    following = torch.cat([timesteps[1:], torch.zeros(1)])
    return timesteps, (timesteps - following) / float(scheduler.num_train_timesteps)
