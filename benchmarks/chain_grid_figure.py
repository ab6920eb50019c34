"""One figure of the generate chains' variants: a row per variant (its first 8 samples), labelled with its epochs,
iterations and training CPU seconds (issue 30, part 2).

    python benchmarks/chain_grid_figure.py OUT VARIANT [VARIANT ...] [--output FIGURE.png] [--n 8]

Each ``OUT/VARIANT`` is a stage-2 output folder (``logs/history.jsonl``, ``inference/sample_*.png``), as
``benchmarks/default_chain_levers.sh`` writes; ``OUT/VARIANT.time`` (``user sys wall`` seconds, from
``/usr/bin/time -f "%U %S %e"``) adds the CPU seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def last_training_record(folder: Path) -> dict:
    """The last ``phase: train`` line of ``logs/history.jsonl`` (epoch and iteration reached)."""
    records = [json.loads(line) for line in (folder / "logs" / "history.jsonl").read_text().splitlines() if line]
    train = [r for r in records if r.get("phase") == "train"]
    if not train:
        raise SystemExit(f"{folder}: logs/history.jsonl has no training record; did the run start?")
    return train[-1]


def cpu_seconds(out: Path, name: str) -> float | None:
    path = out / f"{name}.time"
    if not path.is_file():
        return None
    user, system, _ = (float(v) for v in path.read_text().split()[:3])
    return user + system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--output", type=Path, default=None, help="default: OUT/chain_variants.png")
    parser.add_argument("--n", type=int, default=8, help="samples per row")
    args = parser.parse_args()
    rows = len(args.variants)
    fig, axes = plt.subplots(rows, args.n, figsize=(1.5 * args.n, 1.75 * rows), squeeze=False)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=1 - 0.2 / rows, wspace=0.03, hspace=0.18)
    for row, name in enumerate(args.variants):
        folder = args.out / name
        samples = sorted((folder / "inference").glob("sample_*.png"))[: args.n]
        if len(samples) < args.n:
            raise SystemExit(f"{folder}/inference has {len(samples)} samples, fewer than --n {args.n}.")
        record = last_training_record(folder)
        cpu = cpu_seconds(args.out, name)
        label = f"{name}: {record['epoch']} epochs, {record['iteration']} iterations"
        label += f", {cpu:.0f} CPU-s" if cpu is not None else ""
        for col, path in enumerate(samples):
            ax = axes[row, col]
            ax.imshow(np.asarray(Image.open(path).convert("L")), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_title(label, loc="left", fontsize=8)
    output = args.output or args.out / "chain_variants.png"
    fig.savefig(output, dpi=100)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
