"""Benchmark: the VQ-VAE-2 bundle against the single-level VQ-VAE bundle at the same code budget and training time.

Both bundles are run as a user runs them (``python -m monai.bundle run``, one after the other, never at the same
time) on the same 2D NIfTI slices (``benchmarks/make_ixi_slices.py``: axial IXI T1 slices, 120 x 96, split by
subject), with the same seed, network width, batch size, learning rate and time budget
(``time_budget_minutes`` / ``time_budget_clock`` of :class:`vqvae_medical.training.handlers.TimeBudget`), then each is
evaluated on the test subjects (``train.json`` + ``evaluate.json``).

Code budget: both models spend the same number of bits per image. With ``H x W`` divisible by 8, the VQ-VAE-2 has
``H/8 * W/8`` top codes from ``K_top`` and ``H/4 * W/4`` bottom codes from ``K_bottom``; the VQ-VAE has ``H/4 * W/4``
codes from ``K``. Per bottom-grid position that is ``log2(K_top) / 4 + log2(K_bottom)`` bits against ``log2(K)``,
so ``K_top = K_bottom = 256`` (2 + 8 = 10 bits) matches ``K = 1024`` (10 bits) exactly: 7,200 bits for a
120 x 96 slice either way.

Usage::

    python benchmarks/make_ixi_slices.py --output-dir /tmp/ixi_slices
    nohup python benchmarks/vqvae2_vs_vqvae.py --data-dir /tmp/ixi_slices --output-dir /tmp/vq_compare \\
        --minutes 30 --clock process > /tmp/vq_compare.log 2>&1 &
    python benchmarks/vqvae2_vs_vqvae.py --data-dir /tmp/ixi_slices --output-dir /tmp/vq_compare --stage report

``--stage train`` / ``evaluate`` / ``report`` run one stage (``all``, the default, runs the three); results go to
``<output_dir>/comparison.json`` and a Markdown table ``<output_dir>/comparison.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib

from vqvae_medical.utils.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"

__all__ = ["COMMON", "MODELS", "code_bits", "run_bundle", "main"]

COMMON: dict[str, Any] = {
    "seed": 0,
    "batch_size": 8,
    "learning_rate": 0.001,
    "max_epochs": 1000,  # the time budget ends training
    "network_def#model#channels": [32, 64],
    "network_def#model#res_channels": [16, 32],
    "network_def#model#num_res_units": 2,
}
"""Overrides given to both bundles."""

MODELS: dict[str, dict[str, Any]] = {
    "vqvae2": {"bundle": "vqvae2", "num_embeddings": [256, 256], "embedding_dim": [64, 64]},
    "vqvae": {"bundle": "vqvae", "num_embeddings": 1024, "embedding_dim": 64},
}
"""Per-model bundle and codebook overrides (same bits per image, see the module docstring)."""


def code_bits(model: str, height: int, width: int) -> float:
    """Bits per image of the code grid(s) of ``model`` for an ``height x width`` image (padded as the network does)."""
    k = MODELS[model]["num_embeddings"]
    if isinstance(k, list):  # VQ-VAE-2: pad to 8, top at 1/8, bottom at 1/4
        h, w = math.ceil(height / 8) * 8, math.ceil(width / 8) * 8
        return (h // 8) * (w // 8) * math.log2(k[0]) + (h // 4) * (w // 4) * math.log2(k[1])
    h, w = math.ceil(height / 4) * 4, math.ceil(width / 4) * 4
    return (h // 4) * (w // 4) * math.log2(k)


def _arg(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_bundle(bundle: str, configs: list[str], overrides: dict[str, Any], log: Path, threads: int) -> dict[str, float]:
    """``python -m monai.bundle run`` in the bundle folder; returns its wall and CPU (user + system) seconds."""
    files = [f"configs/{c}" for c in configs]
    config_arg = files[0] if len(files) == 1 else json.dumps(files).replace('"', "'")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg, "--bundle_root", "."]
    for key, value in overrides.items():
        cmd += [f"--{key}", _arg(value)]
    # passive OpenMP waiting: threads that spin at barriers on a shared CPU burn process time without doing work
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=BUNDLES / bundle, env=env, stdout=f, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with code {proc.returncode}; see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": time.perf_counter() - start, "cpu_s": cpu}


def _overrides(model: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = {k: v for k, v in MODELS[model].items() if k != "bundle"}
    return {
        **COMMON,
        **spec,
        "dataset_dir": str(Path(args.data_dir).absolute()),
        "output_dir": str(Path(args.output_dir).absolute() / model),
        "time_budget_minutes": args.minutes,
        "time_budget_clock": args.clock,
    }


def _training_summary(output_dir: Path) -> dict[str, Any]:
    records = [json.loads(x) for x in (output_dir / "logs" / "history.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in records if r["phase"] == "train"]
    val = [r for r in records if r["phase"] == "validation"]
    return {
        "epochs": len(train),
        "iterations": train[-1]["iteration"] if train else 0,
        "best_val_ssim": max((r["ssim"] for r in val), default=float("nan")),
    }


def _report(args: argparse.Namespace, models: list[str]) -> dict[str, Any]:
    out = Path(args.output_dir)
    sample = sorted((Path(args.data_dir) / "keras_slices_test").glob("*.nii.gz"))[0]
    height, width = nib.load(sample).shape[:2]
    results: dict[str, Any] = {"image_size": [height, width], "common": COMMON, "models": {}}
    previous = json.loads((out / "comparison.json").read_text()) if (out / "comparison.json").is_file() else {}
    for model in models:
        entry = dict(previous.get("models", {}).get(model, {}))
        entry.update({"bundle": MODELS[model]["bundle"], "overrides": _overrides(model, args)})
        entry["bits_per_image"] = code_bits(model, height, width)
        if (out / model / "logs" / "history.jsonl").is_file():
            entry["training"] = {**entry.get("training", {}), **_training_summary(out / model)}
        if (out / model / "eval" / "metrics.json").is_file():
            entry["test"] = json.loads((out / model / "eval" / "metrics.json").read_text())
        results["models"][model] = entry
    atomic_write_json(results, out / "comparison.json")
    lines = [
        "| model | bits/image | epochs | iterations | train wall min | train CPU min | test SSIM | PSNR | MSE | usage "
        "| perplexity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, e in results["models"].items():
        t, m, tr = e.get("test", {}), e.get("training", {}), e.get("train_time", {})
        usage = " / ".join(f"{t[k]:.3f}" for k in sorted(t) if k.startswith("codebook_usage"))
        perp = " / ".join(f"{t[k]:.1f}" for k in sorted(t) if k.startswith("perplexity"))
        lines.append(
            f"| {model} | {e['bits_per_image']:.0f} | {m.get('epochs', '')} | {m.get('iterations', '')} | "
            f"{tr.get('wall_s', float('nan')) / 60:.1f} | {tr.get('cpu_s', float('nan')) / 60:.1f} | "
            f"{t.get('ssim', float('nan')):.4f} | {t.get('psnr', float('nan')):.2f} | "
            f"{t.get('mse', float('nan')):.5f} | "
            f"{usage} | {perp} |"
        )
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder with keras_slices_{train,validate,test}")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget of each model")
    parser.add_argument("--clock", choices=("wall", "process"), default="process")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["vqvae2", "vqvae"])
    parser.add_argument("--stage", choices=("all", "train", "evaluate", "report"), default="all")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, dict[str, Any]] = {}
    for model in args.models:
        bundle, overrides = MODELS[model]["bundle"], _overrides(model, args)
        if args.stage in ("all", "train"):
            times.setdefault(model, {})["train_time"] = run_bundle(
                bundle, ["train.json"], overrides, out / model / "train.log", args.threads
            )
            print(f"{model}: trained in {times[model]['train_time']}", flush=True)
        if args.stage in ("all", "evaluate"):
            times.setdefault(model, {})["eval_time"] = run_bundle(
                bundle, ["train.json", "evaluate.json"], overrides, out / model / "evaluate.log", args.threads
            )
            print(f"{model}: evaluated in {times[model]['eval_time']}", flush=True)
        if model in times:  # keep the timings of earlier stages in comparison.json
            path = out / "comparison.json"
            data = json.loads(path.read_text()) if path.is_file() else {"models": {}}
            data.setdefault("models", {}).setdefault(model, {}).update(times[model])
            atomic_write_json(data, path)
    return _report(args, args.models)


if __name__ == "__main__":
    main()
