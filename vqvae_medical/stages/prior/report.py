"""The prior stage's evaluation report."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from vqvae_medical.evaluation.figures import save_prior_report
from vqvae_medical.networks.quantizers import perplexity
from vqvae_medical.training.checkpoints import atomic_write_json
from vqvae_medical.training.handlers import read_history

__all__ = ["PriorEvaluationReport"]

logger = logging.getLogger(__name__)


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
        history_path: the training :class:`~vqvae_medical.training.handlers.MetricsHistory` file.
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
            "marginal_bits_per_code": math.log2(float(perplexity(torch.from_numpy(self.counts).double()))),
            "nll_fraction_of_uniform": nll / uniform,
            "n_maps": len(bits),
            "n_codes": int(len(bits) * self.n_codes),
        }
        classes = sorted(int(c) for c in set(labels.tolist()) if c >= 0)
        for c in classes:
            metrics[f"nll_bits_per_code_class{c}"] = float(bits[labels == c].sum() / ((labels == c).sum() * self.n_codes))
            metrics[f"n_maps_class{c}"] = int((labels == c).sum())
        atomic_write_json(metrics, self.output_dir / "metrics.json")
        per_map = bits / max(self.n_codes, 1)
        groups = [(self._name(c), per_map[labels == c]) for c in classes] if classes else [("all", per_map)]
        history = read_history(self.history_path) if self.history_path else []
        save_prior_report(self.output_dir / "report.png", groups, nll, uniform, metrics["marginal_bits_per_code"], history)
        logger.info(f"evaluation: {metrics} -> {self.output_dir}")
