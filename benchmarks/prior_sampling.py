"""Benchmark: cached vs naive ancestral sampling from a :class:`~vqvae_medical.networks.pixelcnn.GatedPixelCNN`.

A prior of realistic size for a VQ-VAE code level (``K = 512`` codes, 64 channels, 10 gated layers of kernel 3:
receptive field 10 rows above and 10 columns either side) samples ``8`` code maps of ``32 x 32`` twice in the same
process, from generators seeded alike: naively (a full forward pass per position, 1,024 of them) and with the
row cache (:class:`~vqvae_medical.networks.pixelcnn.PixelCNNCache`). The samples must be identical.

Both run with the same intra-op thread count (``--threads``, default 1: on a shared CPU, OpenMP synchronisation
dominates the per-position operations of the cached sampler with more threads; ``--threads 0`` keeps torch's
default). One untimed warm-up forward precedes the timings. The weights are torch's default initialisation.

Usage::

    python benchmarks/prior_sampling.py            # human-readable line
    python benchmarks/prior_sampling.py --json     # {"cached_s": ..., "naive_s": ..., "speedup": ..., "identical": ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from vqvae_medical.networks.pixelcnn import GatedPixelCNN
from vqvae_medical.stages.prior.sampling import sample

__all__ = ["bench", "main"]


def bench(
    batch: int = 8,
    size: int = 32,
    num_embeddings: int = 512,
    channels: int = 64,
    num_layers: int = 10,
    kernel_size: int = 3,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """Wall time of cached and naive sampling of ``[batch, size, size]`` code maps, and whether they agree."""
    torch.manual_seed(seed)
    model = GatedPixelCNN(2, num_embeddings, channels, num_layers, kernel_size).eval()
    shape = (batch, size, size)
    with torch.no_grad():
        model(torch.zeros(shape, dtype=torch.long))  # warm-up

    t0 = time.perf_counter()
    cached = sample(model, shape, temperature=temperature, generator=torch.Generator().manual_seed(seed))
    cached_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive = sample(model, shape, temperature=temperature, generator=torch.Generator().manual_seed(seed), cached=False)
    naive_s = time.perf_counter() - t0

    return {
        "cached_s": round(cached_s, 3),
        "naive_s": round(naive_s, 3),
        "speedup": round(naive_s / cached_s, 1),
        "identical": bool(torch.equal(cached, naive)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="code map height and width")
    parser.add_argument("--num-embeddings", type=int, default=512, help="codebook size K")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both samplers (0: default)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = (
        f"B={args.batch} {args.size}x{args.size} K={args.num_embeddings} channels={args.channels} "
        f"layers={args.layers} kernel={args.kernel_size} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(config, file=sys.stderr, flush=True)
    report = bench(
        args.batch,
        args.size,
        args.num_embeddings,
        args.channels,
        args.layers,
        args.kernel_size,
        args.temperature,
        args.seed,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"cached {report['cached_s']:.3f} s, naive {report['naive_s']:.3f} s, "
            f"speedup {report['speedup']:.1f}x, identical samples: {report['identical']}"
        )
    return report


if __name__ == "__main__":
    main()
