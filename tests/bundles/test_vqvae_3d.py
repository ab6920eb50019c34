"""The 3D VQ-VAE (the vqvae bundle with ``configs/3d.json`` after each command's configs) end to end through
``python -m monai.bundle``, on small crops of real IXI T1 volumes.

Train (two iterations on random 32^3 patches of volumes resized to 40^3, tiny channels; in this process, the command
line trains in the tests of a multi-file ``dataset.json`` and of the embedded default), evaluate (``metrics.json``
and ``report.png``), then infer with a 32^3 sliding window: the reconstruction must be a NIfTI with the input's
shape and affine, and the code map must cover the same world box. Also: the configured sub-pixel decoder is free of
checkerboards at initialisation, multi-file channel items of a ``dataset.json`` train, and the embedded MNI152
default runs one iteration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from tests.bundle_runner import (
    VQVAE_3D,
    bundle_network,
    config_paths,
    read_metrics,
    reconstruction_metrics,
    run_bundle,
    run_bundle_in_process,
)
from vqvae_medical.data import DataError
from vqvae_medical.data.volumes import check_volume_datalist
from vqvae_medical.networks import VQVAE, ReconstructionNetwork
from vqvae_medical.stages.autoencoder.inference import (
    SlidingWindowReconstructionStep,
    make_inferer,
)

BUNDLE = "vqvae"
TINY = {
    "network_def#model#channels": [8, 16],
    "network_def#model#res_channels": [8, 8],
    "num_embeddings": 32,
    "embedding_dim": 8,
    "spatial_size": [40, 40, 40],
}

#: the tests that use ``trained`` run on one pytest-xdist worker (--dist loadgroup): it is built once
TRAINED = pytest.mark.xdist_group("vqvae_3d_trained")


def _world_box(img: nib.Nifti1Image) -> np.ndarray:
    """World coordinates of the outer corners of the voxel grid (min and max per axis)."""
    s = np.asarray(img.shape[:3], dtype=float)
    corners = np.array(
        [[i, j, k, 1.0] for i in (-0.5, s[0] - 0.5) for j in (-0.5, s[1] - 0.5) for k in (-0.5, s[2] - 0.5)]
    )
    world = (img.affine @ corners.T).T[:, :3]
    return np.stack([world.min(0), world.max(0)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ixi_files, real_folder):
    """4 IXI volumes split by subject -> 2 training, 1 validation, 1 test; trained two iterations of one 32^3 patch
    each (tiny channels)."""
    files = ixi_files(4)
    root = tmp_path_factory.mktemp("vqvae3d")
    data = real_folder(files, root / "ixi4", link=True)
    out = root / "out"
    common = {"dataset_dir": data, "output_dir": out, "val_fraction": 0.25, "test_fraction": 0.25, **TINY}
    run_bundle_in_process(
        BUNDLE, ["train.json", VQVAE_3D], {**common, "patch_size": [32, 32, 32], "batch_size": 1, "max_epochs": 1}
    )
    return files, out, common


@TRAINED
@pytest.mark.slow
def test_train_evaluate_infer(trained, tmp_path, real_folder):
    files, out, common = trained
    assert (out / "models" / "model.pt").is_file()
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    train = [h for h in history if h["phase"] == "train"]
    assert train and train[-1]["iteration"] == 2 and np.isfinite(train[-1]["loss"])

    run_bundle(BUNDLE, ["train.json", "evaluate.json", VQVAE_3D], common)
    metrics = read_metrics(out)
    assert set(metrics) >= {"ssim", "psnr", "mse", "codebook_usage", "perplexity", "n_images"}
    assert metrics["n_images"] == 1
    assert np.isfinite(metrics["ssim"])
    # against the test volume's reconstruction and code histogram, computed here
    configs = ["train.json", "evaluate.json", VQVAE_3D]
    recomputed = reconstruction_metrics(BUNDLE, common, out / "models" / "model.pt", configs)
    for key in ("psnr", "mse", "codebook_usage", "perplexity"):
        assert metrics[key] == pytest.approx(recomputed[key], rel=1e-4), key
    assert (out / "eval" / "report.png").stat().st_size > 10_000

    source = files[3]
    inputs = real_folder([source], tmp_path / "infer_in", link=True)
    overrides = {
        "input_dir": inputs,
        "output_dir": out,
        "ckpt_path": out / "models" / "model.pt",
        "roi_size": [32, 32, 32],
        **TINY,
    }
    run_bundle(BUNDLE, ["inference.json", VQVAE_3D], overrides)
    stem = source.name[: -len(".nii.gz")]
    ref = nib.load(source)
    recon = nib.load(out / "inference" / f"{stem}_recon.nii.gz")
    codes = nib.load(out / "inference" / f"{stem}_codes.nii.gz")
    assert recon.shape == ref.shape
    np.testing.assert_allclose(recon.affine, ref.affine, atol=1e-4)
    values = np.asarray(recon.dataobj)
    ref_values = np.asarray(ref.dataobj)
    assert np.isfinite(values).all() and values.std() > 0
    assert ref_values.min() - 1e-3 <= values.min() and values.max() <= ref_values.max() + 1e-3
    assert codes.shape == (10, 10, 10)  # the 40^3 network grid at downsampling factor 4
    codes_values = np.asarray(codes.dataobj)
    assert codes_values.min() >= 0 and codes_values.max() < TINY["num_embeddings"]
    np.testing.assert_allclose(_world_box(codes), _world_box(ref), atol=1e-3)


@TRAINED
def test_model_zoo_checks(trained, tmp_path):
    """``verify_net_in_out`` and a script-mode ``ckpt_export`` of the trained checkpoint; the TorchScript module
    reconstructs a volume exactly as the eager network does."""
    _, out, _ = trained
    tiny = {k: v for k, v in TINY.items() if k != "spatial_size"}
    meta, inference = config_paths(BUNDLE, ["metadata.json", "inference.json"])
    files = {"meta_file": meta, "config_file": [inference, *config_paths(BUNDLE, [VQVAE_3D])]}
    volumes = {f"_meta_#network_data_format#{k}#spatial_shape": ["*"] * 3 for k in ("inputs#image", "outputs#pred")}
    monai.bundle.verify_net_in_out("network_def", **files, **tiny, **volumes)
    ts = tmp_path / "model.ts"
    ckpt = out / "models" / "model.pt"
    monai.bundle.ckpt_export("network_def", filepath=str(ts), ckpt_file=str(ckpt), **files, **tiny)
    exported = torch.jit.load(str(ts))
    eager = bundle_network(BUNDLE, tiny, ckpt, config=["inference.json", VQVAE_3D])
    x = torch.rand(1, 1, 24, 20, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(x)
        assert expected.shape == x.shape
        torch.testing.assert_close(exported(x), expected)


def test_subpixel_decoder_has_no_checkerboard_at_init():
    """Constant latents decode to a constant volume (away from the zero-padded border) with the bundle's
    sub-pixel decoder, whereas a transposed-convolution decoder shows a checkerboard."""
    parser = ConfigParser()
    parser.read_config(config_paths(BUNDLE, ["train.json", VQVAE_3D]))
    parser["network_def"]["model"]["channels"] = [16, 32]
    parser["network_def"]["model"]["res_channels"] = [8, 16]
    model = parser.get_parsed_content("network_def#model")
    assert isinstance(model, VQVAE) and model.spatial_dims == 3
    transposed = VQVAE(3, 1, channels=(16, 32), res_channels=(8, 16), embedding_dim=32, upsample_mode="transposed")

    def interior_spread(net: VQVAE) -> float:
        torch.manual_seed(0)
        z = torch.full((1, net.embedding_dim, 20, 20, 20), 0.5)
        with torch.no_grad():
            y = net.eval().decode(z)
        assert y.shape == (1, 1, 80, 80, 80)
        # zero padding reaches 4 latent voxels (16 output voxels) in at the first level, 3 x 2 at the second, 1 last
        inner = y[..., 24:-24, 24:-24, 24:-24]
        return float((inner.max() - inner.min()) / (y.abs().max() + 1e-12))

    assert interior_spread(model) < 1e-5
    assert interior_spread(transposed) > 1e-3


def test_sliding_window_step_covers_the_volume():
    """Windows smaller than the volume reconstruct every voxel, and the code map is that of the whole volume."""
    torch.manual_seed(0)
    model = VQVAE(3, 1, channels=(8, 16), res_channels=(8, 8), num_embeddings=16, embedding_dim=8).eval()
    network = ReconstructionNetwork(model)

    class _Engine:
        amp = False
        non_blocking = False
        amp_kwargs: dict = {}
        inferer = make_inferer(roi_size=(16, 16, 16), overlap=0.5, mode="gaussian")

        class state:  # noqa: N801
            device = torch.device("cpu")

        def fire_event(self, event):
            pass

    engine = _Engine()
    engine.network = network
    x = torch.rand(1, 1, 24, 28, 20)
    out = SlidingWindowReconstructionStep()(engine, {"image": x})
    assert out["pred"].shape == x.shape
    assert 0.0 <= float(out["pred"].min()) and float(out["pred"].max()) <= 1.0
    with torch.no_grad():
        whole = network(x).clamp(0, 1)
    # the blended windows differ from one pass over the volume, but only by the windows' border effects
    assert float((out["pred"] - whole).abs().mean()) < 0.5 * float(whole.abs().mean())
    torch.testing.assert_close(out["indices"][0], model.encode_to_indices(x))
    assert out["indices"][0].shape == (1, 6, 7, 5)


def _second_channel(src: Path, dst: Path) -> Path:
    """A second 'modality' on the grid of ``src``: its square root, saved with the same affine."""
    img = nib.load(src)
    data = np.sqrt(np.asarray(img.get_fdata(dtype=np.float32)))
    nib.save(nib.Nifti1Image(data, img.affine), dst)
    return dst


def test_multichannel_items_are_checked(tmp_path, ixi_files):
    a, b = ixi_files(2)
    a2 = _second_channel(a, tmp_path / "a_sqrt.nii.gz")
    report = check_volume_datalist([{"image": [str(a), str(a2)]}, {"image": str(b)}], channels=2, skip_bad=True)
    # the single-channel item cannot give 2 channels; the two-file item can
    assert [item["image"] for item in report.items] == [[str(a), str(a2)]] and report.n_skipped == 1
    with pytest.raises(DataError, match="different affines"):
        check_volume_datalist([{"image": [str(a), str(b)]}], channels=2)
    with pytest.raises(DataError, match="3 channels"):
        check_volume_datalist([{"image": [str(a), str(a2), str(a)]}], channels=2)


@pytest.mark.slow
def test_train_multichannel_dataset_json(tmp_path, ixi_files):
    files = ixi_files(3)
    items = []
    for f in files:
        extra = _second_channel(f, tmp_path / f"{f.name[: -len('.nii.gz')]}_sqrt.nii.gz")
        items.append({"image": [os.path.relpath(f, tmp_path), extra.name]})
    datalist = {"training": [items[0]], "validation": [items[1]], "test": [items[2]]}
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    out = tmp_path / "out"
    overrides = {**TINY, "dataset_dir": tmp_path / "dataset.json", "output_dir": out, "in_channels": 2, "max_epochs": 1}
    overrides["spatial_size"] = [32, 32, 32]
    run_bundle(BUNDLE, ["train.json", VQVAE_3D], overrides)
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["model.encoder.layers.0.0.weight"].shape[1] == 2  # the first convolution reads two channels
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert any(h["phase"] == "validation" and np.isfinite(h["ssim"]) for h in history)


@pytest.mark.slow
def test_embedded_default_one_iteration(tmp_path):
    pytest.importorskip("nilearn")
    out = tmp_path / "out"
    overrides = {
        **TINY,
        "output_dir": out,
        "spatial_size": [32, 32, 32],
        "max_epochs": 1,
        "max_train_items": 1,
        "max_val_items": 1,
    }
    run_bundle(BUNDLE, ["train.json", VQVAE_3D], overrides)
    volumes = sorted((out / "cache" / "mni152_volumes").glob("mni152_aug*.nii.gz"))
    assert len(volumes) == 8
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history if h["phase"] == "train"] == [1]
    assert (out / "models" / "model.pt").is_file()
