"""The prior stage's Ignite iteration steps and its bits-per-code metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines.utils import IterationEvents

from vqvae_medical.networks.pixelcnn import prior_cross_entropy
from vqvae_medical.stages.prior.hierarchical import LEVEL_KEYS, HierarchicalPrior, pack_hierarchical_inputs
from vqvae_medical.stages.prior.network import pack_inputs, prior_of
from vqvae_medical.training.steps import TrainStep

__all__ = ["PriorTrainStep", "PriorEvalStep", "BitsPerCode", "level_metrics", "lower_is_better"]


_LN2 = math.log(2.0)


def _batch(engine: Any, batchdata: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The network input of a batch and the output entries it gives: ``codes``, ``label`` (and ``top`` for the
    hierarchical prior of a VQ-VAE-2)."""
    if batchdata is None:
        raise ValueError("must provide batch data for current iteration.")
    model = prior_of(engine.network)
    codes = batchdata["codes"].to(engine.state.device, non_blocking=engine.non_blocking).long()
    labels = batchdata.get("label")
    labels = labels.to(codes.device).long() if labels is not None else torch.full_like(codes[:, 0, 0], -1)
    class_label = labels if model.class_conditioned else None
    out: dict[str, Any] = {"codes": codes, "label": labels}
    if not isinstance(model, HierarchicalPrior):
        return pack_inputs(codes, class_label), out
    if "top" not in batchdata:
        raise ValueError(
            "the hierarchical prior needs items with top and bottom codes: the code maps of a VQ-VAE-2 "
            "(code_map_dataset with num_embeddings [top, bottom])."
        )
    out["top"] = batchdata["top"].to(codes.device).long()
    return pack_hierarchical_inputs(out["top"], codes, class_label, model.scale_factor), out


def _levels(engine: Any, logits: torch.Tensor, out: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{level: (logits, codes)}``: ``{"": ...}`` for a one-level prior, ``{"top": ..., "bottom": ...}`` for the
    hierarchical prior."""
    model = prior_of(engine.network)
    if not isinstance(model, HierarchicalPrior):
        return {"": (logits, out["codes"])}
    return {lv: (lg, out[LEVEL_KEYS[lv]]) for lv, lg in zip(LEVEL_KEYS, model.split_logits(logits), strict=False)}


class PriorTrainStep(TrainStep):
    """One training iteration of a PixelCNN prior: cross-entropy of the logits for the code maps (teacher forcing).

    Returns ``codes``, ``label``, ``loss`` (nats per code) and ``bits_per_code`` for the handlers. The iteration
    (AMP, events, finite-loss check, optimizer step) is :class:`~vqvae_medical.training.steps.TrainStep`'s.

    For the :class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior` of a VQ-VAE-2 the loss is the sum of
    the two levels' mean cross-entropies (nats per top code + nats per bottom code). The top and bottom priors share
    no parameters, so each one's gradient is exactly that of its own mean loss: the same as training the two
    separately with one optimizer setting, whereas weighting by the number of codes would scale the top prior's
    gradients down by its share of the codes (1/5). ``bits_per_code`` is then the mean over all codes of both levels
    (the key metric's measure), with ``bits_per_code_top`` and ``bits_per_code_bottom`` beside it; the output also
    holds ``top``.
    """

    def __init__(self) -> None:
        super().__init__(loss_name="prior loss")

    def forward(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        x, out = _batch(engine, batchdata)
        out["levels"] = _levels(engine, engine.network(x), out)
        return out

    def compute_loss(self, output: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        levels = output.pop("levels")
        if list(levels) == [""]:
            loss = prior_cross_entropy(*levels[""])
            return loss, {"bits_per_code": loss / _LN2}
        losses = {lv: prior_cross_entropy(logits, codes) for lv, (logits, codes) in levels.items()}
        counts = {lv: codes.numel() for lv, (_, codes) in levels.items()}
        total_bits = sum(losses[lv] * counts[lv] for lv in losses) / (sum(counts.values()) * _LN2)
        terms = {"bits_per_code": total_bits, **{f"bits_per_code_{lv}": v / _LN2 for lv, v in losses.items()}}
        return sum(losses.values()), terms


class PriorEvalStep:
    """One evaluation iteration: eval mode, no gradients; the negative log2-likelihood of each code map.

    Returns ``codes``, ``label``, ``loss`` (mean bits per code of the batch), ``nll_bits`` (``[B]``, bits of each
    whole map) and ``n_codes`` (codes per map) for :class:`BitsPerCode` and :class:`PriorEvaluationReport`. For the
    hierarchical prior of a VQ-VAE-2, ``nll_bits`` and ``n_codes`` cover both levels of each image, and
    ``nll_bits_<level>``, ``n_codes_<level>`` (``top``, ``bottom``) and the ``top`` codes are added.
    """

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        x, out = _batch(engine, batchdata)
        engine.network.eval()
        device = out["codes"].device
        use_amp = bool(engine.amp) and device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            logits = engine.network(x)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        nll_bits = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        n_codes = 0
        for lv, (level_logits, codes) in _levels(engine, logits, out).items():
            nats = F.cross_entropy(level_logits.float(), codes, reduction="none").flatten(1).sum(1)
            bits = (nats / _LN2).double()
            nll_bits, n_codes = nll_bits + bits, n_codes + int(codes[0].numel())
            if lv:
                out[f"nll_bits_{lv}"], out[f"n_codes_{lv}"] = bits, int(codes[0].numel())
        return {**out, "loss": (nll_bits.mean() / n_codes).float(), "nll_bits": nll_bits, "n_codes": n_codes}


class BitsPerCode(Metric):
    """Negative log2-likelihood per code over an evaluation run: total bits of all maps / number of codes.

    Reads ``nll_bits`` (``[B]``) and ``n_codes`` from the :class:`PriorEvalStep` output (``nll_bits_<level>`` and
    ``n_codes_<level>`` with a ``level``); lower is better.

    Args:
        output_transform: what to read from the step output; defaults to the entries of ``level``.
        device: where the sums are kept.
        level: ``None`` (all codes), or ``"top"``/``"bottom"``: one level of a VQ-VAE-2's hierarchical prior.
    """

    def __init__(self, output_transform=None, device="cpu", level: str | None = None) -> None:
        if level is not None and level not in LEVEL_KEYS:
            raise ValueError(f"level must be None or one of {tuple(LEVEL_KEYS)}, got {level!r}.")
        if output_transform is None:
            suffix = "" if level is None else f"_{level}"

            def output_transform(out: dict[str, Any]) -> tuple[torch.Tensor, int]:
                return out[f"nll_bits{suffix}"], out[f"n_codes{suffix}"]

        self.level = level
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


def level_metrics(num_embeddings: int | Sequence[int]) -> dict[str, BitsPerCode] | None:
    """The evaluator's ``additional_metrics``: ``nll_bits_per_code_top`` and ``nll_bits_per_code_bottom``
    (:class:`BitsPerCode` of each level) when ``num_embeddings`` is a VQ-VAE-2's ``(top, bottom)`` pair, else
    ``None`` (a one-level prior has only the key metric)."""
    if not isinstance(num_embeddings, (list, tuple)):
        return None
    return {f"nll_bits_per_code_{lv}": BitsPerCode(level=lv) for lv in LEVEL_KEYS}


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for a key metric to minimise (the evaluator then logs the lowest NLL as best)."""
    return current < best
