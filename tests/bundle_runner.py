"""Run ``python -m monai.bundle <command>`` on a bundle of this repository as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tiny import TINY_VQVAE2_2D, TINY_VQVAE_2D  # the tiny settings' home (tests/tiny.py), re-exported

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the bundles the tests run: the repository's, or a copy named by ``VQVAE_MEDICAL_BUNDLES``
#: (``tests/bundles/test_leftovers.py`` runs bundle tests against a copy with a user's trained outputs planted in it)
BUNDLES = Path(os.environ.get("VQVAE_MEDICAL_BUNDLES") or REPO_ROOT / "bundles")
#: what a bundle folder ships (git tracks these); everything else in it is a run's output (models/, logs/, cache/...)
BUNDLE_SOURCES = ("configs", "docs", "LICENSE")

__all__ = [
    "BUNDLES",
    "BUNDLE_SOURCES",
    "REPO_ROOT",
    "TINY_VQVAE_2D",
    "TINY_VQVAE2_2D",
    "VQVAE_3D",
    "config_paths",
    "default_threads",
    "monai_bundle",
    "run_bundle",
    "run_bundle_in_process",
    "torchrun_bundle",
    "bundle_network",
    "copy_bundle",
    "read_metrics",
    "reconstruction_metrics",
    "real_diversity",
    "real_test_images",
]


#: the overlay that makes the vqvae bundle 3D: it follows each command's configs (``train.json`` + ``3d.json``;
#: ``train.json`` + ``evaluate.json`` + ``3d.json``; ``inference.json`` + ``3d.json``)
VQVAE_3D = "3d.json"


def config_paths(bundle: str, configs: Sequence[str]) -> list[str]:
    """The paths of ``configs`` (file names under ``bundles/<bundle>/configs``), in order."""
    return [str(BUNDLES / bundle / "configs" / c) for c in configs]


def copy_bundle(bundle: str, dest: str | os.PathLike) -> Path:
    """``dest`` (created): a copy of what ``bundles/<bundle>`` ships (:data:`BUNDLE_SOURCES`), without the outputs a
    user's runs may have left there. Returns ``dest``."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_SOURCES:
        src = BUNDLES / bundle / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest


def default_threads() -> int:
    """OpenMP threads of one bundle run: the CPU cores of this machine shared among the pytest-xdist workers
    (``PYTEST_XDIST_WORKER_COUNT``; 1 on 2 cores with the default ``-n 2``), at most 2 (2 when run serially on 2
    cores). More threads than cores make OpenMP spin and every run slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, cores // workers))


def _plain(value: Any) -> Any:
    """``value`` with paths turned into strings, inside lists, tuples and dicts too."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _arg(value: Any) -> str:
    """Format an override so that python-fire parses it back to the same value.

    Non-strings are written as Python literals: fire reads ``False`` as ``False`` but JSON's ``false``/``null`` as
    the (truthy) strings ``"false"``/``"null"``. ``None`` is written ``$None``, an expression the config evaluates:
    MONAI drops an override whose value is ``None`` (``update_kwargs(ignore_none=True)``).
    """
    if value is None:
        return "$None"
    if isinstance(value, (Path, str)):
        return str(value)
    return repr(_plain(value))


