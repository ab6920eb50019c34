"""Sampling code maps from the prior and decoding them through the frozen autoencoder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer
from torch import nn

from vqvae_medical.evaluation.figures import save_image_grid
from vqvae_medical.stages.frozen import grid_size
from vqvae_medical.stages.prior.codes import check_codebooks
from vqvae_medical.stages.prior.hierarchical import LEVELS, HierarchicalPrior, sample_hierarchical
from vqvae_medical.stages.prior.network import prior_of
from vqvae_medical.stages.prior.sampling import prior_device, sample
from vqvae_medical.training.checkpoints import atomic_save

__all__ = ["PriorSampleWriter", "PriorSampler", "sample_and_decode", "save_samples"]

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
    generator = torch.Generator(device=device).manual_seed(int(seed))
    old_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(int(threads))
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, HierarchicalPrior):
            codes = sample_hierarchical(model, num_samples, grids[0], class_label, temperature, generator)
        else:
            codes = sample(model, (num_samples, *grids), class_label, temperature=temperature, generator=generator)
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
    """

    def __init__(self, vqvae: nn.Module, image_size: Sequence[int], temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.vqvae = vqvae
        self.image_size = [int(s) for s in image_size]
        self.temperature = float(temperature)
        self.seed = int(seed)

    def sample(
        self, network: nn.Module, num_samples: int, class_label: int | None = None, seed: int | None = None
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Codes ``[N, h, w]`` (a ``(top, bottom)`` pair for a hierarchical prior) and images ``[N, C, H, W]`` (see
        :func:`sample_and_decode`)."""
        seed = self.seed if seed is None else int(seed)
        return sample_and_decode(network, self.vqvae, num_samples, self.image_size, class_label, self.temperature, seed)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        labels = torch.as_tensor(inputs).reshape(-1).long()
        if labels.numel() == 0 or bool((labels != labels[0]).any()):
            raise ValueError("PriorSampler samples one class per call: class_labels must be [B] equal values.")
        label = int(labels[0])
        return self.sample(network, labels.numel(), None if label < 0 else label)[1]


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
) -> list[Path]:
    """Sample with ``sampler``, decode and save PNG grids and code maps.

    For an unconditioned prior: ``<prefix>.png`` and ``<prefix>_codes.pt``. For a class-conditioned prior, per
    class (``class_label``, or every class when ``None``): ``<prefix>_class<c>.png`` and ``<prefix>_class<c>_codes.pt``,
    plus ``<prefix>.png`` with all classes when there are several. The ``.pt`` files hold ``codes`` (int16
    ``[N, h, w]``; for a hierarchical prior ``codes_top`` and ``codes_bottom`` instead), ``class_label``,
    ``temperature`` and ``seed`` (``torch.load(weights_only=True)`` reads them).
    Class ``c`` is sampled with seed ``seed + c``, so one class gives the same samples alone or with the others.

    Returns:
        the written files.
    """
    model = prior_of(prior)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.class_conditioned:
        classes: list[int | None] = (
            list(range(int(model.num_classes))) if class_label is None else [int(class_label)]
        )
    else:
        classes = [None]
    written: list[Path] = []
    all_images: list[torch.Tensor] = []
    titles: list[str] = []
    for c in classes:
        codes, images = sampler.sample(prior, num_samples, c, seed + (c or 0))
        stem = prefix if c is None else f"{prefix}_class{c}"
        name = "" if c is None else (class_names[c] if class_names and c < len(class_names) else f"class {c}")
        written.append(save_image_grid(out / f"{stem}.png", list(images), ncols=ncols))
        levels = dict(zip([f"codes_{lv}" for lv in LEVELS], codes)) if isinstance(codes, tuple) else {"codes": codes}
        payload = {
            **{k: v.to(torch.int16) for k, v in levels.items()},
            "class_label": -1 if c is None else c,
            "temperature": float(sampler.temperature),
            "seed": int(seed + (c or 0)),
        }
        written.append(atomic_save(payload, out / f"{stem}_codes.pt"))
        all_images += list(images)
        titles += [name] + [""] * (len(images) - 1)
        of = "" if c is None else f" of {name}"
        shapes = " + ".join(str(list(v.shape[1:])) for v in levels.values())
        logger.info(f"sampled {num_samples} code maps {shapes}{of} -> {out / stem}.png")
    if len(classes) > 1:
        written.append(save_image_grid(out / f"{prefix}.png", all_images, ncols=max(ncols, 8), titles=titles))
    return written


class PriorSampleWriter:
    """Every ``interval`` training epochs, samples ``num_samples`` images (per class) and writes PNG grids.

    Files go to ``<output_dir>/epoch=<N>/`` (see :func:`save_samples`); the sampler has its own seeded generator,
    so training's random state is unaffected.

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
        save_samples(self.output_dir / f"epoch={engine.state.epoch}", sampler, self.prior, self.num_samples, seed=self.seed)
