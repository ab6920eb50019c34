"""Causal transformer prior over the raster sequence of a VQ code map, with key/value-cached sampling.

A prior with global context for the codes of a VQ-VAE level: every code attends to all the codes before it in
raster order, not only to a window of rows as in a gated PixelCNN. This is the autoregressive transformer prior of
Esser et al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021 (arXiv 2012.09841), and the
global self-attention that PixelSNAIL (Chen et al., ICML 2018, arXiv 1712.09763) adds to a PixelCNN. The network is
MONAI's :class:`monai.networks.nets.DecoderOnlyTransformer` (its token and position embeddings, causal pre-norm
blocks and output layer, with their weights); this module only arranges the code map as a sequence:

- the input at step ``i`` is the token before code ``i`` (a start token at ``i = 0``), so the output at step ``i``
  predicts code ``i`` from codes ``0 .. i - 1``;
- class conditioning: the start token is the class token (``num_classes`` extra tokens in the vocabulary), which
  every later step attends to; an unconditioned prior has a single start token;
- spatial conditioning (optional, e.g. the upsampled top level of a VQ-VAE-2): the condition map at position ``i``
  is projected to the model width and added to the input embedding of step ``i``, the step that predicts code
  ``i`` (no causality applies to the condition).

MONAI's transformer has no key/value cache: its forward recomputes the whole sequence. :class:`TransformerPriorCache`
evaluates the same modules (MONAI's layer norms, projections, MLPs and output layer) one step at a time, keeping the
keys and values of past steps of every block, so that sampling costs one token per step instead of a whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DecoderOnlyTransformer
from torch import nn

from vqvae_medical.networks.code_prior import CodePrior, CodePriorCache

__all__ = ["TransformerPrior", "TransformerPriorCache"]


def _drop_unused_cross_attention_norms(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the unused ``norm_cross_attn`` LayerNorms were dropped (``pixelcnn_prior``
    < 0.4.0) hold them at their initial values (never trained): drop them so that those checkpoints still load."""
    for key in [k for k in state_dict if k.startswith(prefix) and ".norm_cross_attn." in k]:
        del state_dict[key]


