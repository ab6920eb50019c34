"""The 2D VQ-VAE-2 bundle end to end through ``python -m monai.bundle``, on real IXI slices in the HIPMRI layout."""

from __future__ import annotations

import importlib.util
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import (
    REPO_ROOT,
    TINY_VQVAE2_2D,
    bundle_network,
    monai_bundle,
    read_metrics,
    reconstruction_metrics,
    run_bundle,
)
from PIL import Image

from vqvae_medical.data import build_datalist, image_transforms_2d

BUNDLE = "vqvae2"
K_TOP, K_BOTTOM = TINY_VQVAE2_2D["num_embeddings"]
# two iterations of two slices, validation on two slices
TINY = {**TINY_VQVAE2_2D, "batch_size": 2, "max_epochs": 1, "max_train_items": 4, "max_val_items": 2}

#: every test uses the module fixtures ``slices`` or ``trained``: one pytest-xdist worker (--dist loadgroup)
#: builds them once
pytestmark = pytest.mark.xdist_group("vqvae2_trained")


def _slicer():
    """``benchmarks/make_ixi_slices.py``, the script the benchmark data is made with."""
    spec = importlib.util.spec_from_file_location("make_ixi_slices", REPO_ROOT / "benchmarks" / "make_ixi_slices.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slices(tmp_path_factory, ixi_dir):
    """HIPMRI-like tree of 2D NIfTI axial slices of 5 IXI subjects: 3 train, 1 validate, 1 test (3 slices each)."""
    root = tmp_path_factory.mktemp("ixi_slices")
    splits = _slicer().make_slices(ixi_dir, root, n_test=1, n_val=1, seed=0, max_subjects=5, stride=20)
    return root, splits


@pytest.fixture(scope="module")
def trained(slices, tmp_path_factory):
    root, _ = slices
    out = tmp_path_factory.mktemp("out")
    proc = run_bundle(BUNDLE, ["train.json"], {**TINY, "dataset_dir": root, "output_dir": out})
    return root, out, proc


def test_slices_split_by_subject_in_hipmri_layout(slices, ixi_dir):
    root, splits = slices
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "keras_slices_test",
        "keras_slices_train",
        "keras_slices_validate",
    ]
    datalist = build_datalist(root)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 9, "validation": 3, "test": 3}
    subjects = {k: {item["subject"] for item in v} for k, v in datalist.items()}
    assert subjects == {k: set(v) for k, v in splits.items()}
    assert not (subjects["training"] & subjects["test"]) and not (subjects["training"] & subjects["validation"])
    # every slice is 2D and its affine points at the source voxels it was cut from
    item = datalist["test"][1]
    image = nib.load(item["image"])
    assert image.shape == (120, 96)
    source = nib.load(next((ixi_dir / "t1").glob(f"{item['subject']}-*_T1.nii.gz")))
    volume = source.get_fdata()
    data = image.get_fdata()
    rows, cols = np.nonzero(data > 0.2 * data.max())
    to_source = np.linalg.inv(source.affine) @ image.affine
    for r, c in list(zip(rows, cols, strict=True))[:: max(1, len(rows) // 25)]:
        voxel = np.round(to_source @ [r, c, 0, 1]).astype(int)[:3]
        assert np.isclose(data[r, c], volume[tuple(voxel)], rtol=1e-5), (r, c, voxel)
    # an axial slice: the slice normal is the superior axis of the scanner
    normal = np.cross(image.affine[:3, 0], image.affine[:3, 1])
    assert abs(normal[2]) > 0.99 * np.linalg.norm(normal)
    loaded = image_transforms_2d(channels=1)({"image": item["image"]})["image"]
    assert tuple(loaded.shape) == (1, 120, 96)
    assert float(loaded.min()) == 0.0 and float(loaded.max()) == 1.0


def test_train_logs_both_code_levels(trained):
    _, out, proc = trained
    assert (out / "models" / "model.pt").is_file()
    assert (out / "models" / "checkpoint_epoch=1.pt").is_file()
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    train = [r for r in history if r["phase"] == "train"]
    validation = [r for r in history if r["phase"] == "validation"]
    assert len(train) == 1 and train[0]["iteration"] == 2
    assert {"perplexity_top", "perplexity_bottom", "usage_top", "usage_bottom"} <= set(train[0])
    assert {"ssim", "codebook_usage_top", "codebook_usage_bottom", "perplexity_top", "perplexity_bottom"} <= set(
        validation[0]
    )
    assert "Epoch[1] Metrics" in proc.stdout + proc.stderr


def test_same_seed_same_weights(trained, tmp_path):
    root, out, _ = trained
    again = tmp_path / "again"
    run_bundle(BUNDLE, ["train.json"], {**TINY, "dataset_dir": root, "output_dir": again})
    first = torch.load(out / "models" / "model.pt", weights_only=True)
    second = torch.load(again / "models" / "model.pt", weights_only=True)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_evaluate_reports_each_level(trained):
    root, out, _ = trained
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], {**TINY, "dataset_dir": root, "output_dir": out})
    metrics = read_metrics(out)
    levels = {"top": K_TOP, "bottom": K_BOTTOM}
    expected = {"ssim", "psnr", "mse", "n_images"} | {
        f"{m}_{lv}" for m in ("codebook_usage", "perplexity") for lv in levels
    }
    assert set(metrics) >= expected
    assert "codebook_usage" not in metrics and "perplexity" not in metrics
    assert metrics["n_images"] == 3  # every slice of the test subject
    recomputed = reconstruction_metrics(
        BUNDLE, {**TINY, "dataset_dir": root, "output_dir": out}, out / "models" / "model.pt"
    )
    for key in ("ssim", "psnr", "mse"):
        assert metrics[key] == pytest.approx(recomputed[key], rel=1e-4), key
    for level in levels:
        # each level's code statistics against the histogram of its codes on the test split, counted here
        assert metrics[f"codebook_usage_{level}"] == pytest.approx(recomputed[f"codebook_usage_{level}"]), level
        assert metrics[f"perplexity_{level}"] == pytest.approx(recomputed[f"perplexity_{level}"], rel=1e-5), level
    report = Image.open(out / "eval" / "report.png")
    # rows of input | top codes | bottom codes | reconstruction | |error|: wider than the 2D bundle's four columns
    assert report.size[0] >= 5 * 2.6 * 90 - 10 and report.size[1] > 400


