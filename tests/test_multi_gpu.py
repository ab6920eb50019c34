"""``torchrun`` with two CPU processes (gloo) on the bundles' ``multi_gpu_train.json``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from bundle_runner import BUNDLES, TINY_VQVAE_2D, run_bundle

DUMP = "$torch.save(@network_def.state_dict(), os.path.join(@output_dir, f'rank{torch.distributed.get_rank()}.pt'))"
DESTROY = "$torch.distributed.destroy_process_group()"


@pytest.mark.timeout(600)
def test_vqvae_2d_two_processes(brain_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, f in enumerate(sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:12]):
        shutil.copy(f, data / f"slice_{i:02d}.jpg")
    out = tmp_path / "out"
    overrides = {**TINY_VQVAE_2D, "dataset_dir": data, "output_dir": out, "data_layout": "folder", "val_fraction": 0.2, "test_fraction": 0.2, "max_epochs": 2}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
        "-m", "monai.bundle", "run",
        "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
        "--bundle_root", ".",
        "--finalize", repr([DUMP, DESTROY]),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v) if not isinstance(v, list) else repr(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=BUNDLES / "vqvae_2d", env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    for key in ("model.quantizer.codebook", "model.quantizer.cluster_size", "model.quantizer.embed_sum"):
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    assert rank0["model.quantizer.initialized"]
    # only rank 0 wrote checkpoints, and they load in a single-process run
    assert (out / "models" / "checkpoint_epoch=2.pt").is_file()
    run_bundle("vqvae_2d", ["train.json", "evaluate.json"], {**overrides, "max_epochs": 2})
    assert (out / "eval" / "metrics.json").is_file()
