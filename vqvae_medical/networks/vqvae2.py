"""Two-level VQ-VAE (VQ-VAE-2) for 2D and 3D images.

Razavi, van den Oord and Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2", NeurIPS 2019
(arXiv 1906.00446), figure 2a. Data flow (``f`` = downsampling factor relative to the image):

- bottom encoder: two strided convolutions (``f = 4``) with residual units -> bottom features ``h``;
- top encoder: one more strided convolution (``f = 8``) and a 3x3 convolution -> top latent, quantized with the
  top codebook;
- top decoder: upsamples the quantized top by 2 (back to ``f = 4``); its output is concatenated with ``h`` and a
  1x1 convolution (as in the paper's reference code) maps it to the bottom latent, quantized with the bottom
  codebook, so the bottom codes only have to carry what the top codes miss;
- decoder: the quantized top, upsampled by 2, concatenated with the quantized bottom and upsampled by 4 to the image
  (the last upsampling outputs the image channels directly).

So top codes lie at ``1/8`` and bottom codes at ``1/4`` of the (padded) image size. The two codebooks are separate
quantizer modules (``quantizer_top``, ``quantizer_bottom``) built by
:func:`~vqvae_medical.networks.quantizers.make_quantizer`. The interface matches
:class:`~vqvae_medical.networks.vqvae.VQVAE`, so training step, handlers, code extraction and export are shared:
``forward`` returns a :class:`~vqvae_medical.networks.vqvae.VQOutput` with ``levels = (top, bottom)``, the index
methods take and return ``(top, bottom)`` pairs, and ``reconstruct`` is TorchScript-scriptable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer
from monai.utils import ensure_tuple_rep
from torch import nn

from vqvae_medical.networks.blocks import (
    UPSAMPLE_MODES,
    ResidualUnit,
    make_downsample,
    make_upsample,
)
from vqvae_medical.networks.config import recorded
from vqvae_medical.networks.latent_norm import latent_norm_mode, normalize_latents
from vqvae_medical.networks.quantizers import make_quantizer
from vqvae_medical.networks.vqvae import (
    CheckpointedSequential,
    VQOutput,
    crop_to,
    encoder_input,
)

__all__ = ["VQVAE2"]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(top, bottom)`` from an int (used for both levels) or a sequence of two positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (top, bottom) pair of positive ints, got {value!r}.")
    return int(pair[0]), int(pair[1])


@recorded
class VQVAE2(nn.Module):
    """Hierarchical VQ-VAE with a top (``1/8``) and a bottom (``1/4``) code level, for 2D or 3D images.

    Razavi et al., "Generating Diverse High-Fidelity Images with VQ-VAE-2", NeurIPS 2019, arXiv 1906.00446. The
    input is replicate-padded to a multiple of :attr:`downsample_factor` (8) and every reconstruction is cropped
    back to the input size.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: image channels.
        out_channels: reconstruction channels (defaults to ``in_channels``).
        channels: ``(c1, c2)`` feature channels after the first and the second strided convolution of the bottom
            encoder (mirrored by the decoder); the top encoder and the top decoder use ``c2``.
        num_res_units: residual units per block.
        res_channels: hidden channels of the residual units, an int or one per entry of ``channels``
            (defaults to ``channels``).
        num_embeddings: codebook sizes ``(top, bottom)``, or one int for both.
        embedding_dim: code dimensions ``(top, bottom)``, or one int for both.
        quantizer: ``"ema"`` or ``"gradient"`` (both levels).
        commitment_cost: weight of the commitment loss (both levels).
        decay: EMA decay (``"ema"`` only).
        epsilon: Laplace smoothing (``"ema"`` only).
        codebook_init: ``"data"``, ``"kmeans"`` or ``"random"`` (``"ema"`` only).
        dead_code_threshold: EMA cluster size under which codes are restarted; 0 disables (``"ema"`` only).
        norm: normalisation in the residual units: ``"batch"``, ``"instance"``, ``"group"`` or ``None``.
        act: activation type and arguments.
        upsample_mode: ``"subpixel"`` (ICNR), ``"resize_conv"`` or ``"transposed"``, for every upsampling.
        blur: blur after sub-pixel upsampling.
        output_act: activation of the reconstruction (e.g. ``"sigmoid"``), ``None`` for linear.
        use_checkpointing: recompute each block's activations in the backward pass to save memory (the
            quantizers are never recomputed, so EMA updates happen once per step).
        ddp_sync: all-reduce codebook statistics under ``torch.distributed``.
        channels_last: keep weights and activations in channels-last memory format (faster convolutions on
            oneDNN and on tensor cores, as in :class:`~vqvae_medical.networks.vqvae.VQVAE`).
        normalize_latents: normalise both levels' latent vectors before quantization: ``True`` onto the sphere
            of radius ``sqrt(D)``, ``"tanh"`` their norm squashed below it
            (:mod:`~vqvae_medical.networks.latent_norm`, as in :class:`~vqvae_medical.networks.vqvae.VQVAE`).

    Attributes:
        downsample_factor: 8, the multiple the input is padded to (top codes at ``1/8``).
        level_factors: ``(8, 4)``, downsampling of the ``(top, bottom)`` code grids.
        num_embeddings: ``(top, bottom)`` codebook sizes.
        embedding_dim: ``(top, bottom)`` code dimensions.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        channels: Sequence[int] = (64, 128),
        num_res_units: int = 2,
        res_channels: Sequence[int] | int | None = None,
        num_embeddings: Sequence[int] | int = (512, 512),
        embedding_dim: Sequence[int] | int = (64, 64),
        quantizer: str = "ema",
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        codebook_init: str = "data",
        dead_code_threshold: float = 1.0,
        norm: tuple | str | None = None,
        act: tuple | str | None = "relu",
        upsample_mode: str = "subpixel",
        blur: bool = False,
        output_act: tuple | str | None = None,
        use_checkpointing: bool = False,
        ddp_sync: bool = True,
        channels_last: bool = True,
        normalize_latents: bool | str = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or (out_channels is not None and out_channels < 1):
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels} and {out_channels}.")
        channels = tuple(channels)
        if len(channels) != 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(
                f"channels must be two positive ints (after the first and second downsampling), got {channels!r}."
            )
        if num_res_units < 0:
            raise ValueError(f"num_res_units must be non-negative, got {num_res_units}.")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}.")
        if isinstance(res_channels, Sequence) and len(res_channels) != 2:
            raise ValueError(f"res_channels must be an int or a pair like channels, got {res_channels!r}.")
        res_channels = ensure_tuple_rep(channels if res_channels is None else res_channels, 2)
        num_embeddings = _pair(num_embeddings, "num_embeddings")
        embedding_dim = _pair(embedding_dim, "embedding_dim")
        out_channels = in_channels if out_channels is None else out_channels

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_embeddings: tuple[int, int] = num_embeddings
        self.embedding_dim: tuple[int, int] = embedding_dim
        self.downsample_factor = 8
        self.level_factors: tuple[int, int] = (8, 4)
        self.latent_norm = latent_norm_mode(normalize_latents)

        c1, c2 = channels
        r1, r2 = res_channels
        d_top, d_bottom = embedding_dim
        conv = Conv[Conv.CONV, spatial_dims]

        def residuals(ch: int, rch: int) -> list[nn.Module]:
            return [ResidualUnit(spatial_dims, ch, rch, act=act, norm=norm) for _ in range(num_res_units)]

        def down(cin: int, cout: int, rch: int) -> nn.Module:
            return nn.Sequential(make_downsample(spatial_dims, cin, cout), get_act_layer(act), *residuals(cout, rch))

        def up(cin: int, cout: int, rch: int) -> nn.Module:
            return nn.Sequential(
                *residuals(cin, rch),
                make_upsample(upsample_mode, spatial_dims, cin, cout, 2, blur=blur),
                get_act_layer(act),
            )

        # image -> bottom features h at 1/4
        self.encoder_bottom = CheckpointedSequential([down(in_channels, c1, r1), down(c1, c2, r2)], use_checkpointing)
        # h -> top latent at 1/8
        self.encoder_top = CheckpointedSequential(
            [down(c2, c2, r2), conv(c2, d_top, kernel_size=3, padding=1)], use_checkpointing
        )
        # quantized top -> features at 1/4 that condition the bottom latent
        self.decoder_top = CheckpointedSequential(
            [conv(d_top, c2, kernel_size=3, padding=1), up(c2, c2, r2)], use_checkpointing
        )
        # [h, decoder_top(quantized top)] -> bottom latent (1x1, as in the paper's reference code)
        self.pre_quantize_bottom = conv(2 * c2, d_bottom, kernel_size=1)
        # quantized top 1/8 -> 1/4 for the image decoder
        self.upsample_top = make_upsample(upsample_mode, spatial_dims, d_top, d_top, 2, blur=blur)
        # [upsampled quantized top, quantized bottom] at 1/4 -> image
        # the last upsampling outputs the image directly, as in the paper's reference decoder and in VQVAE: a
        # full-resolution feature stage (c1 channels at the image size) would cost about as much as the rest
        # of the network (measured: 1.9x the single-level VQ-VAE's step time with it)
        decoder: list[nn.Module] = [
            conv(d_top + d_bottom, c2, kernel_size=3, padding=1),
            up(c2, c1, r2),
            nn.Sequential(
                *residuals(c1, r1), make_upsample(upsample_mode, spatial_dims, c1, out_channels, 2, blur=blur)
            ),
        ]
        if output_act is not None:
            decoder.append(get_act_layer(output_act))
        self.decoder = CheckpointedSequential(decoder, use_checkpointing)

        ema = {"decay": decay, "epsilon": epsilon, "dead_code_threshold": dead_code_threshold, "ddp_sync": ddp_sync}
        quantizer_for = functools.partial(
            make_quantizer, quantizer, spatial_dims, commitment_cost=commitment_cost, codebook_init=codebook_init, **ema
        )
        self.quantizer_top = quantizer_for(num_embeddings[0], d_top)
        self.quantizer_bottom = quantizer_for(num_embeddings[1], d_bottom)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous top latent ``[B, D_top, *spatial / 8]`` and bottom features ``[B, c2, *spatial / 4]``.

        The input is padded to a multiple of 8. The bottom latent depends on the quantized top, see
        :meth:`bottom_latent`.
        """
        x = encoder_input(x, self.spatial_dims, self.in_channels, self.downsample_factor, self.channels_last)
        features = self.encoder_bottom(x)
        z_top = self.encoder_top(features)
        return normalize_latents(z_top, self.latent_norm), features

    def bottom_latent(self, features: torch.Tensor, quantized_top: torch.Tensor) -> torch.Tensor:
        """Continuous bottom latent ``[B, D_bottom, *spatial / 4]`` from the bottom features and the quantized top."""
        conditioning = self.decoder_top(quantized_top.to(features.dtype))
        z_bottom = self.pre_quantize_bottom(torch.cat([features, conditioning], dim=1))
        return normalize_latents(z_bottom, self.latent_norm)

    def decode(
        self, quantized_top: torch.Tensor, quantized_bottom: torch.Tensor, output_size: list[int] | None = None
    ) -> torch.Tensor:
        """Image from quantized top (``1/8``) and bottom (``1/4``) latents; cropped to ``output_size`` when given."""
        top = self.upsample_top(quantized_top)
        y = self.decoder(torch.cat([top, quantized_bottom.to(top.dtype)], dim=1))
        if output_size is not None:
            y = crop_to(y, output_size)
        return y

    def encode_to_indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code indices ``(top [B, *spatial / 8], bottom [B, *spatial / 4])`` of an image; never changes any state."""
        z_top, features = self.encode(x)
        top = self.quantizer_top.quantize_indices(z_top)
        bottom = self.quantizer_bottom.quantize_indices(self.bottom_latent(features, self.quantizer_top.embed(top)))
        return top, bottom

    def embed_indices(self, indices: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized latents ``(top [B, D_top, ...], bottom [B, D_bottom, ...])`` of ``(top, bottom)`` indices."""
        top, bottom = indices[0], indices[1]
        if top.ndim != self.spatial_dims + 1 or bottom.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"expected (top, bottom) indices of shape [B, *spatial] with {self.spatial_dims} spatial dims, "
                f"got {list(top.shape)} and {list(bottom.shape)}."
            )
        expected = [top.shape[0]] + [2 * s for s in top.shape[1:]]
        if list(bottom.shape) != expected:
            raise ValueError(
                f"bottom indices must be twice the top indices in every spatial dim, got top {list(top.shape)} "
                f"and bottom {list(bottom.shape)}."
            )
        return self.quantizer_top.embed(top), self.quantizer_bottom.embed(bottom)

    def decode_from_indices(
        self, indices: tuple[torch.Tensor, torch.Tensor], output_size: list[int] | None = None
    ) -> torch.Tensor:
        """Image decoded from ``(top, bottom)`` code indices (a tuple or a list of two tensors)."""
        quantized_top, quantized_bottom = self.embed_indices(indices)
        return self.decode(quantized_top, quantized_bottom, output_size)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` through both codebooks without changing any state (export and inference path)."""
        size = [int(s) for s in x.shape[2:]]
        return self.decode_from_indices(self.encode_to_indices(x), size)

    @torch.jit.unused
    def forward(self, x):  # untyped: TorchScript reads unused signatures without the future import
        """Training forward pass.

        Args:
            x: image ``[B, in_channels, *spatial]``.

        Returns:
            :class:`VQOutput` with the reconstruction (input size), ``quantizer_loss = top + bottom`` and
            ``levels = (top, bottom)`` :class:`~vqvae_medical.networks.quantizers.QuantizerOutput`.
        """
        size = list(x.shape[2:])
        z_top, features = self.encode(x)
        q_top = self.quantizer_top(z_top)
        q_bottom = self.quantizer_bottom(self.bottom_latent(features, q_top.quantized))
        reconstruction = self.decode(q_top.quantized, q_bottom.quantized, size)
        return VQOutput(reconstruction, q_top.loss + q_bottom.loss, (q_top, q_bottom))
