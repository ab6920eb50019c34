"""How far the generate chains' samples are from the slices they were trained on (issue 30, part 2).

The default chains train on 144 MNI152 slices and test on 24: too few for the bundles' own ``evaluate.json``
(its c2st has no power at 24 images). This script compares each variant's samples with the stage-1
reconstructions of all 192 slices of the chain's data (same decoder, so the decoder is no tell), with the
image-statistics two-sample test of ``vqvae_medical.evaluation.image_statistics`` (background speckle, detail,
gradients, foreground intensities; accuracy 0.5 = indistinguishable, 1.0 = always told apart), on three seeds, and
prints its floor (the reconstructions split in two halves) beside it. Where the test tells every variant apart
(accuracy 1.0), ``mean_abs_effect_sd`` (the samples' mean minus the slices' mean of each statistic, in pooled
standard deviations, averaged over the 17 statistics) grades how far, and the three largest effects say where.

    python benchmarks/chain_realism.py OUT VARIANT [VARIANT ...]

``OUT/stage1`` is the chain's VQ-VAE and ``OUT/VARIANT/inference_realism/sample_*.png`` its samples (written by
the bundle's inference with ``--n_samples N --inference_dir OUT/VARIANT/inference_realism``, as
``benchmarks/default_chain_levers.sh`` does). One JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae_medical.evaluation.image_statistics import image_statistics, logistic_c2st, statistics_comparison
from vqvae_medical.stages.frozen import load_autoencoder

SEEDS = (0, 1, 2)


def read_pngs(paths: list[Path]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays))[:, None]


@torch.no_grad()
def reconstructions(stage1: Path) -> torch.Tensor:
    """Stage-1 reconstructions of every slice of the stage-1 data (training, validation and test), 8-bit."""
    autoencoder = load_autoencoder(stage1, device="cpu")
    sections = autoencoder.datalist(stage1 / "cache")
    items = [item for name in ("training", "validation", "test") for item in sections.get(name, [])]
    transform = autoencoder.transforms()
    images = torch.stack([torch.as_tensor(transform(dict(item))["image"]) for item in items]).float()
    out = [autoencoder.decode_from_indices(autoencoder.encode_to_indices(b)) for b in images.split(32)]
    return (torch.cat(out).clamp(0, 1) * 255).round() / 255  # 8-bit, as the samples' PNGs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--write-reference", type=Path, default=None, help="also save the reconstructions as PNGs here")
    args = parser.parse_args()
    real = reconstructions(args.out / "stage1")
    if args.write_reference is not None:
        args.write_reference.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(real):
            array = (image[0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(args.write_reference / f"{i:04d}.png")
    real_features = image_statistics(real)
    half = len(real) // 2
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    floor = [logistic_c2st(real_features[perm[:half]], real_features[perm[half:]], seed=s) for s in SEEDS]
    print(json.dumps({"variant": "floor: reconstructions, two halves", "n": half, "accuracy": floor}))
    for name in args.variants:
        paths = sorted((args.out / name / "inference_realism").glob("sample_*.png"))
        if not paths:
            raise SystemExit(f"{args.out / name}/inference_realism holds no sample_*.png")
        samples = read_pngs(paths)
        if samples.shape[-2:] != real.shape[-2:]:
            raise SystemExit(f"{name}: samples are {list(samples.shape[-2:])}, slices {list(real.shape[-2:])}")
        features = image_statistics(samples)
        scores = [logistic_c2st(real_features, features, seed=s) for s in SEEDS]
        effects = {k: v["effect_sd"] for k, v in statistics_comparison(real_features, features).items()}
        effects = {k: v for k, v in effects.items() if v is not None}
        largest = sorted(effects, key=lambda k: -abs(effects[k]))[:3]
        row = {
            "variant": name,
            "n": min(len(real), len(samples)),
            "accuracy": scores,
            "mean": round(float(np.mean(scores)), 3),
            "mean_abs_effect_sd": round(float(np.mean([abs(v) for v in effects.values()])), 2),
            "largest_effects_sd": {k: round(effects[k], 2) for k in largest},
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
