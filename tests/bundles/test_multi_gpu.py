"""``torchrun`` with two CPU processes (gloo) on every trainable bundle's ``multi_gpu_train.json``.

Each test trains a tiny network for a few iterations on real images, dumps every rank's final weights (a
``finalize`` override), checks they are identical on both ranks (codebooks included), and loads the checkpoint
rank 0 wrote in an ordinary single-process run of the bundle (``monai.bundle.run`` in this process: the command line
is tested elsewhere, the imports of one more process are saved).
"""

from __future__ import annotations

from pydoc import locate

import pytest
import torch
from bundle_runner import (
    BUNDLES,
    TINY_VQVAE2_2D,
    TINY_VQVAE_2D,
    bundle_network,
    read_metrics,
    run_bundle_in_process,
    torchrun_bundle,
)
from distributed_runs import DESTROY, DUMP, RANK_FILE, assert_same_weights, brain_run, rank_states
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from tiny import TINY_DIFFUSION, TINY_PRIOR, TINY_VQVAE_3D

from vqvae_medical.data import image_transforms_2d
from vqvae_medical.stages.autoencoder.record import data_settings, write_record
from vqvae_medical.stages.provenance import file_sha256
from vqvae_medical.utils.io import atomic_save

#: handlers that write files or logs: rank 0 only
WRITERS = {
    "CheckpointSaver",
    "BestModelSaver",
    "AutoencoderRecordWriter",
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "MetricsHistory",
    "ProgressBar",
    "PriorSampleWriter",
    "SampleGrid",
    "ModelWriter",
}
#: handlers every rank must run (same resume point, validation with reduced metrics, same schedule and stop)
EVERY_RANK = {
    "ResumeFromCheckpoint",
    "ResumeOrStartFresh",
    "LrScheduleHandler",
    "ValidationHandler",
    "CodebookMonitor",
    "TimeBudget",
    "FiniteLossGuard",
    "DiffusionEMA",
    "EMAHandler",
    "LatentDiffusionPrepareBatch",
}


def _handler_type(parser: ConfigParser, item) -> str:
    """Class name of a handler entry of a config (``{"_target_": ...}``, a reference ``"@id"`` to one, or
    ``{"_target_": "typing.cast", "val": "@id"}``: a handler defined elsewhere, in a dict as MONAI's
    ``check_properties`` wants every entry)."""
    while (
        isinstance(item, str) and item.startswith("@") or isinstance(item, dict) and item["_target_"] == "typing.cast"
    ):
        item = parser.get(item[1:]) if isinstance(item, str) else item["val"]
    return item["_target_"].split(".")[-1]


def _handler_class(parser: ConfigParser, item) -> type:
    """The class a handler entry of a config builds (MONAI's short names looked up as MONAI does)."""
    while (
        isinstance(item, str) and item.startswith("@") or isinstance(item, dict) and item["_target_"] == "typing.cast"
    ):
        item = parser.get(item[1:]) if isinstance(item, str) else item["val"]
    target = item["_target_"]
    if "." not in target:
        module = ComponentLocator().get_component_module_name(target)
        target = f"{module[0] if isinstance(module, list) else module}.{target}"
    return locate(target)


@pytest.mark.parametrize("bundle", ["vqvae", "vqvae_3d", "vqvae2", "pixelcnn_prior", "latent_diffusion"])
def test_ranks_other_than_zero_run_every_handler_but_the_writers(bundle):
    """``multi_gpu_train.json`` hands each engine the handlers of its rank, chosen by type (``handlers_of_rank``:
    all on rank 0, all but the writers on the others); this test fails when a handler of ``train.json``'s lists is
    a writer the selection keeps, or an every-rank handler it drops."""
    folder, overlay = ("vqvae", ["3d.json"]) if bundle == "vqvae_3d" else (bundle, [])  # the 3D overlay
    configs = BUNDLES / folder / "configs"
    parser = ConfigParser()
    parser.read_config([configs / c for c in ("train.json", "multi_gpu_train.json", *overlay)])
    for section, engine_key in (
        ("train", "train#trainer#train_handlers"),
        ("validate", "validate#evaluator#val_handlers"),
    ):
        entries = parser.get(f"{section}#handlers")
        handlers = [_handler_type(parser, h) for h in entries]
        unknown = set(handlers) - WRITERS - EVERY_RANK
        assert not unknown, f"{bundle}: say in this test whether {unknown} write files (rank 0 only) or not"
        engine = parser.get(engine_key)
        assert engine["handlers"] == f"@{section}#handlers" and engine["rank"] == "@rank", f"{bundle} {section}"
        select = locate(engine["_target_"])
        classes = [_handler_class(parser, h) for h in entries]
        assert select(classes, 0) == classes
        kept = [c.__name__ for c in select(classes, 1)]
        assert kept == [h for h in handlers if h not in WRITERS], f"{bundle} {section}"


