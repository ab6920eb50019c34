"""Power and cost of the sample-quality yardstick (``vqvae_medical.evaluation.sample_quality``) on real brain slices.

Draws ``2 * n`` slices (seeded) from ``<data-dir>/Test/*/*.jpg`` (208 x 176 grey JPEGs read to [0, 1]), splits
them into disjoint sets A and B, and runs :func:`c2st_accuracy` with its default settings of A against:

- ``real``: B itself (an ideal generator: the score should be near 0.5);
- ``blur_<s>``: Gaussian-blurred copies of B (sigma ``s`` pixels of the 208 x 176 slice);
- ``noise_<s>``: B plus Gaussian noise of standard deviation ``s``, clipped to [0, 1];
- ``shuffled``: B with each slice's pixels permuted (the intensity histogram kept, the anatomy gone);
- ``mean``: ``n`` copies of the per-pixel mean of B (no diversity at all);

then the MS-SSIM diversity of A and one full :func:`sample_quality` call (A against blurred B; its power check
blurs half of A against the other half). It prints one JSON line per case with the scores and process CPU seconds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sample_quality.py --data-dir ../shared/data/brain_mri_2d --n 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae_medical.evaluation.sample_quality import blur_images, c2st_accuracy, ms_ssim_diversity, sample_quality


def load_slices(data_dir: Path, n: int, seed: int) -> torch.Tensor:
    files = sorted((data_dir / "Test").glob("*/*.jpg"))
    if len(files) < n:
        raise ValueError(f"{data_dir}/Test holds {len(files)} slices, {n} are needed.")
    pick = np.random.default_rng(seed).permutation(len(files))[:n]
    arrays = [np.asarray(Image.open(files[i]).convert("L"), dtype=np.float32) / 255.0 for i in pick]
    return torch.from_numpy(np.stack(arrays))[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/brain_mri_2d"))
    parser.add_argument("--n", type=int, default=128, help="images per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="real,blur_1.0,blur_1.5,noise_0.05,shuffled,mean,diversity,sample_quality")
    args = parser.parse_args()
    x = load_slices(args.data_dir, 2 * args.n, args.seed)
    a, b = x[: args.n], x[args.n :]
    g = torch.Generator().manual_seed(1)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "n_per_set": args.n, "shape": list(a.shape[1:])}))
    for case in args.cases.split(","):
        t0 = time.process_time()
        if case == "diversity":
            value = {"ms_ssim_diversity_real": ms_ssim_diversity(a, seed=args.seed)}
        elif case == "sample_quality":
            value = sample_quality(a, blur_images(b, 1.0), seed=args.seed)
        else:
            if case == "real":
                other = b
            elif case.startswith("blur_"):
                other = blur_images(b, float(case.split("_")[1]))
            elif case.startswith("noise_"):
                other = (b + float(case.split("_")[1]) * torch.randn(b.shape, generator=g)).clamp(0, 1)
            elif case == "shuffled":
                flat = b.reshape(len(b), -1)
                other = torch.stack([f[torch.randperm(f.numel(), generator=g)] for f in flat]).reshape(b.shape)
            elif case == "mean":
                other = b.mean(0, keepdim=True).expand_as(b).contiguous()
            else:
                raise ValueError(f"unknown case {case!r}.")
            value = {"c2st_accuracy": c2st_accuracy(a, other, seed=args.seed)}
        print(json.dumps({"case": case, **value, "cpu_s": round(time.process_time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
