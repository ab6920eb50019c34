"""The ``cache`` setting (auto / memory / disk / none) of the bundles, on real IXI volumes and brain slices.

The capped test trains the 3D bundle in a process whose address space is limited (``RLIMIT_AS``, as ``ulimit -v``
or ``prlimit --as`` set it) to its own footprint plus less than the preprocessed training set: the automatic
choice caches on disk and training finishes; ``--cache memory`` stops up front with one ``ERROR (DataError)`` line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_runner import BUNDLES, _arg
from conftest import put_files
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset

from benchmarks.memory_cap import capped_run_overrides
from vqvae_medical.data import (
    available_memory,
    choose_cache,
    estimate_cache_bytes,
    image_transforms_2d,
    make_dataset,
    volume_transforms_3d,
)

MIB = 2**20


def _items(files) -> list[dict]:
    return [{"image": str(f)} for f in files]


def test_estimate_is_exact_for_a_fixed_spatial_size(ixi_files):
    data = _items(ixi_files(4))
    transform = volume_transforms_3d(spatial_size=[40, 36, 32], patch_size=16, augment=True)
    total, largest = estimate_cache_bytes(data, transform)
    assert largest == 40 * 36 * 32 * 4  # float32, one channel; the random crop and flips are not cached
    assert total == 4 * largest
    # what CacheDataset really holds
    cached = CacheDataset(data, transform, cache_rate=1.0, progress=False)._cache
    assert sum(item["image"].nelement() * item["image"].element_size() for item in cached) == total


def test_auto_uses_memory_when_it_fits_and_logs_why(ixi_files, caplog):
    data = _items(ixi_files(2))
    transform = volume_transforms_3d(spatial_size=[32, 32, 32])
    with caplog.at_level("INFO", logger="vqvae_medical.data.caching"):
        assert choose_cache(data, transform, "auto") == ("memory", 2 * 32**3 * 4)
    assert re.search(
        r"cache='auto' -> 'memory' for the training set: estimated 2 training items x 0\.1 MiB", caplog.text
    )
    assert available_memory().source in caplog.text


def test_each_local_process_counts(ixi_files, monkeypatch):
    """Under torchrun every process on a machine caches its own copy."""
    data = _items(ixi_files(2))
    transform = volume_transforms_3d(spatial_size=[32, 32, 32])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert choose_cache(data, transform, "memory")[1] == 3 * 2 * 32**3 * 4


_CAPPED_CHOICE = r"""
import json, resource, sys
from vqvae_medical.data import available_memory, choose_cache, volume_transforms_3d, DataError
files = json.loads(sys.argv[1])
used = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + 200 * 2**20, resource.RLIM_INFINITY))
limit = available_memory()
transform = volume_transforms_3d(spatial_size=[128, 128, 128], resize_mode='pad')
small = [{'image': f} for f in files[:2]]      # 16 MiB
large = [{'image': f} for f in files] * 8      # 8 x 4 x 8 MiB = 256 MiB
out = {'source': limit.source, 'available': limit.available,
       'small': choose_cache(small, transform, 'auto'), 'large': choose_cache(large, transform, 'auto')}
try:
    choose_cache(large, transform, 'memory')
except DataError as e:
    out['error'] = str(e)