class TransformerPrior(CodePrior):
    """Causal transformer prior over a 2D map of VQ code indices, with the call interface of ``GatedPixelCNN``.

    ``forward(codes [B, H, W], class_label [B] | None, condition | None) -> logits [B, K, H, W]``, the logits at
    ``(r, c)`` depending only on the codes before ``(r, c)`` in raster order (and on the class and condition).
    Code maps up to ``max_seq_len`` positions (``H * W``) are accepted. Conditioning (both optional):

    - class: ``class_label`` ``[B]`` integers in ``[0, num_classes)``, read through the start token;
    - spatial: ``condition`` of the same spatial size as the codes, a float map ``[B, conditioning_channels, H, W]``,
      or, when ``conditioning_num_embeddings`` is set, integer codes ``[B, Hc, Wc]`` (e.g. the top code map) that go
      through their own embedding of ``conditioning_channels`` dims and are nearest-upsampled to ``H x W``.

    The blocks' causal masks (``max_seq_len ** 2`` floats each) are kept out of the state dict, which holds the
    learned weights only. With ``use_flash_attention`` (default) the blocks use ``F.scaled_dot_product_attention``
    (memory linear in the sequence length, as long sequences such as ``64 x 64`` maps need; on one CPU thread a
    forward of 8 maps of ``32 x 32`` through 6 blocks of width 128 took 1.0 CPU-s against 3.6), else MONAI's
    explicit attention matrix. The forward is TorchScript-scriptable.

    Args:
        spatial_dims: number of spatial dimensions; only 2 is supported.
        num_embeddings: number of codes ``K`` (codebook size of the modelled level).
        max_seq_len: the largest code map, in positions ``H * W``.
        channels: width of the transformer (``attn_layers_dim``).
        num_layers: number of transformer blocks.
        num_heads: attention heads per block (``channels`` must be divisible by it).
        num_classes: number of classes for class conditioning.
        conditioning_channels: channels of the spatial condition (embedding dims for integer conditions; defaults
            to ``channels`` when ``conditioning_num_embeddings`` is set).
        conditioning_num_embeddings: number of codes of an integer spatial condition (e.g. the top codebook size).
        embedding_dropout: dropout on the input embeddings (training only).
        use_flash_attention: use ``F.scaled_dot_product_attention`` in MONAI's attention blocks (and in the cache).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        num_embeddings: int = 512,
        max_seq_len: int = 1024,
        channels: int = 128,
        num_layers: int = 6,
        num_heads: int = 4,
        num_classes: int | None = None,
        conditioning_channels: int | None = None,
        conditioning_num_embeddings: int | None = None,
        embedding_dropout: float = 0.0,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        conditioning_channels = self.set_conditioning(
            "TransformerPrior", spatial_dims, num_embeddings, channels, num_layers, num_classes, conditioning_channels,
            conditioning_num_embeddings,
        )
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}.")
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        self.max_seq_len = max_seq_len
        self.num_heads = num_heads

        # vocabulary: the K codes, then the start tokens (one per class, or a single one)
        num_start = num_classes if num_classes is not None else 1
        self.transformer = DecoderOnlyTransformer(
            num_tokens=num_embeddings + num_start,
            max_seq_len=max_seq_len,
            attn_layers_dim=channels,
            attn_layers_depth=num_layers,
            attn_layers_heads=num_heads,
            embedding_dropout_rate=embedding_dropout,
            use_flash_attention=use_flash_attention,
        )
        for block in self.transformer.blocks:
            # the causal mask is a constant of max_seq_len ** 2 floats: keep it out of checkpoints
            mask = block.attn.causal_mask
            del block.attn.causal_mask
            if use_flash_attention:  # unused: the attention is told is_causal instead
                mask = mask.new_empty(1, 1, 0, 0)
            block.attn.register_buffer("causal_mask", mask, persistent=False)
            # MONAI's TransformerBlock builds a cross-attention LayerNorm even without cross-attention; its weights
            # never get a gradient, which DistributedDataParallel refuses ("parameters that were not used")
            if not block.with_cross_attention:
                block.norm_cross_attn = nn.Identity()
        self.register_load_state_dict_pre_hook(_drop_unused_cross_attention_norms)
        self.cond_embedding = (
            nn.Embedding(conditioning_num_embeddings, conditioning_channels)
            if conditioning_num_embeddings is not None and conditioning_channels is not None
            else None
        )
        self.cond_proj = nn.Linear(conditioning_channels, channels) if conditioning_channels is not None else None

    def start_tokens(self, class_label: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The first input token of each sequence ``[B]``: the class token, or the single start token."""
        self.check_class_label(class_label)
        if class_label is not None:
            return class_label.long() + self.num_embeddings
        device = self.transformer.token_embeddings.weight.device
        return torch.full([batch_size], self.num_embeddings, dtype=torch.long, device=device)

    def condition_features(self, condition: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
        """The projected spatial condition of each step, ``[B, height * width, channels]`` (``None`` if not
        conditioned)."""
        features = self.spatial_features(condition, height, width, contiguous=False)
        cond_proj = self.cond_proj
        if features is None or cond_proj is None:
            return None
        return cond_proj(features.flatten(2).transpose(1, 2))

    def forward(
        self, codes: torch.Tensor, class_label: torch.Tensor | None = None, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` of the codes ``[B, H, W]`` (int64), each from the codes before it in raster order.

        Args:
            codes: code map ``[B, H, W]`` with values in ``[0, K)``.
            class_label: ``[B]`` class indices (required iff the prior is class-conditioned).
            condition: spatial condition (required iff the prior is spatially conditioned), see the class docstring.
        """
        if codes.dim() != 3 or codes.dtype != torch.long:
            raise ValueError("codes must be an int64 code map [B, H, W].")
        b, height, width = codes.shape[0], codes.shape[1], codes.shape[2]
        n = height * width
        if n > self.max_seq_len:
            raise ValueError(f"the code map has {n} positions, more than max_seq_len={self.max_seq_len}.")
        start = self.start_tokens(class_label, b)
        features = self.condition_features(condition, height, width)
        tokens = torch.cat([start[:, None], codes.reshape(b, n)[:, : n - 1]], dim=1)
        net = self.transformer
        x = net.token_embeddings(tokens) + net.position_embeddings(tokens)
        if features is not None:
            x = x + features
        x = net.embedding_dropout(x)
        for block in net.blocks:
            x = block(x)
        logits = net.to_logits(x)[:, :, : self.num_embeddings]
        return logits.transpose(1, 2).reshape(b, self.num_embeddings, height, width)


class TransformerPriorCache(CodePriorCache):
    """Incremental evaluation of a :class:`TransformerPrior` with a key/value cache, one position at a time.

    MONAI's ``DecoderOnlyTransformer`` has no key/value cache, so this class runs its modules for the newest step
    only: each block's layer norms, query/key/value projections, output projection and MLP are MONAI's own modules
    applied to one token; the keys and values of the past steps are kept per block in preallocated buffers, and the
    new query attends to them (the same scaled dot product and softmax as MONAI's ``SABlock``, or
    ``F.scaled_dot_product_attention`` when the prior uses flash attention). The logits equal those of
    :meth:`TransformerPrior.forward` at each position up to floating-point summation order. The model should be in
    eval mode (no dropout). The cache holds ``2 * num_layers * B * H * W * channels`` floats.

    Arguments as :class:`~vqvae_medical.networks.code_prior.CodePriorCache`'s.
    """

    model: TransformerPrior

    def start(self, class_label: torch.Tensor | None, condition: torch.Tensor | None) -> None:
        model, batch_size, height, width = self.model, self.batch_size, self.height, self.width
        n = height * width
        if n > model.max_seq_len:
            raise ValueError(f"the code map has {n} positions, more than max_seq_len={model.max_seq_len}.")
        self.length = n
        net = model.transformer
        self.net = net
        self.token = model.start_tokens(class_label, batch_size)
        self.features = model.condition_features(condition, height, width)
        weight = net.token_embeddings.weight
        shape = [[batch_size, block.attn.num_heads, n, block.attn.dim_head] for block in net.blocks]
        self.keys = [weight.new_zeros(s) for s in shape]
        self.values = [weight.new_zeros(s) for s in shape]
        self.step = 0
        self._logits: torch.Tensor | None = None  # logits of the current step, once computed

    def _attention(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """MONAI's ``SABlock`` of block ``i`` for the newest token ``x`` ``[B, 1, D]``; caches its key and value."""
        attn = block.attn
        t = self.step
        if attn.use_combined_linear:
            qkv = attn.input_rearrange(attn.qkv(x))
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = attn.input_rearrange(attn.to_q(x))
            k = attn.input_rearrange(attn.to_k(x))
            v = attn.input_rearrange(attn.to_v(x))
        self.keys[i][:, :, t : t + 1] = k
        self.values[i][:, :, t : t + 1] = v
        keys = self.keys[i][:, :, : t + 1]
        values = self.values[i][:, :, : t + 1]
        if attn.use_flash_attention:
            out = F.scaled_dot_product_attention(q, keys, values, scale=attn.scale)
        else:
            weights = (torch.einsum("blxd,blyd->blxy", q, keys) * attn.scale).softmax(dim=-1)
            out = torch.einsum("bhxy,bhyd->bhxd", weights, values)
        out = attn.out_rearrange(out)
        if attn.include_fc:
            out = attn.out_proj(out)
        return attn.drop_output(out)

    def next_logits(self) -> torch.Tensor:
        """Logits ``[B, K]`` at the current position, from the codes appended so far."""
        t = self.step
        if t >= self.length:
            raise ValueError("the code map is complete.")
        if self._logits is not None:
            return self._logits
        net = self.net
        token = self.token[:, None]
        position = torch.full_like(token, t)
        x = net.token_embeddings(token) + net.position_embeddings.embedding(position)
        if self.features is not None:
            x = x + self.features[:, t : t + 1]
        x = net.embedding_dropout(x)
        for i, block in enumerate(net.blocks):
            x = x + self._attention(i, block, block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        self._logits = net.to_logits(x)[:, 0, : self.model.num_embeddings]
        return self._logits

    def append(self, codes: torch.Tensor) -> None:
        """Set the codes ``[B]`` at the current position and move to the next one."""
        if self.step >= self.length:
            raise ValueError("the code map is complete.")
        self.next_logits()  # the keys and values of this step's input, if not computed yet
        self.token = codes.long()
        self.step += 1
        self._logits = None