def _tiny_vqvae_checkpoint(folder, images, overrides: dict):
    """A tiny vqvae network (built from that bundle's inference.json) whose EMA codebook is initialised from
    the encodings of ``images`` by one training-mode forward pass, saved as a stage-1 output folder (model.pt and
    its record, 32 x 32 images): a VQ-VAE for the prior and the diffusion bundles without a training run."""
    torch.manual_seed(0)
    net = bundle_network("vqvae", overrides)
    net.model.train()
    with torch.no_grad():
        net.model(images)
    assert bool(net.model.quantizer.initialized)
    path = atomic_save(net.state_dict(), folder / "models" / "model.pt")
    preprocessing = {"transforms": "image_transforms_2d", "channels": images.shape[1], "spatial_size": [32, 32]}
    write_record(path, net, preprocessing, data_settings(None), [32, 32])
    return folder


@pytest.mark.timeout(300)
def test_vqvae_two_processes(brain_slices, tmp_path):
    out = tmp_path / "out"
    overrides = brain_run(brain_slices, out, **TINY_VQVAE_2D, max_epochs=2)
    torchrun_bundle("vqvae", ["train.json", "multi_gpu_train.json"], {**overrides, "finalize": [DUMP, DESTROY]})

    rank0, rank1 = rank_states(out)
    for key in ("model.quantizer.codebook", "model.quantizer.cluster_size", "model.quantizer.embed_sum"):
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    assert_same_weights(rank0, rank1)
    assert rank0["model.quantizer.initialized"]
    # only rank 0 wrote checkpoints, and they load in a single-process run
    assert (out / "models" / "checkpoint_epoch=2.pt").is_file()
    run_bundle_in_process("vqvae", ["train.json", "evaluate.json"], overrides)
    assert (out / "eval" / "metrics.json").is_file()


@pytest.mark.timeout(300)
def test_vqvae_3d_two_processes(ixi_files, real_folder, tmp_path):
    """7 IXI volumes split by subject: 4 training (two iterations of one volume per rank), 2 validation (one per
    rank: the validation metrics are all-reduced over both ranks), 1 test."""
    data = real_folder(ixi_files(7), tmp_path / "ixi", link=True)
    out = tmp_path / "out"
    overrides = {
        **TINY_VQVAE_3D,
        "dataset_dir": data,
        "output_dir": out,
        "spatial_size": [32, 32, 32],
        "val_fraction": 0.3,
        "test_fraction": 0.15,
        "batch_size": 1,
        "max_epochs": 1,
    }
    proc = torchrun_bundle(
        "vqvae", ["train.json", "multi_gpu_train.json", "3d.json"], {**overrides, "finalize": [DUMP, DESTROY]}
    )

    rank0, rank1 = rank_states(out)
    assert_same_weights(rank0, rank1)
    assert rank0["model.quantizer.initialized"]
    assert "Epoch[1] Metrics" in proc.stdout + proc.stderr
    run_bundle_in_process("vqvae", ["train.json", "evaluate.json", "3d.json"], overrides)
    assert read_metrics(out)["n_images"] >= 1


@pytest.mark.timeout(300)
def test_vqvae2_two_processes(brain_slices, tmp_path):
    """VQ-VAE-2: both codebooks (top and bottom) are all-reduced, so every weight and buffer is equal on the ranks."""
    out = tmp_path / "out"
    overrides = brain_run(brain_slices, out, **TINY_VQVAE2_2D, batch_size=2, max_epochs=1)
    proc = torchrun_bundle("vqvae2", ["train.json", "multi_gpu_train.json"], {**overrides, "finalize": [DUMP, DESTROY]})

    rank0, rank1 = rank_states(out)
    codebooks = [k for k in rank0 if k.endswith("codebook")]
    assert len(codebooks) == 2, codebooks
    assert_same_weights(rank0, rank1)
    assert all(bool(v) for k, v in rank0.items() if k.endswith("initialized"))
    # the two ranks logged one history: rank 0's (8 training slices / 2 ranks / batch 2 = 2 iterations)
    history = (out / "logs" / "history.jsonl").read_text().splitlines()
    assert sum('"phase": "train"' in line for line in history) == 1, history
    assert "Epoch[1] Metrics" in proc.stdout + proc.stderr
    run_bundle_in_process("vqvae2", ["train.json", "evaluate.json"], overrides)
    assert read_metrics(out)["n_images"] >= 1


