"""Benchmark: cached vs naive ancestral sampling from a gated PixelCNN or a causal transformer prior.

``--prior pixelcnn`` (default): a :class:`~vqvae_medical.networks.pixelcnn.GatedPixelCNN` of realistic size for a
VQ code level (``K = 512`` codes, 64 channels, 10 gated layers of kernel 3: receptive field 10 rows above and 10
columns either side), cached with :class:`~vqvae_medical.networks.pixelcnn.PixelCNNCache` (row cache).

``--prior transformer``: a :class:`~vqvae_medical.networks.transformer_prior.TransformerPrior` (MONAI's
``DecoderOnlyTransformer``, ``K = 512``, width 64, 4 blocks of 4 heads, ``F.scaled_dot_product_attention``; global
context over the 1,024 positions), cached with
:class:`~vqvae_medical.networks.transformer_prior.TransformerPriorCache` (keys and values of past positions).

``--prior hierarchical``: the VQ-VAE-2 prior
(:class:`~vqvae_medical.stages.prior.hierarchical.HierarchicalPrior`, Razavi et al. 2019): a top gated PixelCNN
over ``size / 2 x size / 2`` top maps and a bottom gated PixelCNN over ``size x size`` bottom maps conditioned on the
top codes (embedded and nearest-upsampled), both of the PixelCNN settings above, sampled top then bottom
(:func:`~vqvae_medical.stages.prior.hierarchical.sample_hierarchical`), each level cached with ``PixelCNNCache``.
Identical means both levels are.

Either prior samples ``8`` code maps of ``32 x 32`` twice in the same process, from generators seeded alike:
naively (a full forward pass per position, 1,024 of them) and cached. The samples must be identical. Wall and
process CPU times (user + system, all threads) are reported; on a shared machine the CPU times are the steadier.

Both run with the same intra-op thread count (``--threads``, default 1: on a shared CPU, OpenMP synchronisation
dominates the per-position operations of the cached sampler with more threads; ``--threads 0`` keeps torch's
default). One untimed warm-up forward precedes the timings. The weights are torch's default initialisation.

Usage::

    python benchmarks/prior_sampling.py            # human-readable line
    python benchmarks/prior_sampling.py --json     # {"cached_s": ..., "naive_s": ..., "speedup": ..., "identical": ...}
    python benchmarks/prior_sampling.py --prior transformer --json
    python benchmarks/prior_sampling.py --prior hierarchical --json   # VQ-VAE-2: top 16 x 16, bottom 32 x 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from vqvae_medical.networks.pixelcnn import GatedPixelCNN
from vqvae_medical.networks.transformer_prior import TransformerPrior
from vqvae_medical.stages.prior.hierarchical import HierarchicalPrior, pack_hierarchical_inputs, sample_hierarchical
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
    prior: str = "pixelcnn",
    num_heads: int = 4,
    flash_attention: bool = True,
) -> dict:
    """Wall and CPU times of cached and naive sampling of ``[batch, size, size]`` code maps, and whether they agree.

    ``kernel_size`` applies to the PixelCNN, ``num_heads`` and ``flash_attention`` to the transformer. For
    ``prior="hierarchical"`` ``size`` is the bottom map's (the top map is half of it).
    """
    torch.manual_seed(seed)
    shape = (batch, size, size)
    model: torch.nn.Module
    if prior == "hierarchical":
        return _bench_hierarchical(batch, size, num_embeddings, channels, num_layers, kernel_size, temperature, seed)
    if prior == "pixelcnn":
        model = GatedPixelCNN(2, num_embeddings, channels, num_layers, kernel_size)
    elif prior == "transformer":
        model = TransformerPrior(
            2, num_embeddings, size * size, channels, num_layers, num_heads, use_flash_attention=flash_attention
        )
    else:
        raise ValueError(f"prior must be 'pixelcnn', 'transformer' or 'hierarchical', got {prior!r}.")
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape, dtype=torch.long))  # warm-up

    def run(cached: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sample(model, shape, temperature=temperature, generator=generator, cached=cached)

    cached, *cached_times = _timed(lambda: run(True))
    naive, *naive_times = _timed(lambda: run(False))
    return {"prior": prior, **_speed(cached_times, naive_times), "identical": bool(torch.equal(cached, naive))}


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _speed(cached: list[float], naive: list[float]) -> dict:
    """Wall and CPU seconds (``[wall, cpu]`` each) of the cached and naive samplers, and their ratios."""
    return {
        "cached_s": round(cached[0], 3),
        "naive_s": round(naive[0], 3),
        "speedup": round(naive[0] / cached[0], 1),
        "cached_cpu_s": round(cached[1], 3),
        "naive_cpu_s": round(naive[1], 3),
        "speedup_cpu": round(naive[1] / cached[1], 1),
    }


def _bench_hierarchical(
    batch: int,
    size: int,
    num_embeddings: int,
    channels: int,
    num_layers: int,
    kernel_size: int,
    temperature: float,
    seed: int,
) -> dict:
    """Cached vs naive sampling of ``batch`` VQ-VAE-2 code pairs (top ``size / 2``, bottom ``size``)."""
    if size % 2:
        raise ValueError(f"the bottom map size must be even (the top map is half of it), got {size}.")
    top = GatedPixelCNN(2, num_embeddings, channels, num_layers, kernel_size)
    bottom = GatedPixelCNN(
        2, num_embeddings, channels, num_layers, kernel_size, conditioning_num_embeddings=num_embeddings
    )
    model = HierarchicalPrior(top, bottom).eval()
    half = size // 2
    with torch.no_grad():  # warm-up
        zeros = torch.zeros(batch, half, half, dtype=torch.long)
        model(pack_hierarchical_inputs(zeros, torch.zeros(batch, size, size, dtype=torch.long)))

    def run(cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return sample_hierarchical(model, batch, (half, half), None, temperature, generator, cached)

    cached, *cached_times = _timed(lambda: run(True))
    naive, *naive_times = _timed(lambda: run(False))
    return {
        "prior": "hierarchical",
        "top_size": half,
        "bottom_size": size,
        **_speed(cached_times, naive_times),
        "identical": bool(torch.equal(cached[0], naive[0]) and torch.equal(cached[1], naive[1])),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", choices=["pixelcnn", "transformer", "hierarchical"], default="pixelcnn")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="code map height and width (hierarchical: bottom map)")
    parser.add_argument("--num-embeddings", type=int, default=512, help="codebook size K")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="gated layers / blocks (default 10 / 4)")
    parser.add_argument("--kernel-size", type=int, default=3, help="PixelCNN kernel size")
    parser.add_argument("--heads", type=int, default=4, help="transformer attention heads")
    parser.add_argument(
        "--explicit-attention", action="store_true", help="transformer: MONAI's attention matrix, not SDPA"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both samplers (0: default)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformer = args.prior == "transformer"
    layers = args.layers if args.layers is not None else (4 if transformer else 10)
    shape_of = (
        f"heads={args.heads} attention={'explicit' if args.explicit_attention else 'sdpa'}"
        if transformer
        else f"kernel={args.kernel_size}"
    )
    config = (
        f"{args.prior} B={args.batch} {args.size}x{args.size} K={args.num_embeddings} channels={args.channels} "
        f"layers={layers} {shape_of} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(config, file=sys.stderr, flush=True)
    report = bench(
        args.batch,
        args.size,
        args.num_embeddings,
        args.channels,
        layers,
        args.kernel_size,
        args.temperature,
        args.seed,
        args.prior,
        args.heads,
        not args.explicit_attention,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"cached {report['cached_s']:.3f} s, naive {report['naive_s']:.3f} s, "
            f"speedup {report['speedup']:.1f}x (CPU time: cached {report['cached_cpu_s']:.3f} s, "
            f"naive {report['naive_cpu_s']:.3f} s, {report['speedup_cpu']:.1f}x), "
            f"identical samples: {report['identical']}"
        )
    return report


if __name__ == "__main__":
    main()
