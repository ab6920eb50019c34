"""Training throughput of our 2D VQ-VAE vs MONAI's ``VQVAE`` with the same configuration, in one process.

Both models get the same channels per level (64, 128), two residual units per level with (32, 64) hidden channels,
a 256 x 32 codebook, factor-4 downsampling, Adam and an L1 + quantizer loss, on batches of real brain slices
(208 x 176, ``../shared/data/brain_mri_2d``; random images when that folder is absent). They differ where our design
differs: the residual unit's second convolution is 1x1 as in van den Oord et al. (MONAI: 3x3), the decoder's
upsampling is ICNR sub-pixel (MONAI: transposed convolution) and the quantizer is ours (MONAI: dense distances and
one-hot matrices). Steps alternate between the two models so that machine noise hits both alike.

    python benchmarks/train_throughput.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE as MonaiVQVAE

from vqvae_medical.networks import VQVAE

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain_mri_2d"


def load_batch(batch_size: int) -> torch.Tensor:
    files = sorted(DATA.glob("Test/NonDemented/*.jpg"))[:batch_size]
    if len(files) < batch_size:
        return torch.rand(batch_size, 1, 208, 176)
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files])
    return torch.from_numpy(arr)[:, None]


def build(which: str, num_embeddings: int = 256, embedding_dim: int = 32) -> torch.nn.Module:
    if which == "ours":
        return VQVAE(
            2,
            1,
            channels=(64, 128),
            num_res_units=2,
            res_channels=(32, 64),
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
        )
    return MonaiVQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(64, 128),
        num_res_layers=2,
        num_res_channels=(32, 64),
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=num_embeddings,
        embedding_dim=embedding_dim,
    )


def step_fn(which: str, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if which == "ours":
            out = model(x)
            loss = F.l1_loss(out.reconstruction, x) + out.quantizer_loss
        else:
            recon, q_loss = model(x)
            loss = F.l1_loss(recon, x) + q_loss
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = load_batch(args.batch_size)
    steps, times = {}, {"ours": [], "monai": []}
    for which in ("ours", "monai"):
        model = build(which).train()
        steps[which] = step_fn(which, model, torch.optim.Adam(model.parameters(), 1e-4), x)
        for _ in range(args.warmup):
            steps[which]()
    for _ in range(args.steps):
        for which in ("ours", "monai"):
            t0 = time.perf_counter()
            steps[which]()
            times[which].append(time.perf_counter() - t0)
    ours = args.batch_size / statistics.median(times["ours"])
    monai = args.batch_size / statistics.median(times["monai"])
    result = {"ours_img_s": round(ours, 3), "monai_img_s": round(monai, 3), "speedup": round(ours / monai, 3)}
    header = f"batch {args.batch_size} of {tuple(x.shape[2:])} images, {torch.get_num_threads()} threads"
    print_result(result, header, args.json, width=12)


def print_result(result: dict, header: str, as_json: bool, width: int = 0) -> None:
    """A benchmark's result on stdout: one JSON object (``as_json``), else ``header`` and one ``key: value`` line
    per entry, the keys right-aligned to ``width`` characters (the benchmarks' one report format)."""
    if as_json:
        print(json.dumps(result))
        return
    print(header)
    for k, v in result.items():
        print(f"{k:>{width}}: {v}")


if __name__ == "__main__":
    main()
