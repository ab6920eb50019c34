"""Probe of a bundle training run: where the validation SSIM goes, iteration by iteration.

Runs a bundle's ``train.json`` (any overrides) with one extra handler on the trainer that, every ``--every``
iterations, reconstructs the validation images and logs one JSON line with: the SSIM of the clamped prediction
(what validation reports), the SSIM of the raw prediction, the SSIM map's mean over the foreground (target local
mean above 0.02) and over the background, the mean and the 99th percentile of the raw prediction on background
pixels (target == 0), the PSNR, the learning rate, the codes used by the validation images and the last training
loss. Used to find the cause of the validation-SSIM collapses of issue 18.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/convergence_probe.py bundles/vqvae --every 6 \
        --out /tmp/probe.jsonl -- --max_epochs 30 --output_dir /tmp/probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from vqvae_medical.evaluation.losses import SeparableSSIMLoss


def ssim_maps(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM map (valid filtering) and the local mean of the target at the same positions."""
    spatial_dims = target.ndim - 2
    s = SeparableSSIMLoss(spatial_dims, data_range=1.0)
    c = target.shape[1]
    means = s.local_means(torch.cat([pred, target, pred * pred, target * target, pred * target], 1))
    mx, my, mxx, myy, mxy = means.split(c, 1)
    vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
    smap = (2 * mx * my + s.c1) / (mx * mx + my * my + s.c1) * (2 * cov + s.c2) / (vx + vy + s.c2)
    return smap, my


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    it = iter(items)
    for key in it:
        value = next(it)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if value in ("true", "false"):
                value = value == "true"
        out[key.lstrip("-")] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--every", type=int, default=10, help="probe every N training iterations")
    p.add_argument("--out", required=True, help="JSON-lines output")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    bundle = Path(args.bundle)
    os.chdir(bundle)
    parser = ConfigParser()
    parser.read_config("configs/train.json")
    parser.update(_parse_overrides(overrides))
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    val_loader = parser.get_parsed_content("validate#dataloader")
    network = parser.get_parsed_content("network")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("")

    def probe(engine) -> None:
        was_training = network.training
        network.eval()
        rec = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "lr": engine.optimizer.param_groups[0]["lr"],
        }
        out = engine.state.output
        if isinstance(out, dict):
            rec["train_loss"] = float(out["loss"])
            rec["train_usage"] = float(out.get("usage", float("nan")))
        sums: dict[str, float] = {}
        n = 0
        codes = set()
        with torch.no_grad():
            for batch in val_loader:
                x = batch["image"].to(engine.state.device)
                x = x.as_tensor() if hasattr(x, "as_tensor") else x
                o = network(x)
                raw = o.reconstruction.float()
                for level in o.levels:
                    codes.update(level.indices.unique().tolist())
                clamped = raw.clamp(0, 1)
                smap_c, my = ssim_maps(clamped, x)
                smap_r, _ = ssim_maps(raw, x)
                fg = my > 0.02
                bg_pix = x == 0
                b = x.shape[0]
                for i in range(b):
                    f, g = fg[i], ~fg[i]
                    vals = {
                        "ssim": smap_c[i].mean(),
                        "ssim_raw": smap_r[i].mean(),
                        "ssim_fg": smap_c[i][f].mean() if f.any() else torch.tensor(float("nan")),
                        "ssim_bg": smap_c[i][g].mean() if g.any() else torch.tensor(float("nan")),
                        "bg_fraction": g.float().mean(),
                        "bg_mean_raw": raw[i][bg_pix[i]].mean() if bg_pix[i].any() else torch.tensor(0.0),
                        "bg_p99_raw": raw[i][bg_pix[i]].quantile(0.99) if bg_pix[i].any() else torch.tensor(0.0),
                        "bg_frac_pos": (raw[i][bg_pix[i]] > 0.005).float().mean()
                        if bg_pix[i].any()
                        else torch.tensor(0.0),
                        "psnr": -10 * torch.log10(((clamped[i] - x[i]) ** 2).mean().clamp_min(1e-12)),
                    }
                    for k, v in vals.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    n += 1
        rec.update({k: v / max(n, 1) for k, v in sums.items()})
        rec["val_codes"] = len(codes)
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
        network.train(was_training)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=args.every), probe)
    trainer.run()


if __name__ == "__main__":
    sys.exit(main())
