"""Ignite iteration steps for the autoencoders, used as ``iteration_update`` of MONAI's workflows.

MONAI's ``SupervisedTrainer._iteration`` computes ``loss_function(network(x), y)`` and keeps only the network output;
a VQ-VAE's training loss needs the quantizer loss from the same forward pass, and the handlers need the code
indices, perplexity and usage. These steps run one forward pass, add the losses, keep MONAI's AMP conventions
(``engine.amp``, ``engine.scaler``; the quantizer itself stays in fp32) and return a dict that MONAI handlers read
with ``from_engine`` (``image``, ``label``, ``pred``, ``loss``) plus the code statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from vqvae_medical.losses import SeparableSSIMLoss

__all__ = [
    "NonFiniteLossError",
    "check_finite_loss",
    "FiniteLossGuard",
    "unwrap",
    "reconstruction_loss",
    "VQTrainStep",
    "VQEvalStep",
    "training_scalars",
]


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite; the step stops before the optimizer changes any weight."""


def check_finite_loss(engine: Any, loss: torch.Tensor, what: str = "training loss", details: str = "") -> None:
    """Raise :class:`NonFiniteLossError` naming the epoch and iteration when ``loss`` is NaN or infinite.

    Call it after the forward pass and before ``backward``/``optimizer.step``, so that no weight is updated and
    the checkpoints on disk (written at epoch ends) stay those of the last good epoch. Every bundle's training
    step uses it: :class:`VQTrainStep`, :class:`~vqvae_medical.prior.PriorTrainStep` and, for MONAI's default
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


def reconstruction_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``"l1"`` or ``"mse"`` reconstruction loss."""
    if kind == "l1":
        return F.l1_loss
    if kind == "mse":
        return F.mse_loss
    raise ValueError(f"reconstruction loss must be 'l1' or 'mse', got {kind!r}.")


def _level_stats(levels) -> dict[str, torch.Tensor]:
    """Perplexity and usage of each code level; one level is reported without a suffix."""
    names = ("",) if len(levels) == 1 else ("_top", "_bottom") if len(levels) == 2 else tuple(f"_{i}" for i in range(len(levels)))
    stats: dict[str, torch.Tensor] = {}
    for name, level in zip(names, levels):
        stats[f"perplexity{name}"] = level.perplexity.detach()
        stats[f"usage{name}"] = level.usage.detach()
    return stats


