"""Training, evaluation and sampling of a gated PixelCNN prior over the code maps of a frozen VQ-VAE.

The prior (van den Oord et al., "Conditional Image Generation with PixelCNN Decoders", NeurIPS 2016,
arXiv 1606.05328) models ``p(z) = prod_i p(z_i | z_<i [, class])`` over the raster-ordered code map ``z`` of a
VQ-VAE (van den Oord et al., NeurIPS 2017, arXiv 1711.00937); new images are drawn by ancestral sampling of ``z``
and decoding it with the VQ-VAE's decoder. Its loss is the cross-entropy over the ``K`` codes; it is reported as the
negative log-likelihood in bits per code, next to ``log2 K`` for a uniform prior.

:class:`PriorNetwork` is the bundle's ``network_def``: one float tensor in (``[B, 1, H, W]`` codes, plus a constant
channel holding the class for a class-conditioned prior), one tensor of logits out, so that MONAI's
``verify_net_in_out`` (random float input) and ``ckpt_export`` (TorchScript) apply. The steps, metric and handlers
below plug into MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` like those of :mod:`vqvae_medical.engines`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from ignite.metrics import Metric  # noqa: E402
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce  # noqa: E402
from monai.engines.utils import IterationEvents  # noqa: E402
from torch import nn  # noqa: E402

from vqvae_medical.checkpoints import atomic_save, safe_load  # noqa: E402
from vqvae_medical.codes import model_state_dict  # noqa: E402
from vqvae_medical.engines import check_finite_loss, unwrap  # noqa: E402
from vqvae_medical.figures import plot_training_curves, save_image_grid  # noqa: E402
from vqvae_medical.handlers import read_history  # noqa: E402
from vqvae_medical.networks.pixelcnn import GatedPixelCNN, prior_cross_entropy  # noqa: E402
from vqvae_medical.networks.transformer_prior import TransformerPrior  # noqa: E402
from vqvae_medical.sampling import prior_device, sample  # noqa: E402

__all__ = [
    "PriorNetwork",
    "pack_inputs",
    "prior_of",
    "load_prior",
    "PriorTrainStep",
    "PriorEvalStep",
    "BitsPerCode",
    "lower_is_better",
    "PriorEvaluationReport",
    "code_size",
    "sample_and_decode",
    "save_samples",
    "PriorSampleWriter",
]

logger = logging.getLogger(__name__)
_LN2 = math.log(2.0)


class PriorNetwork(nn.Module):
    """``forward(x) -> logits``: a gated PixelCNN or transformer prior behind a one-tensor interface.

    ``x`` is a float ``[B, C, H, W]`` tensor: channel 0 holds the codes (cast with ``.long()``), and for a
    class-conditioned prior channel 1 holds the class index (read at the top-left position, see
    :func:`pack_inputs`). The output is the prior's logits ``[B, K, H, W]``. Training reaches the prior through
    ``model``; the state-dict keys are ``model.*``.

    Args:
        model: the prior, a :class:`~vqvae_medical.networks.GatedPixelCNN` or a
            :class:`~vqvae_medical.networks.TransformerPrior` (class conditioning allowed, spatial conditioning not).
    """

    def __init__(self, model: GatedPixelCNN | TransformerPrior) -> None:
        super().__init__()
        if model.spatially_conditioned:
            raise ValueError("PriorNetwork supports class conditioning only, not a spatially conditioned prior.")
        self.model = model
        self.class_conditioned: bool = bool(model.class_conditioned)
        self.in_channels: int = 2 if self.class_conditioned else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError("expected [B, C, H, W] input with C = 1 (codes) or 2 (codes, class) channels.")
        codes = x[:, 0].long()
        class_label: torch.Tensor | None = None
        if self.class_conditioned:
            class_label = x[:, 1, 0, 0].long()
        return self.model(codes, class_label)


def pack_inputs(codes: torch.Tensor, class_label: torch.Tensor | None = None) -> torch.Tensor:
    """The :class:`PriorNetwork` input of codes ``[B, H, W]`` and optional classes ``[B]``: float ``[B, 1|2, H, W]``."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, H, W], got {list(codes.shape)}.")
    x = codes.float()[:, None]
    if class_label is None:
        return x
    label = class_label.to(x.device, torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, *codes.shape[1:])
    return torch.cat([x, label], dim=1)


