"""Figures: training curves (one panel per metric, training and validation of a metric in the same panel), sample
grids of 2D images and 3D volumes, the prior's report, and the evaluation report listing each image's SSIM when
there are few images."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from vqvae_medical.evaluation.figures import (
    mid_slices,
    plot_ssim_values,
    plot_training_curves,
    save_evaluation_report,
    save_prior_report,
    save_sample_grid,
)

HISTORY = [
    {"phase": "train", "epoch": 1, "iteration": 10, "loss": 0.5, "perplexity": 12.0},
    {"phase": "validation", "epoch": 1, "iteration": 2, "ssim": 0.61, "psnr": 17.5, "perplexity": 10.0},
    {"phase": "train", "epoch": 2, "iteration": 20, "loss": 0.3, "perplexity": 30.0},
    {"phase": "validation", "epoch": 2, "iteration": 2, "ssim": 0.74, "psnr": 21.0, "perplexity": 28.0},
]


def test_one_panel_per_metric(tmp_path):
    path = tmp_path / "curves.png"
    panels = plot_training_curves(HISTORY, path)
    assert [p.get_title() for p in panels] == ["loss", "perplexity", "psnr", "ssim"]
    assert len(panels[1].get_lines()) == 2  # train and validation perplexity share a panel
    assert list(panels[3].get_lines()[0].get_ydata()) == [0.61, 0.74]
    assert Image.open(path).size == (4 * 260, 230)  # four panels of 2.6 x 1.9 in (+0.4 in title) at 100 dpi


def test_panels_fill_a_given_axes_area():
    fig, axes = plt.subplots(1, 2)
    panels = plot_training_curves(HISTORY, ax=axes[1])
    assert axes[1] not in fig.axes and all(p.figure is fig for p in panels)
    plt.close(fig)


def test_empty_history_says_so():
    panels = plot_training_curves([])
    assert "no history" in panels[0].get_title()


def test_sample_grid_of_images_and_of_volumes(tmp_path):
    images = torch.rand(5, 1, 32, 24, generator=torch.Generator().manual_seed(0))
    grid = Image.open(save_sample_grid(tmp_path / "2d.png", images))
    assert grid.size == (5 * 216, 216)  # one row of five 2.4 in tiles at 90 dpi
    volumes = torch.rand(2, 1, 20, 16, 12, generator=torch.Generator().manual_seed(1))
    grid = Image.open(save_sample_grid(tmp_path / "3d.png", volumes, labels=[0, 1]))
    assert grid.size == (3 * 216, 2 * 216)  # a row of axial, coronal, sagittal mid-slices per volume
    assert np.asarray(grid.convert("L")).std() > 10


def test_mid_slices_cut_through_the_centre():
    volume = np.zeros((1, 20, 16, 12), dtype=np.float32)
    volume[0, 10, 8, 6] = 1.0
    axial, coronal, sagittal = mid_slices(volume)
    assert [v.shape for v in (axial, coronal, sagittal)] == [(16, 20), (12, 20), (12, 16)]
    assert all(v.sum() == 1.0 for v in (axial, coronal, sagittal))


def test_prior_report(tmp_path):
    groups = [("class 0", np.array([1.2, 1.4, 1.3])), ("class 1", np.array([2.0, 2.2]))]
    path = save_prior_report(tmp_path / "report.png", groups, 1.6, 4.0, 3.1, HISTORY)
    assert Image.open(path).size == (990, 360)  # 11 x 4 in at 90 dpi


def test_few_images_show_each_ssim_value():
    values = [0.91, 0.42, 0.88, 0.95, 0.77, 0.93, 0.90, 0.86]
    fig, ax = plt.subplots()
    assert plot_ssim_values(values, ax) == "values"
    heights = [patch.get_height() for patch in ax.patches]
    assert np.allclose(heights, values)
    labels = [t.get_text() for t in ax.texts]
    assert labels == [f"{v:.3f}" for v in values]
    assert "n=8" in ax.get_title() and "min 0.420" in ax.get_title()
    plt.close(fig)


def test_many_images_get_a_histogram():
    values = np.linspace(0.5, 0.99, 40)
    fig, ax = plt.subplots()
    assert plot_ssim_values(values, ax) == "histogram"
    assert len(ax.patches) == 20 and not ax.texts
    plt.close(fig)


def test_report_with_eight_images(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((1, 16, 16)).astype(np.float32)
    samples = [{"image": image, "recon": image * 0.9, "codes": [rng.integers(0, 8, (4, 4))]}]
    path = save_evaluation_report(tmp_path / "report.png", samples, [0.9] * 7 + [0.3], [np.arange(8)], HISTORY)
    # the reconstruction is drawn: a report whose reconstruction differs has the same layout and other pixels
    other = [{**samples[0], "recon": 1.0 - image}]
    changed = save_evaluation_report(tmp_path / "other.png", other, [0.9] * 7 + [0.3], [np.arange(8)], HISTORY)
    first, second = np.asarray(Image.open(path)), np.asarray(Image.open(changed))
    assert first.shape == second.shape and not np.array_equal(first, second)
