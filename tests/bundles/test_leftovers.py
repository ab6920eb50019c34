"""Tests do not depend on what a user's runs left in ``bundles/`` (issue #31, item 13).

The README's commands write into the bundle folders (the configs' default ``output_dir``): ``models/`` with a trained
stage-1 record, ``cache/``, ``logs/``, ``inference/``, ``eval/``. In a fresh clone after those commands the diffusion
bundle's ``verify_net_in_out`` test built its ``network_def`` against the trained ``bundles/vqvae`` it found. Here
the bundle tests that build networks from the default configs run (in a pytest subprocess) against a copy of
``bundles/`` with such leftovers planted in it (``VQVAE_MEDICAL_BUNDLES``), and ``git`` ignores every folder a bundle
run writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_runner import BUNDLES, REPO_ROOT, copy_bundle
from monai.bundle import ConfigParser

from vqvae_medical.stages.autoencoder.record import write_record
from vqvae_medical.training.provenance import PREVIOUS_DIR
from vqvae_medical.utils.io import atomic_save

STAGE_ONE = ("vqvae", "vqvae2")
#: the bundle tests that build networks from the configs' defaults, with no stage-1 folder of their own to point at
#: (the stage-2 ones: a stage-1 bundle's network does not read another folder)
NETWORK_CHECKS = (
    "tests/bundles/test_latent_diffusion.py::test_model_zoo_verify_net_in_out",
    "tests/bundles/test_model_zoo.py::test_model_zoo_ci_checks[latent_diffusion]",
    "tests/bundles/test_model_zoo.py::test_model_zoo_ci_checks[pixelcnn_prior]",
    "tests/bundles/test_model_zoo.py::test_inference_network_matches_training_network",
)


def _plant_trained_autoencoder(bundle_dir: Path, overlay: tuple[str, ...] = ()) -> None:
    """``models/model.pt`` and ``models/autoencoder.json`` as the bundle's default training job (with ``overlay``,
    e.g. ``3d.json``) leaves them in its default ``output_dir`` (default network, preprocessing and data settings;
    initial weights stand in for trained ones)."""
    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / c) for c in ("train.json", *overlay)])
    parser["bundle_root"] = str(bundle_dir)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    path = atomic_save(network.state_dict(), Path(parser.get_parsed_content("ckpt_dir")) / "model.pt")
    settings = parser.get_parsed_content("data_settings")
    preprocessing = parser.get_parsed_content("preprocessing_settings")
    write_record(path, network, preprocessing, settings, parser["spatial_size"])


def _plant_outputs(bundle_dir: Path) -> None:
    """The other folders a user's runs fill, with files no test may read; stage 2's ``models/model.pt`` unreadable."""
    for folder, name in (("cache", "latents_training.pt"), ("logs", "history.jsonl"), ("inference", "sample_0.png")):
        (bundle_dir / folder).mkdir(parents=True, exist_ok=True)
        (bundle_dir / folder / name).write_bytes(b"left by a user's run")
    (bundle_dir / "eval").mkdir(exist_ok=True)
    (bundle_dir / "eval" / "metrics.json").write_text('{"left by": "a user\'s run"}')
    if not (bundle_dir / "models" / "model.pt").exists():
        (bundle_dir / "models").mkdir(exist_ok=True)
        (bundle_dir / "models" / "model.pt").write_bytes(b"not a checkpoint: left by a user's run")


@pytest.fixture
def bundles_with_leftovers(tmp_path) -> Path:
    root = tmp_path / "bundles"
    for bundle in sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir()):
        copy_bundle(bundle, root / bundle)
        if bundle in STAGE_ONE:
            _plant_trained_autoencoder(root / bundle)
        if bundle == "vqvae":  # the 3D default run writes <bundle_root>/3d
            _plant_trained_autoencoder(root / bundle, ("3d.json",))
        _plant_outputs(root / bundle)
    return root


def test_network_checks_ignore_trained_leftovers_in_the_bundle_folders(bundles_with_leftovers):
    """The planted ``vqvae`` record has the default 32-dimensional codes; a test that built the diffusion network
    from it instead of its own tiny settings failed with "expected a [B, 32, ...] tensor"; one that read a planted
    ``model.pt`` would fail to load it; one that wrote there fails the session's clean-folders check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"VQVAE_MEDICAL_BUNDLES": str(bundles_with_leftovers), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *NETWORK_CHECKS]
    proc = subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


def _output_folders() -> set[str]:
    """The folders of ``output_dir`` that the bundles' configs write (``os.path.join(@output_dir, '<name>'...)``),
    the default output folders below the bundle (``os.path.join(@bundle_root, '3d')``) and ``previous/``, where a
    fresh run moves an earlier run's files."""
    pattern = re.compile(r"os\.path\.join\(@(?:output_dir|bundle_root), '([^'.][^']*)'")
    names = {m for config in BUNDLES.glob("*/configs/*.json") for m in pattern.findall(config.read_text())}
    return names | {PREVIOUS_DIR}


def test_git_ignores_every_folder_a_bundle_run_writes():
    """``git status`` after the README's commands listed their output folders (``cache/``, ``inference/``,
    ``logs/``) as untracked."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    folders = _output_folders()
    assert {"models", "logs", "cache", "eval", "inference", "previous"} <= folders

    def ignored(paths: list[str]) -> set[str]:
        """The ``paths`` that ``.gitignore`` ignores."""
        cmd = ["git", "check-ignore", "--no-index", "--stdin"]
        proc = subprocess.run(cmd, check=False, cwd=REPO_ROOT, input="\n".join(paths), capture_output=True, text=True)
        return set(proc.stdout.split())

    paths = [f"bundles/{b.name}/{folder}/file" for b in BUNDLES.iterdir() if b.is_dir() for folder in sorted(folders)]
    missing = sorted(set(paths) - ignored(paths))
    assert not missing, f"not ignored by .gitignore: {missing}"
    shipped = [f"bundles/{b.name}/configs/train.json" for b in BUNDLES.iterdir() if b.is_dir()]
    assert not ignored(shipped), "the bundles' own files must not be ignored"
