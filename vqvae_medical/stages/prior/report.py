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
from vqvae_medical.stages.prior.hierarchical import LEVEL_KEYS, LEVELS
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

    For the hierarchical prior of a VQ-VAE-2 (``num_embeddings`` a ``(top, bottom)`` pair) the same keys cover all
    codes of both levels (``n_maps`` counts images; the uniform and marginal references are the per-level ones
    weighted by each level's codes), and each level adds ``nll_bits_per_code_<level>``,
    ``uniform_bits_per_code_<level>``, ``marginal_bits_per_code_<level>`` and ``n_codes_<level>``.

    Args:
        output_dir: folder of the two files.
        num_embeddings: number of codes ``K`` (a ``(top, bottom)`` pair for a VQ-VAE-2).
        history_path: the training :class:`~vqvae_medical.training.handlers.MetricsHistory` file.
        class_names: display names of the classes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_embeddings: int | Sequence[int],
        history_path: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        if isinstance(num_embeddings, (list, tuple)):
            if len(num_embeddings) != len(LEVELS):
                raise ValueError(f"num_embeddings must be one int or a (top, bottom) pair, got {num_embeddings}.")
            self.levels: dict[str, int] = {lv: int(k) for lv, k in zip(LEVELS, num_embeddings)}
        else:
            self.levels = {"": int(num_embeddings)}
        self.history_path = history_path
        self.class_names = list(class_names) if class_names else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.bits: dict[str, list[float]] = {lv: [] for lv in self.levels}
        self.labels: list[int] = []
        self.counts = {lv: np.zeros(k, dtype=np.int64) for lv, k in self.levels.items()}
        self.n_codes = dict.fromkeys(self.levels, 0)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        self.labels += out["label"].cpu().tolist()
        for lv, k in self.levels.items():
            suffix = f"_{lv}" if lv else ""
            self.bits[lv] += out[f"nll_bits{suffix}"].double().cpu().tolist()
            self.n_codes[lv] = int(out[f"n_codes{suffix}"])
            codes = out[LEVEL_KEYS[lv]] if lv else out["codes"]
            self.counts[lv] += np.bincount(codes.reshape(-1).cpu().numpy(), minlength=k)

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else f"class {c}"

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        bits = sum(np.asarray(b, dtype=np.float64) for b in self.bits.values())
        labels = np.asarray(self.labels, dtype=np.int64)
        n_codes = sum(self.n_codes.values())
        per_level: dict[str, Any] = {}
        uniform = marginal = 0.0
        for lv, k in self.levels.items():
            share = self.n_codes[lv] / n_codes
            level_marginal = math.log2(float(perplexity(torch.from_numpy(self.counts[lv]).double())))
            uniform += share * math.log2(k)
            marginal += share * level_marginal
            if lv:
                n_level = len(self.bits[lv]) * self.n_codes[lv]
                per_level[f"nll_bits_per_code_{lv}"] = float(np.sum(self.bits[lv]) / n_level)
                per_level[f"uniform_bits_per_code_{lv}"] = math.log2(k)
                per_level[f"marginal_bits_per_code_{lv}"] = level_marginal
                per_level[f"n_codes_{lv}"] = int(n_level)
        nll = float(bits.sum() / (len(bits) * n_codes))
        metrics: dict[str, Any] = {
            "nll_bits_per_code": nll,
            "uniform_bits_per_code": uniform,
            "marginal_bits_per_code": marginal,
            "nll_fraction_of_uniform": nll / uniform,
            "n_maps": len(bits),
            "n_codes": int(len(bits) * n_codes),
            **per_level,
        }
        classes = sorted(int(c) for c in set(labels.tolist()) if c >= 0)
        for c in classes:
            metrics[f"nll_bits_per_code_class{c}"] = float(bits[labels == c].sum() / ((labels == c).sum() * n_codes))
            metrics[f"n_maps_class{c}"] = int((labels == c).sum())
        atomic_write_json(metrics, self.output_dir / "metrics.json")
        per_map = bits / max(n_codes, 1)
        groups = [(self._name(c), per_map[labels == c]) for c in classes] if classes else [("all", per_map)]
        history = read_history(self.history_path) if self.history_path else []
        save_prior_report(self.output_dir / "report.png", groups, nll, uniform, marginal, history)
        logger.info(f"evaluation: {metrics} -> {self.output_dir}")
