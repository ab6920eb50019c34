"""CPU time of one training step of the 3D ``vqvae`` network (``configs/3d.json``) in fp32 and under CPU bf16 autocast
(``cpu_bf16``).

The network, the step (L1 + quantizer + SSIM terms) and the optimizer are those of ``bundles/vqvae`` with
``configs/3d.json`` (its ``train.json``, parsed), on a batch of IXI volumes cut to ``--patch`` voxels (random values
when ``../shared/data/ixi_t1_2mm`` is absent). Steps alternate between fp32 and bf16 so that machine noise hits both
alike; the medians of the CPU time per step (``time.process_time``) and the CPU's bf16 flags are printed.

    OMP_NUM_THREADS=1 python benchmarks/cpu_bf16_step.py --patch 32 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer

from vqvae_medical.stages.autoencoder.steps import VQTrainStep
from vqvae_medical.training.runtime import native_cpu_bf16

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ixi_t1_2mm"


def batch(patch: int, batch_size: int) -> torch.Tensor:
    """``batch_size`` IXI volumes min-max scaled, centre ``patch``³ crops; random values without the data."""
    files = sorted(DATA.rglob("*.nii.gz"))[:batch_size]
    if len(files) < batch_size:
        return torch.rand(batch_size, 1, patch, patch, patch, generator=torch.Generator().manual_seed(0))
    import nibabel as nib

    volumes = []
    for f in files:
        v = torch.from_numpy(nib.load(str(f)).get_fdata(dtype="float32"))
        v = (v - v.min()) / (v.max() - v.min())
        starts = [(s - patch) // 2 for s in v.shape]
        volumes.append(v[tuple(slice(a, a + patch) for a in starts)])
    return torch.stack(volumes)[:, None]


def trainer(cpu_bf16: bool | str, images: torch.Tensor) -> SupervisedTrainer:
    """A trainer of the bundle's network and optimizer settings whose every iteration is one step on ``images``."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles" / "vqvae" / "configs" / c) for c in ("train.json", "3d.json")])
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").model
    step = VQTrainStep(ssim_weight=parser["ssim_weight"], range_weight=parser["range_weight"], cpu_bf16=cpu_bf16)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": images}] * 1000,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=parser["learning_rate"]),
        loss_function=torch.nn.L1Loss(),
        iteration_update=step,
        decollate=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, default=32, help="cube edge of the training patch (voxels)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision, after one warm-up step")
    args = parser.parse_args()
    images = batch(args.patch, args.batch_size)
    engines = {"fp32": trainer(False, images), "bf16": trainer("force", images)}
    times: dict[str, list[float]] = {k: [] for k in engines}
    for i in range(args.steps + 1):
        for name, engine in engines.items():
            start = time.process_time()
            engine._process_function(engine, {"image": images})
            if i:  # the first step of each is a warm-up (oneDNN picks its kernels)
                times[name].append(time.process_time() - start)
    fp32, bf16 = (statistics.median(times[k]) for k in ("fp32", "bf16"))
    print(
        json.dumps(
            {
                "patch": args.patch,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "native_cpu_bf16": native_cpu_bf16(),
                "fp32_cpu_s_per_step": round(fp32, 3),
                "bf16_cpu_s_per_step": round(bf16, 3),
                "bf16_over_fp32": round(bf16 / fp32, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
