"""The prior bundle's sampler (``inferer`` of pixelcnn_prior/configs/inference.json) and its sample writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqvae_medical.networks import VQVAE, GatedPixelCNN
from vqvae_medical.stages.prior.generate import (
    PriorSampler,
    sample_and_decode,
    save_samples,
)
from vqvae_medical.stages.prior.network import PriorNetwork
from vqvae_medical.training.runtime import SettingError

SIZE = [16, 12]  # code maps 4 x 3


def tiny_models(num_classes: int | None = 2) -> tuple[PriorNetwork, VQVAE]:
    torch.manual_seed(0)
    vqvae = VQVAE(2, 1, channels=(8, 16), num_res_units=1, num_embeddings=16, embedding_dim=4, channels_last=False)
    prior = GatedPixelCNN(2, num_embeddings=16, channels=8, num_layers=2, num_classes=num_classes)
    with torch.no_grad():  # a prior that prefers some codes, so that seeds and classes matter
        for p in prior.parameters():
            p.add_(torch.randn_like(p))
    return PriorNetwork(prior).eval(), vqvae.eval()


def test_prior_sampler_is_an_inferer_of_class_labels():
    network, vqvae = tiny_models()
    sampler = PriorSampler(vqvae, SIZE, temperature=1.0, seed=3)
    images = sampler(torch.full((3,), 1), network)
    codes, reference = sample_and_decode(network, vqvae, 3, SIZE, 1, 1.0, 3)
    assert list(images.shape) == [3, 1, *SIZE] and codes.shape == (3, 4, 3)
    torch.testing.assert_close(images, reference, rtol=0, atol=0)
    assert not torch.equal(sampler(torch.full((3,), 0), network), images)
    with pytest.raises(ValueError, match="one class"):
        sampler(torch.tensor([0, 1]), network)
    with pytest.raises(ValueError, match="class_label"):
        sampler(torch.full((2,), -1), network)  # a class-conditioned prior needs a class
    with pytest.raises(ValueError, match="temperature"):
        PriorSampler(vqvae, SIZE, temperature=0.0)


def test_save_samples_writes_the_sampler_output_per_class(tmp_path):
    network, vqvae = tiny_models()
    sampler = PriorSampler(vqvae, SIZE, temperature=0.7)
    written = save_samples(tmp_path, sampler, network, num_samples=2, class_names=["a", "b"], seed=5)
    assert sorted(p.name for p in written) == sorted(
        [
            *[f"sample_class{c}_{i:03d}.png" for c in (0, 1) for i in (0, 1)],
            "samples_class0.png",
            "samples_class0_codes.npy",
            "samples_class1.png",
            "samples_class1_codes.npy",
            "samples.png",
            "sampling.json",
        ]
    )
    saved = np.load(tmp_path / "samples_class1_codes.npy")
    codes, _ = sampler.sample(network, 2, 1, seed=6)  # class c uses seed + c
    assert torch.equal(torch.from_numpy(saved).long(), codes)
    info = json.loads((tmp_path / "sampling.json").read_text())
    assert info["temperature"] == pytest.approx(0.7) and [c["seed"] for c in info["classes"]] == [5, 6]
    unconditional, vqvae = tiny_models(None)
    written = save_samples(tmp_path / "u", PriorSampler(vqvae, SIZE), unconditional, num_samples=2, sample_files=False)
    assert sorted(p.name for p in written) == ["samples.png", "samples_codes.npy", "sampling.json"]


@pytest.mark.parametrize("bad", [{"top_k": -1}, {"top_k": 2.5}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_truncation_is_one_setting_error(bad):
    _, vqvae = tiny_models()
    with pytest.raises(SettingError, match="top_k|top_p"):
        PriorSampler(vqvae, SIZE, **bad)


def test_sampler_truncates_and_records_it(tmp_path):
    network, vqvae = tiny_models(None)
    plain = PriorSampler(vqvae, SIZE, seed=4).sample(network, 8)[0]
    greedy = PriorSampler(vqvae, SIZE, seed=4, top_k=1).sample(network, 8)[0]
    assert not torch.equal(plain, greedy)
    assert torch.equal(greedy, PriorSampler(vqvae, SIZE, seed=9, top_p=1e-6).sample(network, 8)[0])  # both argmax
    assert (greedy == greedy[0]).all()  # no randomness left: every sample is the same
    save_samples(tmp_path, PriorSampler(vqvae, SIZE, top_p=0.9), network, num_samples=2, sample_files=False)
    info = json.loads((tmp_path / "sampling.json").read_text())
    assert (info["top_k"], info["top_p"]) == (0, 0.9)
