"""The latent diffusion generator (network_def of inference.json), its sampler, the EMA handler and the model writer."""

from __future__ import annotations

import time

import pytest
import torch
from ignite.engine import Engine
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from tiny_stage2 import tiny_unet

from vqvae_medical.networks import VQVAE
from vqvae_medical.stages.diffusion.generator import (
    LatentDiffusionGenerator,
    load_generator,
)
from vqvae_medical.stages.diffusion.handlers import DiffusionEMA, ModelWriter
from vqvae_medical.stages.diffusion.network import LatentDiffusionNetwork
from vqvae_medical.stages.diffusion.sampling import LatentSampler
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.utils.io import atomic_save, safe_load

LATENT = (4, 8, 6)
IMAGE = (30, 22)  # decoded 32 x 24, cropped


def tiny_vqvae() -> VQVAE:
    torch.manual_seed(0)
    model = VQVAE(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4, channels_last=False)
    return model.eval()  # its codebook starts as standard normal vectors


def tiny_network(prediction_type: str = "v_prediction", num_class_embeds: int | None = None, seed: int = 0):
    unet = tiny_unet(2, num_class_embeds, attention=True, seed=seed)
    with torch.no_grad():  # MONAI zero-initialises the output convolution: make the UNet predict something
        for p in unet.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return LatentDiffusionNetwork(unet, 2, 0.8, LATENT, IMAGE, prediction_type=prediction_type)


def ddim(prediction_type: str = "v_prediction", clip_sample: bool = False) -> DDIMScheduler:
    return DDIMScheduler(
        1000,
        schedule="scaled_linear_beta",
        beta_start=0.0015,
        beta_end=0.0195,
        clip_sample=clip_sample,
        prediction_type=prediction_type,
    )


def noise(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *LATENT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "prediction_type, clip_sample",
    [("epsilon", False), ("v_prediction", False), ("sample", False), ("epsilon", True)],
)
def test_generator_equals_monai_ddim_sampling_and_decoding(prediction_type, clip_sample):
    """The generator's own DDIM loop gives bit for bit MONAI's ``DiffusionInferer.sample`` with the
    ``DDIMScheduler``, then ``/ scale_factor``, codebook snap and decoding by the frozen VQ-VAE."""
    net, vqvae = tiny_network(prediction_type).eval(), tiny_vqvae()
    generator = LatentDiffusionGenerator(net, vqvae, ddim(prediction_type, clip_sample), num_inference_steps=4)
    x = noise()
    with torch.no_grad():
        images = generator(x)
        scheduler = ddim(prediction_type, clip_sample)
        scheduler.set_timesteps(4)
        z = DiffusionInferer(scheduler).sample(x, net, scheduler=scheduler)
        reference = FrozenAutoencoder(vqvae).decode(z / net.scale_factor, list(IMAGE)).clamp(0, 1)
    assert list(images.shape) == [3, 1, *IMAGE]
    torch.testing.assert_close(images, reference, rtol=0, atol=0)
    assert float(images.std()) > 0


def test_generator_equals_monai_rflow_sampling_and_decoding():
    """The generator's Euler loop gives MONAI's ``DiffusionInferer.sample`` with the ``RFlowScheduler`` (its
    ``step`` with the next timestep), then ``/ scale_factor``, codebook snap and decoding."""
    net, vqvae = tiny_network("flow").eval(), tiny_vqvae()
    generator = LatentDiffusionGenerator(net, vqvae, RFlowScheduler(1000, use_discrete_timesteps=False), 4)
    assert generator.scheduler_name == "RFlowScheduler"
    x = noise()
    with torch.no_grad():
        images = generator(x)
        scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
        scheduler.set_timesteps(4)
        z = DiffusionInferer(scheduler).sample(x, net, scheduler=scheduler, verbose=False)
        reference = FrozenAutoencoder(vqvae).decode(z / net.scale_factor, list(IMAGE)).clamp(0, 1)
        torch.testing.assert_close(generator.denoise(x), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-5)
    assert float(images.std()) > 0
    scripted = torch.jit.script(generator)  # what ckpt_export compiles
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), images, rtol=0, atol=0)


def test_generator_torchscript_equals_eager_with_classes():
    """``torch.jit.script`` (what ``ckpt_export`` runs) compiles the whole sampler-decoder, class labels included;
    the eager generator is not modified by scripting."""
    generator = LatentDiffusionGenerator(tiny_network(num_class_embeds=3).eval(), tiny_vqvae(), ddim(), 3)
    scripted = torch.jit.script(generator)
    assert type(generator.diffusion.unet) is DiffusionModelUNet
    x, labels = noise(2), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, labels), generator(x, labels), rtol=0, atol=0)
        assert not torch.equal(generator(x, labels), generator(x, torch.tensor([1, 1])))


