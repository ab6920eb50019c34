"""Faults of issue 17 through ``python -m monai.bundle run``, from real files of ``../shared/data``.

Silent failures that must not happen: inference overwriting its own outputs, a changed learning rate or
``max_epochs`` ignored on resume, inference reading a model other than the one of ``--output_dir``. And one
``ERROR (<kind>): ...`` line, no traceback, for: a checkpoint that does not fit the network, a missing checkpoint,
no ``--input_dir``, images smaller than the SSIM window, an output folder that cannot be written (a path below a
regular file: we run as root, so permission bits would not stop a write), a pickled checkpoint (without torch's
``weights_only=False`` advice), a 4D NIfTI given to the 2D bundle. Recovery: a truncated newest checkpoint is
skipped for the previous one, and 0-byte ``.tmp`` files left by ``kill -9`` during a save are removed. A 3D folder
mixing NIfTI with MetaImage and NRRD trains.

Networks are tiny (``TINY_VQVAE_2D``), runs last one to three epochs of a few iterations.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import TINY_VQVAE_2D, run_bundle, run_bundle_in_process
from PIL import Image
from tiny import TINY_VQVAE_3D

from vqvae_medical.data.checks import DataError
from vqvae_medical.training.runtime import SettingError, _user_error
from vqvae_medical.training.schedules import cosine_decay
from vqvae_medical.utils.io import safe_load

TINY = {
    **TINY_VQVAE_2D,
    "data_layout": "folder",
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "amp": False,
    "device": "cpu",
}
NET = {k: v for k, v in TINY.items() if k.startswith("network_def") or k in ("num_embeddings", "embedding_dim")}

#: the tests that use ``trained`` run on one pytest-xdist worker (--dist loadgroup): it is built once
TRAINED = pytest.mark.xdist_group("faults_trained")


def _last_line(proc) -> str:
    return [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]


def _one_line_error(proc, kind: str) -> str:
    """The run failed with one ``ERROR (kind): ...`` line and no traceback; returns that line."""
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    last = _last_line(proc)
    assert last.startswith(f"ERROR ({kind}):"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def slices(brain_dir, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("slices")
    for i, f in enumerate(sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:10]):
        shutil.copy(f, data / f"slice_{i:02d}.jpg")
    return data


@pytest.fixture(scope="module")
def trained(slices, tmp_path_factory) -> Path:
    """A run trained two epochs at learning rate 1e-3 (in this process): checkpoints of epochs 1 and 2 and
    ``models/model.pt``, what the faults below start from."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_bundle_in_process(
        "vqvae",
        ["train.json"],
        {**TINY, "dataset_dir": slices, "output_dir": out, "max_epochs": 2, "learning_rate": 1e-3},
    )
    assert (out / "models" / "checkpoint_epoch=2.pt").is_file() and (out / "models" / "model.pt").is_file()
    return out


def _copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


