"""Latent diffusion pieces (vqvae_medical.stages.diffusion) on small real brain slices and tiny networks."""

from __future__ import annotations

import shutil

import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from tiny_stage2 import tiny_unet, train_steps

from vqvae_medical.data import image_transforms_2d
from vqvae_medical.evaluation.diversity import ms_ssim_settings, pairwise_ms_ssim
from vqvae_medical.networks import VQVAE, ReconstructionNetwork
from vqvae_medical.stages.autoencoder.record import (
    data_settings,
    state_fingerprint,
    write_record,
)
from vqvae_medical.stages.diffusion.generator import LatentDiffusionGenerator
from vqvae_medical.stages.diffusion.latents import LatentSet, extract_latents
from vqvae_medical.stages.diffusion.network import (
    LatentDiffusionNetwork,
    load_diffusion_network,
)
from vqvae_medical.stages.diffusion.sampling import LatentSampler
from vqvae_medical.stages.diffusion.training import LatentDiffusionPrepareBatch
from vqvae_medical.stages.frozen import FrozenAutoencoder, load_autoencoder
from vqvae_medical.utils.io import atomic_save

SIZE = (64, 48)  # crop of the brain slices: latents 16 x 12


def tiny_vqvae(spatial_dims: int = 2) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(
        spatial_dims, 1, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4, channels_last=False
    )


@pytest.fixture(scope="module")
def slices(brain_dir, tmp_path_factory):
    """Six real brain slices and their preprocessing (cropped to SIZE)."""
    folder = tmp_path_factory.mktemp("slices")
    for f in sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:6]:
        shutil.copy(f, folder / f.name.replace(" ", "_"))
    items = [{"image": str(p), "label": i % 2} for i, p in enumerate(sorted(folder.glob("*.jpg")))]
    return items, image_transforms_2d(spatial_size=SIZE)


@pytest.fixture()
def trained_vqvae(slices):
    """A tiny VQ-VAE trained for a few steps (EMA codebook initialised from data)."""
    items, transform = slices
    images = torch.stack([transform(dict(i))["image"].as_tensor() for i in items])
    return train_steps(tiny_vqvae(), images), images


def test_frozen_autoencoder_never_changes_state(trained_vqvae):
    model, images = trained_vqvae
    frozen = FrozenAutoencoder(model, latent="encoder")
    before = state_fingerprint(model)
    frozen.train()  # a trainer calling train() must not unfreeze it
    assert not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    z = frozen.encode(images)
    frozen.decode(z, list(images.shape[2:]))
    assert state_fingerprint(model) == before
    # the same network, unfrozen, in training mode: its forward pass moves the EMA codebook (so the check can fail)
    model.train()
    model(images)
    assert state_fingerprint(model) != before


def test_latent_kinds_and_snapping(trained_vqvae):
    model, images = trained_vqvae
    enc = FrozenAutoencoder(model, latent="encoder")
    quant = FrozenAutoencoder(model, latent="quantized")
    z = enc.encode(images)
    assert list(z.shape) == [images.shape[0], 4, SIZE[0] // 4, SIZE[1] // 4]
    assert torch.equal(z, model.encode(images).float())
    snapped = model.quantizer.embed(model.quantizer.quantize_indices(z))
    assert torch.equal(quant.encode(images), snapped)
    size = list(images.shape[2:])
    assert torch.equal(enc.decode(z, size), model.decode(snapped, size))
    assert not torch.allclose(enc.decode(z, size), model.decode(z, size))
    raw = FrozenAutoencoder(model, latent="encoder", snap_to_codebook=False)
    assert torch.equal(raw.decode(z, size), model.decode(z, size))


def test_load_autoencoder_from_stage_one_folder(trained_vqvae, tmp_path):
    model, images = trained_vqvae
    network = ReconstructionNetwork(model)
    path = atomic_save(network.state_dict(), tmp_path / "models" / "model.pt")
    write_record(path, network, {"transforms": "image_transforms_2d", "spatial_size": list(SIZE)}, data_settings(None))
    frozen = load_autoencoder(tmp_path, latent="quantized")
    assert state_fingerprint(frozen.autoencoder) == state_fingerprint(model) == frozen.fingerprint
    assert frozen.latent == "quantized" and frozen.latent_channels == 4 and frozen.spatial_dims == 2
    assert torch.equal(frozen.encode(images), FrozenAutoencoder(model, latent="quantized").encode(images))


def test_scale_factor_is_inverse_std_of_training_latents_and_cached(trained_vqvae, slices, tmp_path):
    model, images = trained_vqvae
    items, transform = slices
    frozen = FrozenAutoencoder(model)
    cache = tmp_path / "latents_training.pt"
    latents = extract_latents(frozen, items, cache, transform, {"size": list(SIZE)}, batch_size=4)
    expected = frozen.encode(images)
    assert torch.equal(latents.latents, expected)
    assert latents.scale_factor == pytest.approx(1.0 / expected.double().std().item(), rel=1e-9)
    assert (latents.latents * latents.scale_factor).std().item() == pytest.approx(1.0, abs=1e-5)
    assert latents.labels.tolist() == [i % 2 for i in range(len(items))]
    assert latents.image_size == list(SIZE)
    stamp = cache.stat().st_mtime_ns
    again = extract_latents(frozen, items, cache, transform, {"size": list(SIZE)}, batch_size=4)
    assert torch.equal(again.latents, latents.latents) and again.fingerprint == latents.fingerprint
    assert cache.stat().st_mtime_ns == stamp and LatentSet.load(cache).fingerprint == latents.fingerprint
    # other preprocessing settings are not served from the stale cache
    other = extract_latents(frozen, items, cache, transform, {"size": [1, 2]}, batch_size=4)
    assert other.fingerprint != latents.fingerprint and cache.stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="class conditioning"):
        extract_latents(frozen, [{"image": i["image"]} for i in items], None, transform, {"size": list(SIZE)})


