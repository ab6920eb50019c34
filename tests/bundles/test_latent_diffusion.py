"""The latent diffusion bundle end to end on real images: a tiny VQ-VAE trained inside the test (the vqvae
bundle, in this process), then diffusion train -> inference -> evaluate through ``python -m monai.bundle`` (2D brain
slices, 3D IXI volumes), plus in-process runs of the same configs for the checks that need the objects (frozen
codebook, resume, classes)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import (
    BUNDLES,
    bundle_network,
    monai_bundle,
    read_metrics,
    real_diversity,
    real_test_images,
    run_bundle,
    run_bundle_in_process,
)
from monai.bundle import ConfigParser
from monai.networks.nets import DiffusionModelUNet
from PIL import Image
from tiny import TINY_DIFFUSION, TINY_VQVAE
from tiny_stage2 import train_steps

from vqvae_medical.data import volume_transforms_3d
from vqvae_medical.networks import VQVAE, ReconstructionNetwork
from vqvae_medical.stages.autoencoder.record import (
    data_settings,
    state_fingerprint,
    write_record,
)
from vqvae_medical.stages.diffusion.evaluation import evaluate_samples
from vqvae_medical.stages.diffusion.latents import LatentSet
from vqvae_medical.stages.diffusion.network import PREDICTION_TYPES
from vqvae_medical.stages.diffusion.sampling import LatentSampler
from vqvae_medical.stages.frozen import load_autoencoder
from vqvae_medical.training.checkpoints import ResumeFromCheckpoint
from vqvae_medical.utils.io import atomic_save, safe_load

BUNDLE = "latent_diffusion"
SIZE_2D = [96, 80]  # centre crop of the 208 x 176 slices: latents 24 x 20
SIZE_3D = [32, 32, 32]
TINY = {**TINY_DIFFUSION, "num_inference_steps": 4}  # the UNet takes the 8 latent channels
TRAIN = {
    "batch_size": 4,
    "max_epochs": 1,
    "sample_interval": 1,
    "n_monitor_samples": 2,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
}

#: the tests that use ``brain_2d`` (and ``trained_2d``) run on one pytest-xdist worker (--dist loadgroup): built once
BRAIN_2D = pytest.mark.xdist_group("latent_diffusion_brain_2d")


def _parse(configs: list[str], overrides: dict) -> ConfigParser:
    """The bundle's configs parsed in this process, as ``monai.bundle run`` would with these overrides."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / BUNDLE / "configs" / c) for c in configs])
    parser.update(
        {
            "bundle_root": str(BUNDLES / BUNDLE),
            **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()},
        }
    )
    parser.get_parsed_content("initialize")
    return parser


@pytest.fixture(scope="module")
def brain_2d(tmp_path_factory, brain_dir):
    """12 real brain slices and a tiny VQ-VAE trained on them by the vqvae bundle (in this process: its command
    line is tested in ``test_bundle_vqvae.py``)."""
    data = tmp_path_factory.mktemp("slices")
    for f in sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:12]:
        shutil.copy(f, data / f.name.replace(" ", "_"))
    vq_out = tmp_path_factory.mktemp("vqvae")
    vq = {**TINY_VQVAE, "batch_size": 4, "max_epochs": 1, "spatial_size": SIZE_2D}
    run_bundle_in_process(
        "vqvae",
        ["train.json"],
        {
            **vq,
            "dataset_dir": data,
            "output_dir": vq_out,
            "data_layout": "folder",
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
    )
    assert (vq_out / "models" / "model.pt").is_file()
    # the data set, its split and the preprocessing (96 x 80) come from the VQ-VAE's record
    common = {**TINY, "autoencoder_dir": vq_out}
    return data, vq_out, common


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory, brain_2d):
    _, ckpt, common = brain_2d
    out = tmp_path_factory.mktemp("ldm2d")
    proc = run_bundle(BUNDLE, ["train.json"], {**common, **TRAIN, "output_dir": out})
    return out, proc


@BRAIN_2D
def test_train_2d_writes_model_checkpoint_logs_and_samples(trained_2d):
    out, proc = trained_2d
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "checkpoint_epoch=1.pt").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert Image.open(out / "logs" / "samples_epoch=1.png").size[0] > 100
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in history} == {"train", "validation"}
    assert "val_loss" in history[-1] or "val_loss" in history[-2]
    assert "Epoch[1] Metrics -- val_loss" in proc.stdout + proc.stderr


