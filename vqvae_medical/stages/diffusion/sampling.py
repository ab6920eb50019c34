"""The diffusion inferers: MONAI's training inferer with class labels, the sampler of the generator; sample writers."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import DiffusionInferer, Inferer
from torch import nn

from vqvae_medical.evaluation.figures import save_sample_grid
from vqvae_medical.stages.diffusion.generator import LatentDiffusionGenerator
from vqvae_medical.stages.diffusion.network import PREDICTION_TYPES
from vqvae_medical.training.checkpoints import atomic_write_json

__all__ = ["ClassConditionedDiffusionInferer", "LatentSampler", "generate", "write_samples"]

logger = logging.getLogger(__name__)


class ClassConditionedDiffusionInferer(DiffusionInferer):
    """MONAI's ``DiffusionInferer`` that also passes ``class_labels`` to the UNet (its class embedding).

    ``__call__`` (training: noise the input with the scheduler and predict) and ``sample`` are MONAI's; a
    ``class_labels`` tensor binds to the network's ``class_labels`` argument.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if noise.shape != inputs.shape:
            raise ValueError(f"noise {list(noise.shape)} must have the latent's shape {list(inputs.shape)}.")
        model = diffusion_model if class_labels is None else partial(diffusion_model, class_labels=class_labels)
        return super().__call__(inputs, model, noise, timesteps, condition=condition, mode=mode)

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        diffusion_model: nn.Module,
        scheduler: Any = None,
        class_labels: torch.Tensor | None = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        model = diffusion_model if class_labels is None else partial(diffusion_model, class_labels=class_labels)
        return super().sample(input_noise, model, scheduler=scheduler, verbose=verbose, **kwargs)


