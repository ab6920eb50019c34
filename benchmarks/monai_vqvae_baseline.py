"""MONAI's ``VQVAE`` trained the same way as the 2D bundle's default recipe, for comparison.

Same data split (``vqvae_medical.data.lists.training_datalist``), same transforms, batch size, Adam learning rate
with the bundle's cosine decay over the time budget (``vqvae_medical.training.schedules.cosine_decay``), L1 +
``ssim_weight`` x (1 - SSIM) + quantizer loss (``--ssim_weight 0 --final_lr_factor 1`` gives the 0.1.0 recipe: L1,
constant rate) and the same time budget (process CPU time, like the bundle's ``TimeBudget`` handler); the network is
``monai.networks.nets.VQVAE`` with the same channels, residual units, codebook size and dimension, and its own EMA
quantizer (``decay`` as given). Evaluated on the test split with MONAI's ``SSIMMetric``/``PSNRMetric`` and the same
codebook-usage definition as the bundle.

    python benchmarks/monai_vqvae_baseline.py --dataset_dir ../shared/data/brain_mri_2d --minutes 20 --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import VQVAE as MonaiVQVAE
from monai.utils import set_determinism

from vqvae_medical.data import image_transforms_2d
from vqvae_medical.data.lists import training_datalist
from vqvae_medical.evaluation.losses import SeparableSSIMLoss
from vqvae_medical.evaluation.metrics import code_histogram_stats
from vqvae_medical.training.handlers import TimeBudget
from vqvae_medical.training.schedules import cosine_decay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--data_layout", default="folder")
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--spatial_size", type=int, nargs="*", default=None)
    parser.add_argument("--test_fraction", type=float, default=0.1)
    parser.add_argument("--val_fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=20.0, help="process CPU minutes of training")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--num_embeddings", type=int, default=256)
    parser.add_argument("--embedding_dim", type=int, default=32)
    parser.add_argument("--ssim_weight", type=float, default=1.0)
    parser.add_argument("--final_lr_factor", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    set_determinism(args.seed)
    datalist = training_datalist(
        args.dataset_dir,
        "/tmp",
        2,
        args.in_channels,
        args.data_layout,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    size = args.spatial_size or None
    train = CacheDataset(
        datalist["training"],
        image_transforms_2d(channels=args.in_channels, spatial_size=size, divisible_by=4),
        progress=False,
    )
    test = CacheDataset(
        datalist["test"],
        image_transforms_2d(channels=args.in_channels, spatial_size=size, divisible_by=4),
        progress=False,
    )
    net = MonaiVQVAE(
        spatial_dims=2,
        in_channels=args.in_channels,
        out_channels=args.in_channels,
        channels=(32, 64),
        num_res_layers=2,
        num_res_channels=(16, 32),
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=args.num_embeddings,
        embedding_dim=args.embedding_dim,
        decay=args.decay,
    )
    opt = torch.optim.Adam(net.parameters(), args.learning_rate)
    budget = TimeBudget(args.minutes, clock="process")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine_decay(10**6, budget, args.final_lr_factor))
    ssim_loss = SeparableSSIMLoss(2)
    start, iterations, epochs = time.process_time(), 0, 0
    wall = time.perf_counter()
    while time.process_time() - start < args.minutes * 60:
        epochs += 1
        for batch in DataLoader(train, batch_size=args.batch_size, shuffle=True):
            x = batch["image"].as_tensor()
            recon, q_loss = net(x)
            loss = F.l1_loss(recon, x) + q_loss
            if args.ssim_weight > 0:
                loss = loss + args.ssim_weight * ssim_loss(recon, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            iterations += 1
            if time.process_time() - start >= args.minutes * 60:
                break
        budget.spent_s = time.process_time() - start
        schedule.step()
    wall = time.perf_counter() - wall
    net.eval()
    ssim, psnr = SSIMMetric(spatial_dims=2, data_range=1.0), PSNRMetric(max_val=1.0)
    counts = torch.zeros(args.num_embeddings, dtype=torch.float64)
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=args.batch_size):
            x = batch["image"].as_tensor()
            recon, _ = net(x)
            recon = recon.clamp(0, 1)
            ssim(recon, x)
            psnr(recon, x)
            idx = net.index_quantize(x)
            counts += torch.bincount(idx.reshape(-1), minlength=args.num_embeddings).double()
    usage, perplexity = code_histogram_stats(counts)
    result = {
        "model": "monai.networks.nets.VQVAE",
        "decay": args.decay,
        "ssim_weight": args.ssim_weight,
        "final_lr_factor": args.final_lr_factor,
        "ssim": float(ssim.aggregate()),
        "psnr": float(psnr.aggregate()),
        "codebook_usage": usage,
        "perplexity": perplexity,
        "n_images": len(test),
        "iterations": iterations,
        "epochs": epochs,
        "process_minutes": round((time.process_time() - start) / 60, 2),
        "wall_minutes": round(wall / 60, 2),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
