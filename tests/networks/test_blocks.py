"""Tests of the building blocks: ICNR sub-pixel upsampling, resize-convolution, blur, residual units."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.utils import icnr_init
from torch import nn

from vqvae_medical.networks.blocks import (
    UPSAMPLE_MODES,
    ResidualUnit,
    ResizeConvUpsample,
    SubPixelUpsample,
    icnr_init_,
    make_downsample,
    make_upsample,
)

CONV = {2: F.conv2d, 3: F.conv3d}


def nearest_of_sub_conv(conv: nn.Module, x: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of the convolution with the first sub-kernel (and bias) of each pixel-shuffle
    group: what an ICNR sub-pixel layer must compute at initialisation."""
    spatial_dims = x.ndim - 2
    group = scale**spatial_dims
    weight, bias = conv.weight[::group], conv.bias[::group]
    y = CONV[spatial_dims](x, weight, bias, padding=conv.padding)
    return F.interpolate(y, scale_factor=scale, mode="nearest")


def interior(y: torch.Tensor, margin: int) -> torch.Tensor:
    for dim in range(2, y.ndim):
        y = y.narrow(dim, margin, y.shape[dim] - 2 * margin)
    return y


def spread(y: torch.Tensor) -> float:
    """Largest range of values within one channel."""
    flat = y.flatten(2)
    return (flat.amax(-1) - flat.amin(-1)).max().item()


@pytest.mark.parametrize("spatial_dims, scale", [(2, 2), (2, 3), (3, 2)])
def test_icnr_subpixel_equals_nearest_upsampling_of_sub_conv(spatial_dims: int, scale: int) -> None:
    torch.manual_seed(0)
    layer = SubPixelUpsample(spatial_dims, 3, 2, scale_factor=scale)
    assert (layer.conv.bias == 0).all()
    x = torch.randn(2, 3, *([5] * spatial_dims))
    y = layer(x)
    assert y.shape == (2, 2, *([5 * scale] * spatial_dims))
    assert torch.equal(y, nearest_of_sub_conv(layer.conv, x, scale))
    # the property holds with any bias that is shared within each pixel-shuffle group
    with torch.no_grad():
        layer.conv.bias.copy_(torch.tensor([0.7, -1.3]).repeat_interleave(scale**spatial_dims))
    assert torch.equal(layer(x), nearest_of_sub_conv(layer.conv, x, scale))


@pytest.mark.parametrize("spatial_dims, scale", [(2, 2), (3, 2)])
def test_monai_icnr_with_default_bias_is_not_nearest_upsampling(spatial_dims: int, scale: int) -> None:
    """The bug icnr_init_ fixes: MONAI's icnr_init keeps the random default bias, so the groups differ."""
    torch.manual_seed(1)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(3, 2 * scale**spatial_dims, 3, padding=1)
    icnr_init(conv, scale)
    x = torch.randn(2, 3, *([5] * spatial_dims))
    from monai.networks.utils import pixelshuffle

    y = pixelshuffle(conv(x), spatial_dims, scale)
    assert not torch.allclose(y, nearest_of_sub_conv(conv, x, scale), atol=1e-3)
    # the same conv after icnr_init_ does satisfy it
    icnr_init_(conv, scale)
    assert torch.equal(pixelshuffle(conv(x), spatial_dims, scale), nearest_of_sub_conv(conv, x, scale))


def test_icnr_init_rejects_bad_channel_count() -> None:
    with pytest.raises(ValueError):
        icnr_init_(nn.Conv2d(3, 6, 3), 2)  # 6 is not a multiple of 2 ** 2


def test_subpixel_rejects_bad_scale() -> None:
    with pytest.raises(ValueError):
        SubPixelUpsample(2, 3, 2, scale_factor=0)


# ---------------------------------------------------------------------------------------------- checkerboards
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode, blur", [("subpixel", False), ("subpixel", True), ("resize_conv", False)])
def test_constant_input_gives_constant_output(spatial_dims: int, mode: str, blur: bool) -> None:
    torch.manual_seed(2)
    layer = make_upsample(mode, spatial_dims, 3, 4, 2, blur=blur)
    y = layer(torch.full((1, 3, *([8] * spatial_dims)), 1.7))
    # away from the zero-padded border every output channel is one value: no checkerboard
    assert spread(interior(y, 4)) < 1e-5
    assert spread(y) > 1e-3  # (the border does differ, so the test would see a pattern)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_transposed_conv_baseline_has_checkerboard(spatial_dims: int) -> None:
    """Baseline: a stride-2, kernel-4 transposed convolution at random initialisation turns a constant input into a
    periodic pattern (Odena et al. 2016), which the two other modes avoid."""
    torch.manual_seed(2)
    layer = make_upsample("transposed", spatial_dims, 3, 4, 2)
    y = interior(layer(torch.full((1, 3, *([8] * spatial_dims)), 1.7)), 4)
    assert spread(y) > 1e-2
    # and the pattern has period 2: even and odd positions differ
    even, odd = y[..., 0::2], y[..., 1::2]
    assert not torch.allclose(even, odd, atol=1e-3)
    assert torch.allclose(y[..., 0::2], y[..., 0:1].expand_as(y[..., 0::2]), atol=1e-5)