class VQTrainStep:
    """One training iteration of a VQ-VAE or VQ-VAE-2:
    ``loss = recon(x_hat, x) + ssim_weight * (1 - SSIM(x_hat, x)) + quantizer_weight * quantizer_loss``, with
    ``x_hat`` the reconstruction clamped to ``clip`` (straight-through gradient).

    The optional SSIM term (Wang et al. 2004; as a training loss: Zhao et al., "Loss Functions for Image
    Restoration with Neural Networks", IEEE TCI 2017) weights local contrast and structure that an L1 or MSE loss
    averages away; it assumes images scaled to [0, 1]. It is :class:`~vqvae_medical.losses.SeparableSSIMLoss`, the
    value of MONAI's ``SSIMLoss`` at a fraction of its cost in 3D.

    Args:
        recon_loss: ``"l1"`` or ``"mse"``.
        quantizer_weight: weight of the quantizer loss (commitment, plus codebook loss for gradient codebooks).
        ssim_weight: weight of the ``1 - SSIM`` term; 0 turns it off.
        ssim_win_size: Gaussian window of the SSIM term (give it the evaluation metric's window).
        clip: value range of the reconstruction that the losses see, or ``None`` for the raw decoder output. The
            forward value is clamped to ``clip``, the gradient passes straight through (Bengio et al., "Estimating
            or Propagating Gradients Through Stochastic Neurons", arXiv 1308.3432), so the training loss is the
            one of the prediction that validation, evaluation and inference score (:class:`VQEvalStep` clamps to
            the same range). With the raw output (the 0.2.0 recipe) the SSIM term penalised a background of -0.1
            as much as one of +0.1 while the clamped evaluation scored the first as perfect: on mostly-black
            medical images the decoder's background offset drifted across zero under Adam, and the validation
            SSIM flipped between ~0.7 and ~0.1 with its sign (measured: background SSIM 0.94 <-> 0.002 between
            neighbouring probes, foreground SSIM steady; ``benchmarks/convergence_probe.py``). Clamped, a
            background anywhere below zero costs nothing and stays there.
        cpu_bf16: on the CPU, run the network under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the quantizer
            and the losses stay fp32). MONAI's ``amp`` is CUDA-only; on CPUs with AVX512-BF16 or AMX instructions
            bf16 convolutions are much faster (a 3D step of the ``vqvae_3d`` network at 64³, batch 2: 0.43 vs
            0.74 CPU-s, one thread, with the SSIM term). Off by default: without those instructions it is slower,
            and activations keep 8 bits of mantissa. Ignored on CUDA (``engine.amp`` decides there).
        image_key: key of the images in the batch dict.
    """

    def __init__(
        self,
        recon_loss: str = "l1",
        quantizer_weight: float = 1.0,
        ssim_weight: float = 0.0,
        ssim_win_size: int = 11,
        clip: tuple[float, float] | None = (0.0, 1.0),
        cpu_bf16: bool = False,
        image_key: str = CommonKeys.IMAGE,
    ):
        if ssim_weight < 0:
            raise ValueError(f"ssim_weight must be >= 0, got {ssim_weight}.")
        if clip is not None and not float(clip[0]) < float(clip[1]):
            raise ValueError(f"clip must be (low, high) with low < high, got {clip}.")
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.recon = reconstruction_loss(recon_loss)
        self.quantizer_weight = float(quantizer_weight)
        self.ssim_weight = float(ssim_weight)
        self.ssim_win_size = int(ssim_win_size)
        self.cpu_bf16 = bool(cpu_bf16)
        if self.cpu_bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.warn("cpu_bf16: this CPU has no native bf16 support (AVX512-BF16/AMX); bf16 will be slower than fp32.")
        self._ssim_losses: dict[int, SeparableSSIMLoss] = {}
        self.image_key = image_key

    def _ssim_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        spatial_dims = target.ndim - 2
        if spatial_dims not in self._ssim_losses:
            self._ssim_losses[spatial_dims] = SeparableSSIMLoss(spatial_dims, data_range=1.0, win_size=self.ssim_win_size)
        return self._ssim_losses[spatial_dims](prediction, target)

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        on_cuda = images.device.type == "cuda"
        use_amp = bool(engine.amp) and on_cuda
        if on_cuda:
            autocast = torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {}))
        else:
            autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.cpu_bf16)
        with autocast:
            out = engine.network(images)
        with torch.autocast(images.device.type, enabled=False):
            pred = out.reconstruction.float()
            if self.clip is not None:  # clamped value, straight-through gradient
                pred = pred + (pred.clamp(*self.clip) - pred).detach()
            recon_loss = self.recon(pred, images.float())
            loss = recon_loss + self.quantizer_weight * out.quantizer_loss
            if self.ssim_weight > 0:
                loss = loss + self.ssim_weight * self._ssim_loss(pred, images.float())
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        check_finite_loss(
            engine, loss, details=f"reconstruction loss {recon_loss.item()}, quantizer loss {out.quantizer_loss.item()}"
        )
        if use_amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {
            CommonKeys.IMAGE: images,
            CommonKeys.LABEL: images,
            CommonKeys.PRED: pred.detach(),
            CommonKeys.LOSS: loss.detach(),
            "recon_loss": recon_loss.detach(),
            "quantizer_loss": out.quantizer_loss.detach(),
            **_level_stats(out.levels),
        }


class VQEvalStep:
    """One evaluation iteration: eval mode, no gradients, codebook untouched.

    The prediction is the reconstruction clipped to ``clip`` (the [0, 1] range of the scaled inputs) so that SSIM
    and PSNR are computed with a known data range; ``indices`` holds one code map per level.

    Args:
        clip: value range of the prediction, or ``None`` to keep it unclipped.
        image_key: key of the images in the batch dict.
    """

    def __init__(self, clip: tuple[float, float] | None = (0.0, 1.0), image_key: str = CommonKeys.IMAGE):
        self.clip = clip
        self.image_key = image_key

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        engine.network.eval()
        use_amp = bool(engine.amp) and images.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            out = engine.network(images)
        pred = out.reconstruction.float()
        if self.clip is not None:
            pred = pred.clamp(*self.clip)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {
            CommonKeys.IMAGE: images,
            CommonKeys.LABEL: images,
            CommonKeys.PRED: pred,
            "indices": tuple(level.indices for level in out.levels),
            **_level_stats(out.levels),
        }


def training_scalars(output: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a step's output (loss terms, perplexity, usage) for ``TensorBoardStatsHandler``."""
    return {k: float(v.detach()) for k, v in output.items() if isinstance(v, torch.Tensor) and v.ndim == 0}
