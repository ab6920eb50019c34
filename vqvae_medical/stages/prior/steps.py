"""The prior stage's Ignite iteration steps and its bits-per-code metric."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines.utils import IterationEvents

from vqvae_medical.networks.pixelcnn import prior_cross_entropy
from vqvae_medical.stages.prior.network import pack_inputs, prior_of
from vqvae_medical.training.steps import TrainStep

__all__ = ["PriorTrainStep", "PriorEvalStep", "BitsPerCode", "lower_is_better"]


_LN2 = math.log(2.0)


def _batch(engine: Any, batchdata: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if batchdata is None:
        raise ValueError("must provide batch data for current iteration.")
    codes = batchdata["codes"].to(engine.state.device, non_blocking=engine.non_blocking).long()
    labels = batchdata.get("label")
    labels = labels.to(codes.device).long() if labels is not None else torch.full_like(codes[:, 0, 0], -1)
    class_label = labels if prior_of(engine.network).class_conditioned else None
    return codes, class_label, labels


class PriorTrainStep(TrainStep):
    """One training iteration of a PixelCNN prior: cross-entropy of the logits for the code maps (teacher forcing).

    Returns ``codes``, ``label``, ``loss`` (nats per code) and ``bits_per_code`` for the handlers. The iteration
    (AMP, events, finite-loss check, optimizer step) is :class:`~vqvae_medical.training.steps.TrainStep`'s.
    """

    def __init__(self) -> None:
        super().__init__(loss_name="prior loss")

    def forward(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        codes, class_label, labels = _batch(engine, batchdata)
        return {"codes": codes, "label": labels, "logits": engine.network(pack_inputs(codes, class_label))}

    def compute_loss(self, output: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = prior_cross_entropy(output.pop("logits"), output["codes"])
        return loss, {"bits_per_code": loss / _LN2}


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
