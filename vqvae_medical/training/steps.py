"""Pieces every training step shares: the AMP/backward/optimizer iteration (:class:`TrainStep`) and the finite-loss
check. ``unwrap`` (the network inside a DDP wrapper), which configs cite here, is re-exported from
:func:`vqvae_medical.utils.modules.unwrap`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from vqvae_medical.training.runtime import resolve_cpu_bf16
from vqvae_medical.utils.errors import UserError
from vqvae_medical.utils.modules import unwrap

__all__ = ["FiniteLossGuard", "NonFiniteLossError", "TrainStep", "check_finite_loss", "unwrap"]


class NonFiniteLossError(UserError, RuntimeError):
    """Raised when a training loss is NaN or infinite; the step stops before the optimizer changes any weight."""


def check_finite_loss(
    engine: Any, loss: torch.Tensor, what: str = "training loss", details: str | Callable[[], str] = ""
) -> None:
    """Raise :class:`NonFiniteLossError` naming the epoch and iteration when ``loss`` is NaN or infinite.

    Call it after the forward pass and before ``backward``/``optimizer.step``, so that no weight is updated and
    the checkpoints on disk (written at epoch ends) stay those of the last good epoch. Every bundle's training
    step uses it: :class:`TrainStep` (the autoencoder's and the prior's steps) and, for MONAI's default iteration
    (the diffusion bundle), :class:`FiniteLossGuard`.

    Args:
        engine: the trainer (its ``state.epoch`` and ``state.iteration`` are reported).
        loss: the loss of this iteration.
        what: name of the loss in the message.
        details: extra text after the value (e.g. the loss terms), or a function giving it (called only when the
            loss is not finite, so that a finite step does not read the terms back from the device).
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    details = details() if callable(details) else details
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


class TrainStep(ABC):
    """The training iteration of MONAI's ``SupervisedTrainer`` for networks whose loss is not
    ``loss_function(network(image), label)``: the autoencoders (reconstruction + quantizer terms, several outputs)
    and the prior (codes in, logits out, class labels packed into the input).

    Subclasses give :meth:`forward` (batch -> inputs and network outputs) and :meth:`compute_loss`; this class runs
    them as ``SupervisedTrainer._iteration`` does: training mode, ``optimizer.zero_grad(set_to_none=
    engine.optim_set_to_none)``, the forward pass under CUDA autocast with ``engine.amp_kwargs`` when ``engine.amp``
    (or CPU bf16 autocast, see :meth:`autocast`), ``engine.state.output`` filled before each of
    ``IterationEvents.FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED`` fires,
    backward and ``optimizer.step`` through ``engine.scaler`` (the trainer's ``GradScaler``) under AMP. Added to it:
    the loss is computed in fp32 outside autocast, and :func:`check_finite_loss` stops the run before ``backward``
    when the loss is NaN or infinite. The returned output has every tensor detached.

    Args:
        cpu_bf16: on the CPU, run the forward pass under ``torch.autocast("cpu", dtype=torch.bfloat16)``: ``True``
            where the CPU has native bf16 instructions (AVX512-BF16 or AMX; else fp32 and one warning, see
            :func:`~vqvae_medical.training.runtime.resolve_cpu_bf16`), ``"force"`` on any CPU. The attribute
            ``cpu_bf16`` holds what the step does.
        loss_name: name of the loss in the non-finite-loss message.
    """

    def __init__(self, cpu_bf16: bool | str = False, loss_name: str = "training loss") -> None:
        self.cpu_bf16 = resolve_cpu_bf16(cpu_bf16)
        self.loss_name = loss_name

    def autocast(self, engine: Any, device: torch.device) -> AbstractContextManager:
        """CUDA AMP (``engine.amp``, ``engine.amp_kwargs``) on a GPU; bf16 on the CPU when ``cpu_bf16``."""
        if device.type == "cuda":
            return torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.cpu_bf16 else nullcontext()

    @abstractmethod
    def forward(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        """Move the batch to ``engine.state.device`` and run ``engine.network``; returns the inputs and outputs the
        loss and the handlers need (run under :meth:`autocast`)."""

    @abstractmethod
    def compute_loss(self, output: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of ``output`` and its named terms (added to the output and to a non-finite message).
        It may remove intermediate entries of ``output`` (e.g. logits) that the handlers do not need."""

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        device = torch.device(engine.state.device)
        with self.autocast(engine, device):
            output = self.forward(engine, batchdata)
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        with torch.autocast(device.type, enabled=False):
            loss, terms = self.compute_loss(output)
        output.update(terms)
        output[CommonKeys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        def details() -> str:
            return ", ".join(f"{k} {v.detach().float().item()}" for k, v in terms.items())

        check_finite_loss(engine, loss, what=self.loss_name, details=details)
        scaler = engine.scaler if engine.amp and device.type == "cuda" else None
        if scaler is not None:
            scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                output[key] = value.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