def _total_variation(y: torch.Tensor) -> float:
    return sum((y.diff(dim=d).abs().mean()).item() for d in range(2, y.ndim))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_keeps_shape_and_smooths(spatial_dims: int) -> None:
    torch.manual_seed(3)
    sharp = SubPixelUpsample(spatial_dims, 3, 2, scale_factor=2, blur=False)
    smooth = SubPixelUpsample(spatial_dims, 3, 2, scale_factor=2, blur=True)
    with torch.no_grad():
        sharp.conv.weight.normal_()  # a trained-looking, non-ICNR kernel: the shuffle output is a checkerboard
        sharp.conv.bias.normal_()
    smooth.load_state_dict(sharp.state_dict())  # the blur has no parameters
    x = torch.randn(1, 3, *([6] * spatial_dims))
    y_sharp, y_smooth = sharp(x), smooth(x)
    assert y_smooth.shape == y_sharp.shape == (1, 2, *([12] * spatial_dims))
    assert _total_variation(y_smooth) < 0.8 * _total_variation(y_sharp)
    # the blur is a box average of the 2^d neighbourhood ending at each pixel (replicate-padded at the start)
    pad = F.pad(y_sharp, (1, 0) * spatial_dims, mode="replicate")
    pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
    assert torch.allclose(y_smooth, pool(pad, 2, stride=1), atol=1e-6)


def test_blur_is_identity_at_scale_one() -> None:
    layer = SubPixelUpsample(2, 3, 2, scale_factor=1, blur=True)
    assert isinstance(layer.blur, nn.Identity)
    assert layer(torch.randn(1, 3, 5, 5)).shape == (1, 2, 5, 5)


# ---------------------------------------------------------------------------------------------- factories
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", UPSAMPLE_MODES)
def test_make_upsample_shapes(spatial_dims: int, mode: str) -> None:
    layer = make_upsample(mode, spatial_dims, 3, 5, 2)
    y = layer(torch.randn(2, 3, *([4] * spatial_dims)))
    assert y.shape == (2, 5, *([8] * spatial_dims))
    expected = {"transposed": nn.Module, "subpixel": SubPixelUpsample, "resize_conv": ResizeConvUpsample}[mode]
    assert isinstance(layer, expected)


def test_make_upsample_errors() -> None:
    with pytest.raises(ValueError, match="upsample mode"):
        make_upsample("bilinear", 2, 3, 3)
    with pytest.raises(ValueError):
        make_upsample("transposed", 2, 3, 3, scale_factor=3)


def test_resize_conv_scale_three() -> None:
    assert make_upsample("resize_conv", 2, 3, 2, 3)(torch.randn(1, 3, 4, 5)).shape == (1, 2, 12, 15)
    assert make_upsample("subpixel", 2, 3, 2, 3)(torch.randn(1, 3, 4, 5)).shape == (1, 2, 12, 15)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_make_downsample_halves(spatial_dims: int) -> None:
    y = make_downsample(spatial_dims, 3, 6)(torch.randn(1, 3, *([8] * spatial_dims)))
    assert y.shape == (1, 6, *([4] * spatial_dims))


# ---------------------------------------------------------------------------------------------- residual units
NORMS = [None, "none", "batch", "instance", "group", ("group", {"num_groups": 2}), ("instance", {"affine": False})]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_residual_unit_shapes(spatial_dims: int, norm) -> None:
    torch.manual_seed(4)
    unit = ResidualUnit(spatial_dims, 6, 4, norm=norm).train()
    x = torch.randn(2, 6, *([5] * spatial_dims))
    y = unit(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None for p in unit.parameters())
    name = norm[0] if isinstance(norm, tuple) else norm
    if name in (None, "none"):
        assert isinstance(unit.norm, nn.Identity)
    elif name == "batch":
        assert isinstance(unit.norm, nn.modules.batchnorm._BatchNorm)
    elif name == "group":
        assert isinstance(unit.norm, nn.GroupNorm)
        assert unit.norm.num_groups == (2 if isinstance(norm, tuple) else 6)  # default min(32, 6), divides 6
    else:
        assert isinstance(unit.norm, nn.modules.instancenorm._InstanceNorm)
        assert unit.norm.affine == (not isinstance(norm, tuple))


def test_residual_unit_is_residual() -> None:
    unit = ResidualUnit(2, 4, 3, act="relu")
    with torch.no_grad():
        unit.conv2.conv.weight.zero_()
        unit.conv2.conv.bias.zero_()
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(unit(x), torch.relu(x))


def test_group_norm_groups_divide_channels() -> None:
    unit = ResidualUnit(2, 48, 8, norm="group")
    assert unit.norm.num_groups == 24  # 32 does not divide 48: the largest divisor below it
