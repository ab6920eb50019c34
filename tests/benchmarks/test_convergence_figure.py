"""``benchmarks/convergence_figure.py``: the "largest validation drop after the first quarter" that the docs and the
issue's convergence criterion quote, and the figure with its summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bundle_runner import REPO_ROOT

from benchmarks.convergence_figure import largest_late_drop

SCRIPT = REPO_ROOT / "benchmarks" / "convergence_figure.py"

# validation SSIM every 5 epochs of the quiet IXI 3D run with range_weight 0 (2026-12-03, 120 epochs): the collapse
# 0.733 -> 0.356 lands on epoch 35, the first validation after the first quarter (epoch 30)
IXI_RW0 = [
    0.138,
    0.169,
    0.353,
    0.641,
    0.653,
    0.733,
    0.356,
    0.773,
    0.761,
    0.8,
    0.812,
    0.819,
    0.818,
    0.823,
    0.826,
    0.831,
    0.84,
    0.839,
    0.839,
    0.842,
    0.847,
    0.847,
    0.848,
    0.848,
]


def test_drop_landing_on_the_first_late_validation_counts():
    drop = largest_late_drop
    assert drop(IXI_RW0) == pytest.approx(0.733 - 0.356)
    # a drop inside the first quarter is the start-up, not a collapse
    assert drop([0.5, 0.1, 0.6, 0.7, 0.8, 0.8, 0.81, 0.82]) == 0.0
    assert drop([0.5, 0.6, 0.7, 0.8, 0.8, 0.81, 0.79, 0.82]) == pytest.approx(0.02)
    assert drop([]) == 0.0


def test_figure_and_summary_from_histories(tmp_path):
    runs = []
    for name, curve in (("rw0", IXI_RW0), ("rw1", sorted(IXI_RW0))):
        (tmp_path / name / "logs").mkdir(parents=True)
        rows = [
            {"phase": "validation", "epoch": 5 * (i + 1), "ssim": v, "psnr": 20 + 10 * v} for i, v in enumerate(curve)
        ]
        (tmp_path / name / "logs" / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        runs.append(f"{name}={tmp_path / name / 'logs' / 'history.jsonl'}")
    (tmp_path / "rw1" / "eval").mkdir()
    (tmp_path / "rw1" / "eval" / "metrics.json").write_text(json.dumps({"ssim": 0.867}))
    out = tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *runs], capture_output=True, text=True, check=True
    )
    summary = json.loads(proc.stdout)
    assert out.stat().st_size > 10_000
    assert summary["rw0"]["largest_late_drop"] == pytest.approx(0.377)
    assert summary["rw0"]["test_ssim"] is None and summary["rw1"]["test_ssim"] == 0.867
    assert summary["rw1"]["largest_late_drop"] == 0.0 and summary["rw1"]["epochs"] == 120
