"""``benchmarks/budget_curve.py``: the table and figure of sample quality against the training budget, read from
the evaluate outputs (``eval/metrics.json``) of runs with different budgets."""

from __future__ import annotations

import json
import subprocess
import sys

from bundle_runner import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "budget_curve.py"


def _run(out, name: str, c2st: float, epochs: int) -> None:
    (out / name / "eval").mkdir(parents=True)
    (out / name / "logs").mkdir()
    metrics = {
        "c2st_accuracy": c2st,
        "c2st_power_blurred_real": 0.87,
        "ms_ssim_diversity_samples": 0.5,
        "ms_ssim_diversity_real": 0.6,
    }
    (out / name / "eval" / "metrics.json").write_text(json.dumps(metrics))
    rows = [{"phase": "train", "epoch": e} for e in range(1, epochs + 1)]
    (out / name / "logs" / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_table_sorted_by_budget_and_figure_written(tmp_path):
    _run(tmp_path / "b16", "diffusion", 0.81, 10)
    _run(tmp_path / "b4", "diffusion", 0.95, 3)
    _run(tmp_path / "b16_50", "diffusion", 0.70, 10)
    _run(tmp_path / "b16_50_seed1", "diffusion", 0.76, 10)  # the same model evaluated with another seed
    fig = tmp_path / "curve.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"diffusion=16:{tmp_path / 'b16'}",
            f"diffusion=4:{tmp_path / 'b4'}",
            f"diffusion=16:{tmp_path / 'b16_50'}:50 steps",
            f"diffusion=16:{tmp_path / 'b16_50_seed1'}:50 steps",
            "--figure",
            str(fig),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| latent diffusion")]
    assert lines[0].startswith("| latent diffusion (DDIM) | 4 | 3 | 0.950 | 0.870 |"), lines
    assert lines[1].startswith("| latent diffusion (DDIM) | 16 | 10 | 0.810 |"), lines
    assert lines[2].startswith("| latent diffusion (DDIM), 50 steps | 16 | 10 | 0.700 |"), lines
    assert lines[3].startswith("| latent diffusion (DDIM), 50 steps | 16 | 10 | 0.760 |"), lines
    assert lines[4] == "| latent diffusion (DDIM), 50 steps, mean of 2 | 16 | 10 | 0.730 | - | - | - |", lines
    assert len(lines) == 5 and fig.stat().st_size > 10_000


def test_a_run_without_evaluation_is_named(tmp_path):
    (tmp_path / "gated").mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), f"gated=8:{tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"{tmp_path / 'gated' / 'eval' / 'metrics.json'}: no c2st_accuracy; run the evaluate first"
    )


def test_strict_adds_the_statistics_test_and_copy_rate(tmp_path):
    _run(tmp_path / "b8", "diffusion", 0.90, 5)
    metrics_path = tmp_path / "b8" / "diffusion" / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics.update({"c2st_stats_accuracy": 0.99, "c2st_stats_power_blurred_real": 1.0, "copy_rate": 0.03})
    metrics_path.write_text(json.dumps(metrics))
    fig = tmp_path / "curve.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), f"diffusion=8:{tmp_path / 'b8'}", "--strict", "--figure", str(fig)],
        capture_output=True,
        text=True,
        check=True,
    )
    head, rule, row = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert "| c2st_stats_accuracy | power (stats) | copy_rate |" in head
    assert head.count("|") == rule.count("|") == row.count("|")
    assert row.startswith("| latent diffusion (DDIM) | 8 | 5 | 0.900 | 0.870 | 0.990 | 1.000 | 0.030 |"), row
    assert fig.stat().st_size > 10_000


def test_a_rectified_flow_run_is_named_by_its_sampler(tmp_path):
    """A diffusion run sampled with the RFlowScheduler is labelled so: from its metrics' ``scheduler``, or, for an
    evaluate older than that key, from what its model.pt was trained to predict."""
    import torch

    _run(tmp_path / "f8", "diffusion", 0.90, 5)
    metrics_path = tmp_path / "f8" / "diffusion" / "eval" / "metrics.json"
    metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), "scheduler": "RFlowScheduler"}))
    _run(tmp_path / "m8", "diffusion", 0.80, 5)
    (tmp_path / "m8" / "diffusion" / "models").mkdir()
    torch.save({"diffusion.prediction_code": torch.tensor(3)}, tmp_path / "m8" / "diffusion" / "models" / "model.pt")
    _run(tmp_path / "d8", "diffusion", 0.70, 5)
    runs = [f"diffusion={b}:{tmp_path / r}" for b, r in ((8, "f8"), (16, "m8"), (8, "d8"))]  # no two alike: no mean
    proc = subprocess.run([sys.executable, str(SCRIPT), *runs], capture_output=True, text=True, check=True)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| latent")]
    flow = "| latent diffusion (rectified flow)"
    assert [line.split(" | ")[0] for line in table] == ["| latent diffusion (DDIM)", flow, flow], table