def test_generator_rejects_what_it_cannot_sample():
    with pytest.raises(ValueError, match="DDIMScheduler"):
        LatentDiffusionGenerator(tiny_network(), tiny_vqvae(), DDPMScheduler(1000))
    flow_with_ddim = LatentDiffusionGenerator(tiny_network("flow"), tiny_vqvae(), ddim(), 2)
    with pytest.raises(ValueError, match="configs/rflow.json"):  # a rectified-flow network, a DDIM scheduler
        LatentSampler(flow_with_ddim).sample(1)
    with pytest.raises(ValueError, match="VQVAE"):
        LatentDiffusionGenerator(tiny_network(), torch.nn.Conv2d(4, 1, 1), ddim())
    mismatch = LatentDiffusionGenerator(tiny_network("epsilon"), tiny_vqvae(), ddim("v_prediction"), 2)
    with pytest.raises(ValueError, match="v_prediction"):
        LatentSampler(mismatch).sample(1)
    with pytest.raises(Exception, match="prediction_type"):
        mismatch(noise(1))


def test_generator_state_dict_and_loading(tmp_path):
    """model.pt holds diffusion.*, decoder.*, quantizer.* (no scheduler tables); it loads strictly; a UNet-only
    model.pt of version 0.1.x loads with the VQ-VAE it was trained on, and not without it."""
    vqvae = tiny_vqvae()
    trained = LatentDiffusionGenerator(tiny_network(seed=1), vqvae, ddim(), 3)
    state = trained.state_dict()
    assert {k.split(".")[0] for k in state} == {"diffusion", "decoder", "quantizer"}
    assert "diffusion.scale_factor" in state and "timesteps" not in state
    path = atomic_save(state, tmp_path / "model.pt")
    blank = LatentDiffusionGenerator(
        LatentDiffusionNetwork(tiny_network().unet, 2),
        VQVAE(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4, channels_last=False),
        ddim(),
        3,
    )
    loaded = load_generator(blank, path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(noise()), trained(noise()), rtol=0, atol=0)

    legacy = atomic_save(tiny_network(seed=1).state_dict(), tmp_path / "legacy.pt")
    with pytest.raises(ValueError, match="0.1.x"):
        load_generator(LatentDiffusionGenerator(tiny_network(), tiny_vqvae(), ddim(), 3), legacy)
    fresh_vqvae = VQVAE(
        2, 1, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4, channels_last=False
    )
    restored = load_generator(
        LatentDiffusionGenerator(LatentDiffusionNetwork(tiny_network().unet, 2), fresh_vqvae, ddim(), 3),
        legacy,
        autoencoder=vqvae,
    )
    with torch.no_grad():
        torch.testing.assert_close(restored(noise()), trained(noise()), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        load_generator(blank, tmp_path / "absent.pt")


def test_sampler_is_the_inferer_seeded_batched_and_class_aware():
    generator = LatentDiffusionGenerator(tiny_network(num_class_embeds=3), tiny_vqvae(), ddim(), 3)
    sampler = LatentSampler(generator, batch_size=2)
    images, labels = sampler.sample(3, seed=5)
    assert list(images.shape) == [3, 1, *IMAGE] and labels.tolist() == [0, 1, 2]
    again, _ = sampler.sample(3, seed=5)
    assert torch.equal(images, again)  # same seed, same images, batch by batch
    # the Inferer API on the noise sample() draws (one [1, *latent] tensor per sample from one seeded generator), in
    # sample()'s batches (2, then 1): bit-identical by construction. One call on all 3 would differ by a few 1e-7 on
    # some CPUs (AVX2 without AVX-512: a convolution over another batch size sums in another order; issue #31)
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(1, *LATENT, generator=g) for _ in range(3)])
    inferred = torch.cat([sampler(x[:2], class_labels=labels[:2]), sampler(x[2:], class_labels=labels[2:])])
    torch.testing.assert_close(inferred, images, rtol=0, atol=0)
    start = time.perf_counter()
    assert sampler.sample(2, class_label=2)[1].tolist() == [2, 2]
    elapsed = time.perf_counter() - start
    with pytest.raises(ValueError):
        sampler.sample(2, class_label=5)
    # the time of the last call, per sample: half of it, not the whole call's and not an earlier call's
    assert 0 < sampler.last_seconds_per_sample <= elapsed / 2 and sampler.num_inference_steps == 3
    unconditional = LatentSampler(LatentDiffusionGenerator(tiny_network(), tiny_vqvae(), ddim(), 2))
    with pytest.raises(ValueError, match="not class-conditioned"):
        unconditional.sample(1, class_label=0)


