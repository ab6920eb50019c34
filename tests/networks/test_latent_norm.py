"""``normalize_latents``: l2-normalised (Yu et al., arXiv 2110.04627) and tanh-squashed latents in the VQ-VAE and the
VQ-VAE-2."""

from __future__ import annotations

import pytest
import torch
from scripting import assert_scripted_equals_eager

from vqvae_medical.networks import VQVAE, VQVAE2, ReconstructionNetwork
from vqvae_medical.networks.config import build_network, network_config
from vqvae_medical.networks.latent_norm import l2_latents, latent_norm_mode, tanh_latents


def test_normalize_latents_puts_every_vector_on_the_sphere_of_radius_sqrt_d():
    z = torch.randn(2, 8, 5, 7) * torch.rand(2, 1, 5, 7) * 30
    out = l2_latents(z)
    assert torch.allclose(out.norm(dim=1), torch.full((2, 5, 7), 8**0.5), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out, z, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # the direction is kept


def test_tanh_latents_keep_small_norms_bound_large_ones_and_keep_the_order():
    radius = 8**0.5
    z = torch.nn.functional.normalize(torch.randn(1, 8, 1, 50), dim=1) * torch.logspace(-2, 2, 50).view(1, 1, 1, 50)
    out = tanh_latents(z)
    n_in, n_out = z.norm(dim=1).flatten(), out.norm(dim=1).flatten()
    small = n_in < 0.1 * radius
    assert torch.allclose(n_out[small], n_in[small], rtol=5e-3)  # about linear well inside the radius
    assert bool((n_out < radius + 1e-5).all()) and bool((n_out[n_in > 3 * radius] > 0.99 * radius).all())
    assert bool((n_out[n_in < 2 * radius].diff() > 0).all())  # monotone: the order of norms (intensity) is kept
    cos = torch.nn.functional.cosine_similarity(out, z, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert tanh_latents(torch.zeros(1, 4, 2, 2)).abs().max() == 0  # no NaN at the origin
    z_bf16 = (torch.randn(2, 8, 4, 4) * 0.05).bfloat16()
    assert tanh_latents(z_bf16).dtype == torch.bfloat16


def test_latent_norm_settings_and_bad_value_message():
    assert [latent_norm_mode(v) for v in (False, None, True, "tanh")] == ["none", "none", "l2", "tanh"]
    with pytest.raises(ValueError, match=r"normalize_latents must be false, true .* or 'tanh'.*'l1'"):
        VQVAE(2, 1, channels=(8, 16), num_embeddings=8, embedding_dim=4, normalize_latents="l1")


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
    assert torch.allclose(z_normed, l2_latents(z_plain), atol=1e-5)
    squashed = VQVAE(spatial_dims, 1, normalize_latents="tanh", **kwargs).eval()
    squashed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(squashed.encode(x), tanh_latents(z_plain), atol=1e-6)
    # the setting is part of the recorded architecture, so stage 2 rebuilds the network that was trained
    assert network_config(normed)["normalize_latents"] is True
    assert build_network(network_config(normed)).latent_norm == "l2"
    assert build_network(network_config(squashed)).latent_norm == "tanh"


def _tiny_vqvae2(normalize_latents: bool | str) -> VQVAE2:
    return VQVAE2(
        2, 1, channels=(8, 16), res_channels=(8, 8), num_res_units=1, num_embeddings=(8, 8), embedding_dim=(4, 6),
        normalize_latents=normalize_latents,
    ).eval()


def test_vqvae2_normalises_both_levels_and_scripts():
    torch.manual_seed(0)
    net = _tiny_vqvae2(True)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        z_top, features = net.encode(x)
        top = net.quantizer_top.quantize_indices(z_top)
        z_bottom = net.bottom_latent(features, net.quantizer_top.embed(top))
    assert torch.allclose(z_top.norm(dim=1), torch.full_like(z_top[:, 0], 2.0), atol=1e-4)
    assert torch.allclose(z_bottom.norm(dim=1), torch.full_like(z_bottom[:, 0], 6**0.5), atol=1e-4)
    assert_scripted_equals_eager(ReconstructionNetwork(net).eval(), x)  # the Model Zoo's export path
    squashed = _tiny_vqvae2("tanh")
    squashed.load_state_dict(net.state_dict())
    with torch.no_grad():
        z_top_t, _ = squashed.encode(x)
    assert bool((z_top_t.norm(dim=1) < 2.0).all())
    assert_scripted_equals_eager(ReconstructionNetwork(squashed).eval(), x)


def _recorded_model(folder, **kwargs):
    """A tiny vqvae network saved as ``folder/models/model.pt`` with its stage-1 record."""
    from vqvae_medical.stages.autoencoder.record import write_record

    torch.manual_seed(0)
    net = ReconstructionNetwork(
        VQVAE(
            2, 1, channels=(8, 16), res_channels=(8, 8), num_res_units=1, num_embeddings=16, embedding_dim=8, **kwargs
        )
    )
    models = folder / "models"
    models.mkdir(parents=True)
    torch.save(net.state_dict(), models / "model.pt")
    write_record(models / "model.pt", net, {"transforms": "image_transforms_2d", "channels": 1}, {"source": "test"})
    return models / "model.pt"


def test_a_network_that_differs_from_the_record_in_a_shape_free_setting_is_refused(tmp_path):
    from vqvae_medical.stages.autoencoder.record import RecordMismatchError, check_against_record

    model_pt = _recorded_model(tmp_path, normalize_latents=False)
    small = {"channels": (8, 16), "res_channels": (8, 8), "num_res_units": 1, "num_embeddings": 16, "embedding_dim": 8}
    same = ReconstructionNetwork(VQVAE(2, 1, normalize_latents=False, decay=0.5, **small))  # decay: training only
    check_against_record(same, model_pt)
    other = ReconstructionNetwork(VQVAE(2, 1, normalize_latents=True, **small))
    other.load_state_dict(torch.load(model_pt, weights_only=True))  # the weights fit: only the record can tell
    with pytest.raises(
        RecordMismatchError,
        match=r"normalize_latents=false \(config: true\).*--network_def#model#normalize_latents False",
    ):
        check_against_record(other, model_pt)


def test_a_record_written_before_the_setting_existed_means_its_default(tmp_path):
    import json

    from vqvae_medical.stages.autoencoder.record import RecordMismatchError, check_against_record

    model_pt = _recorded_model(tmp_path)
    record = model_pt.parent / "autoencoder.json"
    data = json.loads(record.read_text())
    del data["network_def"]["model"]["normalize_latents"]  # as 0.3.0 wrote it
    record.write_text(json.dumps(data))
    small = {"channels": (8, 16), "res_channels": (8, 8), "num_res_units": 1, "num_embeddings": 16, "embedding_dim": 8}
    check_against_record(ReconstructionNetwork(VQVAE(2, 1, **small)), model_pt)
    with pytest.raises(RecordMismatchError):
        check_against_record(ReconstructionNetwork(VQVAE(2, 1, normalize_latents=True, **small)), model_pt)


def test_inference_bundle_stops_with_one_line_on_a_model_trained_with_normalised_latents(tmp_path, brain_files):
    """The vqvae inference config (normalize_latents false) on a model whose record says true: one line naming
    the override, no traceback, no output written; with the override it runs."""
    import shutil

    from bundle_runner import run_bundle

    model_pt = _recorded_model(tmp_path / "run", normalize_latents=True)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(brain_files(1)[0], inputs)
    overrides = {
        "input_dir": inputs,
        "output_dir": tmp_path / "run",
        "ckpt_path": model_pt,
        "num_embeddings": 16,
        "embedding_dim": 8,
        "network_def#model#channels": [8, 16],
        "network_def#model#res_channels": [8, 8],
        "network_def#model#num_res_units": 1,
        "device": "cpu",
    }
    refused = run_bundle("vqvae", ["inference.json"], overrides, expect_ok=False, threads=1)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert "RecordMismatchError" in last and "--network_def#model#normalize_latents True" in last, last
    assert not list((tmp_path / "run" / "inference").glob("**/*.png"))
    ok = run_bundle("vqvae", ["inference.json"], {**overrides, "network_def#model#normalize_latents": True}, threads=1)
    assert ok.returncode == 0
    assert len(list((tmp_path / "run" / "inference").glob("**/*_recon.png"))) == 1
