"""Reference points for the reconstruction SSIM of a folder of 2D images: JPEG at several qualities (with its bits per
image) and Gaussian blurs of the input itself.

They put a VQ-VAE's figure in context: a code grid at factor 4 carries ``log2 K`` bits per 16 pixels, and an image
codec shows how many bits a target SSIM takes on the same images; a blur of width σ shows which scale of detail
the target asks to keep. Images are read and scaled exactly as the 2D bundles read them
(``vqvae_medical.data.image_transforms_2d``: min-max to [0, 1] per image); SSIM is MONAI's ``SSIMMetric`` (Gaussian
window 11, σ 1.5, data range 1) as in the bundles' evaluation. JPEG is Pillow's baseline encoder on the image
rounded to 8 bits (grey, or RGB for 3-channel images).

Usage::

    python benchmarks/rate_references.py --data-dir /tmp/ixi_slices/keras_slices_test --json
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
from monai.metrics import SSIMMetric
from PIL import Image
from scipy.ndimage import gaussian_filter

__all__ = ["load_images", "jpeg_round_trip", "references", "main"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg")


def load_images(data_dir: str | Path, channels: int = 1) -> list[np.ndarray]:
    """``[C, H, W]`` float arrays in [0, 1] of every image in ``data_dir``, read as the 2D bundles read them."""
    from vqvae_medical.data import image_transforms_2d

    files = sorted(p for p in Path(data_dir).iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {data_dir}.")
    load = image_transforms_2d(channels=channels)
    return [np.asarray(load({"image": str(f)})["image"], dtype=np.float32) for f in files]


def jpeg_round_trip(image: np.ndarray, quality: int) -> tuple[np.ndarray, int]:
    """The JPEG-decoded ``image`` (``[C, H, W]`` in [0, 1]) and the size of its JPEG file in bits."""
    u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    pil = Image.fromarray(u8[0] if u8.shape[0] == 1 else np.moveaxis(u8, 0, -1))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255.0
    decoded = decoded[None] if decoded.ndim == 2 else np.moveaxis(decoded, -1, 0)
    return decoded, buffer.tell() * 8


def _ssim(predictions: list[np.ndarray], images: list[np.ndarray]) -> float:
    metric = SSIMMetric(spatial_dims=2, data_range=1.0)
    values = [
        metric(torch.from_numpy(p)[None], torch.from_numpy(i)[None]).mean().item()
        for p, i in zip(predictions, images, strict=True)
    ]
    return float(np.mean(values))


def references(images: list[np.ndarray], qualities=(10, 30, 50, 75), sigmas=(0.5, 0.75, 1.0)) -> dict:
    """Mean SSIM (and mean bits per image for JPEG) of each reference on ``images``."""
    out: dict = {"n_images": len(images), "jpeg": [], "blur": []}
    for q in qualities:
        decoded, bits = zip(*(jpeg_round_trip(i, q) for i in images), strict=True)
        out["jpeg"].append({"quality": q, "bits_per_image": float(np.mean(bits)), "ssim": _ssim(list(decoded), images)})
    for sigma in sigmas:
        blurred = [gaussian_filter(i, sigma=(0, sigma, sigma)) for i in images]
        out["blur"].append({"sigma": sigma, "ssim": _ssim(blurred, images)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder of 2D images (NIfTI slices, PNG or JPEG)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = parser.parse_args(argv)
    result = references(load_images(args.data_dir, args.channels))
    if args.json:
        print(json.dumps(result))
    else:
        for r in result["jpeg"]:
            print(f"JPEG quality {r['quality']:3d}: {r['bits_per_image']:9.0f} bits/image  SSIM {r['ssim']:.4f}")
        for r in result["blur"]:
            print(f"Gaussian blur sigma {r['sigma']:.2f}:               SSIM {r['ssim']:.4f}")
    return result


if __name__ == "__main__":
    main()
