"""Benchmark: peak memory of one 3D training step, our ``VQVAE`` (activation checkpointing) vs MONAI's ``VQVAE``.

A step is the train-mode forward pass of a ``[batch, 1, 128, 128, 128]`` volume, the loss ``L1(reconstruction, x) +
quantizer loss``, the backward pass and one ``torch.optim.Adam`` step (its state is created in that step). Ours is the
3D bundle's default network, read from ``bundles/vqvae/configs/train.json`` + ``3d.json`` (``network_def#model``: two
levels of ``(32, 64)`` channels, downsampling factor 4, two residual units per level with ``(16, 32)`` hidden channels,
2048 codes of dimension 32 (512 before bundle 0.3.0), EMA quantizer, sub-pixel upsampling), run with
``use_checkpointing=True`` (the bundle's switch for large volumes; segments cut at the lowest resolutions and after
every residual unit of the highest-resolution stages, see ``vqvae_medical.networks.vqvae``). MONAI's has the same layout
and codebook size and its defaults otherwise (``use_checkpointing=False``, or its own checkpointing under
``--monai_checkpointing``). ``--reference`` adds ours without checkpointing.

Every measurement runs in a fresh subprocess per model, so that one model's allocations never count for the other:

- on CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it (model,
  input);
- on the CPU (``rss``, the headline figures): the increase of the process's peak resident set size during the step,
  ``getrusage(RUSAGE_SELF).ru_maxrss`` after the step minus the resident size just before it (``/proc/self/statm``),
  i.e. what the step adds to the memory the machine must have; a warm-up step on a ``16^3`` input first loads the
  lazily loaded kernels and creates the Adam state. The workers run with glibc's mmap threshold fixed at
  ``--malloc_mmap_threshold`` bytes (128 KiB, glibc's initial value; the environment variable
  ``MALLOC_MMAP_THRESHOLD_``), the same for both models: by default glibc raises that threshold as large blocks are
  freed (up to 32 MiB), after which tensors come from a heap that fragments and is not given back, and the RSS
  then measures the allocator's slack as much as the step (tens of MiB, varying from run to run). ``0`` keeps
  glibc's dynamic default, to see that effect (``--repeats`` reports the median of fresh processes);
- on the CPU (``tensor``, with ``--method both``): the high-water mark of tensor bytes allocated during a second
  step, from ``torch.profiler`` (see ``benchmarks/quantizer.py``): tensor storage only, no allocator slack.

Usage::

    python benchmarks/memory_3d.py                 # table on stderr, JSON on stdout
    python benchmarks/memory_3d.py --json          # exactly one JSON object on stdout
    python benchmarks/memory_3d.py --size 64 --method both --reference --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["build_model", "training_step", "measure", "main"]

MIB = 1024.0 * 1024.0
ROOT = Path(__file__).resolve().parents[1]
#: the 3D training configs of the vqvae bundle (train.json + the 3d.json overlay), whose default network is measured
BUNDLE_CONFIG = [ROOT / "bundles" / "vqvae" / "configs" / c for c in ("train.json", "3d.json")]


def bundle_model_args(config_file: str | os.PathLike | list = BUNDLE_CONFIG) -> dict:
    """Resolved keyword arguments of the bundle's default network (``network_def#model``, without ``_target_``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_file] if isinstance(config_file, list) else str(config_file))
    keys = [k for k in parser["network_def#model"] if k != "_target_"]
    return {k: parser.get_parsed_content(f"network_def#model#{k}") for k in keys}


