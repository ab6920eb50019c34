"""Before/after validation curves of training runs, one PNG: validation SSIM (and PSNR) per epoch of each run's
``logs/history.jsonl`` (``vqvae_medical.training.handlers.MetricsHistory``), or, for ``benchmarks/convergence_probe.py``
output, the SSIM with its foreground/background split per iteration.

    python benchmarks/convergence_figure.py --out bundles/vqvae/docs/brain_convergence.png \\
        --title "brain_mri_2d, 20 CPU-min" \\
        "0.2.0=$TMPDIR/brain_before/logs/history.jsonl" "fixed=$TMPDIR/brain_after/logs/history.jsonl"
    python benchmarks/convergence_figure.py --probe --out probe.png \\
        "0.2.0=$TMPDIR/pb_base.jsonl" "fixed=$TMPDIR/pb_clip.jsonl"

Each run is ``label=path``; a ``metrics.json`` next to ``logs/`` under ``eval/`` (the bundle's evaluation) is
added to the legend as the test SSIM. The largest drop of validation SSIM between consecutive validations after
the first quarter of the run is printed and written in the legend.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def largest_late_drop(values: list[float]) -> float:
    """Largest decrease between consecutive values that lands after the first quarter (0 when none).

    The drop into the first value after the quarter counts (the 0.5.0 IXI curve fell 0.733 -> 0.356 from epoch 30 to
    35 of 120; figures made before 2026-12-03 left such a drop out).
    """
    start = len(values) // 4
    late = values[max(start - 1, 0) :]
    return max([a - b for a, b in zip(late, late[1:], strict=False)] + [0.0])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="label=path")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--probe", action="store_true", help="inputs are convergence_probe.py JSON lines")
    args = p.parse_args(argv)
    summary = {}
    if args.probe:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for spec in args.runs:
            label, path = spec.split("=", 1)
            recs = _records(Path(path))
            its = [r["iteration"] for r in recs]
            for ax, key in zip(axes, ("ssim", "ssim_fg", "ssim_bg"), strict=True):
                ax.plot(its, [r[key] for r in recs], marker="o", ms=2, label=label)
                ax.set_title(
                    {
                        "ssim": "validation SSIM (clamped output)",
                        "ssim_fg": "SSIM, brain windows",
                        "ssim_bg": "SSIM, background windows",
                    }[key],
                    fontsize=9,
                )
            summary[label] = {
                "largest_late_drop": largest_late_drop([r["ssim"] for r in recs]),
                "last": recs[-1]["ssim"],
            }
        for ax in axes:
            ax.set_xlabel("iteration")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for spec in args.runs:
            label, path = spec.split("=", 1)
            recs = [r for r in _records(Path(path)) if r.get("phase") == "validation"]
            epochs, ssim, psnr = [r["epoch"] for r in recs], [r["ssim"] for r in recs], [r.get("psnr") for r in recs]
            drop = largest_late_drop(ssim)
            metrics = Path(path).parents[1] / "eval" / "metrics.json"
            test = json.loads(metrics.read_text()).get("ssim") if metrics.is_file() else None
            text = f"{label}: {len(epochs)} val., max late drop {drop:.3f}" + (
                f", test SSIM {test:.3f}" if test is not None else ""
            )
            axes[0].plot(epochs, ssim, marker="o", ms=2, label=text)
            axes[1].plot(epochs, psnr, marker="o", ms=2, label=label)
            summary[label] = {
                "epochs": epochs[-1] if epochs else 0,
                "largest_late_drop": drop,
                "last_val_ssim": ssim[-1] if ssim else None,
                "test_ssim": test,
            }
        axes[0].set_title("validation SSIM", fontsize=9)
        axes[1].set_title("validation PSNR (dB)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
