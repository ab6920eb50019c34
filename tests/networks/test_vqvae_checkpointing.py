"""Activation checkpointing of the VQ-VAE and the memory-saving pieces it relies on.

Checkpointing must change memory only: the same reconstruction, losses, gradients and codebook updates as without
it, bit for bit (it recomputes the same operations in the backward pass). The channels-last pixel shuffle and
1x1 convolution that avoid layout copies must compute what MONAI's ``pixelshuffle`` and a convolution compute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.utils import pixelshuffle
from scripting import assert_scripted_equals_eager
from torch import nn

from vqvae_medical.networks.blocks import ResidualUnit, inplace_act, pixel_shuffle
from vqvae_medical.networks.export import ReconstructionNetwork
from vqvae_medical.networks.vqvae import VQVAE, CheckpointedSequential

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models


TINY = dict(channels=(4, 8), res_channels=(2, 4), num_res_units=2, num_embeddings=8, embedding_dim=4)


def _pair(**kwargs) -> tuple[VQVAE, VQVAE]:
    """The same 3D network (same weights and buffers) without and with checkpointing."""
    torch.manual_seed(0)
    plain = VQVAE(3, 1, **{**TINY, **kwargs})
    ckpt = VQVAE(3, 1, **{**TINY, **kwargs, "use_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


def _step(model: VQVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(5)  # the same data-dependent codebook initialisation
    out = model(x)
    loss = F.l1_loss(out.reconstruction, x) + out.quantizer_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.reconstruction.detach(), loss.detach(), grads


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (16, 16, 16)),
        ({}, (13, 16, 10)),  # padded to a multiple of 4 and cropped back
        ({"upsample_mode": "transposed", "num_res_units": 1}, (12, 8, 16)),
        ({"upsample_mode": "resize_conv", "num_res_units": 3, "output_act": "sigmoid"}, (8, 8, 8)),
        ({"channels": (4, 8, 8), "res_channels": 2, "norm": "group"}, (16, 8, 16)),
        ({"num_res_units": 0, "channels_last": False}, (8, 16, 8)),
    ],
)
def test_checkpointing_gives_identical_outputs_and_gradients(kwargs: dict, shape: tuple[int, ...]) -> None:
    plain, ckpt = _pair(**kwargs)
    x = torch.rand((2, 1) + shape, generator=torch.Generator().manual_seed(1))
    recon_p, loss_p, grads_p = _step(plain, x)
    recon_c, loss_c, grads_c = _step(ckpt, x)
    assert recon_p.shape == x.shape
    assert torch.equal(recon_p, recon_c)
    assert torch.equal(loss_p, loss_c)
    assert grads_p.keys() == grads_c.keys()
    for name, grad in grads_p.items():
        assert torch.equal(grad, grads_c[name]), name
    # the EMA codebook is updated once per step, not again when the segments are recomputed
    state_p, state_c = plain.state_dict(), ckpt.state_dict()
    for key, value in state_p.items():
        assert torch.equal(value, state_c[key]), key


def test_segments_end_at_the_lowest_resolutions() -> None:
    model = VQVAE(3, 1, **TINY, use_checkpointing=True)
    # encoder: [down, act, res, | res, down, act] || [res, res, conv]: the first stage in two nested pieces
    assert model.encoder.segment_ends == [6, 9]
    assert model.encoder.nested_ends == [3]
    # decoder: [conv, res, res] || [up, act, res] || [res, up]
    assert model.decoder.segment_ends == [3, 6, 8]
    assert model.decoder.nested_ends == []
    flat = model.decoder._flat_layers()
    assert isinstance(flat[2], ResidualUnit) and not isinstance(flat[3], ResidualUnit)


def test_little_is_kept_at_high_resolution_through_the_forward_pass() -> None:
    """With checkpointing, autograd keeps through the forward pass (saved tensors and checkpoint inputs) the input
    image and, at the first level's resolution, only the cut points of the decoder's last stage (one per residual
    unit but the last), which its backward, run first, frees at once; nothing of the encoder's first stage."""
    x = torch.rand(1, 1, 16, 16, 16)
    kept = {}
    for use_checkpointing in (False, True):
        torch.manual_seed(0)
        model = VQVAE(3, 1, **TINY, use_checkpointing=use_checkpointing).train()
        voxels: list[int] = []

        def pack(t: torch.Tensor, voxels: list[int] = voxels) -> torch.Tensor:
            if t.ndim == 5 and t is not x:
                voxels.append(t.shape[2] * t.shape[3] * t.shape[4])
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        (F.l1_loss(out.reconstruction, x) + out.quantizer_loss).backward()
        kept[use_checkpointing] = voxels
    assert sum(v >= 8**3 for v in kept[False]) >= 8  # every activation of the first level and the output
    assert [v for v in kept[True] if v >= 8**3] == [8**3] * (TINY["num_res_units"] - 1)


