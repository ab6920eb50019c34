"""The diffusion inferers: MONAI's training inferer with class labels, the sampler of the generator; sample writers."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.inferers import DiffusionInferer, Inferer
from torch import nn
from tqdm import tqdm

from vqvae_medical.evaluation.figures import save_sample_grid
from vqvae_medical.evaluation.sample_files import SampleFiles
from vqvae_medical.stages.diffusion.flow import FLOW
from vqvae_medical.stages.diffusion.generator import LatentDiffusionGenerator
from vqvae_medical.stages.diffusion.network import PREDICTION_TYPES
from vqvae_medical.training.runtime import SettingError, check_writable
from vqvae_medical.utils.io import atomic_write_json

__all__ = ["ClassConditionedDiffusionInferer", "LatentSampler", "check_n_samples", "generate", "write_samples"]

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
            fix = f"set --prediction_type {diffusion.prediction_type}"
            if FLOW in (sampling_type, diffusion.prediction_type):
                fix = ("add" if diffusion.prediction_type == FLOW else "leave out") + " configs/rflow.json"
            raise SettingError(
                f"the model was trained with prediction_type {diffusion.prediction_type!r} but the sampling scheduler "
                f"uses {sampling_type!r}; {fix}."
            )

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: nn.Module | None = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        network = self.network if network is None else network
        network.eval()
        return network(inputs.to(self.device), *args, **kwargs)

    def batches(
        self, n: int, class_label: int | Sequence[int] | None = None, seed: int | None = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``n`` samples, ``batch_size`` at a time: images ``[b, C, *image_size]`` on the CPU and their class labels
        (``None`` if unconditional). The noise ``[1, *latent_shape]`` of each sample is drawn in turn on the CPU
        from one generator seeded with ``seed``, so sample ``i`` is the same whatever ``n`` and ``batch_size``, and
        the memory of a run is that of one batch. The timing of the whole run (sampling only) is in
        ``last_seconds_per_sample`` and ``last_cpu_seconds_per_sample`` when the last batch has been drawn."""
        if isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise ValueError(f"the number of samples must be a whole number of at least 1, got {n}.")
        n = int(n)
        self.check()
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        labels = self.class_labels(n, class_label)
        latent = [int(s) for s in self.network.diffusion.latent_shape]
        seconds = cpu_seconds = 0.0
        for i in range(0, n, self.batch_size):
            b = min(self.batch_size, n - i)
            start, cpu_start = time.perf_counter(), time.process_time()
            noise = torch.cat([torch.randn([1, *latent], generator=generator) for _ in range(b)])
            batch_labels = None if labels is None else labels[i : i + b]
            with torch.no_grad():
                device_labels = None if batch_labels is None else batch_labels.to(self.device)
                images = self(noise, class_labels=device_labels).float().cpu()
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu_start
            yield images, batch_labels
        self.last_seconds_per_sample = seconds / n
        self.last_cpu_seconds_per_sample = cpu_seconds / n
        logger.info(
            f"sampled {n} images in {seconds:.1f} s ({self.last_seconds_per_sample:.2f} s per sample, "
            f"{self.last_cpu_seconds_per_sample:.2f} CPU-s of this process per sample, "
            f"{self.num_inference_steps} {self.scheduler_name} steps, {torch.get_num_threads()} threads)"
        )

    def sample(
        self, n: int, class_label: int | Sequence[int] | None = None, seed: int | None = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` images ``[n, C, *image_size]`` on the CPU and their class labels (``None`` if unconditional), drawn
        by :meth:`batches` and kept together (for an evaluation; :func:`generate` writes them as they come)."""
        images, labels = [], []
        for batch, batch_labels in self.batches(n, class_label, seed):
            images.append(batch)
            labels.append(batch_labels)
        return torch.cat(images), None if labels[0] is None else torch.cat(labels)


def write_samples(
    images: torch.Tensor,
    output_dir: str | os.PathLike,
    labels: torch.Tensor | None = None,
    voxel_size: Sequence[float] | float | None = None,
    prefix: str = "sample",
) -> list[Path]:
    """Write samples: 2D -> ``<prefix>_NNN.png`` (8-bit grey or RGB); 3D -> ``<prefix>_NNN.nii.gz`` (float32,
    affine ``diag(voxel_size)``); plus ``samples.png``, a grid of all (3D: mid-slices)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = SampleFiles(out, len(images), prefix, keep=len(images), voxel_size=voxel_size)
    files.add(images, labels)
    return [*files.close(), save_sample_grid(out / "samples.png", images, labels)]


def check_n_samples(n: Any, setting: str = "n_samples") -> int:
    """``n`` as an int when it is a whole number of at least 1, else a :class:`SettingError` naming ``--setting``."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or n < 1:
        raise SettingError(f"{setting} is {n!r}: pass --{setting} <a whole number of at least 1>.")
    return int(n)


def generate(
    sampler: LatentSampler,
    n: int,
    output_dir: str | os.PathLike,
    class_label: int | Sequence[int] | None = None,
    seed: int = 0,
    voxel_size: Sequence[float] | float | None = None,
    grid_samples: int = 16,
    models: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample ``n`` images and write each batch as it comes (a progress bar on stderr), so that the memory of the
    run does not grow with ``n`` and what was drawn is on disk if it is interrupted: ``sample_<n>.png`` (2D) or
    ``sample_<n>.nii.gz`` (3D, affine ``diag(voxel_size)``) per sample, ``samples.png`` (a grid of the first
    ``grid_samples``; 3D: mid-slices) and, at the end, ``sampling.json`` (settings, timing, labels and ``models``,
    the checkpoint and autoencoder that made the samples: :func:`~vqvae_medical.stages.provenance.models_used`).
    The settings and the folder are checked before anything is sampled. Returns what ``sampling.json`` holds.

    Raises:
        SettingError: ``n`` below 1, a class label the model does not have, or a folder that cannot be written.
    """
    n = check_n_samples(n)
    out = Path(output_dir)
    check_writable(out, setting="output_dir")
    sampler.check()
    try:
        sampler.class_labels(n, class_label)
    except ValueError as e:
        raise SettingError(f"{e} Pass --class_label <a class of the model>, or leave it out.") from None
    bar = tqdm(total=n, desc="sampling", unit="sample", disable=not progress)
    all_labels: list[int] = []
    try:
        with SampleFiles(out, n, "sample", grid_samples, voxel_size) as files:
            for images, labels in sampler.batches(n, class_label, seed):
                files.add(images, labels)
                all_labels += [] if labels is None else [int(c) for c in labels]
                bar.update(len(images))
            files.close()
    finally:
        bar.close()
    save_sample_grid(out / "samples.png", torch.stack(files.kept), files.kept_labels or None)
    info = {
        "n_samples": n,
        "seed": None if seed is None else int(seed),
        "seconds_per_sample": sampler.last_seconds_per_sample,
        "cpu_seconds_per_sample": sampler.last_cpu_seconds_per_sample,
        "num_inference_steps": sampler.num_inference_steps,
        "scheduler": sampler.scheduler_name,
        "batch_size": sampler.batch_size,
        "device": str(sampler.device),
        "threads": torch.get_num_threads(),
        "image_size": [int(s) for s in sampler.network.diffusion.image_size],
        "latent_shape": [int(s) for s in sampler.network.diffusion.latent_shape],
        "labels": all_labels or None,
        "models": None if models is None else dict(models),
    }
    atomic_write_json(info, out / "sampling.json")
    logger.info(f"wrote {n} samples, samples.png and sampling.json to {out}")
    return info