print(json.dumps(out))
"""


def test_auto_rule_and_refusal_under_an_address_space_limit(ixi_files, repo_root):
    """In a process limited to its address space + 200 MiB: 16 MiB stay in memory, 256 MiB (more than half, and
    more than all of what is left) go to disk, and ``cache='memory'`` is refused with the numbers."""
    files = [str(f) for f in ixi_files(4)]
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    cmd = [sys.executable, "-c", _CAPPED_CHOICE, json.dumps(files)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["source"] == "RLIMIT_AS" and out["available"] <= 200 * MIB
    assert out["small"] == ["memory", 2 * 128**3 * 4]
    assert out["large"] == ["disk", 32 * 128**3 * 4]
    assert out["error"].startswith("cache='memory' cannot hold the training set: estimated 32 training items x 8.0 MiB")
    assert "(RLIMIT_AS). Use --cache disk" in out["error"]


def test_disk_cache_is_reused_and_keyed_by_the_preprocessing(tmp_path, brain_dir):
    files = sorted((brain_dir / "Test" / "MildDemented").glob("*.jpg"))[:3]
    data = _items(files)
    cache_dir = tmp_path / "cache"
    for workers in (0, 2):  # the second dataset reads the first one's files, in two loader worker processes
        dataset = make_dataset(data, image_transforms_2d(spatial_size=[64, 64], augment=True), "disk", cache_dir)
        assert isinstance(dataset, PersistentDataset)
        assert next(iter(DataLoader(dataset, batch_size=3, num_workers=workers)))["image"].shape == (3, 1, 64, 64)
        assert len(list(cache_dir.glob("*.pt"))) == 3
    # another spatial size is another cache entry, never a stale one
    dataset = make_dataset(data, image_transforms_2d(spatial_size=[48, 48]), "disk", cache_dir)
    assert next(iter(DataLoader(dataset, batch_size=3)))["image"].shape == (3, 1, 48, 48)
    assert len(list(cache_dir.glob("*.pt"))) == 6
    assert type(make_dataset(data, image_transforms_2d(), "none")) is Dataset
    with pytest.raises(ValueError, match="cache must be one of 'auto', 'memory', 'disk', 'none'"):
        make_dataset(data, image_transforms_2d(), "ram")


# ---- the 3D bundle under a memory cap ----------------------------------------------------------------------------

#: the imports of a 3D training run; their address space is the footprint the cap is added to
_IMPORTS = (
    "import torch, monai, ignite, torch.utils.tensorboard, vqvae_medical.data, vqvae_medical.networks;"
    "print([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1])"
)
#: room above that footprint: enough to train on patches, less than the preprocessed training set (748.7 MiB)
HEADROOM = 500 * MIB
#: volumes are zero-padded to SIZE^3 (no interpolation: cheap to preprocess)
SIZE = 176


def _capped_env() -> dict[str, str]:
    # one malloc arena: glibc reserves 64 MiB of address space per thread arena, which an address-space cap counts;
    # a fixed mmap threshold: by default glibc raises it when a large block is freed and serves the next volumes from
    # a heap that keeps its peak, so the address space of the run varied by ~100 MiB from run to run (more under
    # load, and the run then failed) instead of following the live tensors (peak ~230 MiB above the imports)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
    }


def _capped_run(bundle: str, overrides: dict, limit: int, overlay: str | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/train.json`` (and ``overlay`` after it) in a process with
    ``RLIMIT_AS = limit``."""
    configs = "configs/train.json" if overlay is None else f"['configs/train.json','configs/{overlay}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", "."]
    for key, value in overrides.items():
        cmd += [f"--{key}", _arg(value)]

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    where = {"cwd": BUNDLES / bundle, "env": _capped_env(), "preexec_fn": cap}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, **where)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vqvae_3d_trains_under_a_memory_cap_smaller_than_its_data_set(ixi_files, tmp_path):
    """40 IXI volumes padded to 176^3 (20.8 MiB each in float32): 36 training volumes = 748.7 MiB preprocessed. The
    cap is the address space of the run's imports + 500 MiB. ``--cache auto`` picks the disk and trains one epoch on
    16^3 patches; ``--cache memory`` stops before caching anything, with one line and no traceback."""
    footprint = (
        int(
            subprocess.run(
                [sys.executable, "-c", _IMPORTS],
                env=_capped_env(),
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            ).stdout
        )
        * 1024
    )
    limit = footprint + HEADROOM
    data = put_files(ixi_files(40), tmp_path / "ixi", link=True)
    out = tmp_path / "out"
    overrides = capped_run_overrides(data, out, SIZE)  # the benchmark's run (benchmarks/memory_cap.py)
    n_train = 36
    data_set = n_train * SIZE**3 * 4
    item = f"{SIZE**3 * 4 / MIB:.1f} MiB"
    total = f"{data_set / MIB:.1f} MiB"
    assert data_set > HEADROOM

    refused = _capped_run("vqvae", {**overrides, "cache": "memory"}, limit, overlay="3d.json")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and "MemoryError" not in refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith(
        f"ERROR (DataError): cache='memory' cannot hold the training set: estimated {n_train} "
        f"training items x {item} = {total}, but only "
    ), message
    assert message.endswith("(RLIMIT_AS). Use --cache disk (or auto) to cache it on disk, or --cache none.")
    available = float(re.search(r"only ([\d.]+) MiB is available", message).group(1)) * MIB
    assert available < data_set
    assert not (out / "cache" / "dataset").exists()

    trained = _capped_run("vqvae", {**overrides, "cache": "auto"}, limit, overlay="3d.json")
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-4000:]
    choice = (
        f"cache='auto' -> 'disk' for the training set: estimated {n_train} training items x {item} = {total}, "
        "available "
    )
    assert re.search(re.escape(choice) + r"[\d.]+ MiB \(RLIMIT_AS\)", log), log[-4000:]
    assert len(list((out / "cache" / "dataset").glob("*.pt"))) == n_train
    state = torch.load(out / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert bool(state["model"]["model.quantizer.initialized"])
    assert Path(out / "logs" / "history.jsonl").is_file()
