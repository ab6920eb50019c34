"""Building blocks of the autoencoders: residual units and upsampling layers free of checkerboard artefacts.

Sub-pixel convolution with ICNR initialisation follows Aitken et al., "Checkerboard artifact free sub-pixel
convolution", 2017 (arXiv 1707.02937). MONAI's ``icnr_init`` arranges the kernel correctly but leaves the conv bias
at its random default; since the ``r^d`` channels that pixel shuffle interleaves then carry different biases, the
output at initialisation is *not* a nearest-neighbour upsampling and shows a checkerboard. ``icnr_init_`` below
reuses MONAI's kernel arrangement and zeroes the bias, which restores the property exactly.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Conv, Norm, Pad, Pool
from monai.networks.layers.utils import get_act_layer
from monai.networks.utils import icnr_init, pixelshuffle
from torch import nn

__all__ = [
    "UPSAMPLE_MODES",
    "icnr_init_",
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
            f"({upsample_factor ** n_dims}) for ICNR."
        )
    with torch.no_grad():
        icnr_init(conv, upsample_factor, init=init)
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


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
        self.conv1 = Convolution(
            spatial_dims, channels, res_channels, kernel_size=3, act=act, norm=None, dropout=dropout, adn_ordering="DA"
        )
        self.conv2 = Convolution(spatial_dims, res_channels, channels, kernel_size=1, conv_only=True)
        self.act = get_act_layer(act) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.conv1(self.norm(x))))


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
        return self.blur(pixelshuffle(self.conv(x), self.spatial_dims, self.scale_factor))


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
