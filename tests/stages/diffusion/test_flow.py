"""Rectified flow (``configs/rflow.json``): MONAI's ``RFlowScheduler`` in the prepare-batch and the generator."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from vqvae_medical.stages.diffusion.flow import flow_steps, flow_timesteps
from vqvae_medical.stages.diffusion.network import LatentDiffusionNetwork
from vqvae_medical.stages.diffusion.training import LatentDiffusionPrepareBatch


@pytest.mark.parametrize(
    "settings",
    [
        {"sample_method": "uniform"},
        {"sample_method": "logit-normal", "loc": 0.3, "scale": 1.2},
        {"sample_method": "logit-normal", "use_discrete_timesteps": False},
        {"sample_method": "uniform", "use_timestep_transform": True, "spatial_dim": 2, "base_img_size_numel": 256},
    ],
)
def test_flow_timesteps_are_monai_draws_from_a_seeded_generator(settings):
    """The same numbers as ``RFlowScheduler.sample_timesteps`` on the global random state seeded alike, drawn from
    the given generator instead (the global state is untouched)."""
    scheduler, latents = RFlowScheduler(1000, **settings), torch.zeros(64, 4, 8, 6)
    torch.manual_seed(3)
    reference = scheduler.sample_timesteps(latents)
    state = torch.get_rng_state()
    drawn = flow_timesteps(scheduler, 64, (8, 6), torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert drawn.dtype == reference.dtype and torch.equal(drawn, reference)
    assert 0 <= float(drawn.min()) and float(drawn.max()) < 1000 and len(drawn.unique()) > 32


def test_logit_normal_timesteps_favour_the_middle():
    """Logit-normal (0, 1) puts 72.8 % of the draws in the middle half of [0, T) (|z| < logit(3 / 4) = 1.099 for a
    standard normal z), uniform 50 %."""
    middle = {}
    for method in ("uniform", "logit-normal"):
        t = flow_timesteps(RFlowScheduler(1000, sample_method=method), 20000, (8, 8), torch.Generator().manual_seed(0))
        middle[method] = float(((t >= 250) & (t < 750)).float().mean())
    assert abs(middle["uniform"] - 0.5) < 0.02 and abs(middle["logit-normal"] - 0.728) < 0.01


def test_prepare_batch_targets_the_velocity_on_the_straight_path():
    network = LatentDiffusionNetwork(torch.nn.Identity(), spatial_dims=2, scale_factor=0.5, prediction_type="flow")
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False, sample_method="logit-normal")
    prepare = LatentDiffusionPrepareBatch(1000, network, scheduler=scheduler, prediction_type="flow", seed=0)
    latent = torch.randn(5, 4, 8, 6)
    z, target, _, kwargs = prepare({"latent": latent})
    torch.testing.assert_close(z, latent * 0.5)
    torch.testing.assert_close(target, z - kwargs["noise"])
    t = kwargs["timesteps"]
    assert t.dtype == torch.float32 and not torch.equal(t, t.round())
    # x_t (MONAI's add_noise) moves along the target: x_t + (t / T) * target is the latent
    x_t = scheduler.add_noise(z, kwargs["noise"], t)
    torch.testing.assert_close(x_t + (t / 1000).view(-1, 1, 1, 1) * target, z)
    prepare.reset()  # a new epoch: the same draws again (the validation loss is comparable across epochs)
    assert torch.equal(prepare({"latent": latent})[3]["timesteps"], t)


def test_flow_and_its_scheduler_go_together():
    flow_net = LatentDiffusionNetwork(torch.nn.Identity(), spatial_dims=2, prediction_type="flow")
    with pytest.raises(ValueError, match="rflow.json"):
        LatentDiffusionPrepareBatch(1000, flow_net, scheduler=DDPMScheduler(1000), prediction_type="flow")
    with pytest.raises(ValueError, match="RFlowScheduler"):
        LatentDiffusionPrepareBatch(1000, flow_net, prediction_type="flow")
    v_net = LatentDiffusionNetwork(torch.nn.Identity(), spatial_dims=2, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="'flow'"):
        LatentDiffusionPrepareBatch(1000, v_net, scheduler=RFlowScheduler(1000), prediction_type="v_prediction")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        LatentDiffusionPrepareBatch(
            1000, flow_net, scheduler=RFlowScheduler(1000), prediction_type="flow", min_snr_gamma=5.0
        )


def test_flow_steps_sum_to_the_whole_path():
    timesteps, step = flow_steps(RFlowScheduler(1000, use_discrete_timesteps=False), 7, (8, 6))
    assert float(timesteps[0]) == 1000 and float(step.sum()) == pytest.approx(1.0)
    assert bool((step > 0).all())