# ------------------------------------------------------------------ results lost or wrong, exit code 0
@TRAINED
def test_inference_gives_every_input_its_own_output_and_uses_the_model_of_output_dir(trained, slices, tmp_path):
    # one real slice in four orientations, so that each reconstruction can be told apart from the other inputs
    base = Image.open(sorted(slices.glob("*.jpg"))[0]).convert("L")
    inputs = tmp_path / "inputs"
    variants = {
        "sub1/x.jpg": base,
        "sub2/x.jpg": base.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        "y.jpg": base.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "y.png": base.transpose(Image.Transpose.ROTATE_180),
    }
    for rel, img in variants.items():
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(inputs / rel, **({"quality": 95} if rel.endswith(".jpg") else {}))
    run_dir = _copy_run(trained, tmp_path / "run")  # another output_dir than the bundle's own
    proc = run_bundle("vqvae", ["inference.json"], {**NET, "input_dir": inputs, "output_dir": run_dir, "device": "cpu"})
    assert f"loaded weights from {run_dir / 'models' / 'model.pt'}" in proc.stdout + proc.stderr
    inference = run_dir / "inference"
    with open(inference / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    by_input = {Path(r["input"]).relative_to(inputs).as_posix(): r for r in rows}
    assert set(by_input) == {"sub1/x.jpg", "sub2/x.jpg", "y.jpg", "y.png"}
    recons = {r["reconstruction"] for r in rows}
    assert len(recons) == 4, recons
    assert by_input["sub1/x.jpg"]["reconstruction"] == "sub1/x_recon.png"
    assert by_input["sub2/x.jpg"]["reconstruction"] == "sub2/x_recon.png"
    for r in rows:
        assert (inference / r["reconstruction"]).is_file() and (inference / r["codes"]).is_file()
    # each output is the reconstruction of its own input (not of another input of the same name)
    for rel, r in by_input.items():
        recon = np.asarray(Image.open(inference / r["reconstruction"]), dtype=np.float64).ravel()
        corr = {
            o: np.corrcoef(recon, np.asarray(Image.open(inputs / o), dtype=np.float64).ravel())[0, 1] for o in variants
        }
        assert max(corr, key=corr.get) == rel, (rel, corr)


@TRAINED
def test_changed_learning_rate_and_max_epochs_take_effect_on_resume(trained, slices, tmp_path):
    out = _copy_run(trained, tmp_path / "run")
    before = safe_load(out / "models" / "checkpoint_epoch=2.pt")
    assert before["lr_scheduler"]["base_lrs"] == [pytest.approx(1e-3)]
    proc = run_bundle(
        "vqvae",
        ["train.json"],
        {**TINY, "dataset_dir": slices, "output_dir": out, "max_epochs": 3, "learning_rate": 1e-5},
    )
    log = proc.stdout + proc.stderr
    assert "learning_rate is 0.001 in" in log and "and 1e-05 in this run: continuing with 1e-05" in log, log[-3000:]
    assert "max_epochs is 2 in" in log
    after = safe_load(out / "models" / "checkpoint_epoch=3.pt")
    assert after["trainer"]["iteration"] == 3 * after["trainer"]["epoch_length"]
    assert after["lr_scheduler"]["base_lrs"] == [pytest.approx(1e-5)]
    group = after["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(1e-5)
    # the schedule continues from the new start value: lr = 1e-5 * (the cosine factor after epoch 3 of 3)
    factor = cosine_decay(3, None, 0.01)(after["lr_scheduler"]["last_epoch"])
    assert group["lr"] == pytest.approx(1e-5 * factor)


# ------------------------------------------------------------------ one clear message
@TRAINED
def test_checkpoint_that_does_not_fit_names_tensor_and_setting(trained, slices, tmp_path):
    model = trained / "models" / "model.pt"
    proc = run_bundle(
        "vqvae",
        ["inference.json"],
        {
            **NET,
            "num_embeddings": 32,
            "input_dir": slices,
            "output_dir": tmp_path / "inf",
            "ckpt_path": model,
            "device": "cpu",
        },
        expect_ok=False,
    )
    last = _one_line_error(proc, "CheckpointError")
    assert str(model) in last and "quantizer.codebook" in last and "--num_embeddings 16" in last, last
    # the same on resume, with how to start over
    out = _copy_run(trained, tmp_path / "run")
    proc = run_bundle(
        "vqvae",
        ["train.json"],
        {**TINY, "num_embeddings": 32, "dataset_dir": slices, "output_dir": out, "max_epochs": 3},
        expect_ok=False,
    )
    last = _one_line_error(proc, "CheckpointError")
    assert "checkpoint_epoch=2.pt" in last and "num_embeddings is 16 in the checkpoint and 32 here" in last, last
    assert "--resume False" in last


def test_missing_checkpoint_and_missing_input_dir(slices, tmp_path):
    empty_run = tmp_path / "never_trained"
    proc = run_bundle(
        "vqvae",
        ["inference.json"],
        {**NET, "input_dir": slices, "output_dir": empty_run, "device": "cpu"},
        expect_ok=False,
    )
    last = _one_line_error(proc, "MissingCheckpointError")
    assert str(empty_run / "models" / "model.pt") in last and "--ckpt_path" in last, last
    proc = run_bundle(
        "vqvae", ["inference.json"], {**NET, "output_dir": tmp_path / "o", "device": "cpu"}, expect_ok=False
    )
    assert "--input_dir" in _one_line_error(proc, "DataError")


def test_pickled_checkpoint_names_the_file_without_torch_advice(slices, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"weights": argparse.Namespace(cmd="echo owned")}, evil)
    proc = run_bundle(
        "vqvae",
        ["inference.json"],
        {**NET, "input_dir": slices, "output_dir": tmp_path / "o", "ckpt_path": evil, "device": "cpu"},
        expect_ok=False,
    )
    last = _one_line_error(proc, "UntrustedCheckpointError")
    assert last.startswith(f"ERROR (UntrustedCheckpointError): {evil}: refused to load"), last
    assert "weights_only=False" not in proc.stderr and "weights_only" not in last


def test_images_smaller_than_the_ssim_window(slices, tmp_path):
    data = tmp_path / "tiny"
    data.mkdir()
    for f in sorted(slices.glob("*.jpg")):
        Image.open(f).crop((100, 100, 108, 108)).save(data / f.name.replace(".jpg", ".png"))  # 8x8 patches
    overrides = {**TINY, "dataset_dir": data, "output_dir": tmp_path / "o", "max_epochs": 1}
    proc = run_bundle("vqvae", ["train.json"], overrides, expect_ok=False)
    last = _one_line_error(proc, "DataError")
    assert "smaller than the minimum size of 11" in last and "spatial_size" in last and "(8, 8)" in last, last


@pytest.mark.parametrize("configs", [["train.json"], ["train.json", "3d.json"]], ids=["vqvae", "vqvae_3d"])
def test_output_folder_that_cannot_be_written_stops_before_training(configs, slices, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so no folder can be created below it")
    out = blocker / "out"
    proc = run_bundle(
        "vqvae",
        configs,
        {"dataset_dir": slices, "output_dir": out, "max_epochs": 1, "device": "cpu"},
        expect_ok=False,
    )
    last = _one_line_error(proc, "SettingError")
    assert str(out / "models") in last and "--output_dir" in last, last
    assert "Epoch" not in proc.stdout + proc.stderr  # no training happened first


def test_4d_nifti_in_the_2d_bundle_is_called_4d(ixi_dir, slices, tmp_path):
    volumes = sorted((ixi_dir / "t1").glob("*.nii.gz"))[:2]
    first = nib.load(volumes[0])
    stacked = np.stack([np.asarray(nib.load(v).dataobj, dtype=np.float32) for v in volumes], axis=-1)
    data = tmp_path / "data"
    shutil.copytree(slices, data)
    nib.save(nib.Nifti1Image(stacked, first.affine), data / "zz_4d.nii.gz")
    overrides = {**TINY, "dataset_dir": data, "output_dir": tmp_path / "o", "max_epochs": 1}
    proc = run_bundle("vqvae", ["train.json"], overrides, expect_ok=False)
    last = _one_line_error(proc, "DataError")
    assert "zz_4d.nii.gz" in last and f"is a 4D image of shape {tuple(stacked.shape)}" in last, last


# ------------------------------------------------------------------ recovery
@TRAINED
def test_truncated_newest_checkpoint_resumes_from_the_previous_and_stale_tmp_files_go(trained, slices, tmp_path):
    out = _copy_run(trained, tmp_path / "run")
    newest = out / "models" / "checkpoint_epoch=2.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    # what kill -9 during a save leaves: 0-byte temporary files of atomic_save and of the best-model metadata
    stale = [
        out / "models" / ".checkpoint_epoch=3.pt.k9x1.tmp",
        out / "models" / ".model.pt.k9x2.tmp",
        out / "models" / "model.pt.tmp",
    ]
    for f in stale:
        f.write_bytes(b"")
    proc = run_bundle("vqvae", ["train.json"], {**TINY, "dataset_dir": slices, "output_dir": out, "max_epochs": 3})
    log = proc.stdout + proc.stderr
    assert "checkpoint_epoch=2.pt: cannot read the checkpoint" in log and "--resume False" in log, log[-3000:]
    assert f"resumed from {out / 'models' / 'checkpoint_epoch=1.pt'}" in log
    third = safe_load(out / "models" / "checkpoint_epoch=3.pt")["trainer"]
    assert third["iteration"] == 3 * third["epoch_length"]
    second = safe_load(out / "models" / "checkpoint_epoch=2.pt")["trainer"]  # rewritten intact
    assert second["iteration"] == 2 * second["epoch_length"]
    assert not [f for f in stale if f.exists()]


def test_3d_folder_mixing_nifti_metaimage_and_nrrd_trains(ixi_dir, tmp_path):
    itk = pytest.importorskip("itk")
    volumes = sorted((ixi_dir / "t1").glob("*.nii.gz"))[:6]
    data = tmp_path / "mixed"
    data.mkdir()
    for i, v in enumerate(volumes):
        if i % 3 == 0:
            shutil.copy(v, data / v.name)
        else:
            itk.imwrite(itk.imread(str(v)), str(data / v.name.replace(".nii.gz", ".mha" if i % 3 == 1 else ".nrrd")))
    tiny_3d = {
        **TINY_VQVAE_3D,
        "batch_size": 2,
        "data_layout": "folder",
        "val_fraction": 0.34,
        "test_fraction": 0.0,
        "amp": False,
        "device": "cpu",
    }
    out = tmp_path / "out"
    run_bundle("vqvae", ["train.json", "3d.json"], {**tiny_3d, "dataset_dir": data, "output_dir": out, "max_epochs": 1})
    assert (out / "models" / "checkpoint_epoch=1.pt").is_file()


# ------------------------------------------------------------------ the pieces, without a bundle run
def test_output_names_are_unique_and_keep_sub_folders(tmp_path):
    from vqvae_medical.evaluation.writers import output_names

    files = [tmp_path / "in" / rel for rel in ("sub1/x.jpg", "sub2/x.jpg", "y.jpg", "y.png", "z.nii.gz")]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    names = output_names(files, tmp_path / "in")
    assert names == {
        str(files[0]): "sub1/x",
        str(files[1]): "sub2/x",
        str(files[2]): "y_jpg",
        str(files[3]): "y_png",
        str(files[4]): "z",
    }
    assert output_names(list(reversed(files)), tmp_path / "in") == names  # independent of the order
    # without a root the folders are dropped, and the clash of the two x.jpg is resolved with a counter
    flat = output_names(files, None)
    assert len(set(flat.values())) == len(files)


def test_constructor_refusing_a_setting_is_one_setting_error_line(slices, tmp_path):
    """A bad network setting on the command line: one line naming the component and the value, no traceback."""
    overrides = {**TINY, "dataset_dir": slices, "output_dir": tmp_path / "o", "max_epochs": 1}
    proc = run_bundle(
        "vqvae", ["train.json"], {**overrides, "network_def#model#normalize_latents": "l1"}, expect_ok=False
    )
    last = _one_line_error(proc, "SettingError")
    assert "vqvae_medical.networks.VQVAE: normalize_latents must be false, true" in last and "got 'l1'." in last, last
    assert not (tmp_path / "o" / "models" / "model.pt").exists()


def test_user_error_unwraps_monai_instantiation_failures_only_for_bad_arguments():
    def wrapped(cause: BaseException) -> RuntimeError:
        try:
            try:
                raise cause
            except Exception as e:
                raise RuntimeError("Failed to instantiate component 'pkg.Net' with keywords: a,b") from e
        except RuntimeError as outer:
            return outer

    found = _user_error(wrapped(TypeError("Net.__init__() got an unexpected keyword argument 'c'")))
    assert isinstance(found, SettingError)
    assert str(found) == (
        "pkg.Net: Net.__init__() got an unexpected keyword argument 'c'. Check that setting in the config or on the "
        "command line."
    )
    assert isinstance(_user_error(wrapped(DataError("x.png: unreadable"))), DataError)  # our own kind wins
    assert _user_error(wrapped(OSError("disk"))) is None  # not a bad argument: the traceback stays
    assert _user_error(RuntimeError("Failed to instantiate component 'pkg.Net'")) is None


def test_check_writable_names_the_folder_and_the_setting(tmp_path):
    from vqvae_medical.training.runtime import SettingError, check_writable

    assert check_writable(tmp_path / "a" / "models", None, setting="output_dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SettingError, match=r"file\.txt/out/models: cannot write to this folder .* --output_dir"):
        check_writable(tmp_path / "file.txt" / "out" / "models")


def test_mismatch_of_a_vqvae2_level_names_the_level():
    from vqvae_medical.networks import VQVAE2
    from vqvae_medical.training.mismatch import describe_mismatch

    kwargs = {"channels": (8, 16), "res_channels": (8, 8), "num_res_units": 1, "embedding_dim": (4, 4)}
    trained = VQVAE2(2, 1, num_embeddings=(8, 16), **kwargs)
    wanted = VQVAE2(2, 1, num_embeddings=(8, 32), **kwargs)
    why = describe_mismatch(wanted, trained.state_dict())
    assert (
        "quantizer_bottom.codebook" in why
        and "num_embeddings of the bottom level is 16 in the checkpoint and 32 here" in why
    )
    assert describe_mismatch(trained, trained.state_dict()) is None
