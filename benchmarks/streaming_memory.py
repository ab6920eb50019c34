"""Benchmark: peak memory of the stage-2 bundles' inference against the number of samples (issue 31, item 6).

Both ``pixelcnn_prior`` and ``latent_diffusion`` sample in batches and write each batch as it comes (one image file
per sample, the prior's code maps streamed into ``.npy``, the grid from the first 16), so the peak resident memory
of a run should not grow with ``--num_samples`` / ``--n_samples``. This measures it as a user meets it: for each
bundle and each size, ``python -m monai.bundle run --config_file configs/inference.json`` in a fresh process, whose
peak resident set size (``ru_maxrss`` from ``os.wait4``: the kernel's high-water mark of that process, VmHWM) and
CPU time (user + system) are read when it exits.

The models are tiny, with their initial weights (what is measured is the bookkeeping around them, not their
size): a VQ-VAE of 32 x 32 grey images (8 x 8 codes of 16, 8 latent channels; channels 8/16), the prior bundle's
transformer with 8 channels, 2 layers, 2 heads, and the diffusion bundle's UNet with channels 16/32 and 2 DDIM
steps. They are written as the bundles leave them (``models/model.pt``, ``models/autoencoder.json``) to
``--work_dir``. Batch sizes are the configs' defaults (prior 64, diffusion 8) unless ``--batch_size`` is given.

``--package_root`` runs the bundles and the package of another checkout (e.g. an export of an earlier commit:
``git archive <commit> | tar -x -C <dir>``), to compare with the version before streaming; settings that its
``inference.json`` does not define (``batch_size``) are not passed.

Usage::

    python benchmarks/streaming_memory.py                        # table on stderr, JSON on stdout
    python benchmarks/streaming_memory.py --sizes 16 256 --bundles pixelcnn_prior
    python benchmarks/streaming_memory.py --package_root <export of an earlier commit> --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["SIZES", "build_folders", "main", "measure"]

ROOT = Path(__file__).resolve().parents[1]
SIZES = (16, 256, 1024, 4096)
IMAGE = [32, 32]
MIB = 1024.0


def _tests_module(name: str):
    """A helper module of ``tests/``: the tiny settings (``tests/tiny.py``) and the tiny stage-1 and stage-2 folders
    (``tests/tiny_stage2.py``) have one home, shared by the tests and this benchmark."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module(name)


def build_folders(work_dir: Path) -> dict[str, Path]:
    """A tiny stage-1 folder, a prior and a diffusion model on it, as the bundles leave them."""
    stage2 = _tests_module("tiny_stage2")
    vq = stage2.stage_one(work_dir / "vqvae", None)
    prior = stage2.prior_folder(work_dir / "prior", vq)
    diffusion = stage2.diffusion_folder(work_dir / "diffusion", vq)
    return {"vqvae": vq, "pixelcnn_prior": prior, "latent_diffusion": diffusion}


def _arg(value) -> str:
    return str(value) if isinstance(value, (str, Path)) else repr(value)


def measure(
    bundle: str,
    n: int,
    folders: dict[str, Path],
    out: Path,
    package_root: Path = ROOT,
    batch_size: int | None = None,
    threads: int = 1,
) -> dict:
    """Run the bundle's inference for ``n`` samples in a fresh process; its peak RSS, wall and CPU time."""
    config = package_root / "bundles" / bundle / "configs" / "inference.json"
    defined = json.loads(config.read_text())
    tiny = _tests_module("tiny")
    overrides = {**(tiny.TINY_PRIOR if bundle == "pixelcnn_prior" else tiny.TINY_DIFFUSION)}
    overrides.update({"autoencoder_dir": folders["vqvae"], "ckpt_path": folders[bundle] / "models" / "model.pt"})
    overrides.update({"output_dir": out, "device": "cpu"})
    overrides["num_samples" if bundle == "pixelcnn_prior" else "n_samples"] = int(n)
    if batch_size is not None and "batch_size" in defined:
        overrides["batch_size"] = int(batch_size)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", "."]
    for key, value in overrides.items():
        cmd += [f"--{key}", _arg(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MPLBACKEND": "Agg", "PYTHONPATH": str(package_root)}
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=package_root / "bundles" / bundle, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{bundle} with {n} samples failed ({proc.returncode}); see {log}")
    files = len(list((out / "inference").glob("sample*_*.png")))
    return {
        "bundle": bundle,
        "n_samples": int(n),
        "peak_rss_mib": usage.ru_maxrss / MIB,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "sample_files": files,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--bundles", nargs="+", default=["pixelcnn_prior", "latent_diffusion"])
    parser.add_argument(
        "--work_dir", type=Path, default=None, help="folder of the models and outputs (default: a temporary one)"
    )
    parser.add_argument("--package_root", type=Path, default=ROOT, help="checkout whose bundles and package run")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="only the JSON list on stdout")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work_dir or Path(tmp)).absolute()
        folders = build_folders(work / "models")
        rows = []
        for bundle in args.bundles:
            for n in args.sizes:
                out = work / "runs" / f"{bundle}_{n}"
                row = measure(bundle, n, folders, out, args.package_root.absolute(), args.batch_size, args.threads)
                rows.append(row)
                if not args.json:
                    print(
                        f"{bundle:16s} n={n:5d}  peak RSS {row['peak_rss_mib']:7.1f} MiB  wall {row['wall_s']:6.1f} s  "
                        f"CPU {row['cpu_s']:6.1f} s  files {row['sample_files']}",
                        file=sys.stderr,
                    )
    print(json.dumps(rows, indent=None if args.json else 2))
    return rows


if __name__ == "__main__":
    main()