@BRAIN_2D
def test_scale_factor_is_inverse_std_of_training_latents_and_stored(trained_2d):
    out, _ = trained_2d
    cache = out / "cache" / "latents_training.pt"
    latents = LatentSet.load(cache)
    assert latents.latent_shape == [8, SIZE_2D[0] // 4, SIZE_2D[1] // 4]
    expected = 1.0 / latents.latents.double().std().item()
    generator = safe_load(out / "models" / "model.pt")
    diffusion = {k[len("diffusion.") :]: v for k, v in generator.items() if k.startswith("diffusion.")}
    checkpoint = safe_load(out / "models" / "checkpoint_epoch=1.pt")
    for state in (diffusion, checkpoint["model"], checkpoint["ema"]):
        assert float(state["scale_factor"]) == pytest.approx(expected, rel=1e-6)
        assert state["latent_shape"].tolist() == latents.latent_shape
        assert state["image_size"].tolist() == SIZE_2D


@BRAIN_2D
def test_model_pt_is_the_generator_with_the_averaged_weights_and_the_frozen_decoder(trained_2d, brain_2d):
    """models/model.pt = generator state: ``diffusion.*`` are the EMA weights of the checkpoint (not the raw
    weights), ``decoder.*`` / ``quantizer.*`` the VQ-VAE's own decoder and codebook."""
    out, _ = trained_2d
    _, vq_out, _ = brain_2d
    generator = safe_load(out / "models" / "model.pt")
    assert {k.split(".")[0] for k in generator} == {"diffusion", "decoder", "quantizer"}
    checkpoint = safe_load(out / "models" / "checkpoint_epoch=1.pt")
    ema, raw = checkpoint["ema"], checkpoint["model"]
    assert set(ema) == set(raw) == {k[len("diffusion.") :] for k in generator if k.startswith("diffusion.")}
    for key, value in ema.items():
        assert torch.equal(generator[f"diffusion.{key}"], value), key
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("unet."))
    vqvae = {k[len("model.") :]: v for k, v in safe_load(vq_out / "models" / "model.pt").items()}
    for key in (k for k in generator if k.split(".")[0] in ("decoder", "quantizer")):
        assert torch.equal(generator[key], vqvae[key]), key


@BRAIN_2D
def test_inference_2d_writes_png_samples(trained_2d, brain_2d, tmp_path):
    """inference.json needs only models/model.pt (the VQ-VAE decoder is in it); its inferer writes the samples."""
    out, _ = trained_2d
    _, vq_out, _ = brain_2d
    result = tmp_path / "result"
    run_bundle(
        BUNDLE,
        ["inference.json"],
        {
            **TINY,
            "ckpt_path": out / "models" / "model.pt",
            "autoencoder_dir": vq_out,
            "output_dir": result,
            "n_samples": 3,
        },
    )
    files = sorted((result / "inference").glob("sample_*.png"))
    assert len(files) == 3
    for f in files:
        img = Image.open(f)
        assert img.size == (SIZE_2D[1], SIZE_2D[0]) and img.mode == "L"
    assert Image.open(result / "inference" / "samples.png").size[0] > 100
    info = json.loads((result / "inference" / "sampling.json").read_text())
    assert info["num_inference_steps"] == 4 and info["scheduler"] == "DDIMScheduler"
    assert info["seconds_per_sample"] > 0 and info["latent_shape"] == [8, 24, 20]


