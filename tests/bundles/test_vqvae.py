"""The 2D VQ-VAE bundle end to end through ``python -m monai.bundle``, on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_runner import (
    TINY_VQVAE_2D,
    bundle_network,
    monai_bundle,
    read_metrics,
    reconstruction_metrics,
    run_bundle,
)
from PIL import Image

BUNDLE = "vqvae"
TINY = {**TINY_VQVAE_2D, "max_epochs": 1}
TINY_INFER = {k: v for k, v in TINY.items() if k not in ("batch_size", "max_epochs")}

#: the tests that use ``trained`` run on one pytest-xdist worker (--dist loadgroup): it is built once
TRAINED = pytest.mark.xdist_group("vqvae_trained")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, brain_files, real_folder):
    """A flat folder of 12 real brain slices, trained for one short epoch."""
    data = real_folder(brain_files(12), tmp_path_factory.mktemp("flat"))
    out = tmp_path_factory.mktemp("out")
    proc = run_bundle(
        BUNDLE,
        ["train.json"],
        {
            **TINY,
            "dataset_dir": data,
            "output_dir": out,
            "data_layout": "folder",
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
    )
    return data, out, proc


@TRAINED
def test_train_writes_model_logs_and_checkpoint(trained):
    _, out, proc = trained
    assert (out / "models" / "model.pt").is_file()
    assert (out / "models" / "checkpoint_epoch=1.pt").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "logs" / "training_curves.png").is_file()
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in history} == {"train", "validation"}
    assert "Epoch[1] Metrics" in proc.stdout + proc.stderr


@TRAINED
def test_evaluate_writes_metrics_and_report(trained):
    data, out, _ = trained
    run_bundle(
        BUNDLE,
        ["train.json", "evaluate.json"],
        {
            **TINY,
            "dataset_dir": data,
            "output_dir": out,
            "data_layout": "folder",
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
    )
    metrics = read_metrics(out)
    assert set(metrics) >= {"ssim", "psnr", "mse", "codebook_usage", "perplexity", "n_images"}
    assert metrics["n_images"] >= 2
    overrides = {
        **TINY,
        "dataset_dir": data,
        "output_dir": out,
        "data_layout": "folder",
        "val_fraction": 0.2,
        "test_fraction": 0.2,
    }
    recomputed = reconstruction_metrics(BUNDLE, overrides, out / "models" / "model.pt")
    for key in ("ssim", "psnr", "mse"):
        assert metrics[key] == pytest.approx(recomputed[key], rel=1e-4), key
    assert metrics["n_images"] == recomputed["n_images"]
    # the code statistics against the histogram of the test split's codes, counted here
    assert metrics["codebook_usage"] == pytest.approx(recomputed["codebook_usage"])
    assert metrics["perplexity"] == pytest.approx(recomputed["perplexity"], rel=1e-5)
    report = Image.open(out / "eval" / "report.png")
    assert report.size[0] > 400 and report.size[1] > 400


@TRAINED
def test_inference_same_size_and_format(trained, tmp_path, isic_dir):
    data, out, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    first = sorted(data.glob("*.jpg"))[0]
    shutil.copy(first, src / "slice.jpg")
    # an odd size that is not a multiple of the downsampling factor, saved as PNG
    grey = np.asarray(Image.open(first))[3:40, 5:58]
    Image.fromarray(grey).save(src / "odd.png")
    result = tmp_path / "result"
    run_bundle(
        BUNDLE,
        ["inference.json"],
        {**TINY_INFER, "input_dir": src, "output_dir": result, "ckpt_path": out / "models" / "model.pt"},
    )
    for name, size in (("slice", Image.open(first).size), ("odd", (53, 37))):
        recon = Image.open(result / "inference" / f"{name}_recon.png")
        assert recon.size == size and recon.mode == "L"
        codes = np.asarray(Image.open(result / "inference" / f"{name}_codes.png"))
        assert codes.max() < 16
        assert codes.shape == (-(-size[1] // 4), -(-size[0] // 4))


@TRAINED
def test_model_zoo_checks(trained, tmp_path):
    _, out, _ = trained
    args = ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    monai_bundle(BUNDLE, "verify_net_in_out", ["network_def", *args], TINY_INFER)
    ts = tmp_path / "model.ts"
    ckpt = out / "models" / "model.pt"
    monai_bundle(
        BUNDLE, "ckpt_export", ["network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), *args], TINY_INFER
    )
    assert ts.is_file() and ts.stat().st_size > 0
    # the TorchScript (script mode) module reconstructs exactly as the eager network
    exported = torch.jit.load(str(ts))
    eager = bundle_network(BUNDLE, TINY_INFER, ckpt)
    x = torch.rand(2, 1, 52, 44, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), eager(x))


@TRAINED
def test_resume_continues_from_last_checkpoint(trained, tmp_path):
    data, out, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    proc = run_bundle(
        BUNDLE,
        ["train.json"],
        {
            **TINY,
            "max_epochs": 2,
            "dataset_dir": data,
            "output_dir": resumed,
            "data_layout": "folder",
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
    )
    assert "resumed from" in proc.stdout + proc.stderr
    assert (resumed / "models" / "checkpoint_epoch=2.pt").is_file()
    train_epochs = [
        json.loads(x)["epoch"] for x in (resumed / "logs" / "history.jsonl").read_text().splitlines() if '"train"' in x
    ]
    assert train_epochs == [1, 2], train_epochs


def _split_tree(root: Path, files: list[Path]) -> Path:
    for i, split in enumerate(("train", "validate", "test")):
        d = root / f"keras_png_slices_{split}"
        d.mkdir(parents=True)
        for f in files[i * 2 : i * 2 + 2]:
            Image.open(f).save(d / (f.stem.replace(" ", "_") + ".png"))
    return root


def _class_tree(root: Path, files: list[Path]) -> Path:
    for i, split in enumerate(("train", "test")):
        for j, cls in enumerate(("AD", "NC")):
            d = root / "AD_NC" / split / cls
            d.mkdir(parents=True)
            for f in files[(i * 2 + j) * 2 : (i * 2 + j) * 2 + 2]:
                shutil.copy(f, d / f.name.replace(" ", "_"))
    return root / "AD_NC"


def _decathlon(root: Path, files: list[Path]) -> Path:
    sections = {"training": files[:3], "validation": files[3:5], "test": files[5:6]}
    spec = {k: [{"image": str(f)} for f in v] for k, v in sections.items()}
    path = root / "dataset.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("layout", ["split", "class", "decathlon"])
def test_each_datalist_layout_trains(layout, brain_files, tmp_path):
    files = brain_files(8)
    dataset = (
        {"split": _split_tree, "class": _class_tree, "decathlon": _decathlon}[layout](tmp_path / "data", files)
        if layout != "decathlon"
        else _decathlon(tmp_path, files)
    )
    overrides = {**TINY, "dataset_dir": dataset, "output_dir": tmp_path / "out"}
    if layout == "class":
        overrides["val_fraction"] = 0.25
    run_bundle(BUNDLE, ["train.json"], overrides)
    assert (tmp_path / "out" / "models" / "model.pt").is_file()


def test_rgb_photos(isic_folder, tmp_path):
    data = isic_folder(6, tmp_path / "isic")
    out = tmp_path / "out"
    overrides = {
        **TINY,
        "dataset_dir": data,
        "output_dir": out,
        "in_channels": 3,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "spatial_size": [64, 64],
    }
    run_bundle(BUNDLE, ["train.json"], overrides)
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], overrides)
    assert read_metrics(out)["n_images"] >= 1
    assert Image.open(out / "eval" / "report.png").mode in ("RGB", "RGBA")
