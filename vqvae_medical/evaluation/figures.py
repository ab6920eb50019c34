"""Every PNG figure of the package (matplotlib, Agg backend): reconstructions, code maps, codebook usage, sample
grids (2D images or 3D mid-slices) and the prior's bits-per-code report. The stages collect the
numbers; the drawing lives here only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vqvae_medical.utils.curves import plot_training_curves  # re-exported: one of the figures

__all__ = [
    "to_display",
    "mid_slices",
    "plot_training_curves",
    "plot_ssim_values",
    "save_evaluation_report",
    "save_image_grid",
    "save_sample_grid",
    "save_prior_report",
    "save_anomaly_figure",
]


def to_display(image: Any) -> np.ndarray:
    """``[C, H, W]`` array/tensor -> ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB) float array clipped to [0, 1]."""
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr[:3], 0, -1)
    return np.clip(arr, 0.0, 1.0)


def _save_figure(fig: Any, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Write ``fig`` to the PNG ``path`` (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def mid_slices(volume: Any) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices ``[H, W]`` of ``[C, X, Y, Z]`` (first channel), rotated for display."""
    v = np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume, dtype=np.float32)[0]
    x, y, z = (s // 2 for s in v.shape)
    return [np.rot90(v[:, :, z]), np.rot90(v[:, y, :]), np.rot90(v[x, :, :])]


#: up to this many images the report shows each image's SSIM instead of a histogram
MAX_LISTED_VALUES = 16


def plot_ssim_values(ssim_values: Sequence[float], ax, max_listed: int = MAX_LISTED_VALUES) -> str:
    """Per-image SSIM on ``ax``: one labelled bar per image when there are at most ``max_listed`` (a histogram of
    a handful of values hides them), else a histogram; the mean and the minimum are in the title either way.

    Returns:
        ``"values"`` or ``"histogram"``, the kind of plot drawn.
    """
    values = np.asarray(ssim_values, dtype=float).reshape(-1)
    n = len(values)
    summary = f"mean {values.mean():.3f}, min {values.min():.3f}" if n else "no values"
    if 0 < n <= max_listed:
        bars = ax.bar(np.arange(n), values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=5, rotation=90, padding=2)
        ax.set_xticks(np.arange(n))
        ax.set_xticklabels([f"#{i}" for i in range(n)], fontsize=5)
        ax.set_ylim(min(0.0, float(values.min())), 1.15)
        ax.set_xlabel("image", fontsize=6)
        kind = "values"
    else:
        ax.hist(values, bins=20, color="tab:blue")
        kind = "histogram"
    ax.set_title(f"per-image SSIM (n={n}; {summary})", fontsize=7)
    ax.tick_params(labelsize=6)
    return kind


def save_evaluation_report(
    path: str | os.PathLike,
    samples: Sequence[dict[str, Any]],
    ssim_values: Sequence[float],
    code_counts: Sequence[np.ndarray],
    history: Sequence[dict[str, Any]] = (),
    spatial_dims: int = 2,
    level_names: Sequence[str] = ("codes",),
) -> Path:
    """One PNG: reconstructions (input | code maps | reconstruction [| error]), per-image SSIM (each value when
    there are at most 16 images, else a histogram; :func:`plot_ssim_values`), codebook usage bars and training
    curves.

    Args:
        path: output PNG.
        samples: dicts with ``image`` ``[C, ...]``, ``recon`` ``[C, ...]`` and ``codes`` (one ``[...]`` map per
            level).
        ssim_values: per-image SSIM of the whole evaluation set.
        code_counts: per level, the histogram of code use over the evaluation set.
        history: training history records (see :func:`plot_training_curves`).
        spatial_dims: 2 or 3 (3D rows show axial, coronal and sagittal mid-slices with an absolute-error column).
        level_names: titles of the code maps.
    """
    rows: list[list[tuple[str, np.ndarray, str]]] = []
    for i, s in enumerate(samples):
        image, recon = np.asarray(s["image"]), np.asarray(s["recon"])
        if spatial_dims == 3:
            views = zip(("axial", "coronal", "sagittal"), mid_slices(image), mid_slices(recon), strict=True)
            for view, a, b in views:
                rows.append(
                    [
                        (f"#{i} input ({view})", np.clip(a, 0, 1), "gray"),
                        (f"#{i} reconstruction", np.clip(b, 0, 1), "gray"),
                        ("|error|", np.abs(a - b), "magma"),
                    ]
                )
        else:
            row = [(f"#{i} input", to_display(image), "gray")]
            row += [(name, np.asarray(c), "nipy_spectral") for name, c in zip(level_names, s["codes"], strict=False)]
            row += [
                ("reconstruction", to_display(recon), "gray"),
                ("|error|", np.abs(to_display(image) - to_display(recon)), "magma"),
            ]
            rows.append(row)
    n_cols = max((len(r) for r in rows), default=3)
    # with three columns (3D, or 2D without code maps) the curves get a full-width row of their own
    curves_row = n_cols <= 3
    n_rows = len(rows) + 1 + int(curves_row)
    fig = plt.figure(figsize=(2.6 * max(n_cols, 3), 2.6 * n_rows + 0.6))
    grid = fig.add_gridspec(n_rows, max(n_cols, 3))
    for r, row in enumerate(rows):
        for c, (title, img, cmap) in enumerate(row):
            ax = fig.add_subplot(grid[r, c])
            if img.ndim == 3:
                ax.imshow(img)
            else:
                ax.imshow(img, cmap=cmap, vmin=0 if cmap == "gray" else None, vmax=1 if cmap == "gray" else None)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    ncol = max(n_cols, 3)
    stats_row = n_rows - 2 if curves_row else n_rows - 1
    ax = fig.add_subplot(grid[stats_row, 0])
    plot_ssim_values(ssim_values, ax)
    ax = fig.add_subplot(grid[stats_row, 1])
    for name, counts in zip(level_names, code_counts, strict=False):
        counts = np.sort(np.asarray(counts, dtype=float))[::-1]
        used = int((counts > 0).sum())
        ax.bar(
            np.arange(len(counts)),
            counts / max(counts.sum(), 1.0),
            width=1.0,
            alpha=0.6,
            label=f"{name}: {used}/{len(counts)} used",
        )
    ax.set_title("codebook usage (codes sorted by frequency)", fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax = fig.add_subplot(grid[-1, :] if curves_row else grid[-1, 2:ncol])
    plot_training_curves(history, ax=ax)
    fig.tight_layout()
    return _save_figure(fig, path)


def save_image_grid(
    path: str | os.PathLike, images: Sequence[Any], ncols: int = 4, titles: Sequence[str] | None = None
) -> Path:
    """Save 2D images ``[C, H, W]`` in [0, 1] as a PNG grid."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.4 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = to_display(images[i])
            ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def save_sample_grid(
    path: str | os.PathLike,
    images: Any,
    labels: Sequence[int] | None = None,
    ncols: int | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """A PNG grid of generated (or real) images ``[N, C, H, W]`` or volumes ``[N, C, X, Y, Z]`` in [0, 1].

    2D: ``ncols`` images a row (default: up to 8). 3D: one row per volume with its axial, coronal and sagittal
    mid-slices. Titles are ``names`` (default ``#i``), followed by ``class c`` when ``labels`` are given.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(images))]
    if labels is not None:
        names = [f"{name} class {int(c)}" for name, c in zip(names, labels, strict=False)]
    if np.ndim(images[0]) == 4:
        tiles = [view for image in images for view in mid_slices(image)]
        titles = [f"{name} {v}" for name in names for v in ("ax", "cor", "sag")]
        return save_image_grid(path, tiles, ncols=3, titles=titles)
    return save_image_grid(path, list(images), ncols=ncols or min(8, max(1, len(images))), titles=names)


def save_prior_report(
    path: str | os.PathLike,
    bits_per_map_code: Sequence[tuple[str, np.ndarray]],
    nll_bits_per_code: float,
    uniform_bits_per_code: float,
    marginal_bits_per_code: float,
    history: Sequence[dict[str, Any]] = (),
) -> Path:
    """One PNG for a prior's evaluation: the histogram of bits per code of each map (one series per group, e.g. per
    class) against the uniform (``log2 K``) and marginal-entropy references, and the training curves.

    Args:
        path: output PNG.
        bits_per_map_code: ``(name, values)`` per group; ``values`` are each map's bits divided by its codes.
        nll_bits_per_code: the prior's mean negative log2-likelihood per code (in the title).
        uniform_bits_per_code: ``log2 K``.
        marginal_bits_per_code: entropy of the evaluated maps' code histogram.
        history: training history records (see :func:`plot_training_curves`).
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in bits_per_map_code:
        axes[0].hist(values, bins=20, alpha=0.6, label=f"{name} (n={len(values)})")
    uniform = uniform_bits_per_code
    axes[0].axvline(uniform, color="k", ls="--", label=f"uniform log2 K = {uniform:.2f}")
    axes[0].axvline(marginal_bits_per_code, color="gray", ls=":", label="marginal entropy")
    axes[0].set_xlabel("bits per code (per map)")
    nll = nll_bits_per_code
    axes[0].set_title(f"test NLL {nll:.3f} bits/code ({nll / uniform:.1%} of uniform)", fontsize=9)
    axes[0].legend(fontsize=7)
    plot_training_curves(history, ax=axes[1])
    fig.tight_layout()
    return _save_figure(fig, path)


def save_anomaly_figure(
    path: str | os.PathLike,
    images: Sequence[Any],
    healed: Sequence[Any],
    maps: Sequence[Any],
    names: Sequence[str] | None = None,
) -> Path:
    """One row per input: the input, its healed version, the anomaly map and the map over the input (anomaly maps
    of :mod:`vqvae_medical.stages.prior.anomaly`; images ``[C, H, W]`` in [0, 1], maps ``[1, H, W]``). The maps of
    one figure share one colour scale, from 0 to their largest value."""
    n = len(images)
    top = max(float(np.max(to_display(m))) for m in maps) if n else 1.0
    top = top if top > 0 else 1.0
    fig, axes = plt.subplots(n, 4, figsize=(9.6, 2.6 * n), squeeze=False)
    for i in range(n):
        img, heal, amap = to_display(images[i]), to_display(healed[i]), to_display(maps[i])
        grey = "gray" if img.ndim == 2 else None
        panels = [(img, grey, 1.0), (heal, grey, 1.0), (amap, "hot", top)]
        for ax, (arr, cmap, vmax) in zip(axes[i], panels, strict=False):
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=vmax)
        axes[i, 3].imshow(img, cmap=grey, vmin=0, vmax=1)
        axes[i, 3].imshow(np.ma.masked_less_equal(amap, 0.0), cmap="hot", vmin=0, vmax=top, alpha=0.6)
        titles = ["input" if names is None else str(names[i]), "healed", f"map (max {top:.2f})", "overlay"]
        for ax, title in zip(axes[i], titles, strict=True):
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return _save_figure(fig, path)
