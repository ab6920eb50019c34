"""Sampling code maps from the prior and decoding them through the frozen autoencoder."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer
from torch import nn
from tqdm import tqdm

from vqvae_medical.evaluation.figures import save_image_grid
from vqvae_medical.evaluation.sample_files import SampleFiles
from vqvae_medical.stages.frozen import grid_size
from vqvae_medical.stages.prior.codes import check_codebooks
from vqvae_medical.stages.prior.hierarchical import LEVELS, HierarchicalPrior, sample_hierarchical
from vqvae_medical.stages.prior.network import prior_of
from vqvae_medical.stages.prior.sampling import check_truncation, prior_device, sample
from vqvae_medical.training.runtime import SettingError, check_writable
from vqvae_medical.utils.io import atomic_write_json

__all__ = ["PriorSampleWriter", "PriorSampler", "sample_and_decode", "sampled_classes", "save_samples"]

logger = logging.getLogger(__name__)


def sample_and_decode(
    prior: nn.Module,
    vqvae: nn.Module,
    num_samples: int,
    image_size: Sequence[int],
    class_label: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    threads: int | None = 1,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Draw code maps from the prior (cached ancestral sampling) and decode them with the VQ-VAE.

    A :class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior` draws the top map, then the bottom map
    given it (:func:`~vqvae_medical.stages.prior.hierarchical.sample_hierarchical`), and the VQ-VAE-2 decodes the
    pair.

    Args:
        prior: a :class:`PriorNetwork`, :class:`~vqvae_medical.networks.GatedPixelCNN`,
            :class:`~vqvae_medical.networks.TransformerPrior` or a hierarchical prior.
        vqvae: the autoencoder whose codes the prior models (``decode_from_indices``).
        num_samples: number of samples.
        image_size: decoded image size ``(H, W)``; the code maps are ``ceil(size / f)``.
        class_label: class of every sample (required for a class-conditioned prior, else ``None``).
        temperature: softmax temperature of the sampler.
        seed: seed of the sampler's own generator (the global RNG is untouched).
        threads: on the CPU, intra-op threads while sampling (1 is fastest for the cached sampler), then restored;
            ``None`` keeps the current setting.
        generator: the random generator to draw from (on the prior's device), e.g. one that goes on from batch to
            batch; ``None`` makes one seeded with ``seed``.
        top_k: draw each code from the ``top_k`` most likely ones (0: off;
            :func:`~vqvae_medical.stages.prior.sampling.draw_codes`).
        top_p: draw each code from the nucleus of cumulative probability ``top_p`` (1: off).

    Returns:
        int64 codes ``[N, h, w]`` (a ``(top, bottom)`` pair for a hierarchical prior) and images ``[N, C, H, W]``
        clipped to [0, 1], on the CPU.
    """
    model = prior_of(prior)
    num_embeddings = list(model.num_embeddings) if isinstance(model, HierarchicalPrior) else model.num_embeddings
    check_codebooks(vqvae, num_embeddings)
    if model.class_conditioned and class_label is None:
        raise ValueError("this prior is class-conditioned: give a class_label.")
    if model.class_conditioned and not 0 <= int(class_label) < int(model.num_classes):
        raise ValueError(f"class_label must be in [0, {model.num_classes}), got {class_label}.")
    if not model.class_conditioned and class_label is not None:
        raise ValueError("this prior has no class conditioning: class_label must be None.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    device = prior_device(model)
    grids = grid_size(vqvae, image_size)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    old_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(int(threads))
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, HierarchicalPrior):
            codes = sample_hierarchical(
                model, num_samples, grids[0], class_label, temperature, generator, top_k=top_k, top_p=top_p
            )
        else:
            codes = sample(
                model,
                (num_samples, *grids),
                class_label,
                temperature=temperature,
                generator=generator,
                top_k=top_k,
                top_p=top_p,
            )
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    vq_device = next(vqvae.parameters()).device
    with torch.no_grad():
        on_vq = tuple(c.to(vq_device) for c in codes) if isinstance(codes, tuple) else codes.to(vq_device)
        images = vqvae.decode_from_indices(on_vq, [int(s) for s in image_size])
    codes = tuple(c.cpu() for c in codes) if isinstance(codes, tuple) else codes.cpu()
    return codes, images.float().clamp(0.0, 1.0).cpu()