@pytest.mark.timeout(300)
def test_pixelcnn_prior_two_processes(isic_folder, tmp_path):
    """The prior trains on the code maps of a frozen VQ-VAE: rank 0 extracts and caches them once, rank 1 reads
    that cache; the prior's weights are equal on the ranks and the checkpoint evaluates in one process."""
    data = isic_folder(12, tmp_path / "isic")
    photos = sorted((data / "images").glob("*.jpg"))
    transform = image_transforms_2d(channels=3, spatial_size=[32, 32])
    images = torch.stack([transform({"image": str(f)})["image"].as_tensor() for f in photos[:4]])
    vq_dir = _tiny_vqvae_checkpoint(tmp_path / "vqvae", images, {**TINY_VQVAE_2D, "in_channels": 3})
    out = tmp_path / "out"
    overrides = {
        **TINY_PRIOR,
        "num_classes": 2,
        "class_names": ["benign", "malignant"],
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "autoencoder_dir": vq_dir,
        "dataset_dir": data,
        "output_dir": out,
        "batch_size": 2,
        "max_epochs": 1,
        "sample_interval": 1,
    }
    proc = torchrun_bundle(
        "pixelcnn_prior", ["train.json", "multi_gpu_train.json"], {**overrides, "finalize": [DUMP, DESTROY]}
    )
    log = proc.stdout + proc.stderr
    # one extraction per section (by rank 0); rank 1 read rank 0's cache
    assert log.count("-> codes") == 2 and log.count("cached codes") == 2, log[-4000:]

    rank0, rank1 = rank_states(out)
    assert_same_weights(rank0, rank1)
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "checkpoint_epoch=1.pt").is_file()
    assert (out / "logs" / "samples" / "epoch=1" / "samples_class0.png").is_file()
    run_bundle_in_process("pixelcnn_prior", ["train.json", "evaluate.json"], overrides)
    # what was evaluated is the checkpoint the two ranks wrote
    checkpoint = out / "models" / "model.pt"
    models = read_metrics(out)["models"]
    assert models["checkpoint"] == str(checkpoint) and models["checkpoint_sha256"] == file_sha256(checkpoint)


@pytest.mark.timeout(300)
def test_latent_diffusion_two_processes(brain_slices, tmp_path):
    """The UNet is DDP-wrapped, the frozen VQ-VAE is not; rank 0 encodes and caches the latents, rank 1 reads them,
    so both build the network with the same scale factor. The raw and the averaged (EMA) weights are equal on the
    ranks, only rank 0 writes them, and the averaged weights sample in a single-process inference run."""
    transform = image_transforms_2d(channels=1, spatial_size=[32, 32])
    files = sorted(brain_slices.glob("*.jpg"))
    images = torch.stack([transform({"image": str(f)})["image"].as_tensor() for f in files[:4]])
    vq = {k: v for k, v in TINY_VQVAE_2D.items() if k != "batch_size"}
    vq_dir = _tiny_vqvae_checkpoint(tmp_path / "vqvae", images, vq)
    out = tmp_path / "out"
    common = {**TINY_DIFFUSION, "autoencoder_dir": vq_dir}
    overrides = {
        **common,
        "dataset_dir": brain_slices,
        "data_layout": "folder",
        "output_dir": out,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "batch_size": 2,
        "max_epochs": 1,
        "sample_interval": 1,
        "n_monitor_samples": 1,
    }
    dump = f"$torch.save({{'net': @network_def.state_dict(), 'ema': @train#ema.ema_model.state_dict()}}, {RANK_FILE})"
    proc = torchrun_bundle(
        "latent_diffusion", ["train.json", "multi_gpu_train.json"], {**overrides, "finalize": [dump, DESTROY]}
    )
    log = proc.stdout + proc.stderr
    assert log.count("encoded") == 2 and log.count("cached latents") == 2, log[-4000:]

    rank0, rank1 = rank_states(out)
    assert_same_weights(rank0["net"], rank1["net"])
    assert_same_weights(rank0["ema"], rank1["ema"])
    assert torch.isfinite(rank0["net"]["scale_factor"])
    saved = torch.load(out / "models" / "model.pt", weights_only=True)  # the generator: diffusion.* = the EMA
    ema = {k[len("diffusion.") :]: v for k, v in saved.items() if k.startswith("diffusion.")}
    assert_same_weights(ema, rank0["ema"])
    assert (out / "logs" / "samples_epoch=1.png").is_file()
    result = tmp_path / "result"
    run_bundle_in_process(
        "latent_diffusion",
        ["inference.json"],
        {**common, "ckpt_path": out / "models" / "model.pt", "output_dir": result, "n_samples": 1},
    )
    assert len(list((result / "inference").glob("sample_*.png"))) == 1
