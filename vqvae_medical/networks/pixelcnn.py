"""Gated PixelCNN prior over VQ code maps.

van den Oord et al., "Conditional Image Generation with PixelCNN Decoders", NeurIPS 2016 (arXiv 1606.05328):
a vertical stack (rows above) and a horizontal stack (current row, to the left) of gated convolutions
``tanh(W_f * x + V_f^T h) * sigmoid(W_g * x + V_g^T h)``, with the vertical stack fed into the horizontal one
shifted down by one row so that the receptive field has no blind spot. Residual connections and skip outputs
are in the horizontal stack. The prior reads an integer code map ``[B, H, W]`` (the indices of a VQ-VAE level) and
returns logits ``[B, K, H, W]`` over the ``K`` codes, position ``(r, c)`` depending only on the codes before it in
raster order. 2D only.

The causal structure is built from convolution shapes and one-sided padding, not from masked weights, so no
weight is ever multiplied by a mask and no work is spent on masked-out taps. With ``p = kernel_size // 2`` and
``L`` layers the logits at ``(r, c)`` depend on the codes at rows ``r - 1 - L p .. r - 1``, columns
``c - L p .. c + L p`` and on row ``r``, columns ``c - L p .. c - 1`` (clipped to the map), and on nothing else.

:class:`PixelCNNCache` evaluates the same network one position at a time for raster-order sampling: the vertical
stack once per row, the horizontal stack one column per layer and position (see
:mod:`vqvae_medical.stages.prior.sampling`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqvae_medical.networks.code_prior import CodePrior, CodePriorCache

__all__ = ["GatedPixelCNN", "GatedPixelCNNLayer", "PixelCNNCache", "prior_cross_entropy", "bits_per_code"]


def _gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation ``tanh(a) * sigmoid(b)`` of the two channel halves ``a, b`` of ``x``."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedPixelCNNLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack, without blind spot (arXiv 1606.05328, Fig. 2).

    With ``p = kernel_size // 2``, the vertical stack output at row ``r`` is a ``(p + 1) x kernel_size``
    convolution over rows ``r - p .. r`` of its input; it reaches the horizontal stack through a ``1 x 1``
    convolution after a shift down by one row, so row ``r`` of the horizontal stack only sees rows above ``r``
    through it. The horizontal stack is a ``1 x (p + 1)`` convolution over columns ``c - p .. c`` (mask ``"B"``) or a
    ``1 x p`` convolution over columns ``c - p .. c - 1`` (mask ``"A"``, first layer: the current code is excluded;
    this layer has no residual connection since its input contains the current code).

    Args:
        in_channels: input channels of both stacks.
        channels: output channels of both stacks.
        kernel_size: odd kernel size, at least 3.
        mask_type: ``"A"`` (first layer) or ``"B"``.
        num_classes: number of classes for a per-layer class embedding added in the gates (``None``: no class).
        conditioning_channels: channels of a spatial conditioning map projected by a ``1 x 1`` convolution and
            added in the gates (``None``: no spatial conditioning).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 3,
        mask_type: str = "B",
        num_classes: int | None = None,
        conditioning_channels: int | None = None,
    ) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and at least 3, got {kernel_size}.")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}.")
        p = kernel_size // 2
        self.pad = p
        self.mask_a = mask_type == "A"
        self.h_width = p if self.mask_a else p + 1
        self.v_conv = nn.Conv2d(in_channels, 2 * channels, (p + 1, kernel_size))
        self.h_conv = nn.Conv2d(in_channels, 2 * channels, (1, self.h_width))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, 2 * channels, 1)  # residual and skip halves
        self.class_embed = nn.Embedding(num_classes, 2 * channels) if num_classes is not None else None
        self.cond_proj = (
            nn.Conv2d(conditioning_channels, 2 * channels, 1) if conditioning_channels is not None else None
        )

    def conditioning(self, class_label: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor | None:
        """The term added in this layer's gates: ``[B, 2C, 1, 1]`` (class), ``[B, 2C, H, W]`` (spatial) or ``None``."""
        cond: torch.Tensor | None = None
        if self.class_embed is not None and class_label is not None:
            cond = self.class_embed(class_label)[:, :, None, None]
        if self.cond_proj is not None and features is not None:
            s = self.cond_proj(features)
            if cond is None:
                cond = s
            else:
                cond = cond + s
        return cond

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vertical output, horizontal output and skip output, each ``[B, C, H, W]``."""
        p = self.pad
        height = v.shape[2]
        width = h.shape[3]
        v_pre = self.v_conv(F.pad(v, [p, p, p, 0]))
        if cond is not None:
            v_pre = v_pre + cond
        h_pre = self.h_conv(F.pad(h, [p, 0]))
        if self.mask_a:
            h_pre = h_pre[:, :, :, :width]
        h_pre = h_pre + self.v_to_h(F.pad(v_pre, [0, 0, 1, 0])[:, :, :height])
        if cond is not None:
            h_pre = h_pre + cond
        res, skip = self.h_out(_gate(h_pre)).chunk(2, dim=1)
        if not self.mask_a:
            res = res + h
        return _gate(v_pre), res, skip


class GatedPixelCNN(CodePrior):
    """Gated PixelCNN prior over a 2D map of VQ code indices (van den Oord et al. 2016, arXiv 1606.05328).

    Conditioning (both optional, both added in every layer's gates through a per-layer projection):

    - class: ``class_label`` ``[B]`` integers in ``[0, num_classes)``; a per-layer embedding is the gate bias;
    - spatial: ``condition`` of the same spatial size as the codes (no causality applies to it), either a float
      map ``[B, conditioning_channels, H, W]`` (e.g. the embedded top level of a VQ-VAE-2 already upsampled), or,
      when ``conditioning_num_embeddings`` is set, integer codes ``[B, Hc, Wc]`` (e.g. the top code map) that go
      through their own embedding of ``conditioning_channels`` dims and are nearest-upsampled to ``H x W``.

    A conditioned prior requires its conditioning in :meth:`forward`. The forward is TorchScript-scriptable; an
    unconditioned prior's ``forward(codes) -> logits`` is the one-tensor network a bundle's ``network_def`` needs.

    Args:
        spatial_dims: number of spatial dimensions; only 2 is supported.
        num_embeddings: number of codes ``K`` (codebook size of the modelled level).
        channels: channels of both stacks (and of the code embedding).
        num_layers: gated layers (the first is mask ``"A"``, the others ``"B"``).
        kernel_size: odd kernel size of the stacks, at least 3.
        num_classes: number of classes for class conditioning.
        conditioning_channels: channels of the spatial condition (embedding dims for integer conditions; defaults
            to ``channels`` when ``conditioning_num_embeddings`` is set).
        conditioning_num_embeddings: number of codes of an integer spatial condition (e.g. the top codebook size).
        output_channels: hidden channels of the ``1 x 1`` output head (defaults to ``channels``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        num_embeddings: int = 512,
        channels: int = 64,
        num_layers: int = 10,
        kernel_size: int = 3,
        num_classes: int | None = None,
        conditioning_channels: int | None = None,
        conditioning_num_embeddings: int | None = None,
        output_channels: int | None = None,
    ) -> None:
        super().__init__()
        conditioning_channels = self.set_conditioning(
            "GatedPixelCNN", spatial_dims, num_embeddings, channels, num_layers, num_classes, conditioning_channels,
            conditioning_num_embeddings,
        )
        self.kernel_size = kernel_size

        self.embedding = nn.Embedding(num_embeddings, channels)
        self.cond_embedding = (
            nn.Embedding(conditioning_num_embeddings, conditioning_channels)
            if conditioning_num_embeddings is not None and conditioning_channels is not None
            else None
        )
        self.layers = nn.ModuleList(
            [
                GatedPixelCNNLayer(
                    channels, channels, kernel_size, "A" if i == 0 else "B", num_classes, conditioning_channels
                )
                for i in range(num_layers)
            ]
        )
        hidden = channels if output_channels is None else output_channels
        self.output = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_embeddings, 1)
        )

    @property
    def receptive_field(self) -> int:
        """``L * p``: the logits at ``(r, c)`` see rows ``r - 1 - L p .. r - 1`` and columns ``c - L p .. c + L p``."""
        return self.num_layers * (self.kernel_size // 2)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code embeddings ``[B, C, H, W]`` of a code map ``[B, H, W]``."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def condition_features(self, condition: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
        """The spatial condition as a float map ``[B, C_cond, height, width]`` (``None`` if not conditioned)."""
        return self.spatial_features(condition, height, width, contiguous=True)

    def forward(
        self, codes: torch.Tensor, class_label: torch.Tensor | None = None, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` of the codes ``[B, H, W]`` (int64), each from the codes before it in raster order.

        Args:
            codes: code map ``[B, H, W]``.
            class_label: ``[B]`` class indices (required iff the prior is class-conditioned).
            condition: spatial condition (required iff the prior is spatially conditioned), see the class docstring.
        """
        if codes.dim() != 3 or codes.dtype != torch.long:
            raise ValueError("codes must be an int64 code map [B, H, W].")
        self.check_class_label(class_label)
        features = self.condition_features(condition, codes.shape[1], codes.shape[2])
        x = self.embed_codes(codes)
        v = x
        h = x
        skip = torch.zeros_like(x)
        for layer in self.layers:
            v, h, s = layer(v, h, layer.conditioning(class_label, features))
            skip = skip + s
        return self.output(skip)


class PixelCNNCache(CodePriorCache):
    """Incremental evaluation of a :class:`GatedPixelCNN`, one position at a time in raster order.

    Gives the logits of :meth:`GatedPixelCNN.forward` at each position (same operations on the same values, up to
    floating-point summation order inside the convolutions) at a small fraction of the cost of a full forward:

    - the vertical stack is computed once per row, for all layers, when the row is complete (one output row of each
      ``(p + 1) x k`` convolution, from the cached rows above), which gives the shifted vertical input of the
      horizontal stack for the next row;
    - the horizontal stack is computed for one column per layer and position, from a per-layer buffer of the
      current row's inputs.

    Arguments as :class:`~vqvae_medical.networks.code_prior.CodePriorCache`'s.
    """

    model: GatedPixelCNN

    def start(self, class_label: torch.Tensor | None, condition: torch.Tensor | None) -> None:
        model, batch_size, height, width = self.model, self.batch_size, self.height, self.width
        model.check_class_label(class_label)
        self.layers = list(model.layers)
        param = model.embedding.weight
        p = model.kernel_size // 2
        self.pad = p
        features = model.condition_features(condition, height, width)
        self.cond = [layer.conditioning(class_label, features) for layer in self.layers]
        c = model.channels
        # vertical-stack inputs of each layer, zero-padded like F.pad(v, [p, p, p, 0]) in the full forward
        self.v_in = [param.new_zeros(batch_size, c, height + p, width + 2 * p) for _ in self.layers]
        # horizontal-stack inputs of each layer for the current row, zero-padded like F.pad(h, [p, 0])
        self.h_in = [param.new_zeros(batch_size, c, 1, width + p) for _ in self.layers]
        # the vertical pre-activations of the row above through v_to_h; zeros above the first row (the shift)
        zero_row = param.new_zeros(batch_size, 2 * c, 1, width)
        self.v_to_h = [layer.v_to_h(zero_row) for layer in self.layers]
        self.row = 0
        self.col = 0

    def _cond_at(self, i: int, r: int, c: int | None) -> torch.Tensor | None:
        cond = self.cond[i]
        if cond is None or (cond.shape[2] == 1 and cond.shape[3] == 1):  # none, or class only
            return cond
        if c is None:
            return cond[:, :, r : r + 1]
        return cond[:, :, r : r + 1, c : c + 1]

    def next_logits(self) -> torch.Tensor:
        """Logits ``[B, K]`` at the current position, from the codes appended so far."""
        if self.row >= self.height:
            raise ValueError("the code map is complete.")
        r, c, p = self.row, self.col, self.pad
        skip = torch.zeros_like(self.h_in[0][:, :, :, :1])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = self.h_in[i]
            h_pre = layer.h_conv(h[:, :, :, c : c + layer.h_width])
            h_pre = h_pre + self.v_to_h[i][:, :, :, c : c + 1]
            cond = self._cond_at(i, r, c)
            if cond is not None:
                h_pre = h_pre + cond
            res, s = layer.h_out(_gate(h_pre)).chunk(2, dim=1)
            if not layer.mask_a:
                res = res + h[:, :, :, c + p : c + p + 1]
            if i < last:
                self.h_in[i + 1][:, :, :, c + p : c + p + 1] = res
            skip = skip + s
        return self.model.output(skip).flatten(1)

    def append(self, codes: torch.Tensor) -> None:
        """Set the codes ``[B]`` at the current position and move to the next one."""
        r, c, p = self.row, self.col, self.pad
        e = self.model.embedding(codes)[:, :, None, None]
        self.v_in[0][:, :, r + p : r + p + 1, c + p : c + p + 1] = e
        self.h_in[0][:, :, :, c + p : c + p + 1] = e
        self.col += 1
        if self.col == self.width:
            self._finish_row()
            self.col = 0
            self.row += 1

    def _finish_row(self) -> None:
        """Vertical stack of the completed row for every layer; its shifted input to the next row's horizontal stack."""
        r, p = self.row, self.pad
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            v_pre = layer.v_conv(self.v_in[i][:, :, r : r + p + 1])
            cond = self._cond_at(i, r, None)
            if cond is not None:
                v_pre = v_pre + cond
            self.v_to_h[i] = layer.v_to_h(v_pre)
            if i < last:
                self.v_in[i + 1][:, :, r + p : r + p + 1, p : p + self.width] = _gate(v_pre)


def prior_cross_entropy(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of the logits ``[B, K, H, W]`` for the codes ``[B, H, W]``: the prior's loss."""
    if logits.dim() != codes.dim() + 1 or logits.shape[0] != codes.shape[0] or logits.shape[2:] != codes.shape[1:]:
        raise ValueError(
            f"logits must be [B, K, *S] for codes [B, *S], got {list(logits.shape)} and {list(codes.shape)}."
        )
    return F.cross_entropy(logits.float(), codes)


def bits_per_code(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean negative log2-likelihood per code: :func:`prior_cross_entropy` divided by ``ln 2``."""
    return prior_cross_entropy(logits, codes) / math.log(2.0)
