"""Reliability of the bundles other than vqvae (which ``test_reliability_2d.py`` covers in full).

The mechanisms are shared (input checks of :mod:`vqvae_medical.data.checks`, the error hook of
:func:`vqvae_medical.training.runtime.install_error_hook`, the finite-loss guard of
:mod:`vqvae_medical.training.steps`, the checkpoints of :mod:`vqvae_medical.training.checkpoints`), so the tests are
parametrised over the bundles and check that every bundle is wired to them:

- bad input: corrupt/truncated NIfTI, NaN voxels, a 2D image in the 3D bundle, a two-channel volume for a
  one-channel config (vqvae_3d); a corrupt 2D NIfTI slice and a 3D volume in vqvae2 -> one ``DataError`` naming
  the file, ``skip_bad_files`` skips it; through ``monai.bundle run`` the last line is ``ERROR (DataError): ...``
  and no traceback is printed;
- mixed image sizes where the config batches images at their own size (``spatial_size`` null) -> one ``DataError``
  naming the odd file before training, instead of a collate error inside the data loader (all four bundles);
- same seed -> bit-identical checkpoints (vqvae_3d, pixelcnn_prior, latent_diffusion; vqvae2 is covered by
  ``test_bundle_vqvae2.py::test_same_seed_same_weights``);
- a NaN loss stops training with ``NonFiniteLossError`` naming the epoch and iteration, before any weight update,
  and leaves the last checkpoint and ``model.pt`` byte-identical (all four bundles);
- the prior and the diffusion bundles refuse a VQ-VAE checkpoint carrying pickled code with one plain message;
- the prior bundle killed with SIGKILL resumes on rerun and ends with the weights of an uninterrupted run.

Networks are tiny, runs last one or two epochs of two iterations, and volumes are resized to 24^3.
"""

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
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import BUNDLES, TINY_VQVAE2_2D, TINY_VQVAE_2D, _arg, run_bundle
from ignite.engine import Events
from monai.bundle import ConfigParser
from tiny import TINY_PRIOR, TINY_UNET, TINY_VQVAE_3D

from vqvae_medical.data import DataError
from vqvae_medical.stages.autoencoder.record import data_settings, write_record
from vqvae_medical.training.steps import NonFiniteLossError
from vqvae_medical.utils.io import atomic_save, safe_load

VQ_NET = {k: v for k, v in TINY_VQVAE_2D.items() if k != "batch_size"}
TINY = {
    "vqvae_3d": {**TINY_VQVAE_3D, "batch_size": 1},
    "vqvae2": {**TINY_VQVAE2_2D, "spatial_size": [48, 48], "batch_size": 2},
    "pixelcnn_prior": {**TINY_PRIOR, "num_classes": 0, "image_size": [32, 32], "batch_size": 2},
    "latent_diffusion": {**TINY_UNET, "embedding_dim": 8, "sample_interval": 0, "batch_size": 2},
}
TINY = {bundle: {**settings, "data_layout": "decathlon"} for bundle, settings in TINY.items()}  # the data sets below
COMMON = {"amp": False, "device": "cpu", "num_workers": 0}
#: case -> (bundle folder, its training configs): vqvae_3d is the vqvae bundle with the configs/3d.json overlay
TRAIN_CONFIGS = {"vqvae_3d": ("vqvae", ["train.json", "3d.json"])}


def _train_configs(case: str) -> tuple[str, list[str]]:
    return TRAIN_CONFIGS.get(case, (case, ["train.json"]))