def build_model(name: str, monai_checkpointing: bool = False) -> torch.nn.Module:
    """``"ours"``: the 3D bundle's default :class:`vqvae_medical.networks.VQVAE` with ``use_checkpointing=True``;
    ``"ours_nockpt"``: the same without checkpointing (reference); ``"monai"``: MONAI's ``VQVAE`` with its defaults
    except the layout (channels, residual units and channels, codebook size and dimension) taken from the bundle."""
    args = bundle_model_args()
    if name in ("ours", "ours_nockpt"):
        from vqvae_medical.networks import VQVAE

        return VQVAE(**{**args, "use_checkpointing": name == "ours"})
    if name == "monai":
        from monai.networks.nets import VQVAE as MonaiVQVAE

        levels = len(args["channels"])
        res_channels = args.get("res_channels") or args["channels"]
        return MonaiVQVAE(
            spatial_dims=args["spatial_dims"],
            in_channels=args["in_channels"],
            out_channels=args.get("out_channels") or args["in_channels"],
            channels=tuple(args["channels"]),
            num_res_layers=args["num_res_units"],
            num_res_channels=tuple(res_channels) if isinstance(res_channels, (list, tuple)) else res_channels,
            # MONAI's default strided convolutions, one per level (its default tuples have three levels)
            downsample_parameters=((2, 4, 1, 1),) * levels,
            upsample_parameters=((2, 4, 1, 1, 0),) * levels,
            num_embeddings=args["num_embeddings"],
            embedding_dim=args["embedding_dim"],
            use_checkpointing=monai_checkpointing,
        )
    raise ValueError(f"unknown model {name!r}.")


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """Forward, ``L1 + quantizer loss``, backward, optimizer step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    recon, q_loss = (out.reconstruction, out.quantizer_loss) if hasattr(out, "reconstruction") else (out[0], out[1])
    loss = torch.nn.functional.l1_loss(recon, x) + q_loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, size: int, batch: int, method: str, device: str, monai_checkpointing: bool) -> dict:
    """Peak memory of one training step of one model, in this process (call it in a fresh one)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(name, monai_checkpointing).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, size, size, size, device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        training_step(model, optimizer, x)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        return {"model": name, "method": "cuda_max_memory_allocated", "peak_mb": peak / MIB, "params": n_params}
    if method == "tensor":
        from benchmarks.quantizer import peak_allocated_bytes

        training_step(model, optimizer, x)  # Adam state and one-off buffers exist before the profiled step
        peak, _ = peak_allocated_bytes(lambda: training_step(model, optimizer, x))
        return {"model": name, "method": "torch_profiler_tensor_bytes", "peak_mb": peak / MIB, "params": n_params}
    # a small warm-up step loads the lazily loaded kernels/libraries and creates the Adam state, so that the
    # measured increase is the step's own working memory at this size
    training_step(model, optimizer, torch.rand(batch, 1, 16, 16, 16, device=dev))
    before = _rss_bytes()
    training_step(model, optimizer, x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"model": name, "method": "rss_increase", "peak_mb": (peak - before) / MIB, "params": n_params}


def _in_subprocess(name: str, args: argparse.Namespace, method: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory_3d",
        "--_worker",
        name,
        "--_method",
        method,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
    ]
    if args.monai_checkpointing:
        cmd.append("--monai_checkpointing")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.malloc_mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_of_runs(name: str, args: argparse.Namespace, method: str) -> dict:
    runs = [_in_subprocess(name, args, method) for _ in range(max(1, args.repeats))]
    peaks = sorted(r["peak_mb"] for r in runs)
    mid = len(peaks) // 2
    median = peaks[mid] if len(peaks) % 2 else 0.5 * (peaks[mid - 1] + peaks[mid])
    return {**runs[0], "peak_mb": median, "runs_mb": [round(r["peak_mb"], 1) for r in runs]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="cube side of the input volume")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--method", choices=("rss", "tensor", "both"), default="rss", help="CPU measurement (ignored on CUDA)"
    )
    parser.add_argument("--monai_checkpointing", action="store_true", help="run MONAI's VQVAE with its checkpointing")
    parser.add_argument("--reference", action="store_true", help="also measure ours without checkpointing")
    parser.add_argument(
        "--malloc_mmap_threshold",
        type=int,
        default=128 * 1024,
        help="glibc mmap threshold of the worker processes in bytes (MALLOC_MMAP_THRESHOLD_); 0: glibc's default",
    )
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per model; the median is reported")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_method", default="rss", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        result = measure(args._worker, args.size, args.batch, args._method, args.device, args.monai_checkpointing)
        print(json.dumps(result))
        return result

    cuda = torch.device(args.device).type == "cuda"
    primary = "rss" if args.method in ("rss", "both") or cuda else "tensor"
    names = ["ours", "monai"] + (["ours_nockpt"] if args.reference else [])
    results = {name: _median_of_runs(name, args, primary) for name in names}
    for name, r in results.items():
        print(f"{name}: {r['peak_mb']:.1f} MiB ({r['method']}, {r['params']} parameters)", file=sys.stderr)
    ours, monai = results["ours"]["peak_mb"], results["monai"]["peak_mb"]
    report = {
        "ours_peak_mb": round(ours, 1),
        "monai_peak_mb": round(monai, 1),
        "ratio": round(ours / monai, 3),
        "method": results["ours"]["method"],
        "device": args.device,
        "input_shape": [args.batch, 1, args.size, args.size, args.size],
        "monai_checkpointing": bool(args.monai_checkpointing),
        "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)",
    }
    if args.repeats > 1:
        report["runs_mb"] = {name: r["runs_mb"] for name, r in results.items()}
    if args.reference:
        report["ours_no_checkpointing_peak_mb"] = round(results["ours_nockpt"]["peak_mb"], 1)
    if args.method == "both" and not cuda:
        tensor = {name: _in_subprocess(name, args, "tensor") for name in ("ours", "monai")}  # deterministic
        for name, r in tensor.items():
            print(f"{name}: {r['peak_mb']:.1f} MiB ({r['method']})", file=sys.stderr)
        report["tensor_ours_peak_mb"] = round(tensor["ours"]["peak_mb"], 1)
        report["tensor_monai_peak_mb"] = round(tensor["monai"]["peak_mb"], 1)
        report["tensor_ratio"] = round(tensor["ours"]["peak_mb"] / tensor["monai"]["peak_mb"], 3)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
