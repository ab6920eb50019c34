"""Pieces every training step shares: the finite-loss check and unwrapping DDP."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

__all__ = ["NonFiniteLossError", "check_finite_loss", "FiniteLossGuard", "unwrap"]


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite; the step stops before the optimizer changes any weight."""


def check_finite_loss(engine: Any, loss: torch.Tensor, what: str = "training loss", details: str = "") -> None:
    """Raise :class:`NonFiniteLossError` naming the epoch and iteration when ``loss`` is NaN or infinite.

    Call it after the forward pass and before ``backward``/``optimizer.step``, so that no weight is updated and
    the checkpoints on disk (written at epoch ends) stay those of the last good epoch. Every bundle's training
    step uses it: :class:`VQTrainStep`, :class:`~vqvae_medical.stages.prior.steps.PriorTrainStep` and, for MONAI's default
    iteration (the diffusion bundle), :class:`FiniteLossGuard`.

    Args:
        engine: the trainer (its ``state.epoch`` and ``state.iteration`` are reported).
        loss: the loss of this iteration.
        what: name of the loss in the message.
        details: extra text after the value (e.g. the loss terms).
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    value = loss.detach().float().mean().item()
    raise NonFiniteLossError(
        f"non-finite {what} ({value}) at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        f"{': ' + details if details else ''}. No weights were updated and the last checkpoint is intact; check "
        "the input data for NaN/Inf, lower the learning rate, or disable AMP."
    )


class FiniteLossGuard:
    """Ignite handler for trainers that run MONAI's own ``SupervisedTrainer`` iteration (no custom step): checks
    ``engine.state.output["loss"]`` with :func:`check_finite_loss` on ``IterationEvents.LOSS_COMPLETED``, i.e.
    after the loss is computed and before ``backward`` and the optimizer step."""

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        check_finite_loss(engine, engine.state.output[CommonKeys.LOSS])


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers."""
    while isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return network