@BRAIN_2D
def test_rflow_overlay_trains_and_samples_a_rectified_flow(brain_2d, tmp_path):
    """configs/rflow.json: the UNet learns the rectified-flow velocity (MONAI's RFlowScheduler) and inference samples
    it in Euler steps; inference without the overlay stops with one line naming it."""
    _, vq_out, common = brain_2d
    out = tmp_path / "flow"
    run_bundle(BUNDLE, ["train.json", "rflow.json"], {**common, **TRAIN, "sample_interval": 0, "output_dir": out})
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert int(state["diffusion.prediction_code"]) == PREDICTION_TYPES.index("flow")
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert math.isfinite(history[-1].get("val_loss", history[-2].get("val_loss", float("nan"))))
    inference = {**TINY, "ckpt_path": out / "models" / "model.pt", "autoencoder_dir": vq_out, "n_samples": 2}
    run_bundle(BUNDLE, ["inference.json", "rflow.json"], {**inference, "output_dir": tmp_path / "samples"})
    info = json.loads((tmp_path / "samples" / "inference" / "sampling.json").read_text())
    assert info["scheduler"] == "RFlowScheduler" and info["num_inference_steps"] == 4
    assert len(list((tmp_path / "samples" / "inference").glob("sample_*.png"))) == 2
    proc = run_bundle(BUNDLE, ["inference.json"], {**inference, "output_dir": tmp_path / "ddim"}, expect_ok=False)
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("ERROR (SettingError):") and "add configs/rflow.json" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@BRAIN_2D
def test_evaluate_2d_writes_sample_quality_diversity_and_mmd(trained_2d, brain_2d):
    out, _ = trained_2d
    _, vq_out, common = brain_2d
    proc = run_bundle(BUNDLE, ["train.json", "evaluate.json"], {**common, **TRAIN, "output_dir": out, "n_samples": 4})
    metrics = read_metrics(out)
    # the whole (tiny) test split is the real set: 12 slices, val and test fractions 0.2
    assert metrics["n_samples"] == metrics["n_generated"] == 4 and 2 <= metrics["n_real"] <= 3
    assert metrics["scheduler"] == "DDIMScheduler" and metrics["num_inference_steps"] == 4  # how they were drawn
    real = real_test_images(vq_out, out / "cache")
    assert len(real) == metrics["n_real"]
    assert metrics["ms_ssim_diversity_real"] == pytest.approx(real_diversity(real, metrics), rel=1e-5)
    ratio = metrics["ms_ssim_diversity_samples"] / metrics["ms_ssim_diversity_real"]
    assert metrics["ms_ssim_diversity_ratio"] == pytest.approx(ratio)
    assert np.isfinite(metrics["mmd"]) and "mmd_real_reference" in metrics
    assert metrics["ms_ssim_kernel_size"] == 5  # fitted to the 96 x 80 images
    # too few images for the classifier two-sample test: null, the reason, one warning
    assert metrics["c2st_accuracy"] is None and metrics["c2st_power_blurred_real"] is None
    assert metrics["c2st_n_per_set"] is None and "at least 64 real and 64 generated" in metrics["c2st_skipped"]
    assert (proc.stdout + proc.stderr).count("no two-sample test") == 1
    assert metrics["cpu_seconds_per_sample"] > 0 and metrics["seconds_per_sample"] > 0
    assert (out / "eval" / "samples_vs_real.png").is_file()