def prior_of(network: nn.Module) -> GatedPixelCNN | TransformerPrior:
    """The :class:`GatedPixelCNN` or :class:`TransformerPrior` inside a :class:`PriorNetwork` (or DDP wrapper), or
    ``network`` itself."""
    network = unwrap(network)
    network = getattr(network, "model", network)
    if not isinstance(network, (GatedPixelCNN, TransformerPrior)):
        raise ValueError(
            f"expected a GatedPixelCNN, a TransformerPrior or a PriorNetwork, got {type(network).__name__}."
        )
    return network


def load_prior(network: nn.Module, ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a prior's ``model.pt`` (state dict of ``network_def``, or a ``{"model": ...}`` checkpoint) with
    ``weights_only=True``; returns ``network`` on ``device`` in eval mode."""
    if not Path(ckpt_path).is_file():
        raise ValueError(f"prior checkpoint {ckpt_path} does not exist. Train the prior first or set ckpt_path.")
    network.load_state_dict(model_state_dict(safe_load(ckpt_path)))
    return network.to(device).eval()


def _batch(engine: Any, batchdata: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if batchdata is None:
        raise ValueError("must provide batch data for current iteration.")
    codes = batchdata["codes"].to(engine.state.device, non_blocking=engine.non_blocking).long()
    labels = batchdata.get("label")
    labels = labels.to(codes.device).long() if labels is not None else torch.full_like(codes[:, 0, 0], -1)
    class_label = labels if prior_of(engine.network).class_conditioned else None
    return codes, class_label, labels


class PriorTrainStep:
    """One training iteration of a PixelCNN prior: cross-entropy of the logits for the code maps (teacher forcing).

    Returns ``codes``, ``label``, ``loss`` (nats per code) and ``bits_per_code`` for the handlers.
    """

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        codes, class_label, labels = _batch(engine, batchdata)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = bool(engine.amp) and codes.device.type == "cuda"
        with torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            logits = engine.network(pack_inputs(codes, class_label))
            loss = prior_cross_entropy(logits, codes)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        check_finite_loss(engine, loss, what="prior loss")
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
        loss = loss.detach()
        return {"codes": codes, "label": labels, "loss": loss, "bits_per_code": loss / _LN2}


class PriorEvalStep:
    """One evaluation iteration: eval mode, no gradients; the negative log2-likelihood of each code map.

    Returns ``codes``, ``label``, ``loss`` (mean bits per code of the batch), ``nll_bits`` (``[B]``, bits of each
    whole map) and ``n_codes`` (codes per map) for :class:`BitsPerCode` and :class:`PriorEvaluationReport`.
    """

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        codes, class_label, labels = _batch(engine, batchdata)
        engine.network.eval()
        use_amp = bool(engine.amp) and codes.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            logits = engine.network(pack_inputs(codes, class_label))
        nats = F.cross_entropy(logits.float(), codes, reduction="none").flatten(1).sum(1)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        n_codes = int(codes[0].numel())
        nll_bits = (nats / _LN2).double()
        return {
            "codes": codes,
            "label": labels,
            "loss": (nll_bits.mean() / n_codes).float(),
            "nll_bits": nll_bits,
            "n_codes": n_codes,
        }


class BitsPerCode(Metric):
    """Negative log2-likelihood per code over an evaluation run: total bits of all maps / number of codes.

    Reads ``nll_bits`` (``[B]``) and ``n_codes`` from the :class:`PriorEvalStep` output; lower is better.
    """

    def __init__(self, output_transform=lambda out: (out["nll_bits"], out["n_codes"]), device="cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._bits = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, int]) -> None:
        bits, n_codes = output
        self._bits += bits.detach().double().sum().to(self._device)
        self._count += int(bits.numel()) * int(n_codes)

    @sync_all_reduce("_bits", "_count")
    def compute(self) -> float:
        if int(self._count) == 0:
            raise ValueError("BitsPerCode needs at least one code map before compute().")
        return float(self._bits / self._count)


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for a key metric to minimise (the evaluator then logs the lowest NLL as best)."""
    return current < best


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


class PriorEvaluationReport:
    """Writes ``metrics.json`` and ``report.png`` for an evaluation run of a prior.

    ``metrics.json``: ``nll_bits_per_code`` (the prior's negative log2-likelihood per code), ``uniform_bits_per_code``
    (``log2 K``, a uniform prior), ``marginal_bits_per_code`` (entropy of the evaluated maps' own code histogram: the
    best prior that ignores context could not do better), ``nll_fraction_of_uniform``, ``n_maps``, ``n_codes`` and,
    with labels, ``nll_bits_per_code_class<c>``. ``report.png``: the per-map bits-per-code histogram (by class) and
    the training curves from ``history_path``.

    Args:
        output_dir: folder of the two files.
        num_embeddings: number of codes ``K``.
        history_path: the training :class:`~vqvae_medical.handlers.MetricsHistory` file.
        class_names: display names of the classes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_embeddings: int,
        history_path: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_embeddings = int(num_embeddings)
        self.history_path = history_path
        self.class_names = list(class_names) if class_names else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.bits: list[float] = []
        self.labels: list[int] = []
        self.counts = np.zeros(self.num_embeddings, dtype=np.int64)
        self.n_codes = 0

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        self.bits += out["nll_bits"].double().cpu().tolist()
        self.labels += out["label"].cpu().tolist()
        self.n_codes = int(out["n_codes"])
        self.counts += np.bincount(out["codes"].reshape(-1).cpu().numpy(), minlength=self.num_embeddings)

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else f"class {c}"

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        bits = np.asarray(self.bits, dtype=np.float64)
        labels = np.asarray(self.labels, dtype=np.int64)
        uniform = math.log2(self.num_embeddings)
        nll = float(bits.sum() / (len(bits) * self.n_codes))
        metrics: dict[str, Any] = {
            "nll_bits_per_code": nll,
            "uniform_bits_per_code": uniform,
            "marginal_bits_per_code": _entropy_bits(self.counts),
            "nll_fraction_of_uniform": nll / uniform,
            "n_maps": len(bits),
            "n_codes": int(len(bits) * self.n_codes),
        }
        classes = sorted(int(c) for c in set(labels.tolist()) if c >= 0)
        for c in classes:
            metrics[f"nll_bits_per_code_class{c}"] = float(bits[labels == c].sum() / ((labels == c).sum() * self.n_codes))
            metrics[f"n_maps_class{c}"] = int((labels == c).sum())
        tmp = self.output_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, self.output_dir / "metrics.json")

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        per_map = bits / max(self.n_codes, 1)
        groups = [(self._name(c), per_map[labels == c]) for c in classes] if classes else [("all", per_map)]
        for name, values in groups:
            axes[0].hist(values, bins=20, alpha=0.6, label=f"{name} (n={len(values)})")
        axes[0].axvline(uniform, color="k", ls="--", label=f"uniform log2 K = {uniform:.2f}")
        axes[0].axvline(metrics["marginal_bits_per_code"], color="gray", ls=":", label="marginal entropy")
        axes[0].set_xlabel("bits per code (per map)")
        axes[0].set_title(f"test NLL {nll:.3f} bits/code ({nll / uniform:.1%} of uniform)", fontsize=9)
        axes[0].legend(fontsize=7)
        plot_training_curves(read_history(self.history_path) if self.history_path else [], ax=axes[1])
        fig.tight_layout()
        fig.savefig(self.output_dir / "report.png", dpi=90)
        plt.close(fig)
        logger.info(f"evaluation: {metrics} -> {self.output_dir}")


def code_size(vqvae: nn.Module, image_size: Sequence[int]) -> list[int]:
    """Code map size of an image of ``image_size`` through ``vqvae`` (``ceil(size / downsample_factor)``)."""
    f = int(vqvae.downsample_factor)
    return [-(-int(s) // f) for s in image_size]


def sample_and_decode(
    prior: nn.Module,
    vqvae: nn.Module,
    num_samples: int,
    image_size: Sequence[int],
    class_label: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    threads: int | None = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw code maps from the prior (cached ancestral sampling) and decode them with the VQ-VAE.

    Args:
        prior: a :class:`PriorNetwork`, :class:`~vqvae_medical.networks.GatedPixelCNN` or
            :class:`~vqvae_medical.networks.TransformerPrior`.
        vqvae: the autoencoder whose codes the prior models (``decode_from_indices``).
        num_samples: number of samples.
        image_size: decoded image size ``(H, W)``; the code maps are ``ceil(size / f)``.
        class_label: class of every sample (required for a class-conditioned prior, else ``None``).
        temperature: softmax temperature of the sampler.
        seed: seed of the sampler's own generator (the global RNG is untouched).
        threads: on the CPU, intra-op threads while sampling (1 is fastest for the cached sampler), then restored;
            ``None`` keeps the current setting.

    Returns:
        int64 codes ``[N, h, w]`` and images ``[N, C, H, W]`` clipped to [0, 1], on the CPU.
    """
    model = prior_of(prior)
    if int(model.num_embeddings) != int(vqvae.num_embeddings):
        raise ValueError(
            f"the prior models {model.num_embeddings} codes but the VQ-VAE codebook has {vqvae.num_embeddings}."
        )
    if model.class_conditioned and class_label is None:
        raise ValueError("this prior is class-conditioned: give a class_label.")
    if model.class_conditioned and not 0 <= int(class_label) < int(model.num_classes):
        raise ValueError(f"class_label must be in [0, {model.num_classes}), got {class_label}.")
    if not model.class_conditioned and class_label is not None:
        raise ValueError("this prior has no class conditioning: class_label must be None.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    device = prior_device(model)
    h, w = code_size(vqvae, image_size)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    old_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(int(threads))
    was_training = model.training
    model.eval()
    try:
        codes = sample(model, (num_samples, h, w), class_label, temperature=temperature, generator=generator)
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    vq_device = next(vqvae.parameters()).device
    with torch.no_grad():
        images = vqvae.decode_from_indices(codes.to(vq_device), [int(s) for s in image_size])
    return codes.cpu(), images.float().clamp(0.0, 1.0).cpu()


def save_samples(
    output_dir: str | os.PathLike,
    prior: nn.Module,
    vqvae: nn.Module,
    num_samples: int = 16,
    image_size: Sequence[int] = (256, 256),
    class_label: int | None = None,
    class_names: Sequence[str] | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    ncols: int = 4,
    prefix: str = "samples",
) -> list[Path]:
    """Sample, decode and save PNG grids and code maps.

    For an unconditioned prior: ``<prefix>.png`` and ``<prefix>_codes.pt``. For a class-conditioned prior, per
    class (``class_label``, or every class when ``None``): ``<prefix>_class<c>.png`` and ``<prefix>_class<c>_codes.pt``,
    plus ``<prefix>.png`` with all classes when there are several. The ``.pt`` files hold ``codes`` (int16
    ``[N, h, w]``), ``class_label``, ``temperature`` and ``seed`` (``torch.load(weights_only=True)`` reads them).
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
        codes, images = sample_and_decode(prior, vqvae, num_samples, image_size, c, temperature, seed + (c or 0))
        stem = prefix if c is None else f"{prefix}_class{c}"
        name = "" if c is None else (class_names[c] if class_names and c < len(class_names) else f"class {c}")
        written.append(save_image_grid(out / f"{stem}.png", list(images), ncols=ncols))
        payload = {
            "codes": codes.to(torch.int16),
            "class_label": -1 if c is None else c,
            "temperature": float(temperature),
            "seed": int(seed + (c or 0)),
        }
        written.append(atomic_save(payload, out / f"{stem}_codes.pt"))
        all_images += list(images)
        titles += [name] + [""] * (len(images) - 1)
        of = "" if c is None else f" of {name}"
        logger.info(f"sampled {num_samples} code maps {list(codes.shape[1:])}{of} -> {out / stem}.png")
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
        save_samples(
            self.output_dir / f"epoch={engine.state.epoch}",
            self.prior,
            self.vqvae,
            self.num_samples,
            self.image_size,
            temperature=self.temperature,
            seed=self.seed,
        )
