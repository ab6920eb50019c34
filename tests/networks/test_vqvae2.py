"""Tests of the two-level VQ-VAE (Razavi et al. 2019, arXiv 1906.00446)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scripting import assert_scripted_equals_eager

from vqvae_medical.networks.export import ReconstructionNetwork
from vqvae_medical.networks.vqvae import VQOutput
from vqvae_medical.networks.vqvae2 import VQVAE2

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models


SMALL = dict(channels=(8, 16), num_res_units=1, num_embeddings=(16, 32), embedding_dim=(4, 6))


def _model(spatial_dims: int = 2, seed: int = 0, **kwargs) -> VQVAE2:
    torch.manual_seed(seed)
    return VQVAE2(spatial_dims, 1, **{**SMALL, **kwargs})


def _image(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2, 1) + shape, generator=g)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"


def _trained(spatial_dims: int = 2, shape: tuple[int, ...] = (36, 20), **kwargs) -> tuple[VQVAE2, torch.Tensor]:
    """A model whose EMA codebooks were initialised from data by one training forward, then put in eval mode."""
    model = _model(spatial_dims, **kwargs)
    x = _image(shape)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


@pytest.mark.parametrize(
    "spatial_dims,shape,upsample_mode",
    [
        (2, (36, 20), "subpixel"),
        (2, (32, 40), "transposed"),
        (2, (33, 17), "resize_conv"),
        (3, (20, 24, 16), "subpixel"),
    ],
)
def test_shapes_both_levels(spatial_dims: int, shape: tuple[int, ...], upsample_mode: str) -> None:
    model = _model(spatial_dims, upsample_mode=upsample_mode)
    x = _image(shape)
    assert model.downsample_factor == 8 and model.level_factors == (8, 4)
    assert model.num_embeddings == (16, 32) and model.embedding_dim == (4, 6)
    top_shape = [2] + [math.ceil(s / 8) for s in shape]
    bottom_shape = [2] + [2 * math.ceil(s / 8) for s in shape]  # 1/4 of the input padded to a multiple of 8

    out = model(x)
    assert isinstance(out, VQOutput)
    assert out.reconstruction.shape == x.shape  # padded and cropped back, never shrunk
    assert len(out.levels) == 2
    assert list(out.levels[0].indices.shape) == top_shape
    assert list(out.levels[1].indices.shape) == bottom_shape
    assert list(out.levels[0].quantized.shape) == [2, 4] + top_shape[1:]
    assert list(out.levels[1].quantized.shape) == [2, 6] + bottom_shape[1:]

    model.eval()
    top, bottom = model.encode_to_indices(x)
    assert list(top.shape) == top_shape and list(bottom.shape) == bottom_shape
    assert top.dtype == bottom.dtype == torch.long
    assert int(top.max()) < 16 and int(bottom.max()) < 32
    assert model.decode_from_indices((top, bottom), list(shape)).shape == x.shape
    assert model.decode_from_indices([top, bottom], list(shape)).shape == x.shape  # a list works too
    padded = [8 * math.ceil(s / 8) for s in shape]
    assert list(model.decode_from_indices((top, bottom)).shape[2:]) == padded
    assert model.reconstruct(x).shape == x.shape


def test_index_round_trip_equals_reconstruct_and_eval_forward() -> None:
    model, x = _trained()
    with torch.no_grad():
        top, bottom = model.encode_to_indices(x)
        decoded = model.decode_from_indices((top, bottom), list(x.shape[2:]))
        reconstruction = model.reconstruct(x)
        out = model(x)
    assert torch.equal(decoded, reconstruction)
    assert torch.equal(out.levels[0].indices, top)
    assert torch.equal(out.levels[1].indices, bottom)
    # the straight-through estimator z + (e - z).detach() equals e up to rounding only
    torch.testing.assert_close(out.reconstruction, reconstruction, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_index_paths_leave_codebooks_bit_identical(mode: str) -> None:
    model, x = _trained()
    model.train(mode == "train")
    before = _buffers(model)
    with torch.no_grad():
        model.encode_to_indices(x)
        model.reconstruct(x)
        if mode == "eval":
            model(x)
    _assert_same_state(before, model)


def test_training_forward_updates_both_ema_codebooks() -> None:
    model, x = _trained()
    model.train()
    top0 = model.quantizer_top.codebook.clone()
    bottom0 = model.quantizer_bottom.codebook.clone()
    assert bool(model.quantizer_top.initialized) and bool(model.quantizer_bottom.initialized)
    with torch.no_grad():
        model(x * 0.5 + 0.25)
    assert not torch.equal(model.quantizer_top.codebook, top0)
    assert not torch.equal(model.quantizer_bottom.codebook, bottom0)


@pytest.mark.parametrize("quantizer", ["ema", "gradient"])
def test_loss_is_sum_and_gradients_reach_every_part(quantizer: str) -> None:
    model = _model(quantizer=quantizer)
    x = _image((32, 24))
    out = model(x)
    torch.testing.assert_close(out.quantizer_loss, out.levels[0].loss + out.levels[1].loss)
    assert out.levels[0].loss > 0 and out.levels[1].loss > 0
    (F.mse_loss(out.reconstruction, x) + out.quantizer_loss).backward()
    for name in ("encoder_bottom", "encoder_top", "decoder_top", "pre_quantize_bottom", "upsample_top", "decoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    if quantizer == "gradient":
        assert float(model.quantizer_top.weight.grad.abs().sum()) > 0
        assert float(model.quantizer_bottom.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("spatial_dims,shape", [(2, (36, 20)), (3, (20, 24, 16))])
def test_torchscript_export_equals_eager(spatial_dims: int, shape: tuple[int, ...]) -> None:
    model, x = _trained(spatial_dims, shape)
    wrapper = ReconstructionNetwork(model).eval()
    assert_scripted_equals_eager(wrapper, x)


def test_activation_checkpointing_same_loss_and_grads() -> None:
    plain = _model(seed=3)
    ckpt = _model(seed=4, use_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = _image((32, 24))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)  # same data-dependent codebook initialisation
        out = model(x)
        loss = F.mse_loss(out.reconstruction, x) + out.quantizer_loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)
    _assert_same_state(_buffers(plain), ckpt)  # EMA updated once per step, not again on recomputation


def test_bad_arguments_and_inputs_raise() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        VQVAE2(1, 1)
    with pytest.raises(ValueError, match="channels"):
        VQVAE2(2, 1, channels=(8, 16, 32))
    with pytest.raises(ValueError, match="num_embeddings"):
        VQVAE2(2, 1, num_embeddings=(8, 8, 8))
    with pytest.raises(ValueError, match="embedding_dim"):
        VQVAE2(2, 1, embedding_dim=0)
    with pytest.raises(ValueError, match="upsample_mode"):
        VQVAE2(2, 1, upsample_mode="bilinear")
    with pytest.raises(ValueError, match="res_channels"):
        VQVAE2(2, 1, res_channels=(4, 4, 4))
    with pytest.raises(ValueError, match="quantizer"):
        VQVAE2(2, 1, quantizer="kmeans")
    model = _model().eval()
    with pytest.raises(ValueError, match="expected"):
        model.encode_to_indices(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="expected"):
        model.reconstruct(torch.rand(1, 1, 16, 16, 16))
    top = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="twice"):
        model.decode_from_indices((top, torch.zeros(1, 3, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="indices"):
        model.decode_from_indices((top, torch.zeros(1, 4, 4, 4, dtype=torch.long)))


def test_overfits_real_brain_slices(brain_dir) -> None:
    from PIL import Image

    files = sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:4]
    if len(files) < 4:
        pytest.skip("fewer than 4 brain slices available")
    images = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
    x = torch.from_numpy(np.stack(images))[:, None, ::2, ::2].contiguous()  # 4 x 1 x 104 x 88
    model = _model(channels=(16, 32), num_embeddings=(32, 64), embedding_dim=(8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(x)
        loss = F.mse_loss(out.reconstruction, x) + out.quantizer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    # the state-free inference path beats predicting the mean intensity
    model.eval()
    with torch.no_grad():
        assert float(F.mse_loss(model.reconstruct(x), x)) < 0.6 * float(x.var())