def test_model_zoo_verify_net_in_out(tmp_path):
    """The generator takes one tensor (latent noise) and returns images of the VQ-VAE's channels. The autoencoder
    folder is an empty one of this test (no record: the configs' default architecture), not the default
    ``../vqvae``, where a user's trained run may be (issue #31)."""
    args = ["network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    overrides = {**TINY, "autoencoder_dir": tmp_path, "_meta_#network_data_format#inputs#image#num_channels": 8}
    proc = monai_bundle(BUNDLE, "verify_net_in_out", args, overrides)
    assert "verified with no error" in proc.stdout + proc.stderr


@BRAIN_2D
def test_model_zoo_ckpt_export_torchscript_equals_eager(trained_2d, brain_2d, tmp_path):
    """``ckpt_export`` compiles the trained generator (``network_def``: the DDIM loop, the UNet and the VQ-VAE
    decoder) in TorchScript script mode; the exported module turns noise into the same images as the eager one
    and as the bundle's sampler, and carries the buffers sampling needs."""
    out, _ = trained_2d
    _, vq_out, _ = brain_2d
    tiny = {**TINY, "autoencoder_dir": str(vq_out)}  # the generator's VQ-VAE architecture comes from the record
    ckpt = out / "models" / "model.pt"
    configs = BUNDLES / BUNDLE / "configs"
    files = {"meta_file": str(configs / "metadata.json"), "config_file": str(configs / "inference.json")}
    ts = tmp_path / "model.ts"
    monai.bundle.ckpt_export("network_def", filepath=str(ts), ckpt_file=str(ckpt), **files, **tiny)
    exported = torch.jit.load(str(ts))
    eager = bundle_network(BUNDLE, tiny, ckpt)
    assert type(eager.diffusion.unet) is DiffusionModelUNet  # scripting compiles a copy; the eager network stays
    noise = torch.randn(2, 8, SIZE_2D[0] // 4, SIZE_2D[1] // 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = eager(noise)
        torch.testing.assert_close(exported(noise), images, rtol=0, atol=0)
    assert list(images.shape) == [2, 1, *SIZE_2D] and 0.0 <= float(images.min()) < float(images.max()) <= 1.0
    sampler = LatentSampler(eager, batch_size=1)
    torch.testing.assert_close(sampler(noise), images, rtol=0, atol=0)
    for name in ("scale_factor", "latent_shape", "image_size", "prediction_code"):
        assert torch.equal(getattr(exported.diffusion, name), getattr(eager.diffusion, name)), name


@BRAIN_2D
def test_vqvae_frozen_bit_identical_and_resume(brain_2d, tmp_path):
    """Diffusion training with the encoder running every iteration (no latent cache, augmentation on) leaves the
    VQ-VAE (codebook included) bit-identical to its checkpoint; a second run resumes with the same scale factor."""
    _, vq_out, common = brain_2d
    overrides = {
        **common,
        **TRAIN,
        "output_dir": tmp_path,
        "cache_latents": False,
        "augment": True,
        "sample_interval": 0,
    }
    reference = state_fingerprint(load_autoencoder(vq_out).autoencoder)
    parser = _parse(["train.json"], overrides)
    autoencoder = parser.get_parsed_content("autoencoder")
    assert state_fingerprint(autoencoder.autoencoder) == reference
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert trainer.state.iteration >= 2
    assert state_fingerprint(autoencoder.autoencoder) == reference
    assert not any(m.training for m in autoencoder.modules())
    assert not any(p.requires_grad for p in autoencoder.parameters())
    scale = float(parser.get_parsed_content("network_def").scale_factor)

    parser = _parse(["train.json"], {**overrides, "max_epochs": 2})
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    resume = next(h for h in parser.get_parsed_content("train#handlers") if isinstance(h, ResumeFromCheckpoint))
    assert resume.loaded_from is not None and resume.loaded_from.name == "checkpoint_epoch=1.pt"
    assert trainer.state.epoch == 2 and (tmp_path / "models" / "checkpoint_epoch=2.pt").is_file()
    assert float(parser.get_parsed_content("network_def").scale_factor) == pytest.approx(scale, rel=1e-7)
    ema = parser.get_parsed_content("train#ema")
    assert trainer.state.ema_momentum == pytest.approx(ema.momentum_at(trainer.state.iteration))
    assert state_fingerprint(parser.get_parsed_content("autoencoder").autoencoder) == reference


@BRAIN_2D
def test_class_conditioned_training_and_sampling(brain_dir, brain_2d, tmp_path):
    """AD/NC-style class folders -> labels -> the UNet's class embedding; samples are drawn per class."""
    _, _, common = brain_2d
    root = tmp_path / "AD_NC"
    for split, offset in (("train", 0), ("test", 6)):
        for cls, folder in (("AD", "MildDemented"), ("NC", "NonDemented")):
            (root / split / cls).mkdir(parents=True)
            n = 12 if (split, cls) == ("test", "AD") else 6
            for f in sorted((brain_dir / "Test" / folder).glob("*.jpg"))[offset : offset + n]:
                shutil.copy(f, root / split / cls / f.name.replace(" ", "_"))
    overrides = {
        **common,
        **TRAIN,
        "dataset_dir": root,
        "data_layout": "class",
        "num_class_embeds": 2,
        "output_dir": tmp_path / "out",
        "sample_interval": 0,
    }
    parser = _parse(["train.json"], overrides)
    latents = parser.get_parsed_content("latents")
    assert latents.labels is not None and set(latents.labels.tolist()) == {0, 1}
    parser.get_parsed_content("train#trainer").run()
    images, labels = parser.get_parsed_content("sampler").sample(4, seed=0)
    assert labels.tolist() == [0, 1, 0, 1] and list(images.shape) == [4, 1, *SIZE_2D]
    images, labels = parser.get_parsed_content("sampler").sample(2, class_label=1, seed=0)
    assert labels.tolist() == [1, 1]
    # the evaluate samples the classes in proportion to the test split's labels (12 AD, 6 NC test slices here)
    test = parser.get_parsed_content("datalist")["test"]
    sampler, preprocessing = parser.get_parsed_content("sampler"), parser.get_parsed_content("autoencoder").transforms()
    metrics = evaluate_samples(sampler, test, preprocessing, tmp_path / "eval", n_samples=6, power_check=False)
    assert metrics["samples_per_class"] == {"0": 4, "1": 2} and metrics["c2st_accuracy"] is None


@pytest.fixture(scope="module")
def ixi_3d(tmp_path_factory, ixi_dir):
    """7 IXI volumes and a tiny 3D VQ-VAE trained on four of them in this process (any 3D VQ-VAE checkpoint fits)."""
    data = tmp_path_factory.mktemp("ixi")
    files = sorted((ixi_dir / "t1").glob("*.nii.gz"))[:7]
    for f in files:
        shutil.copy(f, data / f.name)
    transform = volume_transforms_3d(spatial_size=SIZE_3D)
    volumes = torch.stack([transform({"image": str(f)})["image"].as_tensor() for f in files[:4]])
    torch.manual_seed(0)
    model = VQVAE(3, 1, channels=(8, 16), num_res_units=1, res_channels=(8, 8), num_embeddings=16, embedding_dim=8)
    network = ReconstructionNetwork(train_steps(model, volumes))
    ckpt = atomic_save(network.state_dict(), data.parent / "vqvae3d" / "models" / "model.pt")
    preprocessing = {"transforms": "volume_transforms_3d", "channels": 1, "spatial_size": SIZE_3D}
    write_record(ckpt, network, preprocessing, data_settings(data), SIZE_3D)
    common = {**TINY, "autoencoder_dir": ckpt.parent.parent}
    return data, ckpt.parent.parent, common


def test_3d_train_inference_evaluate(ixi_3d, tmp_path):
    _, vq_out, common = ixi_3d
    out = tmp_path / "out"
    train = {
        **common,
        "batch_size": 2,
        "max_epochs": 1,
        "sample_interval": 1,
        "n_monitor_samples": 1,
        "val_fraction": 0.15,
        "test_fraction": 0.3,
        "output_dir": out,
    }
    run_bundle(BUNDLE, ["train.json", "3d.json"], train)
    assert (out / "models" / "model.pt").is_file() and (out / "logs" / "samples_epoch=1.png").is_file()
    state = safe_load(out / "models" / "model.pt")
    assert (
        state["diffusion.latent_shape"].tolist() == [8, 8, 8, 8] and state["diffusion.image_size"].tolist() == SIZE_3D
    )

    result = tmp_path / "result"
    run_bundle(
        BUNDLE,
        ["inference.json", "3d.json"],
        {
            **TINY,
            "ckpt_path": out / "models" / "model.pt",
            "autoencoder_dir": vq_out,
            "output_dir": result,
            "n_samples": 2,
            "voxel_size": 2.0,
        },
    )
    files = sorted((result / "inference").glob("sample_*.nii.gz"))
    assert len(files) == 2
    img = nib.load(files[0])
    assert img.shape == tuple(SIZE_3D) and np.allclose(np.diag(img.affine)[:3], 2.0)
    assert (result / "inference" / "samples.png").is_file()

    run_bundle(BUNDLE, ["train.json", "3d.json", "evaluate.json"], {**train, "n_samples": 2})
    metrics = read_metrics(out)
    assert metrics["n_samples"] == 2 and metrics["n_real"] == 2 and metrics["c2st_accuracy"] is None
    real = real_test_images(vq_out, tmp_path / "cache", val_fraction=0.15, test_fraction=0.3)
    assert len(real) == 2
    assert metrics["ms_ssim_diversity_real"] == pytest.approx(real_diversity(real, metrics), rel=1e-5)
    ratio = metrics["ms_ssim_diversity_samples"] / metrics["ms_ssim_diversity_real"]
    assert metrics["ms_ssim_diversity_ratio"] == pytest.approx(ratio)
    assert (metrics["ms_ssim_kernel_size"], len(metrics["ms_ssim_weights"])) == (3, 4)


@BRAIN_2D
def test_reconstruction_floor_decodes_as_the_stage_1_network(brain_2d, tmp_path):
    """``benchmarks/reconstruction_floor.py`` (the lowest ``c2st_accuracy`` a generator decoding through a stage-1
    model can reach, docs/benchmarks.md) scores exactly what the VQ-VAE reconstructs: its ``reconstruct`` through
    the frozen autoencoder (encode, snap to the codebook, decode, clip) equals the network's own forward pass."""
    from benchmarks.reconstruction_floor import reconstruct
    from vqvae_medical.data.lists import section
    from vqvae_medical.evaluation.sample_report import load_real_images

    _, vq_out, _ = brain_2d
    autoencoder = load_autoencoder(vq_out, latent="encoder", snap_to_codebook=True)
    test = section(autoencoder.datalist(tmp_path), "test")
    real = load_real_images(test, autoencoder.transforms(), len(test))
    rebuilt = reconstruct(autoencoder, real, batch_size=2)
    with torch.no_grad():
        expected = autoencoder.autoencoder.eval()(real).reconstruction.clamp(0, 1)
    assert rebuilt.shape == real.shape and len(real) >= 2
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(rebuilt, real, atol=1e-2)  # a real reconstruction, not the input
