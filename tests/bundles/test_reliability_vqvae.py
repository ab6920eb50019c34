"""Reliability of the 2D bundle: bad input, SIGKILL and resume, untrusted checkpoints, divergence, determinism."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import BUNDLES, TINY_VQVAE_2D, _arg, run_bundle
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from vqvae_medical.training.handlers import CodebookMonitor
from vqvae_medical.training.steps import NonFiniteLossError

BUNDLE_DIR = BUNDLES / "vqvae"
TINY = {**TINY_VQVAE_2D, "data_layout": "folder", "val_fraction": 0.2, "test_fraction": 0.2}


@pytest.fixture()
def slices(brain_dir, tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for i, f in enumerate(sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:10]):
        shutil.copy(f, data / f"slice_{i:02d}.jpg")
    return data


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- bad input through the bundle
BAD_CASES = ["truncated JPEG", "3D volume in a 2D bundle", "NaN voxels", "transparent alpha"]


def _write_bad_file(case: str, data: Path, ixi_dir: Path) -> tuple[Path, str]:
    """Write the bad file of ``case`` into the folder of real slices ``data``; returns it and the word the error
    must contain."""
    first = sorted(data.glob("*.jpg"))[0]
    if case == "truncated JPEG":
        bad, expected = data / "zz_truncated.jpg", "truncated or corrupt"
        bad.write_bytes(first.read_bytes()[:2000])
    elif case == "3D volume in a 2D bundle":
        bad, expected = data / "zz_volume.nii.gz", "3D"
        shutil.copy(sorted((ixi_dir / "t1").glob("*.nii.gz"))[0], bad)
    elif case == "NaN voxels":
        bad, expected = data / "zz_nan.nii.gz", "NaN"
        arr = np.asarray(Image.open(first), dtype=np.float32)
        arr[10:20, 10:20] = np.nan
        nib.save(nib.Nifti1Image(arr, np.eye(4)), bad)
    else:
        bad, expected = data / "zz_alpha.png", "alpha"
        rgba = np.dstack(
            [np.asarray(Image.open(first).convert("RGB")), np.full(Image.open(first).size[::-1], 90, np.uint8)]
        )
        Image.fromarray(rgba, "RGBA").save(bad)
    return bad, expected


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file_gives_one_clear_error(case, slices, ixi_dir, tmp_path):
    bad, expected = _write_bad_file(case, slices, ixi_dir)
    out = tmp_path / "out"
    proc = run_bundle(
        "vqvae", ["train.json"], {**TINY, "dataset_dir": slices, "output_dir": out, "max_epochs": 1}, expect_ok=False
    )
    assert proc.returncode != 0
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("ERROR (DataError):"), proc.stderr[-3000:]
    assert bad.name in last and expected.lower() in last.lower(), last
    assert "Traceback" not in proc.stderr, "a bad file must not print a traceback"
    assert not (out / "models" / "model.pt").exists()


def test_bad_files_are_skipped_with_the_flag(slices, ixi_dir, tmp_path):
    """``skip_bad_files`` skips each kind of bad file with a warning (all four in one folder) and training goes on."""
    bad = [_write_bad_file(case, slices, ixi_dir)[0] for case in BAD_CASES]
    out = tmp_path / "out"
    proc = run_bundle(
        "vqvae",
        ["train.json"],
        {**TINY, "dataset_dir": slices, "output_dir": out, "max_epochs": 1, "skip_bad_files": True},
    )
    log = proc.stdout + proc.stderr
    assert all(f"skipping {f}" in log for f in bad), log[-3000:]
    assert (out / "models" / "model.pt").is_file()


def test_empty_folder_and_missing_file(tmp_path, slices):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_bundle(
        "vqvae", ["train.json"], {**TINY, "dataset_dir": empty, "output_dir": tmp_path / "o1"}, expect_ok=False
    )
    assert proc.returncode != 0 and "ERROR (DataError):" in proc.stderr and str(empty) in proc.stderr
    listing = tmp_path / "dataset.json"
    files = sorted(str(p) for p in slices.glob("*.jpg"))
    listing.write_text(
        json.dumps(
            {
                "training": [{"image": f} for f in files[:4]] + [{"image": str(tmp_path / "gone.png")}],
                "validation": [{"image": files[5]}],
            }
        )
    )
    proc = run_bundle(
        "vqvae",
        ["train.json"],
        {**TINY, "dataset_dir": listing, "data_layout": "decathlon", "output_dir": tmp_path / "o2"},
        expect_ok=False,
    )
    assert proc.returncode != 0 and "gone.png" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- interrupted training
def _train_cmd(data: Path, out: Path, max_epochs: int) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--bundle_root", "."]
    for k, v in {**TINY, "dataset_dir": data, "output_dir": out, "max_epochs": max_epochs}.items():
        cmd += [f"--{k}", _arg(v)]
    return cmd


def _val_history(out: Path) -> list[dict]:
    return [
        r
        for r in map(json.loads, (out / "logs" / "history.jsonl").read_text().splitlines())
        if r["phase"] == "validation"
    ]


@pytest.mark.timeout(600)
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(slices, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(slices, killed, 4),
        cwd=BUNDLE_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = killed / "models" / "checkpoint_epoch=1.pt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), "no checkpoint was written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "checkpoint_epoch=4.pt").exists()
    rerun = subprocess.run(
        _train_cmd(slices, killed, 4), cwd=BUNDLE_DIR, env=env, capture_output=True, text=True, timeout=400
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    assert (killed / "models" / "checkpoint_epoch=4.pt").is_file()
    no_tmp = [p.name for p in (killed / "models").iterdir() if p.name.endswith(".tmp")]
    assert not no_tmp, f"temporary files left behind: {no_tmp}"

    # the uninterrupted run, in this process with the subprocesses' single thread
    straight = tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _workflow(slices, straight, max_epochs=4).run()
    finally:
        torch.set_num_threads(threads)
    final_killed, final_straight = _val_history(killed)[-1], _val_history(straight)[-1]
    assert final_killed["epoch"] == final_straight["epoch"] == 4
    for key in ("ssim", "mse", "psnr"):
        assert final_killed[key] == pytest.approx(final_straight[key], rel=1e-3, abs=1e-4), key


# ---------------------------------------------------------------- untrusted checkpoints
def test_checkpoint_with_pickled_code_is_refused(slices, tmp_path):
    """On resume; inference given a pickled ``--ckpt_path``: ``test_faults.py``."""
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    torch.save({"model": {}, "payload": argparse.Namespace(cmd="echo owned")}, out / "models" / "checkpoint_epoch=9.pt")
    proc = run_bundle(
        "vqvae", ["train.json"], {**TINY, "dataset_dir": slices, "output_dir": out, "max_epochs": 10}, expect_ok=False
    )
    assert proc.returncode != 0
    assert "ERROR (UntrustedCheckpointError)" in proc.stderr and "checkpoint_epoch=9.pt" in proc.stderr


# ---------------------------------------------------------------- divergence and collapse
def _workflow(data: Path, out: Path, **extra) -> ConfigWorkflow:
    overrides = {**TINY, "dataset_dir": str(data), "output_dir": str(out), **extra}
    wf = ConfigWorkflow(
        config_file=str(BUNDLE_DIR / "configs" / "train.json"),
        meta_file=str(BUNDLE_DIR / "configs" / "metadata.json"),
        logging_file=None,
        workflow_type="train",
        bundle_root=str(BUNDLE_DIR),
        **{k.replace("#", "::"): v for k, v in overrides.items()},
    )
    wf.initialize()
    return wf


def test_nan_loss_stops_with_iteration_and_keeps_last_checkpoint(slices, tmp_path):
    out = tmp_path / "out"
    wf = _workflow(slices, out, max_epochs=1)
    wf.run()
    ckpt, best = out / "models" / "checkpoint_epoch=1.pt", out / "models" / "model.pt"
    before = (_sha(ckpt), _sha(best))
    wf = _workflow(slices, out, max_epochs=2)
    trainer = wf.parser.get_parsed_content("train#trainer")
    network = wf.parser.get_parsed_content("network_def")

    @trainer.on(Events.ITERATION_STARTED(once=trainer.state.epoch_length + 2 if trainer.state.epoch_length else 6))
    def inject_nan(engine):
        with torch.no_grad():
            network.model.decoder.layers[0].weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"iteration \d+"):
        trainer.run()
    assert (_sha(ckpt), _sha(best)) == before
    assert not (out / "models" / "checkpoint_epoch=2.pt").exists()


def test_codebook_collapse_is_logged(caplog):
    engine = Engine(
        lambda e, b: {"loss": torch.tensor(0.1), "usage": torch.tensor(0.02 if e.state.iteration > 2 else 0.9)}
    )
    monitor = CodebookMonitor(min_usage=0.1, every=1)
    monitor.attach(engine)
    with pytest.warns(RuntimeWarning, match="codebook collapse"):
        engine.run(range(5), max_epochs=1)
    assert monitor.warnings == 1
    assert "2.0%" in caplog.text


# ---------------------------------------------------------------- determinism
def test_same_seed_gives_bit_identical_weights(slices, tmp_path):
    states = []
    for run in range(2):
        wf = _workflow(slices, tmp_path / f"run{run}", max_epochs=1, resume=False)
        wf.run()
        states.append({k: v.clone() for k, v in wf.parser.get_parsed_content("network_def").state_dict().items()})
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
