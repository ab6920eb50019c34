"""Benchmark: one training step of :class:`~vqvae_medical.networks.quantizers.EMAVectorQuantizer` vs MONAI's
``EMAQuantizer``.

A step is the train-mode forward pass (nearest-code search and EMA codebook update) followed by the backward pass of
``quantized.sum() + loss`` (straight-through estimator and commitment loss), on ``z`` of shape ``[16, 64, 64, 64]``:
``N = 65,536`` vectors of ``D = 64``, for each codebook size ``K``. Both quantizers run in the same process on the
CPU with torch's default thread count. Ours is initialised (one data-initialisation step) and has dead-code
restarts on (``dead_code_threshold=1``), as in training.

Time: median wall time of ``--repeats`` steps after ``--warmup`` steps; the repeats of ours and MONAI's alternate, so
that both see the same background load on a shared machine. The median process CPU time (all threads, user + system)
is reported too: with ``--threads 1`` it is robust to other processes competing for the cores (wall time is not).

Peak memory: ``torch.profiler`` with ``profile_memory=True`` around one extra step. Every tensor allocation and
free on the CPU goes through c10's profiled CPU allocator, which reports its running total of bytes allocated since
profiling started with every event; the figure is the maximum of that total during the step, i.e. the high-water
mark of tensor memory the step added on top of what existed before it (inputs and module state excluded). It counts
tensor storage exactly and nothing else (no allocator slack or Python objects). ``tracemalloc`` does not see torch
allocations, and the process RSS is blurred by glibc keeping freed pages, hence this method. The largest single
allocation is reported too, to show whether an ``N x K`` fp32 matrix (``N * K * 4`` bytes, 2 GiB at ``K = 8192``)
was ever materialised.

Usage::

    python benchmarks/quantizer.py                       # table on stdout
    python benchmarks/quantizer.py --json --repeats 5 --k 1024 8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from monai.networks.layers import EMAQuantizer
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from vqvae_medical.networks.quantizers import EMAVectorQuantizer

__all__ = ["peak_allocated_bytes", "bench_one", "main"]

MIB = 1024.0 * 1024.0


def peak_allocated_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """Run ``fn`` under the memory profiler.

    Returns:
        ``(peak, largest)``: the high-water mark of CPU tensor bytes allocated during ``fn`` (net of frees, relative
        to the start) and the size of the largest single allocation.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            ef = node.extra_fields
            allocs.append((node.start_time_ns, int(ef.alloc_size), int(ef.total_allocated)))
        stack.extend(node.children)
    if not allocs:
        return 0, 0
    allocs.sort()
    base = allocs[0][2] - allocs[0][1]  # total before the first event
    return max(a[2] for a in allocs) - base, max(a[1] for a in allocs)


def _step(quantizer: nn.Module, z: torch.Tensor) -> None:
    """One training step of a quantizer: train-mode forward (EMA update) and backward."""
    z.grad = None
    out = quantizer(z)
    quantized, loss = (out.quantized, out.loss) if hasattr(out, "quantized") else (out[0], out[1])
    (quantized.sum() + loss).backward()


def _median_ms(fns: list[Callable[[], object]], repeats: int, warmup: int) -> list[tuple[float, float]]:
    """Median wall time and median process CPU time (ms) of each of ``fns``, run alternately ``repeats`` times after
    ``warmup`` runs each."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times, strict=True):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            acc.append((time.perf_counter() - t0, time.process_time() - c0))
    return [(1000.0 * statistics.median(w for w, _ in t), 1000.0 * statistics.median(c for _, c in t)) for t in times]


def bench_one(k: int, repeats: int = 3, warmup: int = 1, shape: tuple[int, ...] = (16, 64, 64, 64)) -> dict:
    """Time and memory of one training step of ours and MONAI's EMA quantizer for codebook size ``k``."""
    torch.manual_seed(0)
    d = shape[1]
    n = shape[0] * int(torch.tensor(shape[2:]).prod())
    spatial_dims = len(shape) - 2
    z = torch.randn(*shape).requires_grad_(True)

    ours = EMAVectorQuantizer(spatial_dims, k, d, init="data", dead_code_threshold=1.0).train()
    _step(ours, z)  # data initialisation happens here, outside the timings
    steps = [partial(_step, ours, z), partial(_step, EMAQuantizer(spatial_dims, k, d).train(), z)]
    (ours_ms, ours_cpu), (monai_ms, monai_cpu) = _median_ms(steps, repeats, warmup)
    (ours_peak, ours_largest), (monai_peak, monai_largest) = (peak_allocated_bytes(step) for step in steps)
    del ours, steps  # both quantizers (and their codebooks) go before the next codebook size

    nk_bytes = n * k * 4
    return {
        "K": k,
        "ours_ms": round(ours_ms, 1),
        "monai_ms": round(monai_ms, 1),
        "speedup": round(monai_ms / ours_ms, 2),
        "ours_cpu_ms": round(ours_cpu, 1),
        "monai_cpu_ms": round(monai_cpu, 1),
        "cpu_speedup": round(monai_cpu / ours_cpu, 2),
        "ours_peak_mb": round(ours_peak / MIB, 1),
        "monai_peak_mb": round(monai_peak / MIB, 1),
        "ours_largest_alloc_mb": round(ours_largest / MIB, 1),
        "monai_largest_alloc_mb": round(monai_largest / MIB, 1),
        "nk_fp32_mb": round(nk_bytes / MIB, 1),
        "ours_allocated_nk": ours_largest >= nk_bytes,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[512, 1024, 8192], help="codebook sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    results = []
    for k in args.k:
        r = bench_one(k, args.repeats, args.warmup)
        results.append(r)
        print(f"K={k}: {r}", file=sys.stderr, flush=True)
        if r["ours_allocated_nk"]:
            print(f"WARNING: ours allocated an N x K fp32 matrix at K={k}", file=sys.stderr)
    report = {
        "results": results,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "N": 16 * 64 * 64,
        "D": 64,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"N={report['N']} D=64 threads={report['threads']} torch={report['torch']} repeats={args.repeats} "
            f"load average (1 min) before/after: {report['loadavg_1min']}"
        )
        print(
            f"{'K':>6} {'ours ms':>9} {'MONAI ms':>9} {'speedup':>8} {'ours CPU ms':>12} {'MONAI CPU ms':>13} "
            f"{'CPU speedup':>12} {'ours MiB':>9} {'MONAI MiB':>10} {'ours max alloc MiB':>19}"
        )
        for r in results:
            print(
                f"{r['K']:>6} {r['ours_ms']:>9.1f} {r['monai_ms']:>9.1f} {r['speedup']:>8.2f} "
                f"{r['ours_cpu_ms']:>12.1f} {r['monai_cpu_ms']:>13.1f} {r['cpu_speedup']:>12.2f} "
                f"{r['ours_peak_mb']:>9.1f} {r['monai_peak_mb']:>10.1f} {r['ours_largest_alloc_mb']:>19.1f}"
            )
        big = [r for r in results if r["K"] >= 8192]
        for r in big:
            verdict = "YES (bad)" if r["ours_allocated_nk"] else "no"
            print(f"K={r['K']}: ours allocated an N x K fp32 matrix ({r['nk_fp32_mb']:.0f} MiB)? {verdict}")
    return report


if __name__ == "__main__":
    main()
