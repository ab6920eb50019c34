"""Table and figure of ``benchmarks/generator_comparison.sh``: one row per generator, one grid of samples each.

Reads ``<out>/<generator>/eval/metrics.json`` (the bundles' evaluate output), ``<out>/<generator>/logs/history.jsonl``
(epochs trained) and the ``cpu_seconds`` lines that the script's ``/usr/bin/time`` wrote into ``<out>/<generator>.log``,
prints a Markdown table and, with ``--figure``, stacks each generator's ``eval/samples_vs_real.png`` (its samples
above as many real test images) into one PNG.

Usage::

    python benchmarks/generator_table.py /tmp/gen_brain gated transformer hierarchical diffusion --figure out.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LABELS = {
    "gated": "gated PixelCNN (one level)",
    "transformer": "transformer prior (one level)",
    "hierarchical": "VQ-VAE-2, gated top + gated bottom",
    "hierarchical_transformer": "VQ-VAE-2, transformer top + gated bottom",
    "diffusion": "latent diffusion (DDIM)",
}


def _epochs(run: Path) -> int:
    path = run / "logs" / "history.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((int(r.get("epoch", 0)) for r in rows if r.get("phase") == "train"), default=0)


def _cpu_seconds(log: Path) -> list[float]:
    """Process CPU seconds (user + sys) of each bundle command in ``log``, in order (train, then evaluate)."""
    if not log.is_file():
        return []
    found = re.findall(r"cpu_seconds ([\d.]+) user ([\d.]+) sys", log.read_text(errors="replace"))
    return [float(u) + float(s) for u, s in found]


def _scheduler(run: Path, metrics: dict) -> str | None:
    """The sampling scheduler of a latent diffusion run: ``scheduler`` of its metrics (latent_diffusion 0.8.0 on),
    else what its ``models/model.pt`` was trained to predict (``diffusion.prediction_code`` 3: a rectified flow)."""
    if metrics.get("scheduler") or not (run / "models" / "model.pt").is_file():
        return metrics.get("scheduler")
    import torch

    from vqvae_medical.stages.diffusion.network import PREDICTION_TYPES

    state = torch.load(run / "models" / "model.pt", map_location="cpu", weights_only=True)
    code = state.get("diffusion.prediction_code")
    return None if code is None else ("RFlowScheduler" if PREDICTION_TYPES[int(code)] == "flow" else "DDIMScheduler")


def label(row: dict) -> str:
    """The generator's name in tables and figures (a diffusion run names its sampler)."""
    if row.get("scheduler") == "RFlowScheduler":
        return "latent diffusion (rectified flow)"
    return LABELS.get(row["generator"], row["generator"])


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows(out: Path, generators: list[str]) -> list[dict]:
    table = []
    for name in generators:
        metrics_path = out / name / "eval" / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        cpu = _cpu_seconds(out / f"{name}.log")
        nll = metrics.get("nll_bits_per_code")
        levels = [metrics.get(f"nll_bits_per_code_{lv}") for lv in ("top", "bottom")]
        table.append(
            {
                "generator": name,
                "epochs": _epochs(out / name),
                "train_cpu_min": cpu[0] / 60 if cpu else None,
                "c2st_accuracy": metrics.get("c2st_accuracy"),
                "c2st_power_blurred_real": metrics.get("c2st_power_blurred_real"),
                "c2st_stats_accuracy": metrics.get("c2st_stats_accuracy"),
                "c2st_stats_power_blurred_real": metrics.get("c2st_stats_power_blurred_real"),
                "copy_rate": metrics.get("copy_rate"),
                "ms_ssim_diversity_samples": metrics.get("ms_ssim_diversity_samples"),
                "ms_ssim_diversity_real": metrics.get("ms_ssim_diversity_real"),
                "nll_bits_per_code": nll,
                "nll_top_bottom": levels if any(v is not None for v in levels) else None,
                "cpu_seconds_per_sample": metrics.get("cpu_seconds_per_sample"),
                "n": metrics.get("c2st_n_per_set"),
                "scheduler": _scheduler(out / name, metrics) if name == "diffusion" else None,
            }
        )
    return table


def markdown(table: list[dict]) -> str:
    head = (
        "| generator | epochs | training CPU-min | c2st_accuracy | power (blur σ1) | MS-SSIM samples / real "
        "| NLL bits per code (top / bottom) | sampling CPU-s per image | n per set |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in table:
        nll = _fmt(r["nll_bits_per_code"], 2)
        if r["nll_top_bottom"]:
            nll += " (" + " / ".join(_fmt(v, 2) for v in r["nll_top_bottom"]) + ")"
        lines.append(
            f"| {label(r)} | {r['epochs']} | {_fmt(r['train_cpu_min'], 1)} "
            f"| {_fmt(r['c2st_accuracy'])} | {_fmt(r['c2st_power_blurred_real'])} "
            f"| {_fmt(r['ms_ssim_diversity_samples'])} / {_fmt(r['ms_ssim_diversity_real'])} | {nll} "
            f"| {_fmt(r['cpu_seconds_per_sample'], 2)} | {r['n'] if r['n'] is not None else '-'} |"
        )
    return "\n".join(lines)


def figure(out: Path, generators: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(g, out / g / "eval" / "samples_vs_real.png") for g in generators]
    panels = [(g, p) for g, p in panels if p.is_file()]
    if not panels:
        raise FileNotFoundError(f"No {out}/<generator>/eval/samples_vs_real.png: run the evaluate step first.")
    images = [plt.imread(p) for _, p in panels]
    heights = [im.shape[0] / im.shape[1] for im in images]
    fig, axes = plt.subplots(
        len(images),
        1,
        figsize=(12, 12 * sum(heights) + 0.5 * len(images)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (name, _), im in zip(axes[:, 0], panels, images, strict=True):
        ax.imshow(im)
        ax.set_title(f"{LABELS.get(name, name)}: samples (top row), real test images (bottom row)", fontsize=10)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("generators", nargs="+")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--title", default="generators at equal budgets")
    args = parser.parse_args()
    table = rows(args.out, args.generators)
    print(markdown(table))
    print(json.dumps(table))
    if args.figure is not None:
        figure(args.out, args.generators, args.figure, args.title)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