class PriorSampler(Inferer):
    """The prior bundle's sampler (``inferer`` of ``inference.json``): code maps drawn from the prior, decoded by the
    frozen VQ-VAE (:func:`sample_and_decode`).

    As a MONAI ``Inferer``, ``sampler(class_labels, network)`` returns one decoded image per entry of the int tensor
    ``class_labels`` ``[B]`` (all entries the same class; ``-1`` for an unconditioned prior), drawn with ``seed``.

    Args:
        vqvae: the frozen autoencoder whose codes the prior models.
        image_size: decoded image size ``(H, W)``.
        temperature: softmax temperature.
        seed: seed of the sampler's own generator (the global RNG is untouched).
        top_k: draw each code from the ``top_k`` most likely ones (0: off).
        top_p: draw each code from the nucleus of cumulative probability ``top_p`` (1: off).
    """

    def __init__(
        self,
        vqvae: nn.Module,
        image_size: Sequence[int],
        temperature: float = 1.0,
        seed: int = 0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        check_truncation(top_k, top_p)
        self.top_k, self.top_p = int(top_k), float(top_p)
        self.vqvae = vqvae
        self.image_size = [int(s) for s in image_size]
        self.temperature = float(temperature)
        self.seed = int(seed)

    @property
    def draw_settings(self) -> dict[str, float | int]:
        """How each code is drawn (``temperature``, ``top_k``, ``top_p``): what a sample file or a metrics file
        records beside the samples it describes."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def batches(
        self,
        network: nn.Module,
        num_samples: int,
        class_label: int | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """``num_samples`` samples, ``batch_size`` at a time (all at once when ``None``), as codes and images (see
        :func:`sample_and_decode`), all drawn from one generator seeded with ``seed``: the same seed and batch size
        give the same samples, and a batch as large as ``num_samples`` gives those of :meth:`sample`. Memory stays
        that of one batch however many are drawn."""
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        size = int(num_samples) if batch_size is None else int(batch_size)
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        seed = self.seed if seed is None else int(seed)
        generator = torch.Generator(device=prior_device(prior_of(network))).manual_seed(seed)
        for start in range(0, int(num_samples), size):
            n = min(size, int(num_samples) - start)
            yield sample_and_decode(
                network,
                self.vqvae,
                n,
                self.image_size,
                class_label,
                self.temperature,
                generator=generator,
                top_k=self.top_k,
                top_p=self.top_p,
            )

    def sample(
        self, network: nn.Module, num_samples: int, class_label: int | None = None, seed: int | None = None
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Codes ``[N, h, w]`` (a ``(top, bottom)`` pair for a hierarchical prior) and images ``[N, C, H, W]`` (see
        :func:`sample_and_decode`), in one batch."""
        return next(self.batches(network, num_samples, class_label, seed))

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        labels = torch.as_tensor(inputs).reshape(-1).long()
        if labels.numel() == 0 or bool((labels != labels[0]).any()):
            raise ValueError("PriorSampler samples one class per call: class_labels must be [B] equal values.")
        label = int(labels[0])
        return self.sample(network, labels.numel(), None if label < 0 else label)[1]


def sampled_classes(prior: nn.Module, num_samples: int, class_label: int | None, batch_size: int) -> list[int | None]:
    """The classes :func:`save_samples` draws (``[None]`` for an unconditioned prior), after checking its settings.

    Raises:
        SettingError: ``num_samples`` or ``batch_size`` below 1, a ``class_label`` for a prior without classes, or
            one that is not a class of the prior; the message names the setting and the values it may take.
    """
    model = prior_of(prior)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise SettingError(f"num_samples is {num_samples!r}: pass --num_samples <a whole number of at least 1>.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError(f"batch_size is {batch_size!r}: pass --batch_size <a whole number of at least 1>.")
    if not model.class_conditioned:
        if class_label is not None:
            raise SettingError(
                f"class_label is {class_label!r}, but this prior has no classes (it was trained with num_classes 0): "
                "leave out --class_label, or pass the --ckpt_path of a class-conditioned prior and its --num_classes."
            )
        return [None]
    k = int(model.num_classes)
    if class_label is None:
        return list(range(k))
    if isinstance(class_label, bool) or not isinstance(class_label, int) or not 0 <= class_label < k:
        raise SettingError(
            f"class_label is {class_label!r}, not a class of this prior: pass --class_label 0 to {k - 1} "
            f"(num_classes {k}), or leave it out to sample every class."
        )
    return [int(class_label)]


def save_samples(
    output_dir: str | os.PathLike,
    sampler: PriorSampler,
    prior: nn.Module,
    num_samples: int = 16,
    class_label: int | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    ncols: int = 4,
    prefix: str = "samples",
    batch_size: int = 64,
    grid_samples: int = 16,
    sample_files: bool = True,
    models: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Sample, decode and write as the samples come, ``batch_size`` at a time: the memory of the run does not grow
    with ``num_samples``, and what was drawn is on disk if it is interrupted. The folder is checked first (one
    :class:`SettingError` line naming it), and the settings (:func:`sampled_classes`).

    Files, per class (``class_label``, or every class when ``None``; an unconditioned prior has no ``_class<c>``):

    - ``sample_class<c>_<n>.png``: each sample (with ``sample_files``);
    - ``<prefix>_class<c>_codes.npy``: its code maps, int16 ``[N, h, w]`` (``np.load``; int32 above 32,767 codes),
      for a hierarchical prior ``<prefix>_class<c>_codes_top.npy`` and ``..._codes_bottom.npy`` instead;
    - ``<prefix>_class<c>.png``: a grid of the first ``grid_samples``;

    plus ``<prefix>.png`` with every class when there are several, and ``sampling.json``: the settings (seed of each
    class, temperature, top_k, top_p, batch size, image and code map size), the timing and ``models``, the checkpoint
    and the autoencoder that made the samples (:func:`~vqvae_medical.stages.provenance.models_used`). A ``.npy`` file
    and ``sampling.json`` are whole or absent. Class ``c`` is sampled with seed ``seed + c`` from one generator, batch
    after batch, so one class gives the same samples alone or with the others (for the same ``batch_size``).

    Returns:
        the written files.

    Raises:
        SettingError: an output folder that cannot be written, or settings that cannot be sampled.
    """
    classes = sampled_classes(prior, num_samples, class_label, batch_size)
    out = Path(output_dir)
    check_writable(out, setting="output_dir")
    model = prior_of(prior)
    num_embeddings = max(model.num_embeddings) if isinstance(model, HierarchicalPrior) else model.num_embeddings
    dtype = np.int16 if int(num_embeddings) <= np.iinfo(np.int16).max + 1 else np.int32
    grids = grid_size(sampler.vqvae, sampler.image_size)
    levels = list(LEVELS) if isinstance(model, HierarchicalPrior) else [None]
    level_grids = list(grids) if isinstance(model, HierarchicalPrior) else [grids]
    written: list[Path] = []
    all_images: list[torch.Tensor] = []
    titles: list[str] = []
    record: dict[str, Any] = {"n_samples": int(num_samples), "classes": []}
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=num_samples * len(classes), desc="sampling", unit="sample", disable=not progress)
    try:
        for c in classes:
            stem = prefix if c is None else f"{prefix}_class{c}"
            name = "" if c is None else (class_names[c] if class_names and c < len(class_names) else f"class {c}")
            arrays = {
                f"{stem}_codes" + ("" if lv is None else f"_{lv}"): ([int(g) for g in grid], dtype)
                for lv, grid in zip(levels, level_grids, strict=False)
            }
            image_prefix = ("sample" if c is None else f"sample_class{c}") if sample_files else None
            with SampleFiles(out, num_samples, image_prefix, grid_samples, arrays=arrays) as files:
                for codes, images in sampler.batches(prior, num_samples, c, seed + (c or 0), batch_size):
                    files.add(
                        images, arrays=dict(zip(arrays, codes if isinstance(codes, tuple) else (codes,), strict=False))
                    )
                    bar.update(len(images))
                written += files.close()
            written.append(save_image_grid(out / f"{stem}.png", files.kept, ncols=ncols))
            all_images += files.kept
            titles += [name] + [""] * (len(files.kept) - 1)
            record["classes"].append(
                {
                    "class_label": -1 if c is None else c,
                    "name": name or None,
                    "seed": int(seed + (c or 0)),
                    "codes": [f"{a}.npy" for a in arrays],
                    "grid": f"{stem}.png",
                    "images": f"{image_prefix}_<n>.png" if image_prefix else None,
                }
            )
            shapes = " + ".join(str(shape) for shape, _ in arrays.values())
            of = "" if c is None else f" of {name}"
            logger.info(f"sampled {num_samples} code maps {shapes}{of} -> {out / stem}.png, {out / stem}_codes*.npy")
    finally:
        bar.close()
    if len(classes) > 1:
        written.append(save_image_grid(out / f"{prefix}.png", all_images, ncols=max(ncols, 8), titles=titles))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n = num_samples * len(classes)
    record.update(
        {
            **sampler.draw_settings,
            "batch_size": int(batch_size),
            "image_size": [int(s) for s in sampler.image_size],
            "code_shape": dict(zip(LEVELS, level_grids, strict=False)) if levels[0] else level_grids[0],
            "seconds_per_sample": seconds / n,
            "cpu_seconds_per_sample": cpu_seconds / n,
            "models": None if models is None else dict(models),
        }
    )
    written.append(atomic_write_json(record, out / "sampling.json"))
    return written


class PriorSampleWriter:
    """Every ``interval`` training epochs, samples ``num_samples`` images (per class) and writes PNG grids.

    Files go to ``<output_dir>/epoch=<N>/`` (see :func:`save_samples`: the grids, code maps and ``sampling.json``,
    no file per sample); the sampler has its own seeded generator, so training's random state is unaffected.

    Args:
        output_dir: folder of the sample grids.
        vqvae: the autoencoder that decodes the codes.
        prior: the trained network (:class:`PriorNetwork`).
        image_size: decoded image size.
        interval: epochs between samples; ``0`` or ``None`` disables the handler.
        num_samples: samples per class.
        temperature: sampling temperature.
        seed: sampler seed.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        vqvae: nn.Module,
        prior: nn.Module,
        image_size: Sequence[int],
        interval: int | None = 1,
        num_samples: int = 4,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.vqvae = vqvae
        self.prior = prior
        self.image_size = [int(s) for s in image_size]
        self.interval = int(interval or 0)
        self.num_samples = num_samples
        self.temperature = temperature
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        sampler = PriorSampler(self.vqvae, self.image_size, self.temperature, self.seed)
        folder = self.output_dir / f"epoch={engine.state.epoch}"
        save_samples(folder, sampler, self.prior, self.num_samples, seed=self.seed, sample_files=False, progress=False)
