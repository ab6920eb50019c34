"""Training-curve figure: one panel per metric, training and validation of a metric in the same panel."""

from __future__ import annotations

import matplotlib.pyplot as plt
from PIL import Image

from vqvae_medical.evaluation.figures import plot_training_curves

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
    assert Image.open(path).size[0] > 0


def test_panels_fill_a_given_axes_area():
    fig, axes = plt.subplots(1, 2)
    panels = plot_training_curves(HISTORY, ax=axes[1])
    assert axes[1] not in fig.axes and all(p.figure is fig for p in panels)
    plt.close(fig)


def test_empty_history_says_so():
    panels = plot_training_curves([])
    assert "no history" in panels[0].get_title()