def test_inference_nifti_keeps_shape_and_affine(trained, tmp_path):
    root, out, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    inputs = sorted((root / "keras_slices_test").glob("*.nii.gz"))[:2]
    for f in inputs:
        (src / f.name).write_bytes(f.read_bytes())
    result = tmp_path / "result"
    run_bundle(
        BUNDLE,
        ["inference.json"],
        {**TINY_VQVAE2_2D, "input_dir": src, "output_dir": result, "ckpt_path": out / "models" / "model.pt"},
    )
    for f in inputs:
        stem = f.name[: -len(".nii.gz")]
        source = nib.load(f)
        recon = nib.load(result / "inference" / f"{stem}_recon.nii.gz")
        assert recon.shape == source.shape
        np.testing.assert_allclose(recon.affine, source.affine, atol=1e-4)
        values = recon.get_fdata()
        assert np.isfinite(values).all() and values.std() > 0
        for level, k, factor in (("top", K_TOP, 8), ("bottom", K_BOTTOM, 4)):
            codes = nib.load(result / "inference" / f"{stem}_codes_{level}.nii.gz")
            assert codes.shape == (source.shape[0] // factor, source.shape[1] // factor)
            c = np.asarray(codes.dataobj)
            assert c.min() >= 0 and c.max() < k
            # the code grid covers the slice: its voxel size is the slice's times the downsampling factor
            np.testing.assert_allclose(codes.header.get_zooms()[:2], np.array(source.header.get_zooms()[:2]) * factor)


def test_model_zoo_checks(trained, tmp_path):
    _, out, _ = trained
    args = ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    monai_bundle(BUNDLE, "verify_net_in_out", ["network_def", *args], TINY_VQVAE2_2D)
    ts = tmp_path / "model.ts"
    monai_bundle(
        BUNDLE,
        "ckpt_export",
        ["network_def", "--filepath", str(ts), "--ckpt_file", str(out / "models" / "model.pt"), *args],
        TINY_VQVAE2_2D,
    )
    exported = torch.jit.load(str(ts))
    x = torch.rand(1, 1, 120, 96)
    assert exported(x).shape == x.shape
    # the TorchScript (script mode) module reconstructs exactly as the eager network
    eager = bundle_network(BUNDLE, TINY_VQVAE2_2D, out / "models" / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(x), eager(x))
