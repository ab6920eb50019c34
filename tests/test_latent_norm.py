"""``normalize_latents``: l2-normalised latents (Yu et al., arXiv 2110.04627) in the VQ-VAE and the VQ-VAE-2."""

from __future__ import annotations

import pytest
import torch
from scripting import assert_scripted_equals_eager

from vqvae_medical.networks import VQVAE, VQVAE2, ReconstructionNetwork
from vqvae_medical.networks.config import build_network, network_config
from vqvae_medical.networks.vqvae import normalize_latents


def test_normalize_latents_puts_every_vector_on_the_sphere_of_radius_sqrt_d():
    z = torch.randn(2, 8, 5, 7) * torch.rand(2, 1, 5, 7) * 30
    out = normalize_latents(z)
    assert torch.allclose(out.norm(dim=1), torch.full((2, 5, 7), 8**0.5), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out, z, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # the direction is kept


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_vqvae_encoder_output_is_normalised_only_when_asked(spatial_dims):
    torch.manual_seed(0)
    kwargs = {"channels": (8, 16), "num_res_units": 1, "num_embeddings": 16, "embedding_dim": 4}
    x = torch.rand(2, 1, *([16] * spatial_dims))
    plain = VQVAE(spatial_dims, 1, **kwargs).eval()
    normed = VQVAE(spatial_dims, 1, normalize_latents=True, **kwargs).eval()
    normed.load_state_dict(plain.state_dict())  # same weights: the flag adds no parameter
    with torch.no_grad():
        z_plain, z_normed = plain.encode(x), normed.encode(x)
    assert not torch.allclose(z_plain.norm(dim=1), torch.full_like(z_plain[:, 0], 2.0), atol=1e-3)
    assert torch.allclose(z_normed.norm(dim=1), torch.full_like(z_normed[:, 0], 2.0), atol=1e-4)
    assert torch.allclose(z_normed, normalize_latents(z_plain), atol=1e-5)
    # the flag is part of the recorded architecture, so stage 2 rebuilds the network that was trained
    assert network_config(normed)["normalize_latents"] is True
    assert build_network(network_config(normed)).normalize_latents


def test_vqvae2_normalises_both_levels_and_scripts():
    torch.manual_seed(0)
    net = VQVAE2(2, 1, channels=(8, 16), res_channels=(8, 8), num_res_units=1, num_embeddings=(8, 8),
                 embedding_dim=(4, 6), normalize_latents=True).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        z_top, features = net.encode(x)
        top = net.quantizer_top.quantize_indices(z_top)
        z_bottom = net.bottom_latent(features, net.quantizer_top.embed(top))
    assert torch.allclose(z_top.norm(dim=1), torch.full_like(z_top[:, 0], 2.0), atol=1e-4)
    assert torch.allclose(z_bottom.norm(dim=1), torch.full_like(z_bottom[:, 0], 6**0.5), atol=1e-4)
    assert_scripted_equals_eager(ReconstructionNetwork(net).eval(), x)  # the Model Zoo's export path