def monai_bundle(
    bundle: str,
    command: str,
    args: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    timeout: float = 600,
    threads: int | None = None,
    expect_ok: bool = True,
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <command> <args> --bundle_root <bundle> --key value ...`` run inside the bundle folder,
    on ``threads`` OpenMP threads (:func:`default_threads` when ``None``).

    Raises ``AssertionError`` with the tail of the output when the command fails and ``expect_ok`` is set.
    """
    bundle_dir = BUNDLES / bundle
    cmd = [sys.executable, "-m", "monai.bundle", command, *args]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", _arg(value)]
    threads = default_threads() if threads is None else threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=bundle_dir, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
        )
    return proc


def run_bundle(
    bundle: str,
    configs: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    timeout: float = 600,
    expect_ok: bool = True,
    threads: int | None = None,
) -> subprocess.CompletedProcess:
    """``monai.bundle run`` with one or more config files (later files override earlier ones), on ``threads``
    OpenMP threads (:func:`default_threads` when ``None``)."""
    files = [f"configs/{c}" for c in configs]
    config_arg = files[0] if len(files) == 1 else json.dumps(files).replace('"', "'")
    overrides = {"bundle_root": ".", **(overrides or {})}
    return monai_bundle(bundle, "run", ["--config_file", config_arg], overrides, timeout, threads, expect_ok)


def run_bundle_in_process(bundle: str, configs: Sequence[str], overrides: Mapping[str, Any] | None = None) -> None:
    """What :func:`run_bundle` runs, in this process: ``monai.bundle.run`` (the function behind ``python -m
    monai.bundle run``) with the bundle's configs and ``overrides``, without its logging config, ``sys.excepthook``
    (which the bundles' ``initialize`` replaces) kept. For the runs whose files, not the command line, a test needs
    (a stage-1 folder for stage 2, a checkpoint to evaluate): no new process, so none of its ~10 CPU-s of imports."""
    import warnings

    import monai.bundle

    hook = sys.excepthook
    try:
        with warnings.catch_warnings():  # MONAI's note that configs run code: these are the repository's own
            warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
            monai.bundle.run(
                config_file=config_paths(bundle, configs),
                logging_file=False,
                bundle_root=str(BUNDLES / bundle),
                **{k: "$None" if v is None else _plain(v) for k, v in (overrides or {}).items()},
            )
    finally:
        sys.excepthook = hook


def torchrun_bundle(
    bundle: str,
    configs: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    nproc: int = 2,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node <nproc> -m monai.bundle run`` with one or more config files, one
    CPU thread per process (gloo without a GPU). Raises ``AssertionError`` with the output tail when it fails."""
    files = [f"configs/{c}" for c in configs]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", json.dumps(files).replace('"', "'"), "--bundle_root", "."]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", _arg(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=BUNDLES / bundle, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def bundle_network(
    bundle: str,
    overrides: Mapping[str, Any] | None = None,
    ckpt: str | os.PathLike | None = None,
    config: str | Sequence[str] = "inference.json",
    net_id: str = "network_def",
) -> Any:
    """``net_id`` of a bundle's config (or configs, later ones overriding earlier ones: ``["inference.json",
    "3d.json"]``) built in this process as ``monai.bundle`` builds it (with ``overrides``), with ``ckpt`` loaded
    (``weights_only``) and in eval mode: the eager reference for exported networks."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_paths(bundle, [config] if isinstance(config, str) else config))
    parser.update({k: _plain(v) for k, v in (overrides or {}).items()})
    net = parser.get_parsed_content(net_id)
    if ckpt is not None:
        net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return net.eval()


def read_metrics(output_dir: str | os.PathLike) -> dict[str, float]:
    """``<output_dir>/eval/metrics.json``."""
    return json.loads((Path(output_dir) / "eval" / "metrics.json").read_text())


def reconstruction_metrics(
    bundle: str,
    overrides: Mapping[str, Any],
    ckpt: str | os.PathLike,
    configs: Sequence[str] = ("train.json", "evaluate.json"),
) -> dict[str, float]:
    """What the autoencoder ``ckpt`` scores on ``bundle``'s test split (``configs`` with ``overrides``), computed
    here, the whole split in one batch: what the bundle's ``eval/metrics.json`` must hold. SSIM (2D only), PSNR and
    MSE with MONAI's metrics on the clipped reconstructions; per code level, the fraction of codes used and the
    perplexity (``exp`` of the entropy of the code histogram, in numpy: not the package's function) as
    ``codebook_usage`` and ``perplexity`` (one level) or ``..._top`` and ``..._bottom`` (two)."""
    import numpy as np
    import torch
    from monai.bundle import ConfigParser
    from monai.metrics import MSEMetric, PSNRMetric, SSIMMetric

    parser = ConfigParser()
    parser.read_config(config_paths(bundle, configs))
    parser.update({"bundle_root": str(BUNDLES / bundle), **{k: _plain(v) for k, v in overrides.items()}})
    dataset = parser.get_parsed_content("validate#dataset")
    images = torch.stack([dataset[i]["image"].as_tensor() for i in range(len(dataset))])
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    with torch.no_grad():
        out = network.eval().model(images)
    recon = out.reconstruction.float().clamp(0.0, 1.0)
    result = {
        "psnr": PSNRMetric(max_val=1.0)(recon, images).mean().item(),
        "mse": MSEMetric()(recon, images).mean().item(),
        "n_images": len(dataset),
    }
    if images.ndim == 4:
        result["ssim"] = SSIMMetric(spatial_dims=2, data_range=1.0)(recon, images).mean().item()
    sizes = np.atleast_1d(parser.get_parsed_content("num_embeddings"))
    names = [""] if len(out.levels) == 1 else ["_top", "_bottom"]
    for name, level, k in zip(names, out.levels, sizes, strict=True):
        counts = np.bincount(level.indices.numpy().ravel(), minlength=int(k))
        p = counts[counts > 0] / counts.sum()
        result[f"codebook_usage{name}"] = float(np.count_nonzero(counts) / k)
        result[f"perplexity{name}"] = float(np.exp(-(p * np.log(p)).sum()))
    return result


def real_test_images(autoencoder_dir: str | os.PathLike, cache_dir: str | os.PathLike, **split: Any):
    """The test split of the stage-1 run in ``autoencoder_dir`` (its recorded data, split and preprocessing; ``split``:
    ``val_fraction`` and ``test_fraction`` where a stage-2 run overrides them), every image preprocessed and stacked
    ``[N, C, ...]``: the real set a stage-2 evaluate scores against when the split is small (``cache_dir``: where
    embedded data may be written)."""
    import torch

    from vqvae_medical.stages.frozen import load_autoencoder

    autoencoder = load_autoencoder(autoencoder_dir)
    transform, test = autoencoder.transforms(), autoencoder.datalist(cache_dir, **split)["test"]
    return torch.stack([transform(dict(item))["image"].as_tensor() for item in test])


def real_diversity(real, metrics: Mapping[str, Any]) -> float:
    """MS-SSIM diversity of the real images ``real`` with the kernel size and weights a stage-2 evaluate recorded in
    ``metrics``, computed here: what its ``ms_ssim_diversity_real`` must be when it scored all of ``real``."""
    from vqvae_medical.evaluation.sample_quality import ms_ssim_diversity

    return ms_ssim_diversity(real, kernel_size=metrics["ms_ssim_kernel_size"], weights=metrics["ms_ssim_weights"])