class LatentSampler(Inferer):
    """The bundle's sampler (``inferer`` of ``inference.json``): draws seeded latent noise and runs the
    :class:`~vqvae_medical.stages.diffusion.generator.LatentDiffusionGenerator` on it (deterministic DDIM in latent
    space, then the frozen VQ-VAE decoder), in batches, timing it.

    As a MONAI ``Inferer``, ``sampler(noise, network)`` returns the images of a noise batch (``network`` defaults to
    the sampler's generator; ``class_labels`` is passed on); :meth:`sample` draws the noise itself.

    Args:
        network: the generator (its ``diffusion`` holds the averaged weights, scale factor, latent and image size).
        batch_size: samples generated at once.
    """

    def __init__(self, network: LatentDiffusionGenerator, batch_size: int = 8) -> None:
        super().__init__()
        if not isinstance(network, LatentDiffusionGenerator):
            raise ValueError(f"network must be a LatentDiffusionGenerator, got {type(network).__name__}.")
        self.network = network
        self.batch_size = max(1, int(batch_size))
        self.last_seconds_per_sample = float("nan")
        self.last_cpu_seconds_per_sample = float("nan")

    @property
    def num_inference_steps(self) -> int:
        return self.network.num_inference_steps

    @property
    def scheduler_name(self) -> str:
        return self.network.scheduler_name

    @property
    def device(self) -> torch.device:
        return self.network.diffusion.scale_factor.device

    def class_labels(self, n: int, class_label: int | Sequence[int] | None = None) -> torch.Tensor | None:
        """``None`` for an unconditional model; else ``class_label`` for all, or classes in turn when ``None``."""
        k = self.network.diffusion.num_class_embeds
        if not k:
            if class_label is not None:
                raise ValueError("class_label was given but the model is not class-conditioned (num_class_embeds).")
            return None
        if class_label is None:
            return torch.arange(n) % int(k)
        labels = torch.as_tensor(class_label).long().reshape(-1)
        labels = labels.expand(n) if labels.numel() == 1 else labels
        if labels.numel() != n or int(labels.min()) < 0 or int(labels.max()) >= int(k):
            raise ValueError(f"class_label must be one class or {n} classes in [0, {int(k) - 1}], got {class_label}.")
        return labels

    def check(self) -> None:
        """Raise when the generator is not trained or its scheduler predicts another quantity than the UNet."""
        diffusion = self.network.diffusion
        diffusion.check_ready()
        sampling_type = PREDICTION_TYPES[self.network.prediction_code]
        if sampling_type != diffusion.prediction_type:
            raise ValueError(
                f"the model was trained with prediction_type {diffusion.prediction_type!r} but the sampling scheduler "
                f"uses {sampling_type!r}; set --prediction_type {diffusion.prediction_type}."
            )

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: nn.Module | None = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        network = self.network if network is None else network
        network.eval()
        return network(inputs.to(self.device), *args, **kwargs)

    @torch.no_grad()
    def sample(
        self, n: int, class_label: int | Sequence[int] | None = None, seed: int | None = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` images ``[n, C, *image_size]`` on the CPU and their class labels (``None`` if unconditional); the
        noise ``[n, *latent_shape]`` comes from a generator seeded with ``seed``, drawn on the CPU."""
        self.check()
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        labels = self.class_labels(n, class_label)
        shape = [int(n), *[int(s) for s in self.network.diffusion.latent_shape]]
        noise = torch.randn(shape, generator=generator)
        out = []
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, n, self.batch_size):
            batch_labels = None if labels is None else labels[i : i + self.batch_size].to(self.device)
            out.append(self(noise[i : i + self.batch_size], class_labels=batch_labels).float().cpu())
        self.last_seconds_per_sample = (time.perf_counter() - start) / max(n, 1)
        self.last_cpu_seconds_per_sample = (time.process_time() - cpu_start) / max(n, 1)
        logger.info(
            f"sampled {n} images in {self.last_seconds_per_sample * n:.1f} s ({self.last_seconds_per_sample:.2f} s per "
            f"sample, {self.last_cpu_seconds_per_sample:.2f} CPU-s of this process per sample, "
            f"{self.num_inference_steps} {self.scheduler_name} steps, {torch.get_num_threads()} threads)"
        )
        return torch.cat(out), labels


def write_samples(
    images: torch.Tensor,
    output_dir: str | os.PathLike,
    labels: torch.Tensor | None = None,
    voxel_size: Sequence[float] | float | None = None,
    prefix: str = "sample",
) -> list[Path]:
    """Write samples: 2D -> ``<prefix>_NNN.png`` (8-bit grey or RGB); 3D -> ``<prefix>_NNN.nii.gz`` (float32,
    affine ``diag(voxel_size)``); plus ``samples.png``, a grid of all (3D: mid-slices)."""
    import nibabel as nib
    from PIL import Image

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, img in enumerate(images):
        arr = img.float().numpy()
        if images.ndim == 4:
            pix = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[:3], 0, -1)
            path = out / f"{prefix}_{i:03d}.png"
            Image.fromarray(np.round(np.clip(pix, 0, 1) * 255.0).astype(np.uint8)).save(path)
        else:
            vs = [1.0, 1.0, 1.0] if voxel_size is None else list(np.broadcast_to(np.asarray(voxel_size, float), (3,)))
            data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
            path = out / f"{prefix}_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*vs, 1.0])), path)
        written.append(path)
    written.append(save_sample_grid(out / "samples.png", images, labels))
    return written


def generate(
    sampler: LatentSampler,
    n: int,
    output_dir: str | os.PathLike,
    class_label: int | Sequence[int] | None = None,
    seed: int = 0,
    voxel_size: Sequence[float] | float | None = None,
) -> dict[str, Any]:
    """Sample ``n`` images, write them (:func:`write_samples`) and ``sampling.json`` (timing); returns the latter."""
    images, labels = sampler.sample(n, class_label=class_label, seed=seed)
    write_samples(images, output_dir, labels, voxel_size)
    info = {
        "n_samples": int(n),
        "seconds_per_sample": sampler.last_seconds_per_sample,
        "cpu_seconds_per_sample": sampler.last_cpu_seconds_per_sample,
        "num_inference_steps": sampler.num_inference_steps,
        "scheduler": sampler.scheduler_name,
        "batch_size": sampler.batch_size,
        "device": str(sampler.device),
        "threads": torch.get_num_threads(),
        "image_size": [int(s) for s in sampler.network.diffusion.image_size],
        "latent_shape": [int(s) for s in sampler.network.diffusion.latent_shape],
        "labels": None if labels is None else [int(c) for c in labels],
    }
    atomic_write_json(info, Path(output_dir) / "sampling.json")
    return info