#: the tests that use ``first_run`` run on one pytest-xdist worker (--dist loadgroup): it is built once
FIRST_RUN = pytest.mark.xdist_group("reliability_bundles_first_run")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_datalist(path: Path, training: list[Path], validation: list[Path]) -> Path:
    """A decathlon-style ``dataset.json``: explicit sections, so that an added bad file cannot change the split."""
    sections = {"training": training, "validation": validation, "test": validation}
    path.write_text(json.dumps({k: [{"image": str(f)} for f in v] for k, v in sections.items()}))
    return path


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def volumes(ixi_dir, tmp_path_factory) -> list[Path]:
    """Three real IXI T1 volumes (120 x 120 x 90)."""
    files = sorted((ixi_dir / "t1").glob("IXI*_T1.nii.gz"))[:3]
    if len(files) < 3:
        pytest.skip(f"{ixi_dir} holds fewer than 3 IXI volumes")
    return files


@pytest.fixture(scope="module")
def nifti_slices(volumes, tmp_path_factory) -> list[Path]:
    """Six 2D axial NIfTI slices (120 x 120) of one IXI volume, as in the HIPMRI layout of the VQ-VAE-2 bundle."""
    folder = tmp_path_factory.mktemp("nifti_slices")
    img = nib.load(volumes[0])
    data = img.get_fdata(dtype=np.float32)
    paths = []
    for i, k in enumerate(range(30, 60, 5)):
        path = folder / f"slice_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data[:, :, k], img.affine), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def brain_slices(brain_dir, tmp_path_factory) -> list[Path]:
    """Six real 2D brain slices (208 x 176 grey JPEG)."""
    folder = tmp_path_factory.mktemp("brain_slices")
    paths = []
    for i, f in enumerate(sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:6]):
        paths.append(folder / f"slice_{i:02d}.jpg")
        shutil.copy(f, paths[-1])
    return paths


@pytest.fixture(scope="module")
def vq_ckpt(tmp_path_factory) -> Path:
    """``models/model.pt`` (and its record, 32 x 32 images) of a tiny grey vqvae bundle network; the codebook is
    initialised from one batch of random images (a trained VQ-VAE is not needed to test the prior and the diffusion
    bundles' machinery)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "vqvae" / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLES / "vqvae"), **VQ_NET, "in_channels": 1})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    net.train()
    with torch.no_grad():
        net.model(torch.rand(8, 1, 32, 32))
    path = atomic_save(net.state_dict(), tmp_path_factory.mktemp("vqvae") / "models" / "model.pt")
    preprocessing = {"transforms": "image_transforms_2d", "channels": 1, "spatial_size": [32, 32]}
    write_record(path, net, preprocessing, data_settings(None), [32, 32])
    return path


def _dataset(bundle: str, request: pytest.FixtureRequest, folder: Path) -> Path:
    """The ``dataset.json`` each bundle trains on in these tests: two training items and one validation item."""
    if bundle == "vqvae_3d":
        files = request.getfixturevalue("volumes")
        return _write_datalist(folder / "dataset.json", files[:2], files[2:3])
    if bundle == "vqvae2":
        files = request.getfixturevalue("nifti_slices")
    else:
        files = request.getfixturevalue("brain_slices")
    return _write_datalist(folder / "dataset.json", files[:4], files[4:5])


def _overrides(bundle: str, request: pytest.FixtureRequest, folder: Path) -> dict[str, Any]:
    """Tiny settings, ``dataset.json`` in ``folder`` and ``folder/out`` as ``output_dir``: parsing ``initialize``
    creates the output folders, which must not be the bundle's own (tests run in parallel)."""
    overrides = {**COMMON, **TINY[bundle], "dataset_dir": str(_dataset(bundle, request, folder))}
    overrides["output_dir"] = str(folder / "out")
    if bundle in ("pixelcnn_prior", "latent_diffusion"):
        overrides["autoencoder_dir"] = str(request.getfixturevalue("vq_ckpt").parent.parent)
    return overrides


