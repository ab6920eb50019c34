"""The generative pipeline as the README runs it: stage 1 (an autoencoder bundle) writes its output folder, stage 2
(the PixelCNN prior or latent diffusion) is given only that folder (``--autoencoder_dir``) and runs on the same
embedded MNI152 data, through ``python -m monai.bundle run``, with tiny settings; plus the one-line messages for a
folder that is not a stage-1 output and for a checkpoint swapped under its record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny
import torch
from bundle_runner import TINY_VQVAE_2D, run_bundle
from PIL import Image
from tiny import TINY_DIFFUSION, TINY_VQVAE_3D

from vqvae_medical.stages.frozen import load_autoencoder
from vqvae_medical.utils.io import atomic_save, safe_load

SIZE = [64, 64]  # centre crop of the 128 x 128 embedded slices, recorded by stage 1 and reused by stage 2
QUICK = {"max_epochs": 1, "max_train_items": 16, "max_val_items": 4}
TINY_PRIOR = {**tiny.TINY_PRIOR, "max_seq_len": 256}  # the 16 x 16 codes of stage 1

#: the tests that use ``stage_one`` run on one pytest-xdist worker (--dist loadgroup): it is built once
STAGE_ONE = pytest.mark.xdist_group("pipeline_stage_one")


def _log(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """vqvae trained one epoch on 16 embedded slices (no dataset_dir), cropped to SIZE."""
    out = tmp_path_factory.mktemp("vqvae")
    run_bundle("vqvae", ["train.json"], {**TINY_VQVAE_2D, **QUICK, "output_dir": out, "spatial_size": SIZE})
    return out


@STAGE_ONE
def test_stage_one_writes_its_record(stage_one):
    record = json.loads((stage_one / "models" / "autoencoder.json").read_text())
    assert record["network_def"]["model"]["channels"] == TINY_VQVAE_2D["network_def#model#channels"]
    assert record["network_def"]["model"]["num_embeddings"] == 16
    assert record["preprocessing"] == {"transforms": "image_transforms_2d", "channels": 1, "spatial_size": SIZE}
    assert record["image_size"] == SIZE and record["spatial_dims"] == 2
    assert record["data"]["source"] == "embedded MNI152" and record["data"]["seed"] == 0


@STAGE_ONE
def test_prior_chain(stage_one, tmp_path):
    out = tmp_path / "prior"
    train = run_bundle(
        "pixelcnn_prior", ["train.json"], {**TINY_PRIOR, **QUICK, "autoencoder_dir": stage_one, "output_dir": out}
    )
    assert "encoded 16 images [64, 64] -> codes [16, 16]" in _log(train)
    assert (out / "models" / "model.pt").is_file()
    run_bundle(
        "pixelcnn_prior",
        ["inference.json"],
        {
            **TINY_PRIOR,
            "autoencoder_dir": stage_one,
            "output_dir": out,
            "ckpt_path": out / "models" / "model.pt",
            "num_samples": 4,
        },
    )
    codes = np.load(out / "inference" / "samples_codes.npy")
    assert codes.shape == (4, 16, 16)
    # each sample image is stage 1's decoding of its sampled code map
    with torch.no_grad():
        decoded = load_autoencoder(stage_one).decode_from_indices(torch.from_numpy(codes)).clamp(0, 1)
    files = sorted((out / "inference").glob("sample_*.png"))
    pixels = np.stack([np.asarray(Image.open(f), dtype=np.float32) / 255.0 for f in files])
    np.testing.assert_allclose(pixels, decoded[:, 0].numpy(), atol=1 / 255)
    grid = Image.open(out / "inference" / "samples.png")
    assert grid.width >= 4 * SIZE[1] and grid.height >= SIZE[0]


@STAGE_ONE
def test_diffusion_chain(stage_one, tmp_path):
    out = tmp_path / "ldm"
    train = run_bundle(
        "latent_diffusion",
        ["train.json"],
        {
            **TINY_DIFFUSION,
            **QUICK,
            "autoencoder_dir": stage_one,
            "output_dir": out,
            "batch_size": 8,
            "sample_interval": 0,
        },
    )
    assert "encoded 16 images [64, 64] -> latents [8, 16, 16]" in _log(train)
    run_bundle(
        "latent_diffusion",
        ["inference.json"],
        {
            **TINY_DIFFUSION,
            "autoencoder_dir": stage_one,
            "output_dir": out,
            "ckpt_path": out / "models" / "model.pt",
            "n_samples": 2,
        },
    )
    files = sorted((out / "inference").glob("sample_*.png"))
    assert len(files) == 2 and all(Image.open(f).size == (SIZE[1], SIZE[0]) for f in files)
    assert (out / "inference" / "samples.png").is_file()


def test_not_a_stage_one_folder_is_one_line(tmp_path):
    proc = run_bundle(
        "pixelcnn_prior", ["train.json"], {"autoencoder_dir": tmp_path, "output_dir": tmp_path / "out"}, expect_ok=False
    )
    assert proc.returncode != 0
    expected = f"ERROR (AutoencoderDirError): autoencoder_dir {tmp_path} is not the output of a trained autoencoder"
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "no models/model.pt and no models/autoencoder.json" in proc.stderr
    assert "Traceback" not in proc.stderr


@STAGE_ONE
def test_swapped_checkpoint_is_one_line(stage_one, tmp_path):
    copy = tmp_path / "stage1"
    shutil.copytree(stage_one / "models", copy / "models")
    state = safe_load(copy / "models" / "model.pt")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1.0
    atomic_save(state, copy / "models" / "model.pt")
    proc = run_bundle(
        "pixelcnn_prior", ["train.json"], {"autoencoder_dir": copy, "output_dir": tmp_path / "out"}, expect_ok=False
    )
    assert proc.returncode != 0
    assert f"autoencoder_dir {copy}: models/model.pt does not match models/autoencoder.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_3d_chain_to_latent_diffusion(tmp_path):
    """The 3D vqvae (configs/3d.json) on the embedded MNI152 volumes (no dataset_dir) records 3D preprocessing; latent
    diffusion with 3d.json, given only that folder, encodes the same volumes and samples NIfTI volumes of the
    recorded size."""
    vq = tmp_path / "vqvae_3d"
    tiny_3d = {**TINY_VQVAE_3D, "spatial_size": [32, 32, 32], "batch_size": 2, "max_epochs": 1}
    run_bundle("vqvae", ["train.json", "3d.json"], {**tiny_3d, "output_dir": vq})
    record = json.loads((vq / "models" / "autoencoder.json").read_text())
    assert record["spatial_dims"] == 3 and record["image_size"] == [32, 32, 32]
    assert record["preprocessing"]["transforms"] == "volume_transforms_3d"
    assert record["preprocessing"]["spatial_size"] == [32, 32, 32] and record["preprocessing"]["orientation"] == "RAS"
    out = tmp_path / "ldm"
    configs = ["train.json", "3d.json"]
    overrides = {
        **TINY_DIFFUSION,
        "autoencoder_dir": vq,
        "output_dir": out,
        "max_epochs": 1,
        "batch_size": 2,
        "sample_interval": 0,
    }
    train = run_bundle("latent_diffusion", configs, overrides)
    assert "encoded 6 images [32, 32, 32] -> latents [8, 8, 8, 8]" in _log(train)
    infer = {
        **TINY_DIFFUSION,
        "autoencoder_dir": vq,
        "output_dir": out,
        "ckpt_path": out / "models" / "model.pt",
        "n_samples": 1,
    }
    run_bundle("latent_diffusion", ["inference.json", "3d.json"], infer)
    (sample,) = (out / "inference").glob("sample_*.nii.gz")
    import nibabel as nib

    assert nib.load(sample).shape == (32, 32, 32)
