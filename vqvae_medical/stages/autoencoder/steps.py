"""The autoencoder stage's Ignite iteration steps (loss, AMP, codebook statistics)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from vqvae_medical.evaluation.losses import SeparableSSIMLoss
from vqvae_medical.training.steps import TrainStep

__all__ = ["reconstruction_loss", "VQTrainStep", "VQEvalStep", "training_scalars"]


def reconstruction_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``"l1"`` or ``"mse"`` reconstruction loss."""
    if kind == "l1":
        return F.l1_loss
    if kind == "mse":
        return F.mse_loss
    raise ValueError(f"reconstruction loss must be 'l1' or 'mse', got {kind!r}.")


def _level_stats(levels) -> dict[str, torch.Tensor]:
    """Perplexity and usage of each code level; one level is reported without a suffix."""
    names = (
        ("",)
        if len(levels) == 1
        else ("_top", "_bottom")
        if len(levels) == 2
        else tuple(f"_{i}" for i in range(len(levels)))
    )
    stats: dict[str, torch.Tensor] = {}
    for name, level in zip(names, levels, strict=False):
        stats[f"perplexity{name}"] = level.perplexity.detach()
        stats[f"usage{name}"] = level.usage.detach()
    return stats


class VQTrainStep(TrainStep):
    """One training iteration of a VQ-VAE or VQ-VAE-2:
    ``loss = recon(x_hat, x) + ssim_weight * (1 - SSIM(x_hat, x)) + quantizer_weight * quantizer_loss
    + range_weight * mean((y - x_hat)^2)``, with ``y`` the decoder's output and ``x_hat`` that output clamped to
    ``clip`` (straight-through gradient).

    The optional SSIM term (Wang et al. 2004; as a training loss: Zhao et al., "Loss Functions for Image
    Restoration with Neural Networks", IEEE TCI 2017) weights local contrast and structure that an L1 or MSE loss
    averages away; it assumes images scaled to [0, 1]. It is
    :class:`~vqvae_medical.evaluation.losses.SeparableSSIMLoss`, the value of MONAI's ``SSIMLoss`` at a fraction of
    its cost in 3D. The iteration (AMP, events, finite-loss check, optimizer step) is
    :class:`~vqvae_medical.training.steps.TrainStep`'s.

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
            neighbouring probes, foreground SSIM steady; ``benchmarks/convergence_probe.py``).
        range_weight: weight of the squared distance of the raw output from ``clip`` (zero inside the range). The
            clamp alone is a ratchet: a background pixel above zero is pushed down, one below zero feels nothing,
            so the shared decoder features that make the background drift ever further below zero; in long runs
            the encoder's latent vectors grew with them, the commitment loss took over and the validation SSIM
            fell (latent drift, see ``vqvae_medical.networks.latent_norm``). This term pulls the output back to the
            range without changing the loss of an output inside it. ``0`` is the 0.3.0-0.5.0 recipe.
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
        range_weight: float = 1.0,
        cpu_bf16: bool = False,
        image_key: str = CommonKeys.IMAGE,
    ):
        if ssim_weight < 0:
            raise ValueError(f"ssim_weight must be >= 0, got {ssim_weight}.")
        if range_weight < 0:
            raise ValueError(f"range_weight must be >= 0, got {range_weight}.")
        if clip is not None and not float(clip[0]) < float(clip[1]):
            raise ValueError(f"clip must be (low, high) with low < high, got {clip}.")
        super().__init__(cpu_bf16=cpu_bf16)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.recon = reconstruction_loss(recon_loss)
        self.quantizer_weight = float(quantizer_weight)
        self.range_weight = float(range_weight)
        self.ssim_weight = float(ssim_weight)
        self.ssim_win_size = int(ssim_win_size)
        if self.cpu_bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.warn(
                "cpu_bf16: this CPU has no native bf16 support (AVX512-BF16/AMX); bf16 will be slower than fp32.",
                stacklevel=2,
            )
        self._ssim_losses: dict[int, SeparableSSIMLoss] = {}
        self.image_key = image_key

    def _ssim_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        spatial_dims = target.ndim - 2
        if spatial_dims not in self._ssim_losses:
            self._ssim_losses[spatial_dims] = SeparableSSIMLoss(
                spatial_dims, data_range=1.0, win_size=self.ssim_win_size
            )
        return self._ssim_losses[spatial_dims](prediction, target)

    def forward(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        out = engine.network(images)
        return {
            CommonKeys.IMAGE: images,
            CommonKeys.LABEL: images,
            CommonKeys.PRED: out.reconstruction,
            "quantizer_loss": out.quantizer_loss,
            **_level_stats(out.levels),
        }

    def compute_loss(self, output: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, reconstruction = output[CommonKeys.IMAGE].float(), output[CommonKeys.PRED].float()
        terms: dict[str, torch.Tensor] = {}
        range_loss = None
        if self.clip is not None:  # clamped value, straight-through gradient; the step's prediction is this one
            clamped = reconstruction.clamp(*self.clip)
            range_loss = (reconstruction - clamped).pow(2).mean()
            reconstruction = reconstruction + (clamped - reconstruction).detach()
            output[CommonKeys.PRED] = reconstruction
        recon_loss = self.recon(reconstruction, images)
        loss = recon_loss + self.quantizer_weight * output["quantizer_loss"]
        if range_loss is not None:
            terms["range_loss"] = range_loss.detach()
            if self.range_weight > 0:
                loss = loss + self.range_weight * range_loss
        if self.ssim_weight > 0:
            loss = loss + self.ssim_weight * self._ssim_loss(reconstruction, images)
        return loss, {"recon_loss": recon_loss, "quantizer_loss": output["quantizer_loss"], **terms}


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
