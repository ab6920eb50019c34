"""Min-SNR timestep sampling of ``vqvae_medical.stages.diffusion.training``."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from vqvae_medical.stages.diffusion.network import LatentDiffusionNetwork
from vqvae_medical.stages.diffusion.training import LatentDiffusionPrepareBatch, min_snr_probs


def _scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    return DDPMScheduler(
        1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, prediction_type=prediction_type
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_probs_follow_the_capped_snr_weight(prediction_type):
    scheduler = _scheduler(prediction_type)
    gamma = 5.0
    probs = min_snr_probs(scheduler, prediction_type, gamma).double()
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar)
    ratio = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]
    # the weight per timestep against an independent reading of the paper's formula, up to normalisation
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / ratio
    assert torch.allclose(probs, expected / expected.sum(), rtol=1e-5, atol=1e-9)
    assert abs(float(probs.sum()) - 1.0) < 1e-6
    capped = snr <= gamma
    if prediction_type == "epsilon":  # weight 1 wherever SNR <= gamma, gamma / SNR (< 1) before
        assert torch.allclose(probs[capped], probs[capped][0].expand(int(capped.sum())), rtol=1e-5)
        assert float(probs[0]) < float(probs[-1]) / 10
    if prediction_type == "v_prediction":  # the most likely timestep is where SNR crosses gamma
        peak = int(probs.argmax())
        assert abs(float(snr[peak]) - gamma) < 0.5


def test_prepare_batch_draws_timesteps_from_min_snr_probs():
    scheduler = _scheduler()
    network = LatentDiffusionNetwork(torch.nn.Identity(), spatial_dims=2, prediction_type="v_prediction")
    uniform = LatentDiffusionPrepareBatch(1000, network, scheduler=scheduler, prediction_type="v_prediction", seed=0)
    weighted = LatentDiffusionPrepareBatch(
        1000, network, scheduler=scheduler, prediction_type="v_prediction", seed=0, min_snr_gamma=5.0
    )
    z = torch.zeros(20000, 1, 2, 2)
    t_uniform, t_weighted = uniform.get_timesteps(z), weighted.get_timesteps(z)
    # uniform: a quarter above 750; min-SNR (v): the noisiest quarter has almost no weight
    assert 0.23 < float((t_uniform >= 750).float().mean()) < 0.27
    probs = min_snr_probs(scheduler, "v_prediction", 5.0)
    expected_high = float(probs[750:].sum())
    assert abs(float((t_weighted >= 750).float().mean()) - expected_high) < 0.01
    assert expected_high < 0.05
    # the same seed gives the same draws (validation and resumed runs rely on it)
    again = LatentDiffusionPrepareBatch(
        1000, network, scheduler=scheduler, prediction_type="v_prediction", seed=0, min_snr_gamma=5.0
    )
    assert torch.equal(again.get_timesteps(z), t_weighted)


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_min_snr_gamma_must_be_positive(gamma):
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_probs(_scheduler(), "v_prediction", gamma)


def test_min_snr_needs_a_scheduler():
    network = LatentDiffusionNetwork(torch.nn.Identity(), spatial_dims=2, prediction_type="epsilon")
    with pytest.raises(ValueError, match="scheduler"):
        LatentDiffusionPrepareBatch(1000, network, prediction_type="epsilon", min_snr_gamma=5.0)
