"""How low ``c2st_accuracy`` can go for a generator that decodes through a given stage-1 autoencoder.

Every sample of the PixelCNN priors and of the latent diffusion model is an image drawn by the stage-1 decoder. So
the two-sample test (``vqvae_medical.evaluation.sample_quality``) can tell samples from real slices by the decoder's
own signature (smoothing, quantisation, blocking) even when the codes are perfect. This script scores, against the
same real test images that a generative bundle's evaluate draws (same data, split, preprocessing, seed and number):

- ``training_real``: real training images (an ideal generator of the training distribution; the split itself
  should score near 0.5);
- ``training_reconstructed``: the same training images encoded, snapped to the codebook and decoded (a generator
  whose codes are those of real images: the floor of any generator decoding through this autoencoder);
- ``test_reconstructed``: the real test images' own reconstructions (paired: the decoder's signature alone).

One JSON line per case with the scores of :func:`vqvae_medical.evaluation.sample_report.score_samples` (with its
power check) and the process CPU seconds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/reconstruction_floor.py /tmp/gen50_32/vqvae --n 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vqvae_medical.data.lists import section
from vqvae_medical.evaluation.sample_report import load_real_images, real_image_count, score_samples
from vqvae_medical.stages.frozen import load_autoencoder


def reconstruct(autoencoder, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Images through the frozen autoencoder: encode, snap to the codebook, decode, clip to [0, 1]. The autoencoder
    must be loaded with ``snap_to_codebook=True``: its ``decode`` does the snapping."""
    if not autoencoder.snap_to_codebook:
        raise ValueError("load the autoencoder with snap_to_codebook=True: its decoder knows only codebook vectors.")
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = images[s : s + batch_size]
            out.append(autoencoder.decode(autoencoder.encode(x), output_size=list(x.shape[2:])).clamp(0, 1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("autoencoder_dir", type=Path, help="a stage-1 output folder (vqvae --output_dir)")
    parser.add_argument("--n", type=int, default=128, help="images per set, as the bundles' evaluate (n_samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="training_real,training_reconstructed,test_reconstructed")
    args = parser.parse_args()
    autoencoder = load_autoencoder(args.autoencoder_dir, latent="encoder", snap_to_codebook=True, device="cpu")
    with tempfile.TemporaryDirectory() as cache:
        datalist = autoencoder.datalist(cache)
        transform = autoencoder.transforms()
        test, training = section(datalist, "test"), section(datalist, "training")
        # the real images of a bundle's evaluate: real_image_count test items drawn with the seed
        n_real = real_image_count(len(test), args.n)
        real = load_real_images(test, transform, n_real, seed=args.seed)
        train_images = load_real_images(training, transform, args.n, seed=args.seed)
    print(
        json.dumps(
            {
                "autoencoder_dir": str(args.autoencoder_dir),
                "n_real": len(real),
                "n": args.n,
                "torch_threads": torch.get_num_threads(),
                "shape": list(real.shape[1:]),
            }
        )
    )
    for case in args.cases.split(","):
        t0 = time.process_time()
        if case == "training_real":
            other = train_images
        elif case == "training_reconstructed":
            other = reconstruct(autoencoder, train_images)
        elif case == "test_reconstructed":
            other = reconstruct(autoencoder, real)
        else:
            raise SystemExit(f"unknown case {case!r}")
        scores = score_samples(real, other, seed=args.seed, power_check=True)
        print(json.dumps({"case": case, **scores, "cpu_seconds": round(time.process_time() - t0, 1)}))


if __name__ == "__main__":
    main()
