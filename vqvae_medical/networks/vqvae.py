"""VQ-VAE for 2D and 3D images.

van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017 (arXiv 1711.00937); encoder and
decoder laid out as MONAI's ``VQVAE`` (Tudosiu et al. 2022, arXiv 2209.03177): strided convolutions alternating
with residual units. Differences from ``monai.networks.nets.VQVAE``, each for a measured reason:

- the quantizer is :class:`~vqvae_medical.networks.quantizers.EMAVectorQuantizer` (data initialisation, dead-code
  restart, fp32, chunked search) or the gradient-trained one, instead of MONAI's ``EMAQuantizer`` that collapses;
- upsampling is selectable (``"subpixel"`` ICNR by default, free of checkerboards at initialisation);
- inputs whose size is not a multiple of ``2 ** levels`` are padded and the reconstruction cropped back;
- activation checkpointing in segments cut at the lowest resolutions, finer in the highest-resolution stages
  (see :class:`CheckpointedSequential` and ``VQVAE.__init__``);
- index look-ups (:meth:`VQVAE.encode_to_indices`) never change the codebook, in any mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer
from monai.utils import ensure_tuple_rep
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqvae_medical.networks.blocks import (
    UPSAMPLE_MODES,
    ResidualUnit,
    inplace_act,
    make_downsample,
    make_upsample,
)
from vqvae_medical.networks.config import recorded
from vqvae_medical.networks.latent_norm import latent_norm_mode, normalize_latents
from vqvae_medical.networks.quantizers import QuantizerOutput, make_quantizer

# make_quantizer (networks.quantizers) is re-exported
__all__ = [
    "VQOutput", "VQVAE", "CheckpointedSequential", "encoder_input", "make_quantizer", "pad_to_multiple", "crop_to"
]


class VQOutput(NamedTuple):
    """Result of an autoencoder's training forward pass.

    Attributes:
        reconstruction: decoded image, same shape as the input.
        quantizer_loss: sum of the quantizer losses of all levels.
        levels: one :class:`QuantizerOutput` per code level (one for a VQ-VAE, ``(top, bottom)`` for a VQ-VAE-2).
    """

    reconstruction: torch.Tensor
    quantizer_loss: torch.Tensor
    levels: tuple[QuantizerOutput, ...]


def encoder_input(
    x: torch.Tensor, spatial_dims: int, in_channels: int, multiple: int, channels_last: bool
) -> torch.Tensor:
    """An autoencoder's encoder input: ``x`` checked to be a ``[B, in_channels, *spatial]`` image, replicate-padded
    to a multiple of ``multiple`` (:func:`pad_to_multiple`), in the channels-last layout when ``channels_last``."""
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"expected a [B, {in_channels}, ...] image with {spatial_dims} spatial dims, got shape {list(x.shape)}."
        )
    x = pad_to_multiple(x, multiple)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the spatial dims of ``x`` at their end up to a multiple of ``multiple``."""
    pad: list[int] = []
    for size in x.shape[2:][::-1]:
        pad += [0, (multiple - size % multiple) % multiple]
    if sum(pad) == 0:
        return x
    return F.pad(x, pad, mode="replicate")


