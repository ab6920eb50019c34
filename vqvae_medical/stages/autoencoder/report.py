"""The autoencoder stage's evaluation report (metrics JSON and report PNG)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from vqvae_medical.evaluation.figures import save_evaluation_report
from vqvae_medical.training.handlers import read_history
from vqvae_medical.utils.io import atomic_write_json

__all__ = ["EvaluationReport"]

logger = logging.getLogger(__name__)


class EvaluationReport:
    """Writes ``metrics.json`` and ``report.png`` for an evaluator run.

    ``metrics.json`` holds every scalar of ``engine.state.metrics`` plus ``n_images``. ``report.png`` shows the
    first ``n_samples`` images as input | code map(s) | reconstruction | error (three orthogonal mid-slices for
    3D), the per-image SSIM histogram (from the ``ssim`` metric's details, so attach SSIM with
    ``save_details=True``), the codebook-usage bars and the training curves read from ``history_path``.

    Args:
        output_dir: folder of ``metrics.json`` and ``report.png``.
        num_embeddings: codebook size per level (an int for one level).
        spatial_dims: 2 or 3.
        history_path: the training :class:`MetricsHistory` file.
        n_samples: how many images to draw.
        ssim_key: name of the SSIM metric.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_embeddings: int | Sequence[int],
        spatial_dims: int = 2,
        history_path: str | os.PathLike | None = None,
        n_samples: int = 4,
        ssim_key: str = "ssim",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_embeddings = (
            [int(num_embeddings)] if isinstance(num_embeddings, int) else [int(k) for k in num_embeddings]
        )
        self.spatial_dims = spatial_dims
        self.history_path = history_path
        self.n_samples = n_samples
        self.ssim_key = ssim_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.samples: list[dict[str, Any]] = []
        self.counts = [np.zeros(k, dtype=np.int64) for k in self.num_embeddings]
        self.n_images = 0

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        images, recons, indices = out["image"], out["pred"], out["indices"]
        self.n_images += int(images.shape[0])
        for level, idx in enumerate(indices):
            self.counts[level] += np.bincount(idx.reshape(-1).cpu().numpy(), minlength=self.num_embeddings[level])
        for b in range(images.shape[0]):
            if len(self.samples) >= self.n_samples:
                break
            codes = [idx[b].cpu().numpy() for idx in indices]
            if self.spatial_dims == 3:
                codes = [c[:, :, c.shape[2] // 2] for c in codes]
            self.samples.append(
                {"image": images[b].float().cpu().numpy(), "recon": recons[b].float().cpu().numpy(), "codes": codes}
            )

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, np.floating))}
        metrics["n_images"] = self.n_images
        atomic_write_json(metrics, self.output_dir / "metrics.json")
        details = getattr(engine.state, "metric_details", {}) or {}
        ssim = details.get(self.ssim_key)
        ssim_values = [] if ssim is None else torch.as_tensor(ssim).reshape(-1).float().tolist()
        names = ("codes",) if len(self.num_embeddings) == 1 else ("top codes", "bottom codes")
        history = read_history(self.history_path) if self.history_path else []
        save_evaluation_report(
            self.output_dir / "report.png", self.samples, ssim_values, self.counts, history, self.spatial_dims, names
        )
        logger.info(f"evaluation: {metrics} -> {self.output_dir}")