# ------------------------------------------------------------------------------------------ in-process runs
@pytest.fixture(autouse=True)
def _keep_excepthook(monkeypatch):
    """The bundles' ``initialize`` installs the error hook; keep it out of the test process."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)


def _parser(bundle: str, overrides: Mapping[str, Any]) -> ConfigParser:
    """The bundle's ``train.json`` parsed in this process as ``monai.bundle run`` would, ``initialize`` run."""
    folder, configs = _train_configs(bundle)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / folder / "configs" / c) for c in configs])
    parser.update({k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
    parser["bundle_root"] = str(BUNDLES / folder)
    parser.get_parsed_content("initialize")
    return parser


def _train(bundle: str, overrides: Mapping[str, Any]) -> ConfigParser:
    parser = _parser(bundle, overrides)
    parser.get_parsed_content("train#trainer").run()
    return parser


@pytest.fixture(scope="module")
def first_run(request, tmp_path_factory):
    """``first_run(bundle)``: overrides, output folder and iterations of one seeded epoch of ``bundle`` (run once)."""
    runs: dict[str, tuple[dict, Path, int]] = {}

    def get(bundle: str) -> tuple[dict, Path, int]:
        if bundle not in runs:
            folder = tmp_path_factory.mktemp(bundle)
            overrides = _overrides(bundle, request, folder)
            out = folder / "out"
            parser = _train(bundle, {**overrides, "output_dir": out, "max_epochs": 1})
            runs[bundle] = (overrides, out, parser.get_parsed_content("train#trainer").state.iteration)
        return runs[bundle]

    return get


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Same nested structure, tensors bit-identical."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


# vqvae2: tests/bundles/test_vqvae2.py::test_same_seed_same_weights trains it twice through monai.bundle run
@FIRST_RUN
@pytest.mark.parametrize("bundle", ["vqvae_3d", "pixelcnn_prior", "latent_diffusion"])
def test_same_seed_gives_bit_identical_checkpoints(bundle, first_run, tmp_path):
    overrides, out, iterations = first_run(bundle)
    assert iterations == 2
    again = tmp_path / "again"
    _train(bundle, {**overrides, "output_dir": again, "max_epochs": 1})
    first = safe_load(out / "models" / "checkpoint_epoch=1.pt")
    second = safe_load(again / "models" / "checkpoint_epoch=1.pt")
    # weights, optimizer moments, RNG states (and the diffusion bundle's EMA weights) after two iterations
    assert {"model", "optimizer", "rng", "trainer"} <= set(first)
    _assert_identical(first, second)
    _assert_identical(safe_load(out / "models" / "model.pt"), safe_load(again / "models" / "model.pt"))


@FIRST_RUN
@pytest.mark.parametrize("bundle", ["vqvae_3d", "vqvae2", "pixelcnn_prior", "latent_diffusion"])
def test_nan_loss_stops_naming_the_iteration_and_keeps_the_checkpoints(bundle, first_run, tmp_path):
    overrides, first_out, iterations = first_run(bundle)
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    models = out / "models"
    before = {p.name: _sha(p) for p in models.glob("*.pt")}
    assert {"checkpoint_epoch=1.pt", "model.pt"} <= set(before)

    parser = _parser(bundle, {**overrides, "output_dir": out, "max_epochs": 2})
    trainer = parser.get_parsed_content("train#trainer")
    network = parser.get_parsed_content("network_def")

    @trainer.on(Events.EPOCH_STARTED)
    def diverge(engine):  # after the resumed epoch-1 weights are loaded: the network's last layer turns NaN
        with torch.no_grad():
            list(network.parameters())[-1].fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=rf"at epoch 2, iteration {iterations + 1}\b.*No weights were updated"):
        trainer.run()
    assert {p.name: _sha(p) for p in models.glob("*.pt")} == before
    assert not [p.name for p in models.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ bad input
def _bad_file(case: str, folder: Path, volumes: list[Path], slices: list[Path]) -> tuple[Path, str]:
    """Write the bad file of ``case`` into ``folder``; returns it and the words the error must contain."""
    vol = nib.load(volumes[0])
    if case == "truncated NIfTI volume":
        bad = folder / "truncated.nii.gz"
        bad.write_bytes(volumes[0].read_bytes()[:20_000])
        return bad, "truncated or corrupt NIfTI"
    if case == "NaN voxels":
        data = vol.get_fdata(dtype=np.float32)
        data[40:50, 40:50, 40:50] = np.nan
        bad = folder / "nan.nii.gz"
        nib.save(nib.Nifti1Image(data, vol.affine), bad)
        return bad, "1000 NaN"
    if case == "2D image in the 3D bundle":
        bad = folder / "slice.nii.gz"
        shutil.copy(slices[0], bad)
        return bad, "2D image"
    if case == "two-channel volume, one-channel config":
        data = vol.get_fdata(dtype=np.float32)
        bad = folder / "two_channels.nii.gz"
        nib.save(nib.Nifti1Image(np.stack([data, np.sqrt(data)], axis=-1), vol.affine), bad)
        return bad, "2 channels"
    if case == "corrupt 2D NIfTI slice":
        bad = folder / "corrupt_slice.nii.gz"
        bad.write_bytes(slices[0].read_bytes()[:3_000])
        return bad, "truncated or corrupt NIfTI"
    if case == "3D volume in the 2D bundle":
        bad = folder / "volume.nii.gz"
        shutil.copy(volumes[0], bad)
        return bad, "3D volume"
    raise ValueError(case)


BAD_CASES = [
    ("vqvae_3d", "truncated NIfTI volume"),
    ("vqvae_3d", "NaN voxels"),
    ("vqvae_3d", "2D image in the 3D bundle"),
    ("vqvae_3d", "two-channel volume, one-channel config"),
    ("vqvae2", "corrupt 2D NIfTI slice"),
    ("vqvae2", "3D volume in the 2D bundle"),
]


@pytest.mark.parametrize("bundle, case", BAD_CASES)
def test_bad_file_gives_one_clear_error_and_can_be_skipped(bundle, case, request, volumes, nifti_slices, tmp_path):
    """The bundle's datalist (what training builds first) fails with one DataError naming the file, what is wrong
    and the skip flag; with ``skip_bad_files`` the file is dropped with a warning."""
    bad, expected = _bad_file(case, tmp_path, volumes, nifti_slices)
    overrides = _overrides(bundle, request, tmp_path)
    listing = json.loads(Path(overrides["dataset_dir"]).read_text())
    listing["training"].append({"image": str(bad)})
    Path(overrides["dataset_dir"]).write_text(json.dumps(listing))
    with pytest.raises(RuntimeError) as raised:  # the config parser wraps it
        _parser(bundle, overrides).get_parsed_content("datalist")
    error = raised.value.__cause__
    assert isinstance(error, DataError), repr(raised.value)
    message = str(error)
    assert message.startswith(f"{bad}: ") and expected in message and "skip_bad_files=true" in message, message
    assert len(message.splitlines()) == 1, message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datalist = _parser(bundle, {**overrides, "skip_bad_files": True}).get_parsed_content("datalist")
    assert any(f"skipping {bad}" in str(w.message) for w in caught)
    assert str(bad) not in json.dumps(datalist) and len(datalist["training"]) == len(listing["training"]) - 1


@pytest.mark.parametrize("bundle, case", [("vqvae_3d", "NaN voxels"), ("vqvae2", "3D volume in the 2D bundle")])
def test_bad_file_through_monai_bundle_run_prints_one_line(bundle, case, request, volumes, nifti_slices, tmp_path):
    """End to end: ``monai.bundle run`` stops with ``ERROR (DataError): <file>: ...`` as its last line, no traceback."""
    bad, expected = _bad_file(case, tmp_path, volumes, nifti_slices)
    overrides = _overrides(bundle, request, tmp_path)
    listing = json.loads(Path(overrides["dataset_dir"]).read_text())
    listing["training"].append({"image": str(bad)})
    Path(overrides["dataset_dir"]).write_text(json.dumps(listing))
    overrides = {**overrides, "output_dir": tmp_path / "out", "max_epochs": 1}
    proc = run_bundle(*_train_configs(bundle), overrides, expect_ok=False)
    assert proc.returncode != 0
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith(f"ERROR (DataError): {bad}: ") and expected in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_3d_training_skips_every_bad_file_with_the_flag(request, volumes, nifti_slices, tmp_path):
    """All four kinds of bad 3D input at once, ``skip_bad_files=true``: each is skipped and one epoch trains."""
    cases = [c for b, c in BAD_CASES if b == "vqvae_3d"]
    bad = [_bad_file(case, tmp_path, volumes, nifti_slices)[0] for case in cases]
    overrides = _overrides("vqvae_3d", request, tmp_path)
    listing = json.loads(Path(overrides["dataset_dir"]).read_text())
    listing["training"] += [{"image": str(f)} for f in bad]
    Path(overrides["dataset_dir"]).write_text(json.dumps(listing))
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parser = _train("vqvae_3d", {**overrides, "output_dir": out, "max_epochs": 1, "skip_bad_files": True})
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipping ")]
    assert all(any(str(f) in s for s in skipped) for f in bad), skipped
    assert parser.get_parsed_content("train#trainer").state.iteration == 2
    assert (out / "models" / "model.pt").is_file()


def _smaller_copy(path: Path, folder: Path) -> Path:
    """``path`` cropped by 8 pixels/voxels along its first axis: same kind of file, another size."""
    out = folder / f"smaller_{path.name}"
    if path.name.endswith(".nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[8:], img.affine), out)
    else:
        from PIL import Image

        with Image.open(path) as im:
            im.crop((0, 8, im.width, im.height)).save(out)
    return out


NATIVE_SIZE = {
    "vqvae_3d": {"spatial_size": None, "patch_size": None, "batch_size": 2},
    "vqvae2": {"spatial_size": None},
}  # stage 2 (prior, diffusion) preprocesses as its autoencoder did: the size check follows the stage-1 record


@pytest.mark.parametrize("bundle", list(NATIVE_SIZE))
def test_mixed_sizes_without_resizing_give_one_clear_error(bundle, request, tmp_path):
    """With ``spatial_size`` null the images are batched (or cached as one tensor) at their own size: an image of
    another size stops the bundle with one DataError naming it, before training; with ``spatial_size`` it is used."""
    overrides = _overrides(bundle, request, tmp_path)
    listing = json.loads(Path(overrides["dataset_dir"]).read_text())
    odd = _smaller_copy(Path(listing["training"][0]["image"]), tmp_path)
    listing["training"].append({"image": str(odd)})
    Path(overrides["dataset_dir"]).write_text(json.dumps(listing))
    with pytest.raises(RuntimeError) as raised:
        _parser(bundle, {**overrides, **NATIVE_SIZE[bundle]}).get_parsed_content("datalist")
    error = raised.value.__cause__
    assert isinstance(error, DataError), repr(raised.value)
    assert str(error).startswith(f"{odd}: has size ") and "unlike the most common size" in str(error), str(error)
    assert "spatial_size" in str(error)
    datalist = _parser(bundle, overrides).get_parsed_content("datalist")  # the tests' configs resize: accepted
    assert str(odd) in json.dumps(datalist["training"])


def test_mixed_sizes_of_multi_file_volumes_are_found(volumes, tmp_path):
    from vqvae_medical.data.volumes import check_volume_datalist

    img = nib.load(volumes[0])
    data = img.get_fdata(dtype=np.float32)[:32, :32, :32]
    items = []
    for name, crop in (("a", data), ("b", data), ("c", data[:24])):
        files = [tmp_path / f"{name}_t1.nii.gz", tmp_path / f"{name}_t2.nii.gz"]
        for f, d in zip(files, (crop, np.sqrt(crop)), strict=True):
            nib.save(nib.Nifti1Image(d, img.affine), f)
        items.append({"image": [str(f) for f in files]})
    assert len(check_volume_datalist(items, channels=2).items) == 3
    with pytest.raises(DataError, match=r"c_t1.*has size \(24, 32, 32\), unlike the most common size \(32, 32, 32\)"):
        check_volume_datalist(items, channels=2, require_same_size=True)
    with pytest.warns(UserWarning, match="skipping .*c_t1"):
        report = check_volume_datalist(items, channels=2, require_same_size=True, skip_bad=True)
    assert [i["image"] for i in report.items] == [i["image"] for i in items[:2]] and report.n_skipped == 1


# ------------------------------------------------------------------------------------------ untrusted checkpoints
@pytest.mark.parametrize("bundle", ["pixelcnn_prior", "latent_diffusion"])
def test_vqvae_checkpoint_with_pickled_code_is_refused(bundle, request, tmp_path):
    evil = tmp_path / "evil" / "models" / "model.pt"
    shutil.copytree(request.getfixturevalue("vq_ckpt").parent, evil.parent)
    torch.save({"model": {}, "payload": argparse.Namespace(cmd="echo owned")}, evil)
    overrides = {
        **_overrides(bundle, request, tmp_path),
        "autoencoder_dir": str(evil.parent.parent),
        "output_dir": tmp_path / "out",
    }
    proc = run_bundle(*_train_configs(bundle), overrides, expect_ok=False)
    assert proc.returncode != 0
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith(f"ERROR (UntrustedCheckpointError): {evil}: refused to load"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # the output folders are created (and checked writable) before anything loads; no checkpoint is written
    assert not list((tmp_path / "out" / "models").glob("*.pt"))


# ------------------------------------------------------------------------------------------ interrupted training
def _bundle_cmd(bundle: str, overrides: Mapping[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--bundle_root", "."]
    for k, v in overrides.items():
        cmd += [f"--{k}", _arg(v)]
    return cmd


@pytest.mark.timeout(300)
def test_prior_sigkill_then_rerun_resumes_and_matches_uninterrupted(request, tmp_path):
    """SIGKILL the prior bundle after its first checkpoint, rerun the same command: it resumes from the checkpoint,
    reuses the cached code maps, leaves no temporary file, and ends with the weights of an uninterrupted run."""
    epochs = 4
    overrides = {**_overrides("pixelcnn_prior", request, tmp_path), "max_epochs": epochs}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    cmd = _bundle_cmd("pixelcnn_prior", {**overrides, "output_dir": killed})
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(cmd, cwd=BUNDLES / "pixelcnn_prior", env=env, start_new_session=True, **quiet)
    first = killed / "models" / "checkpoint_epoch=1.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "no checkpoint was written"
    done = sorted(p.name for p in (killed / "models").glob("checkpoint_epoch=*.pt"))
    assert f"checkpoint_epoch={epochs}.pt" not in done, f"the run ended before it was killed: {done}"

    rerun = subprocess.run(cmd, cwd=BUNDLES / "pixelcnn_prior", env=env, capture_output=True, text=True, timeout=200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "resumed from" in log and "cached codes from" in log and "encoded " not in log, log[-3000:]
    assert (killed / "models" / f"checkpoint_epoch={epochs}.pt").is_file()
    assert not [p.name for p in (killed / "models").iterdir() if p.name.endswith(".tmp")]

    # the uninterrupted run, in this process with the subprocess's single thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train("pixelcnn_prior", {**overrides, "output_dir": tmp_path / "straight"})
    finally:
        torch.set_num_threads(threads)
    resumed = safe_load(killed / "models" / f"checkpoint_epoch={epochs}.pt")
    straight = safe_load(tmp_path / "straight" / "models" / f"checkpoint_epoch={epochs}.pt")
    _assert_identical(resumed["model"], straight["model"], "model")
    _assert_identical(resumed["trainer"], straight["trainer"], "trainer")
