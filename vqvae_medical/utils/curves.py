"""The training-curve figure (matplotlib, Agg backend): what :class:`~vqvae_medical.training.handlers.MetricsHistory`
redraws after each epoch and the evaluation reports embed. It sits below ``training`` and ``evaluation`` so that
neither imports the other; every other figure is in :mod:`vqvae_medical.evaluation.figures`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_training_curves"]


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike | None = None, ax=None):
    """Plot every numeric series of ``history`` (records with ``epoch``, ``phase`` and metric keys) against the
    epoch, one small panel per metric (training and validation of the same metric share a panel), so that
    quantities of different scales (SSIM, PSNR in dB, perplexity) each stay readable.

    Args:
        history: records as written by :class:`~vqvae_medical.training.handlers.MetricsHistory`.
        path: PNG to write when the figure is ours (``ax`` is ``None``).
        ax: an axes whose area the panels replace (inside a larger figure).

    Returns:
        The list of panel axes.
    """
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for rec in history:
        for key, value in rec.items():
            if key in ("epoch", "iteration", "phase", "time") or not isinstance(value, (int, float)):
                continue
            series.setdefault(key, {}).setdefault(str(rec.get("phase", "")), []).append((rec["epoch"], value))
    keys = sorted(series)
    n = max(len(keys), 1)
    cols = min(4, n)
    if ax is not None:  # as many columns as suit the shape of the area the panels fill
        box = ax.get_position()
        width, height = ax.figure.get_size_inches()
        aspect = (box.width * width) / max(box.height * height, 1e-6)
        cols = max(1, min(4, n, round((n * aspect) ** 0.5)))
    rows = -(-n // cols)
    own = ax is None
    if own:
        fig = plt.figure(figsize=(2.6 * cols, 1.9 * rows + 0.4))
        grid = fig.add_gridspec(rows, cols)
    else:
        fig = ax.figure
        grid = ax.get_subplotspec().subgridspec(rows, cols, hspace=0.6, wspace=0.35)
        ax.remove()
    panels = []
    if not keys:
        panel = fig.add_subplot(grid[0, 0])
        panel.set_title("training curves (no history found)", fontsize=8)
        panels.append(panel)
    for i, key in enumerate(keys):
        panel = fig.add_subplot(grid[i // cols, i % cols])
        for phase, pts in sorted(series[key].items()):
            xs, ys = zip(*pts, strict=True)
            panel.plot(xs, ys, marker="o", ms=2, lw=1, label=phase or key)
        panel.set_title(key, fontsize=7)
        panel.tick_params(labelsize=6)
        panel.grid(alpha=0.3)
        if len(series[key]) > 1:
            panel.legend(fontsize=5)
        if i // cols == rows - 1:
            panel.set_xlabel("epoch", fontsize=6)
        panels.append(panel)
    if own:
        fig.suptitle("training curves", fontsize=9)
        fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=100)
        plt.close(fig)
    return panels
