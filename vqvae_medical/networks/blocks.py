"""Building blocks of the autoencoders: residual units and upsampling layers free of checkerboard artefacts.

Sub-pixel convolution with ICNR initialisation follows Aitken et al., "Checkerboard artifact free sub-pixel
convolution", 2017 (arXiv 1707.02937). MONAI's ``icnr_init`` arranges the kernel correctly but leaves the conv bias
at its random default; since the ``r^d`` channels that pixel shuffle interleaves then carry different biases, the
output at initialisation is *not* a nearest-neighbour upsampling and shows a checkerboard. ``icnr_init_`` below
reuses MONAI's kernel arrangement and zeroes the bias, which restores the property exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Conv, Norm, Pad, Pool
from monai.networks.layers.utils import get_act_layer
from monai.networks.utils import icnr_init, pixelshuffle
from torch import nn

__all__ = [
    "UPSAMPLE_MODES",
    "icnr_init_",
    "inplace_act",
    "pixel_shuffle",
    "pointwise_conv_channels_last",
    "rows_to_channels_last",
    "ResidualUnit",
    "SubPixelUpsample",
    "ResizeConvUpsample",
    "make_upsample",
    "make_downsample",
]

UPSAMPLE_MODES = ("transposed", "subpixel", "resize_conv")


def icnr_init_(conv: nn.Module, upsample_factor: int, init=nn.init.kaiming_normal_) -> nn.Module:
    """ICNR-initialise ``conv`` for a following pixel shuffle by ``upsample_factor`` and zero its bias.

    Args:
        conv: an N-D convolution whose ``out_channels`` is a multiple of ``upsample_factor ** N``.
        upsample_factor: the pixel-shuffle factor.
        init: initialiser of the shared sub-kernel.

    Returns:
        ``conv``, modified in place.
    """
    n_dims = conv.weight.ndim - 2
    if conv.weight.shape[0] % (upsample_factor**n_dims) != 0:
        raise ValueError(
            f"out_channels ({conv.weight.shape[0]}) must be a multiple of upsample_factor**spatial_dims "
            f"({upsample_factor**n_dims}) for ICNR."
        )
    with torch.no_grad():
        icnr_init(conv, upsample_factor, init=init)
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


#: activations whose in-place version has a backward (it reads the output, which replaces the input)
_INPLACE_ACTS = ("relu", "relu6", "leakyrelu")


def inplace_act(act: tuple | str | None) -> tuple | str | None:
    """``act`` with ``inplace=True`` added when it is a ReLU-type activation (other activations are returned as given).

    Used only where the activation's input is a fresh tensor that no autograd node saved (a convolution's or a sum's
    output): the in-place version computes the same values and saves the same output for its backward, without
    allocating a second tensor of that size.
    """
    if act is None:
        return None
    name, args = (act, {}) if isinstance(act, str) else (act[0], dict(act[1]) if len(act) > 1 else {})
    if str(name).lower() not in _INPLACE_ACTS:
        return act
    if str(name).lower() == "leakyrelu" and float(args.get("negative_slope", 0.01)) < 0:
        return act  # in-place leaky ReLU has no backward for negative slopes
    args.setdefault("inplace", True)
    return (name, args)


def _norm_layer(norm: tuple | str | None, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer from MONAI's factory; ``group`` defaults to ``min(32, channels)`` groups."""
    if norm is None or norm == "none":
        return nn.Identity()
    name, args = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]) if len(norm) > 1 else {})
    name = name.lower()
    if name == "group":
        groups = args.pop("num_groups", min(32, channels))
        while channels % groups:
            groups -= 1
        return Norm[Norm.GROUP](num_groups=groups, num_channels=channels, **args)
    if name == "instance":
        args.setdefault("affine", True)
    return Norm[name, spatial_dims](channels, **args)


