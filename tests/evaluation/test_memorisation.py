"""The memorisation audit (``evaluation.memorisation``, ``stages.memorisation``): on real brain slices a set made of
training images scores a high copy rate and held-out slices a low one; the longest shared code run is the longest
common substring; and both generative bundles' evaluate write the audit (keys, per-sample file, figure)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bundle_runner import run_bundle
from PIL import Image
from tiny_stage2 import SIZE, TINY_DIFFUSION, TINY_PRIOR, diffusion_folder, prior_folder, slice_folder

from vqvae_medical.data import image_transforms_2d
from vqvae_medical.evaluation.memorisation import (
    DISTANCE,
    longest_shared_runs,
    memorisation_metrics,
    nearest_images,
)
from vqvae_medical.evaluation.sample_report import load_real_images
from vqvae_medical.networks import VQVAE, ReconstructionNetwork
from vqvae_medical.stages.autoencoder.record import data_settings, write_record
from vqvae_medical.stages.frozen import load_autoencoder
from vqvae_medical.stages.memorisation import MemorisationAudit
from vqvae_medical.utils.io import atomic_save

AUDIT_KEYS = {
    "copy_rate",
    "copy_threshold",
    "copy_quantile",
    "nearest_train_distance_median",
    "nearest_train_distance_min",
    "held_out_nearest_train_distance_median",
    "nearest_train_distance_kind",
    "n_train_images",
    "n_held_out",
    "memorisation_cpu_seconds",
}


@pytest.fixture(scope="module")
def slices(brain_dir):
    """360 real brain slices from all test classes (seeded order), area-downsampled to 64 x 64, in [0, 1]."""
    files = sorted((brain_dir / "Test").glob("*/*.jpg"))
    if len(files) < 360:
        pytest.skip(f"{brain_dir} holds {len(files)} test slices, 360 are needed")
    pick = np.random.default_rng(0).permutation(len(files))[:360]
    arrays = [np.asarray(Image.open(files[i]).convert("L"), dtype=np.float32) / 255.0 for i in pick]
    return torch.nn.functional.interpolate(torch.from_numpy(np.stack(arrays))[:, None], size=(64, 64), mode="area")


def _batches(x: torch.Tensor, size: int = 50):
    return (x[s : s + size] for s in range(0, len(x), size))


def test_copies_score_high_and_held_out_slices_low(slices):
    train, calibration, held_out = slices[:240], slices[240:300], slices[300:360]
    reference = nearest_images(calibration, _batches(train))
    copies = torch.cat([train[:30], train[100:110] + 0.002 * torch.randn(10, 1, 64, 64).clamp(0, 1)])
    mixed = torch.cat([train[200:230], held_out[:30]])
    rates = {}
    for name, queries in {"copies": copies, "mixed": mixed, "held_out": held_out}.items():
        metrics = memorisation_metrics(nearest_images(queries, _batches(train)), reference)
        rates[name] = metrics["copy_rate"]
    assert rates["copies"] == 1.0
    assert 0.45 <= rates["mixed"] <= 0.65
    assert rates["held_out"] <= 0.15
    assert metrics["nearest_train_distance_kind"] == DISTANCE and metrics["n_train_images"] == 240
    assert metrics["copy_threshold"] == pytest.approx(float(torch.quantile(reference.distance, 0.05)))


def test_nearest_images_match_a_brute_force_search(slices):
    queries, train = slices[:7], slices[20:80]
    found = nearest_images(queries, _batches(train, 13), keep=3)
    d = ((queries.reshape(7, 1, -1) - train.reshape(1, 60, -1)) ** 2).mean(-1).sqrt()
    assert torch.allclose(found.distance, d.min(1).values.double(), atol=1e-6)
    assert torch.equal(found.index, d.argmin(1))
    assert torch.equal(found.images, train[d.argmin(1)[:3]])
    with pytest.raises(ValueError, match="differ in shape"):
        nearest_images(queries, [train[:, :, :32]])
    with pytest.raises(ValueError, match="empty"):
        nearest_images(queries, [])


def _brute_longest(a: list[int], maps: list[list[int]]) -> int:
    best = 0
    for t in maps:
        for i in range(len(a)):
            for j in range(len(t)):
                k = 0
                while i + k < len(a) and j + k < len(t) and a[i + k] == t[j + k]:
                    k += 1
                best = max(best, k)
    return best


def test_longest_shared_code_run_is_the_longest_common_substring():
    g = torch.Generator().manual_seed(0)
    samples, train = torch.randint(0, 3, (6, 4, 5), generator=g), torch.randint(0, 3, (4, 4, 5), generator=g)
    samples[2] = train[1]  # a copied map shares all 20 codes
    samples[3, 1:3] = train[0, 2:4]  # two copied rows: at least 10 codes in raster order
    runs = longest_shared_runs(samples, train)
    expected = [_brute_longest(s.flatten().tolist(), [t.flatten().tolist() for t in train]) for s in samples]
    assert runs.tolist() == expected and runs[2] == 20 and runs[3] >= 10
    # codes never seen in training share nothing
    assert longest_shared_runs(torch.full((2, 4, 5), 7), train).tolist() == [0, 0]


def _fitted_stage_one(folder, data):
    """``folder`` as the vqvae bundle leaves it, for 32 x 32 grey slices of ``data`` (split 0.6 / 0.2 / 0.2): the
    tiny VQ-VAE of ``tiny_stage2.stage_one`` (untrained, whose random codebook gives every image the same codes),
    with a codebook of 16 spread-out encoder outputs of the images (farthest-point picks), so images differ."""
    torch.manual_seed(0)
    model = VQVAE(2, 1, channels=(8, 16), num_res_units=1, res_channels=(8, 8), num_embeddings=16, embedding_dim=8)
    items = [{"image": str(f)} for f in sorted(data.glob("*.jpg"))]
    with torch.no_grad():
        z = model.encode(load_real_images(items, image_transforms_2d(spatial_size=SIZE), len(items)))
        z = z.permute(0, 2, 3, 1).reshape(-1, 8)
        chosen = [0]
        for _ in range(15):
            chosen.append(int(torch.cdist(z, z[chosen]).min(1).values.argmax()))
        model.quantizer.codebook.copy_(z[chosen])
        model.quantizer.embed_sum.copy_(z[chosen])
        model.quantizer.cluster_size.fill_(1.0)
        model.quantizer.initialized.fill_(1)
    network = ReconstructionNetwork(model)
    path = atomic_save(network.state_dict(), folder / "models" / "model.pt")
    preprocessing = {"transforms": "image_transforms_2d", "channels": 1, "spatial_size": SIZE}
    write_record(path, network, preprocessing, data_settings(data, "folder", 0.2, 0.2), SIZE)
    return folder


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, brain_files):
    """A tiny stage-1 folder on 40 real brain slices: 24 training, 8 validation, 8 test images."""
    data = slice_folder(brain_files(40), tmp_path_factory.mktemp("slices"))
    return _fitted_stage_one(tmp_path_factory.mktemp("vq"), data)


def test_audit_through_the_frozen_autoencoder(stage1, tmp_path):
    autoencoder = load_autoencoder(stage1)
    datalist = autoencoder.datalist(tmp_path / "cache")
    train, test = datalist["training"], datalist["test"]
    audit = MemorisationAudit(tmp_path / "eval", autoencoder, train, tmp_path / "codes_training.pt", n_shown=4)
    real = load_real_images(test, autoencoder.transforms(), len(test))
    # samples that are decoded training code maps: every one a copy, every code shared
    train_images = load_real_images(train, autoencoder.transforms(), 6, seed=1)
    copies, codes = audit.reconstruct(train_images)
    metrics = audit(copies, real, codes)
    assert AUDIT_KEYS <= set(metrics)
    assert metrics["copy_rate"] == 1.0 and metrics["nearest_train_distance_min"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["longest_shared_code_run"] == metrics["code_positions"] == 64
    assert metrics["n_train_images"] == len(train) and metrics["n_held_out"] == len(test)
    record = json.loads((tmp_path / "eval" / "memorisation.json").read_text())
    assert len(record["samples"]) == 6 and all(s["copy"] for s in record["samples"])
    assert record["samples"][0]["nearest_train_image"].endswith(".jpg")
    assert Image.open(tmp_path / "eval" / "samples_vs_nearest_training.png").size[0] > 100
    assert (tmp_path / "codes_training.pt").is_file()  # the code-map cache the prior trains on
    # the held-out images, reconstructed: they calibrate the threshold, so at most a few fall below it
    held, _ = audit.reconstruct(real)
    assert audit(held, real)["copy_rate"] <= 0.25
    assert MemorisationAudit(tmp_path / "off", autoencoder, train, enabled=False)(copies, real) == {}


def test_bundle_evaluates_write_the_audit(stage1, tmp_path):
    """Both generative bundles' evaluate write the audit's keys into metrics.json, memorisation.json and the
    figure of each sample beside its nearest training image (tiny untrained generators, 6 samples)."""
    prior = prior_folder(tmp_path / "prior", stage1)
    run_bundle(
        "pixelcnn_prior",
        ["train.json", "evaluate.json"],
        {**TINY_PRIOR, "autoencoder_dir": stage1, "output_dir": prior, "n_samples": 6},
        threads=1,
    )
    metrics = json.loads((prior / "eval" / "metrics.json").read_text())
    assert AUDIT_KEYS | {"longest_shared_code_run", "code_positions"} <= set(metrics)
    assert metrics["code_positions"] == 64 and metrics["n_train_images"] == 24
    assert (prior / "eval" / "samples_vs_nearest_training.png").is_file()
    samples = json.loads((prior / "eval" / "memorisation.json").read_text())["samples"]
    assert len(samples) == 6
    # the metrics summarise the per-sample records; an untrained prior's random code maps copy nothing
    assert metrics["copy_rate"] == pytest.approx(sum(s["copy"] for s in samples) / 6) == 0.0
    assert metrics["longest_shared_code_run"] == max(s["longest_shared_code_run"] for s in samples) < 16

    diffusion = diffusion_folder(tmp_path / "diffusion", stage1)
    run_bundle(
        "latent_diffusion",
        ["train.json", "evaluate.json"],
        {
            **TINY_DIFFUSION,
            "autoencoder_dir": stage1,
            "output_dir": diffusion,
            "n_samples": 6,
            "memorisation_audit": True,
        },
        threads=1,
    )
    metrics = json.loads((diffusion / "eval" / "metrics.json").read_text())
    assert AUDIT_KEYS <= set(metrics) and "longest_shared_code_run" not in metrics
    assert (diffusion / "eval" / "samples_vs_nearest_training.png").is_file()