def test_noise_has_the_latent_shape_not_the_image_shape(trained_vqvae):
    model, images = trained_vqvae
    frozen = FrozenAutoencoder(model)
    latents = frozen.encode(images)
    net = LatentDiffusionNetwork(tiny_unet(), 2, scale_factor=0.5, latent_shape=latents.shape[1:], image_size=SIZE)
    prepare = LatentDiffusionPrepareBatch(1000, net, autoencoder=frozen)
    for batch in ({"image": images}, {"latent": latents}):
        z, target, args, kwargs = prepare(batch, torch.device("cpu"))
        assert torch.allclose(z, latents * 0.5)
        assert kwargs["noise"].shape == latents.shape != images.shape
        assert torch.equal(target, kwargs["noise"])
        assert kwargs["timesteps"].shape == (images.shape[0],) and int(kwargs["timesteps"].max()) < 1000
    # v-prediction target and the class labels of a conditioned model
    scheduler = DDPMScheduler(1000, prediction_type="v_prediction")
    cond = LatentDiffusionNetwork(
        tiny_unet(num_class_embeds=2), 2, 0.5, latents.shape[1:], SIZE, prediction_type="v_prediction"
    )
    prepare = LatentDiffusionPrepareBatch(
        1000, cond, scheduler=scheduler, prediction_type="v_prediction", label_key="label"
    )
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    z, target, _, kwargs = prepare({"latent": latents, "label": labels})
    assert torch.allclose(target, scheduler.get_velocity(z, kwargs["noise"], kwargs["timesteps"]))
    assert torch.equal(kwargs["class_labels"], labels)
    from vqvae_medical.stages.diffusion.sampling import ClassConditionedDiffusionInferer

    pred = ClassConditionedDiffusionInferer(scheduler)(z, cond, **kwargs)
    assert pred.shape == z.shape
    with pytest.raises(ValueError, match="latent's shape"):
        ClassConditionedDiffusionInferer(scheduler)(z, cond, torch.randn_like(images), kwargs["timesteps"])


def test_seeded_prepare_batch_repeats_each_epoch():
    net = LatentDiffusionNetwork(tiny_unet(), 2, 1.0, (4, 8, 8), (32, 32))
    prepare = LatentDiffusionPrepareBatch(1000, net, seed=3)
    batch = {"latent": torch.zeros(2, 4, 8, 8)}
    first = prepare(batch)[3]
    assert not torch.equal(prepare(batch)[3]["noise"], first["noise"])
    prepare.reset()
    again = prepare(batch)[3]
    assert torch.equal(again["noise"], first["noise"]) and torch.equal(again["timesteps"], first["timesteps"])


