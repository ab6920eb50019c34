"""Benchmark: ``vqvae_medical.evaluation.losses.SeparableSSIMLoss`` against MONAI's ``SSIMLoss``, same process,
same inputs; and the validation metric ``vqvae_medical.evaluation.metrics.SeparableSSIMMetric`` against MONAI's
``SSIMMetric``.

One call is the loss's forward and backward pass on a batch like the training steps' (3D: ``2 x 1 x 64^3`` patches
of the 3D bundle; 2D: ``8 x 3 x 256^2`` ISIC-sized photos). Real data is not needed for a timing: the images are
uniform noise and a noisy copy of it, both in [0, 1]. Calls alternate between the two losses so that machine noise
hits both alike; the median CPU time per call is reported with the two loss values (which must agree). The metric
case is one evaluation call (no gradient) on a whole ``1 x 1 x 128^3`` volume, as the 3D bundle validates.

    OMP_NUM_THREADS=1 python benchmarks/ssim_loss.py --json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.losses import SSIMLoss
from monai.metrics import SSIMMetric
from train_throughput import print_result  # the benchmarks' report format (this folder)

from vqvae_medical.evaluation.losses import SeparableSSIMLoss
from vqvae_medical.evaluation.metrics import SeparableSSIMMetric

CASES = {"3d": (3, (2, 1, 64, 64, 64)), "2d": (2, (8, 3, 256, 256)), "3d_metric": (3, (1, 1, 128, 128, 128))}


def time_loss(loss: torch.nn.Module, prediction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """CPU seconds of one forward + backward pass, and the loss value."""
    x = prediction.clone().requires_grad_()
    start = time.process_time()
    value = loss(x, target)
    value.backward()
    return time.process_time() - start, float(value.detach())


def time_metric(metric, prediction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """CPU seconds of one metric call, and the SSIM value."""
    start = time.process_time()
    with torch.no_grad():
        value = metric(prediction, target)
    return time.process_time() - start, float(value.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {}
    for name, (spatial_dims, shape) in CASES.items():
        target = torch.rand(shape)
        prediction = (target + 0.1 * torch.randn(shape)).clamp(0, 1)
        if name.endswith("metric"):
            timer = time_metric
            losses = {"ours": SeparableSSIMMetric(spatial_dims), "monai": SSIMMetric(spatial_dims, data_range=1.0)}
        else:
            timer = time_loss
            losses = {"ours": SeparableSSIMLoss(spatial_dims), "monai": SSIMLoss(spatial_dims, data_range=1.0)}
        times: dict[str, list[float]] = {"ours": [], "monai": []}
        values: dict[str, float] = {}
        for _ in range(args.repeats):
            for which, loss in losses.items():
                seconds, values[which] = timer(loss, prediction, target)
                times[which].append(seconds)
        ours, monai = statistics.median(times["ours"]), statistics.median(times["monai"])
        result[name] = {
            "shape": list(shape),
            "ours_s": round(ours, 4),
            "monai_s": round(monai, 4),
            "speedup": round(monai / ours, 2),
            "ours_loss": values["ours"],
            "monai_loss": values["monai"],
        }
    header = f"{torch.get_num_threads()} threads, median of {args.repeats} forward + backward passes (CPU s)"
    print_result(result, header, args.json)


if __name__ == "__main__":
    main()
