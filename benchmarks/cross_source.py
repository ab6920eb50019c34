"""Cross-source benchmark: a 2D VQ-VAE trained on ``brain_mri_2d`` (OASIS-derived, skull-stripped, ~1 mm JPEG slices)
scored on axial slices of the IXI T1 volumes (another scanner and site, skull on, 2 mm), next to its own test SSIM.

The IXI slices come from ``benchmarks/make_ixi_slices.py`` (its ``keras_slices_test`` folder: subjects held out of
any IXI training). They are resized by ``--ixi-zoom`` (2: to ~1 mm pixels, the scale of ``brain_mri_2d``) and go
through the bundle's own preprocessing (per-image min-max scaling to [0, 1]); ``--ixi-normalise percentile``
instead clips each IXI image to its 0.5-99.5th percentiles before scaling (the bright fat and vessels of a
skull-on T1 otherwise compress the brain's range). Scores are MONAI's ``SSIMMetric`` and PSNR of the
reconstruction clamped to [0, 1], as in the bundle's evaluation.

    cd bundles/vqvae && python -m monai.bundle run --config_file configs/train.json \
        --dataset_dir ../../../shared/data/brain_mri_2d --data_layout folder --test_fraction 0.1 --val_fraction 0.02 \
        --seed 0 --output_dir /tmp/brain_vqvae --max_epochs 100 --time_budget_minutes 20 --time_budget_clock process
    cd ../.. && python benchmarks/make_ixi_slices.py --output-dir /tmp/ixi_slices
    OMP_NUM_THREADS=1 python benchmarks/cross_source.py --run-dir /tmp/brain_vqvae --ixi-dir /tmp/ixi_slices --json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BRAIN = REPO.parent / "shared" / "data" / "brain_mri_2d"

__all__ = ["load_bundle_network", "main", "percentile_scale", "score"]


def load_bundle_network(run_dir: Path, overrides: dict | None = None) -> torch.nn.Module:
    """The ``vqvae`` network of a training run (its ``models/model.pt``), in eval mode on the CPU: built from the
    run's ``models/autoencoder.json`` when it has one (the architecture it was trained with), else from today's
    ``train.json`` with ``overrides`` (runs of versions before 0.3, e.g. ``{"network_def#model#normalize_latents":
    false}`` for one made before 0.4)."""
    from monai.bundle import ConfigParser

    from vqvae_medical.networks.config import build_network

    record = run_dir / "models" / "autoencoder.json"
    if record.is_file():
        wrapper = build_network(json.loads(record.read_text())["network_def"])
    else:
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / "vqvae" / "configs" / "train.json"))
        parser.update({"in_channels": 1, **(overrides or {})})
        wrapper = parser.get_parsed_content("network_def")
    state = torch.load(run_dir / "models" / "model.pt", map_location="cpu", weights_only=True)
    wrapper.load_state_dict(state)
    return wrapper.model.eval()


def percentile_scale(image: torch.Tensor, low: float = 0.5, high: float = 99.5) -> torch.Tensor:
    """Clip to the ``low``-``high`` percentiles of the image and scale that range to [0, 1]."""
    lo, hi = np.percentile(image.numpy(), [low, high])
    return ((image - lo) / max(hi - lo, 1e-6)).clamp(0, 1)


def score(network: torch.nn.Module, images: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean SSIM and PSNR of the clamped reconstructions of ``[1, H, W]`` images in [0, 1] (one at a time)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    ssim, psnr = SSIMMetric(spatial_dims=2, data_range=1.0), PSNRMetric(max_val=1.0)
    values = []
    with torch.no_grad():
        for image in images:
            x = image[None].float()
            pred = network.reconstruct(x).clamp(0, 1)
            values.append(float(ssim(pred, x).mean()))
            psnr(pred, x)
    return {
        "ssim": float(np.mean(values)),
        "ssim_min": float(np.min(values)),
        "psnr": float(psnr.aggregate()),
        "n_images": len(values),
    }


def _load(items: list[dict], zoom: float = 1.0, normalise: str = "minmax") -> list[torch.Tensor]:
    from monai.transforms import Zoom

    from vqvae_medical.data import image_transforms_2d

    transform = image_transforms_2d(channels=1)
    out = []
    for item in items:
        image = torch.as_tensor(np.asarray(transform(dict(item))["image"]))
        if zoom != 1.0:
            image = torch.as_tensor(np.asarray(Zoom(zoom, mode="bilinear", keep_size=False)(image))).clamp(0, 1)
        if normalise == "percentile":
            image = percentile_scale(image)
        out.append(image)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    from vqvae_medical.data import build_datalist

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path, help="output_dir of the brain_mri_2d training run")
    p.add_argument("--ixi-dir", required=True, type=Path, help="output of benchmarks/make_ixi_slices.py")
    p.add_argument("--brain-dir", type=Path, default=DEFAULT_BRAIN)
    p.add_argument("--ixi-zoom", type=float, default=2.0, help="resize factor of the 2 mm IXI slices")
    p.add_argument("--ixi-normalise", choices=("minmax", "percentile"), default="minmax")
    p.add_argument("--max-ixi", type=int, default=None, help="score at most this many IXI slices (evenly spaced)")
    p.add_argument("--override", default="{}", help="JSON config overrides for a run without models/autoencoder.json")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    network = load_bundle_network(args.run_dir, json.loads(args.override))
    # the bundle's own split of the documented brain_mri_2d run
    own = build_datalist(args.brain_dir, layout="folder", val_fraction=0.02, test_fraction=0.1, seed=0)["test"]
    ixi = build_datalist(args.ixi_dir, layout="split")["test"]
    if args.max_ixi is not None and len(ixi) > args.max_ixi:
        ixi = [ixi[i] for i in np.linspace(0, len(ixi) - 1, args.max_ixi).round().astype(int)]
    result = {
        "own_test": score(network, _load(own)),
        "ixi_test": score(network, _load(ixi, args.ixi_zoom, args.ixi_normalise)),
        "ixi_zoom": args.ixi_zoom,
        "ixi_normalise": args.ixi_normalise,
    }
    result["gap_ssim"] = result["own_test"]["ssim"] - result["ixi_test"]["ssim"]
    print(json.dumps(result, indent=None if args.json else 2))
    return result


if __name__ == "__main__":
    main()