def test_scale_factor_and_shapes_are_saved_and_restored(tmp_path):
    net = LatentDiffusionNetwork(tiny_unet(), 2, scale_factor=0.731, latent_shape=(4, 16, 12), image_size=(64, 48))
    path = atomic_save(net.state_dict(), tmp_path / "model.pt")
    fresh = LatentDiffusionNetwork(tiny_unet(), 2)
    with pytest.raises(RuntimeError, match="scale factor"):
        fresh.check_ready()
    loaded = load_diffusion_network(fresh, path)
    assert loaded.scale_factor.item() == pytest.approx(0.731)
    assert loaded.latent_shape.tolist() == [4, 16, 12] and loaded.image_size.tolist() == [64, 48]
    # a training checkpoint ({"model": ..., "optimizer": ...}) works too
    ckpt = atomic_save({"model": net.state_dict(), "rng": {}}, tmp_path / "checkpoint_epoch=1.pt")
    assert load_diffusion_network(LatentDiffusionNetwork(tiny_unet(), 2), ckpt).scale_factor.item() == pytest.approx(
        0.731
    )


@pytest.mark.parametrize("spatial_dims, num_class_embeds", [(2, 3), (3, None)])
def test_torchscript_equals_eager_with_attention(spatial_dims, num_class_embeds):
    """``torch.jit.script`` (what ``ckpt_export`` runs) compiles the network, attention blocks and class embedding
    included, into a module that predicts exactly what the eager one does; the eager network is not modified."""
    unet = tiny_unet(spatial_dims, num_class_embeds, attention=True)
    net = LatentDiffusionNetwork(unet, spatial_dims, scale_factor=0.5, latent_shape=(4, *[8] * spatial_dims)).eval()
    scripted = torch.jit.script(net)
    assert type(net.unet) is DiffusionModelUNet
    x = torch.randn(2, 4, *[8] * spatial_dims)
    kwargs = {"class_labels": torch.tensor([0, 2])} if num_class_embeds else {}
    with torch.no_grad():
        for t in (torch.tensor([3, 900]), torch.tensor(5), 17):
            torch.testing.assert_close(scripted(x, t, **kwargs), net(x, t, **kwargs), rtol=0, atol=0)
    assert torch.equal(scripted.scale_factor, net.scale_factor)


def test_latent_shape_must_fit_the_unet():
    with pytest.raises(ValueError, match="multiple of 2"):
        LatentDiffusionNetwork(tiny_unet(), 2, 1.0, latent_shape=(4, 13, 12))
    with pytest.raises(ValueError, match="channels"):
        LatentDiffusionNetwork(tiny_unet(), 2, 1.0, latent_shape=(8, 16, 12))


@pytest.mark.parametrize(
    "size, kernel, scales", [((208, 176), 11, 5), ((128, 128, 128), 7, 5), ((32, 32, 32), 3, 4), ((20, 24), 5, 3)]
)
def test_ms_ssim_settings_fit_monai_metric(size, kernel, scales):
    k, w = ms_ssim_settings(size)
    assert (k, len(w)) == (kernel, scales)
    assert sum(w) == pytest.approx(1.0)
    x = torch.rand(2, 1, *size) if len(size) == 2 or size[0] <= 32 else None
    if x is not None:
        value = MultiScaleSSIMMetric(len(size), kernel_size=k, weights=w)(x, x)
        assert torch.allclose(value, torch.ones_like(value), atol=1e-4)


def test_pairwise_ms_ssim_diversity(slices):
    items, transform = slices
    real = torch.stack([transform(dict(i))["image"].as_tensor() for i in items])
    same = real[:1].repeat(4, 1, 1, 1)
    assert pairwise_ms_ssim(same, 2) == pytest.approx(1.0, abs=1e-4)
    diverse = pairwise_ms_ssim(real, 2)
    assert 0.0 < diverse < 0.99
    noise = torch.rand(6, 1, *SIZE, generator=torch.Generator().manual_seed(0))
    assert pairwise_ms_ssim(noise, 2) < diverse


def test_prediction_type_is_stored_and_checked_at_sampling(trained_vqvae, tmp_path):
    model, _ = trained_vqvae
    net = LatentDiffusionNetwork(tiny_unet(), 2, 1.0, (4, 16, 12), (64, 48), prediction_type="v_prediction")
    path = atomic_save(net.state_dict(), tmp_path / "model.pt")
    loaded = load_diffusion_network(LatentDiffusionNetwork(tiny_unet(), 2), path)  # built with the default epsilon
    assert loaded.prediction_type == "v_prediction"
    generator = LatentDiffusionGenerator(loaded, FrozenAutoencoder(model), DDIMScheduler(1000, clip_sample=False), 2)
    sampler = LatentSampler(generator)
    with pytest.raises(ValueError, match="v_prediction"):
        sampler.sample(1)
    with pytest.raises(ValueError, match="differs"):
        LatentDiffusionPrepareBatch(1000, loaded, prediction_type="epsilon")