def _add_into(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y + x`` written into ``y`` (a fresh result that no autograd node saved), unless the sum must be promoted
    to another dtype (mixed precision)."""
    if y.dtype == torch.promote_types(y.dtype, x.dtype):
        return y.add_(x)
    return y + x


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.ndim == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    if x.ndim == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return False


#: activations that act on every element alone (they can run on any reshaping of a tensor)
_ELEMENTWISE_ACTS = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
)


def pointwise_conv_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A ``1 x ... x 1`` convolution of a channels-last ``x`` ``[B, C, *spatial]`` as one matrix product over the
    channels: ``[B * prod(spatial), C_out]`` rows, a new (non-view) tensor in the memory order of a channels-last
    ``[B, C_out, *spatial]`` result.

    The same arithmetic as the convolution (a dot product over the input channels per voxel, plus the bias). On CPU,
    PyTorch sends 1x1 convolutions of small batches to its reference ``slow_conv3d`` when it runs single-threaded
    (oneDNN otherwise), which returns a channels-first tensor and copies both layouts around in the backward pass:
    measured 10x slower than this (``[1, 16, 64^3]`` to 32 channels, forward and backward, one thread), and every
    following channels-last convolution would copy its input back.
    """
    nd = x.ndim
    rows = x.permute([0] + list(range(2, nd)) + [1]).reshape(-1, x.shape[1])  # a view for channels-last x
    w = weight.flatten(1)
    if bias is None:
        return torch.mm(rows, w.t())
    return torch.addmm(bias, rows, w.t())


def rows_to_channels_last(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View rows ``[B * prod(spatial), C]`` (see :func:`pointwise_conv_channels_last`) as a channels-last
    ``[B, C, *spatial]`` tensor with the batch and spatial sizes of ``like``."""
    nd = like.ndim
    shape = [like.shape[0]] + list(like.shape[2:]) + [rows.shape[1]]
    return rows.view(shape).permute([0, nd - 1] + list(range(1, nd - 1)))


class ResidualUnit(nn.Module):
    """``x + conv1x1(act(conv3x3(act(norm(x)))))``-style residual unit of the VQ-VAE encoders and decoders.

    As in van den Oord et al. 2017 and MONAI's ``VQVAEResidualUnit`` (Tudosiu et al. 2022, arXiv 2209.03177),
    with a configurable normalisation.

    Args:
        spatial_dims: number of spatial dimensions.
        channels: input and output channels.
        res_channels: channels of the hidden layer.
        act: activation type and arguments.
        norm: normalisation (``"batch"``, ``"instance"``, ``"group"`` or ``None``).
        dropout: dropout ratio.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        res_channels: int,
        act: tuple | str | None = Act.RELU,
        norm: tuple | str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = _norm_layer(norm, spatial_dims, channels)
        # ReLU-type activations run in place: both act on a fresh convolution output or sum that nothing saved
        self.conv1 = Convolution(
            spatial_dims,
            channels,
            res_channels,
            kernel_size=3,
            act=inplace_act(act),
            norm=None,
            dropout=dropout,
            adn_ordering="DA",
        )
        self.conv2 = Convolution(spatial_dims, res_channels, channels, kernel_size=1, conv_only=True)
        self.act = get_act_layer(inplace_act(act)) if act is not None else nn.Identity()
        self.elementwise_act = isinstance(self.act, _ELEMENTWISE_ACTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm(x))
        # the sum is accumulated into the 1x1 convolution's output (no autograd node saves it) and the activation
        # runs in place on it; the input is never written to, so it can be a checkpoint boundary. Values are those
        # of act(x + conv2(h)).
        if _is_channels_last(h) and _is_channels_last(x):
            # channels last: the 1x1 convolution as a matrix product on the rows of the channels-last layout, and
            # the in-place sum and activation on that (base) tensor, not on a view, which autograd would track
            # through full-size copies
            rows = pointwise_conv_channels_last(h, self.conv2.conv.weight, self.conv2.conv.bias)
            skip = x.permute([0] + list(range(2, x.ndim)) + [1]).reshape(-1, x.shape[1])
            rows = _add_into(rows, skip)
            if self.elementwise_act:
                return rows_to_channels_last(self.act(rows), x)
            return self.act(rows_to_channels_last(rows, x))
        return self.act(_add_into(self.conv2(h), x))


def pixel_shuffle(x: torch.Tensor, spatial_dims: int, scale_factor: int) -> torch.Tensor:
    """MONAI's ``pixelshuffle`` (same channel order, same values), whose output keeps a channels-last input's memory
    format.

    MONAI's version always returns a channels-first tensor; after a channels-last convolution that makes every
    following channels-last convolution convert its input (and, in the backward pass, its input and its gradient)
    to channels-last first: a full-size copy each time. Here the one copy the shuffle needs is written in
    channels-last order directly.
    """
    memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    channels_last = spatial_dims in (2, 3) and x.is_contiguous(memory_format=memory_format)
    group = 1
    for _ in range(spatial_dims):
        group *= scale_factor
    size = list(x.shape)
    if not channels_last or size[1] == group:
        # a single output channel: channels-first and channels-last are the same layout
        return pixelshuffle(x, spatial_dims, scale_factor)
    if size[1] % group != 0:
        raise ValueError(
            f"Number of input channels ({size[1]}) must be evenly divisible by scale_factor ** dimensions "
            f"({scale_factor}**{spatial_dims}={group})."
        )
    channels = size[1] // group
    # [B, C, r, ..., r, S_1, ..., S_d] -> [B, S_1, r, ..., S_d, r, C] -> [B, S_1 r, ..., S_d r, C], channels last
    x = x.reshape([size[0], channels] + [scale_factor] * spatial_dims + size[2:])
    order = [0]
    for d in range(spatial_dims):
        order += [2 + spatial_dims + d, 2 + d]
    order.append(1)
    x = x.permute(order).reshape([size[0]] + [s * scale_factor for s in size[2:]] + [channels])
    return x.permute([0, spatial_dims + 1] + list(range(1, spatial_dims + 1)))


class SubPixelUpsample(nn.Module):
    """Sub-pixel convolution upsampling (Shi et al. 2016) with ICNR initialisation (Aitken et al. 2017).

    At initialisation the output equals a nearest-neighbour upsampling of a single convolution of the input, so it
    is free of checkerboard artefacts; the optional blur (replicate pad + average pool of size ``scale_factor``,
    stride 1) keeps it smooth during training.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        scale_factor: integer upsampling factor.
        kernel_size: kernel size of the convolution before the shuffle.
        blur: apply the pad + average-pool blur after the shuffle.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        scale_factor: int = 2,
        kernel_size: int = 3,
        blur: bool = False,
    ) -> None:
        super().__init__()
        if scale_factor < 1:
            raise ValueError(f"scale_factor must be a positive integer, got {scale_factor}.")
        self.spatial_dims = spatial_dims
        self.scale_factor = scale_factor
        self.conv = Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels * scale_factor**spatial_dims, kernel_size, padding=kernel_size // 2
        )
        icnr_init_(self.conv, scale_factor)
        self.blur: nn.Module = nn.Identity()
        if blur and scale_factor > 1:
            self.blur = nn.Sequential(
                Pad[Pad.REPLICATIONPAD, spatial_dims]((scale_factor - 1, 0) * spatial_dims),
                Pool[Pool.AVG, spatial_dims](kernel_size=scale_factor, stride=1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blur(pixel_shuffle(self.conv(x), self.spatial_dims, self.scale_factor))


class ResizeConvUpsample(nn.Module):
    """Nearest-neighbour resize followed by a convolution (Odena et al., "Deconvolution and Checkerboard
    Artifacts", Distill 2016).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        scale_factor: integer upsampling factor.
        kernel_size: kernel size of the convolution.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, scale_factor: int = 2, kernel_size: int = 3
    ) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=float(scale_factor), mode="nearest")
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsample(x))


def make_upsample(
    mode: str, spatial_dims: int, in_channels: int, out_channels: int, scale_factor: int = 2, blur: bool = False
) -> nn.Module:
    """An upsampling layer by name: ``"transposed"`` (the baseline; kernel 4, stride 2 as in MONAI's VQVAE),
    ``"subpixel"`` (ICNR sub-pixel convolution) or ``"resize_conv"`` (nearest resize + convolution)."""
    if mode == "transposed":
        if scale_factor != 2:
            raise ValueError("transposed upsampling supports scale_factor=2 only.")
        return Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, kernel_size=4, stride=2, padding=1)
    if mode == "subpixel":
        return SubPixelUpsample(spatial_dims, in_channels, out_channels, scale_factor, blur=blur)
    if mode == "resize_conv":
        return ResizeConvUpsample(spatial_dims, in_channels, out_channels, scale_factor)
    raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}.")


def make_downsample(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Strided convolution halving every spatial size (kernel 4, stride 2, padding 1, as in MONAI's VQVAE)."""
    return Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=4, stride=2, padding=1)