def crop_to(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Crop the spatial dims of ``x`` to ``size`` (from the start); dims already of that size are left alone (a
    ``narrow`` to the full size would still cost a full-size copy in the backward pass)."""
    for dim, s in enumerate(size):
        if x.shape[dim + 2] != s:
            x = x.narrow(dim + 2, 0, s)
    return x


def _run_layers(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _run_checkpointed(pieces: Sequence[Sequence[nn.Module]], x: torch.Tensor) -> torch.Tensor:
    for layers in pieces:
        x = checkpoint(_run_layers, layers, x, use_reentrant=False)
    return x


class CheckpointedSequential(nn.Module):
    """Layers run in order; with ``use_checkpointing`` the activations of each segment of layers are recomputed in
    the backward pass (``torch.utils.checkpoint``, non-reentrant) instead of being stored.

    Only a segment's input is kept through the forward pass; when the backward pass reaches a segment, its layers
    run again and their activations exist for that segment's backward only. A segment can itself be cut into
    nested checkpointed pieces: then nothing inside it is kept through the forward pass, and while it is
    recomputed only the pieces' inputs are kept, each piece's activations existing for that piece's backward only
    (at the price of running the segment's layers once more).

    Args:
        layers: the layers (one per level, typically; a ``nn.Sequential`` contributes its children to the flat layer
            list that ``segment_ends`` and ``nested_ends`` index).
        use_checkpointing: checkpoint the segments while training.
        segment_ends: positions in the flat layer list where segments end (exclusive); the last segment always ends
            with the last layer. ``None``: one segment per entry of ``layers``.
        nested_ends: positions, inside segments, where nested pieces end.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        use_checkpointing: bool = False,
        segment_ends: Sequence[int] | None = None,
        nested_ends: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.use_checkpointing = use_checkpointing
        n = len(self._flat_layers())
        if segment_ends is None:
            segment_ends, stop = [], 0
            for layer in self.layers:
                stop += len(layer) if isinstance(layer, nn.Sequential) else 1
                segment_ends.append(stop)
        self.segment_ends = sorted({int(e) for e in segment_ends if 0 < int(e) < n} | {n})
        self.nested_ends = sorted({int(e) for e in nested_ends if 0 < int(e) < n} - set(self.segment_ends))

    def _flat_layers(self) -> list[nn.Module]:
        flat: list[nn.Module] = []
        for layer in self.layers:
            flat.extend(layer.children() if isinstance(layer, nn.Sequential) else [layer])
        return flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpointing and self.training and torch.is_grad_enabled():
            return self._forward_checkpointed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    @torch.jit.unused
    def _forward_checkpointed(self, x):  # untyped: TorchScript reads unused signatures without the future import
        flat = self._flat_layers()
        start = 0
        for stop in self.segment_ends:
            cuts = [start] + [e for e in self.nested_ends if start < e < stop] + [stop]
            if len(cuts) > 2:
                pieces = [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
                x = checkpoint(_run_checkpointed, pieces, x, use_reentrant=False)
            else:
                x = checkpoint(_run_layers, flat[start:stop], x, use_reentrant=False)
            start = stop
        return x


@recorded
class VQVAE(nn.Module):
    """Vector-quantised variational autoencoder for 2D or 3D images.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: image channels.
        out_channels: reconstruction channels (defaults to ``in_channels``).
        channels: feature channels per level; ``len(channels)`` levels downsample by ``2 ** len(channels)``.
        num_res_units: residual units per level.
        res_channels: hidden channels of the residual units per level (defaults to ``channels``).
        num_embeddings: codebook size ``K``.
        embedding_dim: code dimension ``D``.
        quantizer: ``"ema"`` or ``"gradient"``.
        commitment_cost: weight of the commitment loss.
        decay: EMA decay (``"ema"`` only).
        epsilon: Laplace smoothing (``"ema"`` only).
        codebook_init: ``"data"``, ``"kmeans"`` or ``"random"`` (``"ema"`` only).
        dead_code_threshold: EMA cluster size under which codes are restarted; 0 disables (``"ema"`` only).
        norm: normalisation in the residual units: ``"batch"``, ``"instance"``, ``"group"`` or ``None``.
        act: activation type and arguments.
        upsample_mode: ``"subpixel"`` (ICNR), ``"resize_conv"`` or ``"transposed"``.
        blur: blur after sub-pixel upsampling.
        output_act: activation of the reconstruction (e.g. ``"sigmoid"``), ``None`` for linear.
        use_checkpointing: recompute the activations in the backward pass, segment by segment, to save memory
            (gradients and outputs are the same as without it).
        ddp_sync: all-reduce codebook statistics under ``torch.distributed``.
        channels_last: keep weights and activations in channels-last memory format, which oneDNN (CPU) and
            cuDNN (CUDA, AMP) convolutions run faster on (measured: about 1.2x per training step on a 2-core CPU).
        normalize_latents: how the encoder's output vectors are normalised before quantization
            (:mod:`~vqvae_medical.networks.latent_norm`): ``False`` not at all, ``True`` projected onto the sphere
            of radius ``sqrt(embedding_dim)`` (l2-normalised codes, Yu et al., ICLR 2022, arXiv 2110.04627),
            ``"tanh"`` their norm squashed below that radius (small vectors keep their norm). Without either the
            encoder's output norm drifts upwards in long runs, the commitment loss grows with it and
            reconstruction quality falls once it dominates.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        channels: Sequence[int] = (64, 128),
        num_res_units: int = 2,
        res_channels: Sequence[int] | int | None = None,
        num_embeddings: int = 256,
        embedding_dim: int = 64,
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
        if len(channels) < 1:
            raise ValueError("channels must name at least one level.")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}.")
        out_channels = in_channels if out_channels is None else out_channels
        res_channels = ensure_tuple_rep(channels if res_channels is None else res_channels, len(channels))
        if len(res_channels) != len(channels):
            raise ValueError("res_channels must be an int or have one entry per level of channels.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.downsample_factor = 2 ** len(channels)
        self.latent_norm = latent_norm_mode(normalize_latents)

        def residuals(ch: int, rch: int) -> list[nn.Module]:
            return [ResidualUnit(spatial_dims, ch, rch, act=act, norm=norm) for _ in range(num_res_units)]

        # ReLU-type activations after a downsampling convolution run in place (nothing saves its output)
        level_act = inplace_act(act)
        # Checkpoint segments (CheckpointedSequential) end where the feature maps are smallest, right after a
        # downsampling and right before an upsampling, so that the full-resolution activations are never kept
        # through the forward pass. Measured at 128^3: the largest remaining costs are the activations of the
        # highest-resolution stages while they are recomputed, so those stages are cut after every residual unit
        # (a residual unit's backward then holds its own activations and one input per earlier unit only): in the
        # decoder directly, since its backward runs first and the cut points are freed at once; in the encoder as
        # pieces nested in the segment, so that none of them is kept through the whole step.
        encoder: list[nn.Module] = []
        encoder_ends: list[int] = []
        encoder_nested: list[int] = []
        prev = in_channels
        for level, (ch, rch) in enumerate(zip(channels, res_channels, strict=True)):
            start = sum(len(stage) for stage in encoder)
            if level > 0:  # after the downsampling into this level (and its activation)
                encoder_ends.append(start + 2)
            else:  # the first stage: after every residual unit but the last
                encoder_nested += [start + 3 + i for i in range(num_res_units - 1)]
            encoder.append(
                nn.Sequential(make_downsample(spatial_dims, prev, ch), get_act_layer(level_act), *residuals(ch, rch))
            )
            prev = ch
        encoder.append(Conv[Conv.CONV, spatial_dims](prev, embedding_dim, kernel_size=3, padding=1))
        self.encoder = CheckpointedSequential(encoder, use_checkpointing, encoder_ends, encoder_nested)

        rev = list(channels)[::-1]
        rev_res = list(res_channels)[::-1]
        decoder: list[nn.Module] = [Conv[Conv.CONV, spatial_dims](embedding_dim, rev[0], kernel_size=3, padding=1)]
        decoder_ends: list[int] = []
        for i, (ch, rch) in enumerate(zip(rev, rev_res, strict=True)):
            last = i + 1 == len(rev)
            start = sum(len(stage) if isinstance(stage, nn.Sequential) else 1 for stage in decoder)
            # the last upsampling layer outputs the image directly, as in MONAI's VQVAE (a full-resolution
            # feature stage would cost more than the rest of the decoder)
            layers = [
                *residuals(ch, rch),
                make_upsample(upsample_mode, spatial_dims, ch, out_channels if last else rev[i + 1], 2, blur=blur),
            ]
            if not last:
                # not in place: a sub-pixel upsampling's output is a (channels-last) view, and an in-place
                # operation on a view is recorded by autograd as full-size copies in the backward pass
                layers.append(get_act_layer(act))
                decoder_ends.append(start + num_res_units)  # before the upsampling
            else:  # the last (highest-resolution) stage: after every residual unit but the last
                decoder_ends += [start + 1 + j for j in range(num_res_units - 1)]
            decoder.append(nn.Sequential(*layers))
        if output_act is not None:
            decoder.append(get_act_layer(output_act))
        self.decoder = CheckpointedSequential(decoder, use_checkpointing, decoder_ends)

        ema = {"decay": decay, "epsilon": epsilon, "dead_code_threshold": dead_code_threshold, "ddp_sync": ddp_sync}
        self.quantizer = make_quantizer(
            quantizer, spatial_dims, num_embeddings, embedding_dim, commitment_cost, codebook_init, **ema
        )
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output ``[B, D, *spatial / f]`` (input padded to a multiple of ``f``)."""
        x = encoder_input(x, self.spatial_dims, self.in_channels, self.downsample_factor, self.channels_last)
        z = self.encoder(x)
        return normalize_latents(z, self.latent_norm)

    def decode(self, z_q: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """Image from (quantized) latents; cropped to ``output_size`` when given."""
        y = self.decoder(z_q)
        if output_size is not None:
            y = crop_to(y, output_size)
        return y

    @torch.jit.unused
    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize encoder outputs (updates an EMA codebook in training mode)."""
        return self.quantizer(z)

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, *spatial / f]`` of an image; never changes the codebook."""
        return self.quantizer.quantize_indices(self.encode(x))

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``[B, D, ...]`` of code indices."""
        return self.quantizer.embed(indices)

    def decode_from_indices(self, indices: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """Image decoded from code indices ``[B, *spatial / f]``."""
        return self.decode(self.quantizer.embed(indices), output_size)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` through the codebook without changing any state (export and inference path)."""
        size = [int(s) for s in x.shape[2:]]
        return self.decode_from_indices(self.encode_to_indices(x), size)

    @torch.jit.unused
    def forward(self, x: torch.Tensor) -> VQOutput:
        """Training forward pass: reconstruction, quantizer loss and the level's codes."""
        size = list(x.shape[2:])
        q = self.quantizer(self.encode(x))
        return VQOutput(self.decode(q.quantized, size), q.loss, (q,))