def test_checkpointed_step_peak_memory_is_lower() -> None:
    from benchmarks.quantizer import peak_allocated_bytes

    # batch 2: PyTorch runs small batch-1 3D convolutions through its reference implementation, not oneDNN
    x = torch.rand(2, 1, 48, 48, 48)
    peaks = {}
    for use_checkpointing in (False, True):
        torch.manual_seed(0)
        model = VQVAE(3, 1, channels=(8, 16), res_channels=(4, 8), use_checkpointing=use_checkpointing).train()

        def step(model: VQVAE = model) -> None:
            out = model(x)
            (F.l1_loss(out.reconstruction, x) + out.quantizer_loss).backward()

        step()
        peaks[use_checkpointing], _ = peak_allocated_bytes(step)
    assert peaks[True] < 0.6 * peaks[False], peaks


def test_scripted_reconstruction_network_with_checkpointing() -> None:
    torch.manual_seed(0)
    model = VQVAE(3, 1, **TINY, use_checkpointing=True)
    x = torch.rand(1, 1, 12, 16, 8)
    model.train()
    with torch.no_grad():
        model(x)  # data-initialised codebook
    wrapper = ReconstructionNetwork(model).eval()
    assert_scripted_equals_eager(wrapper, x)


def test_default_segments_are_one_per_layer() -> None:
    seq = CheckpointedSequential([nn.Sequential(nn.Identity(), nn.ReLU()), nn.Identity()], True)
    assert seq.segment_ends == [2, 3] and seq.nested_ends == []


@pytest.mark.parametrize("spatial_dims, scale", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_channels_last_pixel_shuffle_matches_monai(spatial_dims: int, scale: int) -> None:
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    x = torch.randn(2, 3 * scale**spatial_dims, *([3, 4, 5][:spatial_dims]))
    for layout in (torch.contiguous_format, fmt):
        xl = x.clone().contiguous(memory_format=layout).requires_grad_()
        y = pixel_shuffle(xl, spatial_dims, scale)
        assert torch.equal(y, pixelshuffle(x, spatial_dims, scale))
        assert y.is_contiguous(memory_format=layout)
        g = torch.randn_like(y)
        y.backward(g)
        ref = x.clone().requires_grad_()
        pixelshuffle(ref, spatial_dims, scale).backward(g)
        assert torch.equal(xl.grad, ref.grad)


@pytest.mark.parametrize("act", ["relu", ("leakyrelu", {"negative_slope": 0.1}), "prelu", "gelu", None])
def test_channels_last_residual_unit_matches_channels_first(act) -> None:
    torch.manual_seed(0)
    first = ResidualUnit(3, 6, 3, act=act)
    last = ResidualUnit(3, 6, 3, act=act).to(memory_format=torch.channels_last_3d)
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 6, 5, 4, 3)
    xf = x.clone().requires_grad_()
    xl = x.clone().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    yf, yl = first(xf), last(xl)
    assert yl.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(yl, yf)
    g = torch.randn_like(yf)
    yf.backward(g)
    yl.backward(g)
    torch.testing.assert_close(xl.grad, xf.grad)
    for (name, pf), pl in zip(first.named_parameters(), last.parameters(), strict=True):
        torch.testing.assert_close(pl.grad, pf.grad, msg=name)
    # the input (a checkpoint boundary) is never written to
    assert torch.equal(xl.detach(), x) and torch.equal(xf.detach(), x)


def test_inplace_act_only_for_relu_types() -> None:
    assert inplace_act("relu") == ("relu", {"inplace": True})
    leaky = ("LeakyReLU", {"negative_slope": 0.2})
    assert inplace_act(leaky) == ("LeakyReLU", {"negative_slope": 0.2, "inplace": True})
    assert leaky[1] == {"negative_slope": 0.2}  # the argument is not modified
    assert inplace_act(("leakyrelu", {"negative_slope": -0.5})) == ("leakyrelu", {"negative_slope": -0.5})
    assert inplace_act("gelu") == "gelu"
    assert inplace_act(None) is None