def _train(model: torch.nn.Module, ema: DiffusionEMA, max_epochs: int, state: dict | None = None) -> Engine:
    """SGD epochs of two fixed batches with ``ema`` attached; ``state`` resumes a run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def step(engine, x):
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()

    engine = Engine(step)
    ema.attach(engine)
    if state is not None:
        engine.load_state_dict(state["engine"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
    engine.state.optimizer = optimizer
    engine.run(data, max_epochs=max_epochs)
    return engine


def test_ema_handler_warm_up_and_exact_resume():
    """Ignite's EMAHandler with the warm-up ``m = 1 - min(decay, (1 + n) / (10 + n))``: 4 iterations in one run
    give the same averaged weights as 2 iterations, a checkpoint, and 2 more after resuming."""
    torch.manual_seed(0)
    start = torch.nn.Linear(3, 2)
    ema = DiffusionEMA(torch.nn.Linear(3, 2), decay=0.9)
    assert [round(ema.momentum_at(n), 6) for n in (1, 2, 100)] == [round(1 - 2 / 11, 6), 0.75, 0.1]

    model = torch.nn.Linear(3, 2)
    model.load_state_dict(start.state_dict())
    straight = DiffusionEMA(model, decay=0.9)
    engine = _train(model, straight, 2)
    assert engine.state.iteration == 4 and engine.state.ema_momentum == pytest.approx(1 - 5 / 14)

    first = torch.nn.Linear(3, 2)
    first.load_state_dict(start.state_dict())
    first_ema = DiffusionEMA(first, decay=0.9)
    opt_engine = _train(first, first_ema, 1)
    checkpoint = {
        "engine": opt_engine.state_dict(),
        "ema": first_ema.state_dict(),
        "optimizer": opt_engine.state.optimizer.state_dict(),
        "model": first.state_dict(),
    }
    second = torch.nn.Linear(3, 2)
    second.load_state_dict(checkpoint["model"])
    second_ema = DiffusionEMA(second, decay=0.9)
    resumed = _train(second, second_ema, 2, checkpoint)
    assert resumed.state.iteration == 4
    for a, b in zip(second_ema.ema_model.parameters(), straight.ema_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(straight.ema_model.weight, model.weight)  # averaged, not the raw weights


def test_ema_loads_a_version_0_1_checkpoint_entry():
    source = torch.nn.Linear(3, 2)
    ema = DiffusionEMA(torch.nn.Linear(3, 2))
    ema.load_state_dict({"model": source.state_dict(), "num_updates": 7})
    assert torch.equal(ema.ema_model.weight, source.weight)
    with pytest.raises(ValueError, match="decay"):
        DiffusionEMA(source, decay=1.0)


def test_model_writer_saves_at_epoch_end_and_can_be_disabled(tmp_path):
    net = torch.nn.Linear(3, 2)
    engine = Engine(lambda e, b: None)
    ModelWriter(net, tmp_path / "models" / "model.pt").attach(engine)
    ModelWriter(net, None).attach(engine)
    engine.run([0, 1], max_epochs=2)
    state = safe_load(tmp_path / "models" / "model.pt")
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], net.weight)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]


def test_evaluate_samples_of_an_rgb_channels_last_autoencoder(isic_dir, tmp_path):
    """An RGB VQ-VAE run channels-last (its default) decodes samples that MONAI's ``MMDMetric`` can flatten: the
    generator returns standard-layout images, and ``evaluate_samples`` scores them against real ISIC photos (before
    the fix, 128 ISIC samples were drawn for 8 minutes and the evaluate then died on ``view``)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized, ScaleIntensityRanged

    from vqvae_medical.stages.diffusion.evaluation import evaluate_samples

    torch.manual_seed(0)
    vqvae = VQVAE(
        2, 3, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4, channels_last=True
    ).eval()
    generator = LatentDiffusionGenerator(tiny_network().eval(), vqvae, ddim(), 2)
    with torch.no_grad():
        images = generator(noise(2))
    assert list(images.shape) == [2, 3, *IMAGE] and images.is_contiguous()
    photos = sorted((isic_dir / "images").glob("*.jpg"))[:6]
    transform = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Resized("image", IMAGE),
            ScaleIntensityRanged("image", 0, 255, 0, 1),
        ]
    )
    metrics = evaluate_samples(
        LatentSampler(generator), [{"image": str(p)} for p in photos], transform, tmp_path, n_samples=3
    )
    assert metrics["n_generated"] == 3 and metrics["c2st_accuracy"] is None
    assert metrics["mmd"] > 0 and (tmp_path / "metrics.json").is_file() and (tmp_path / "samples_vs_real.png").is_file()
