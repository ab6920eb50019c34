"""Benchmark: the 3D bundle under an address-space cap (``RLIMIT_AS``) that its preprocessed training set exceeds.

The same scenario as ``tests/data/test_caching.py::test_vqvae_3d_trains_under_a_memory_cap_smaller_than_its_data_set``,
with its figures printed: IXI T1 volumes (``../shared/data/ixi_t1_2mm``) zero-padded to ``--size``\\ ³ (no
interpolation), a tiny network trained for one epoch on ``16^3`` random patches, no validation pass. The cap is either
``--headroom_mib`` above the address space of the run's imports (measured in a fresh process) or ``--cap_mib`` in
absolute terms. Two runs of ``python -m monai.bundle run --config_file configs/train.json``, each in a fresh process
started with ``RLIMIT_AS`` = the cap, ``MALLOC_ARENA_MAX=1`` and ``MALLOC_MMAP_THRESHOLD_=131072`` (as in the test:
glibc otherwise raises its mmap threshold after a large block is freed and the heap keeps its peak, which made the
capped run fail under load; see ``docs/troubleshooting.md``, address-space caps):

- ``--cache memory``: expected to stop at once with one ``ERROR (DataError)`` line;
- ``--cache auto``: expected to pick the disk cache and finish; its peak address space (``VmPeak``) and peak
  resident set (``VmHWM``) are read from ``/proc/self/status`` at the end of the run (a ``finalize`` override).

Usage::

    python benchmarks/memory_cap.py                               # 40 volumes at 176^3, cap = imports + 500 MiB
    python benchmarks/memory_cap.py --size 256 --cap_mib 1800     # cap below the data set itself (2.3 GiB)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
IMPORTS = (
    "import torch, monai, ignite, torch.utils.tensorboard, vqvae_medical.data, vqvae_medical.networks;"
    "print([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1])"
)
STATUS = (
    "$print('STATUS', {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status')"
    " if l.startswith(('VmPeak', 'VmHWM'))})"
)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MPLBACKEND": "Agg",
    }


def capped_run_overrides(data: Path, out: Path, size: int) -> dict:
    """The settings of the capped 3D training run (``tests/data/test_caching.py`` runs the same): a tiny network, the
    volumes of ``data`` zero-padded to ``size``^3, one epoch on 16^3 patches, no validation pass (whole ``size``^3
    volumes through the network are not the point), output in ``out``."""
    return {
        "dataset_dir": str(data),
        "output_dir": str(out),
        "device": "cpu",
        "network_def#model#channels": [8, 16],
        "network_def#model#res_channels": [8, 8],
        "num_embeddings": 32,
        "embedding_dim": 8,
        "spatial_size": [size] * 3,
        "resize_mode": "pad",
        "patch_size": [16, 16, 16],
        "val_fraction": 0.05,
        "test_fraction": 0.05,
        "batch_size": 4,
        "max_epochs": 1,
        "val_interval": 2,
    }


def _run(overrides: dict, limit: int) -> tuple[subprocess.CompletedProcess, float]:
    configs = "['configs/train.json','configs/3d.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", "."]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        check=False,
        cwd=REPO / "bundles" / "vqvae",
        env=_env(),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        capture_output=True,
        text=True,
    )
    return proc, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ixi_t1_2mm" / "t1"))
    parser.add_argument("--n_volumes", type=int, default=40)
    parser.add_argument("--size", type=int, default=176)
    parser.add_argument("--headroom_mib", type=int, default=500)
    parser.add_argument("--cap_mib", type=int, default=None, help="absolute cap (overrides --headroom_mib)")
    args = parser.parse_args()

    cmd = [sys.executable, "-c", IMPORTS]
    footprint = int(subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=True).stdout) * 1024
    limit = args.cap_mib * MIB if args.cap_mib else footprint + args.headroom_mib * MIB
    files = sorted(Path(args.data).glob("IXI*_T1.nii.gz"))[: args.n_volumes]
    with tempfile.TemporaryDirectory(prefix="memory_cap_") as tmp:
        data = Path(tmp) / "ixi"
        data.mkdir()
        for f in files:
            (data / f.name).symlink_to(f)
        out = Path(tmp) / "out"
        overrides = {**capped_run_overrides(data, out, args.size), "finalize": [STATUS]}
        refused, t_refused = _run({**overrides, "cache": "memory"}, limit)
        trained, t_trained = _run({**overrides, "cache": "auto"}, limit)
        log = trained.stdout + trained.stderr
        status = re.search(r"STATUS (\{.*\})", log)
        cached = list((out / "cache" / "dataset").glob("*.pt"))
        n_train = len(cached)
        result = {
            "volumes": len(files),
            "size": args.size,
            "training_items": n_train,
            "training_set_mib": round(n_train * args.size**3 * 4 / MIB, 1),
            "imports_address_space_mib": round(footprint / MIB, 1),
            "cap_mib": round(limit / MIB, 1),
            "memory_run": {
                "exit_code": refused.returncode,
                "seconds": round(t_refused, 1),
                "traceback": "Traceback" in refused.stderr,
                "last_line": refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else "",
            },
            "auto_run": {
                "exit_code": trained.returncode,
                "seconds": round(t_trained, 1),
                "choice": next(
                    (
                        ln.split(" - INFO - ")[-1]
                        for ln in log.splitlines()
                        if "cache='auto' ->" in ln and "training" in ln
                    ),
                    None,
                ),
                "disk_cache_mib": round(sum(f.stat().st_size for f in cached) / MIB, 1),
                "vm_peak_mib": round(ast.literal_eval(status.group(1))["VmPeak"] / 1024, 1) if status else None,
                "vm_hwm_mib": round(ast.literal_eval(status.group(1))["VmHWM"] / 1024, 1) if status else None,
                "checkpoint": (out / "models" / "checkpoint_epoch=1.pt").is_file(),
            },
        }
        if trained.returncode:
            result["auto_run"]["tail"] = log[-3000:]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
