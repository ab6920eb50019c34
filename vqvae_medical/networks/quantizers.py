"""Vector quantizers for VQ-VAEs: nearest-code search, EMA and gradient-trained codebooks.

The EMA quantizer follows van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017
(arXiv 1711.00937, appendix A.1) and Sonnet's ``VectorQuantizerEMA``. It exists here, rather than reusing
``monai.networks.layers.EMAQuantizer``, because MONAI's version

- starts the EMA cluster sizes at zero, so with the usual decay of 0.99 almost every code is starved and the
  model collapses onto a handful of codes (measured: one code, SSIM 0.12 on brain slices);
- has no data-dependent initialisation and no dead-code restart;
- builds a dense ``N x K`` distance matrix and an ``N x K`` one-hot matrix per step, which dominates the step time
  and does not fit for 3D feature maps with large codebooks.

Here the nearest-code search is a chunked ``addmm`` + ``argmin`` under a memory cap, run directly on the
channels-first feature maps (no channels-last copy) with a two-stage argmin (``argmin`` is not vectorised on CPU,
``amin`` is); the EMA statistics are gathered with ``bincount``/``index_add_`` and all-reduced under
``torch.distributed``; the straight-through output and the commitment loss come from one fused autograd function;
and everything that touches the codebook runs in fp32 whatever autocast context surrounds it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QuantizerOutput",
    "nearest_code",
    "perplexity",
    "EMAVectorQuantizer",
    "GradientVectorQuantizer",
    "make_quantizer",
]

#: default memory cap of one distance chunk, in bytes (fp32 elements * 4). The chunk buffer is allocated once per
#: search and reused; on CPU 2-16 MiB measured within 5% of each other single-threaded, and the largest means the
#: fewest parallel regions, which matters when the cores are oversubscribed (see ``docs/benchmarks.md``)
DEFAULT_MAX_CHUNK_BYTES = 16 * 1024 * 1024

#: feature maps with at least this many vectors per sample are searched in place, one sample at a time
_MIN_MAP_SIZE = 256


class QuantizerOutput(NamedTuple):
    """Result of a quantizer call.

    Attributes:
        quantized: straight-through quantized tensor, same shape as the input ``[B, D, *spatial]``.
        loss: scalar quantizer loss (commitment, plus codebook loss for the gradient quantizer).
        indices: code indices ``[B, *spatial]`` (int64).
        perplexity: scalar ``exp(entropy)`` of the code histogram of this batch.
        usage: scalar fraction of codes used over the recent window of training batches
            (in eval mode: fraction used in this batch).
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def _chunk_rows(n: int, k: int, max_chunk_bytes: int) -> int:
    """Rows per distance chunk: as many as fit ``max_chunk_bytes`` of fp32 ``K``-vectors (at least one)."""
    return max(1, min(n, int(max_chunk_bytes) // (4 * k)))


def _argmin_group(k: int, device_type: str) -> int:
    """Group size of the two-stage argmin over ``k`` codes, 0 for a plain ``argmin``.

    Only on CPU, where ``argmin`` is not vectorised: groups of 128 for ``K >= 2048``, 64 for ``K >= 1024``, 32 down
    to ``K = 256`` (measured 2-5x faster than ``argmin`` for ``K >= 512``).
    """
    if device_type != "cpu":
        return 0
    for group, min_k in [(128, 2048), (64, 1024), (32, 256)]:
        if k % group == 0 and k >= min_k:
            return group
    return 0


def _argmin_rows(dist: torch.Tensor, group: int, out: torch.Tensor) -> None:
    """``out[:] = dist.argmin(1)`` for a contiguous ``[m, K]`` block.

    With ``group > 0``: the vectorised ``amin`` of every run of ``group`` consecutive codes, ``argmin`` over those
    minima (the first group holding the row minimum), then ``argmin`` inside that group. The index is the one
    ``argmin`` returns, first minimum on ties included, at a fraction of the cost.
    """
    if group == 0:
        out.copy_(dist.argmin(1))
        return
    m, k = dist.shape[0], dist.shape[1]
    blocks = dist.view(m, k // group, group)
    best = blocks.amin(2).argmin(1)
    inner = blocks[torch.arange(m, device=dist.device), best].argmin(1)
    out.copy_(inner + best * group)


def _nearest_rows(
    flat: torch.Tensor,
    codebook_t: torch.Tensor,
    code_sq: torch.Tensor,
    buf: torch.Tensor,
    group: int,
    out: torch.Tensor,
) -> None:
    """Write the nearest code of every row of ``flat`` ``[n, D]`` (any strides) into ``out`` ``[n]``, chunk by chunk
    through ``buf`` ``[rows, K]``."""
    n = flat.shape[0]
    rows = buf.shape[0]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        dist = buf[: stop - start]
        torch.addmm(code_sq, flat[start:stop], codebook_t, beta=1.0, alpha=-2.0, out=dist)
        _argmin_rows(dist, group, out[start:stop])


def nearest_code(
    flat: torch.Tensor, codebook: torch.Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean distance) for every row of ``flat``.

    ``argmin_k ||x - e_k||^2 = argmin_k (||e_k||^2 - 2 x.e_k)``: the ``||x||^2`` term is constant per row and is
    skipped. Rows are processed in chunks through one reused buffer of at most ``max_chunk_bytes`` of fp32
    distances (the argmin's per-chunk temporaries add at most a fifth of that). The arithmetic is fp32, also under
    autocast (``out=`` variants are not autocast).

    Args:
        flat: ``[N, D]`` vectors (any strides).
        codebook: ``[K, D]`` codes.
        max_chunk_bytes: memory cap for one ``chunk x K`` distance block.

    Returns:
        ``[N]`` int64 indices; on ties the lowest index.
    """
    if flat.ndim != 2 or codebook.ndim != 2 or flat.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code expects flat [N, D] and codebook [K, D], got {list(flat.shape)} and {list(codebook.shape)}."
        )
    n, k = flat.shape[0], codebook.shape[0]
    codebook = codebook.float()
    out = torch.empty(n, dtype=torch.long, device=flat.device)
    buf = torch.empty(_chunk_rows(n, k, max_chunk_bytes), k, dtype=torch.float32, device=flat.device)
    group = _argmin_group(k, flat.device.type)
    _nearest_rows(flat.float(), codebook.t(), codebook.pow(2).sum(1), buf, group, out)
    return out


def _nearest_code_maps(z3: torch.Tensor, codebook: torch.Tensor, max_chunk_bytes: int) -> torch.Tensor:
    """:func:`nearest_code` of every vector of ``z3`` ``[B, D, S]`` (fp32), as ``[B, S]`` indices.

    Large maps are searched in place, one sample at a time (``z3[b].t()`` is a valid strided matrix for BLAS), so
    the channels-last copy of the whole batch is never made; small ones are copied and searched at once.
    """
    b, d, s = z3.shape
    if s < _MIN_MAP_SIZE:
        return nearest_code(z3.transpose(1, 2).reshape(-1, d), codebook, max_chunk_bytes).view(b, s)
    k = codebook.shape[0]
    codebook = codebook.float()
    code_sq = codebook.pow(2).sum(1)
    buf = torch.empty(_chunk_rows(s, k, max_chunk_bytes), k, dtype=torch.float32, device=z3.device)
    group = _argmin_group(k, z3.device.type)
    out = torch.empty(b, s, dtype=torch.long, device=z3.device)
    for i in range(b):
        _nearest_rows(z3[i].t(), codebook.t(), code_sq, buf, group, out[i])
    return out


def _codes_channels_first(codebook: torch.Tensor, indices: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Codes of indices ``[B, S]`` as a new contiguous tensor of ``shape`` ``[B, D, *spatial]``."""
    b, s = indices.shape
    out = torch.empty(shape, dtype=codebook.dtype, device=codebook.device)
    out3 = out.view(b, codebook.shape[1], s)
    if s < _MIN_MAP_SIZE:
        out3.copy_(F.embedding(indices, codebook).transpose(1, 2))
        return out
    codebook_t = codebook.t().contiguous()
    for i in range(b):
        torch.index_select(codebook_t, 1, indices[i], out=out3[i])
    return out


def _code_sums(z3: torch.Tensor, indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Per-code sums ``[K, D]`` of the vectors of ``z3`` ``[B, D, S]`` assigned by ``indices`` ``[B, S]``."""
    b, d, s = z3.shape
    if s < _MIN_MAP_SIZE:
        flat = z3.transpose(1, 2).reshape(-1, d)
        return torch.zeros(num_embeddings, d, dtype=z3.dtype, device=z3.device).index_add_(0, indices.view(-1), flat)
    sums_t = torch.zeros(d, num_embeddings, dtype=z3.dtype, device=z3.device)
    for i in range(b):
        sums_t.index_add_(1, indices[i], z3[i])
    return sums_t.t().contiguous()


class _StraightThrough(torch.autograd.Function):
    """Codes ``q = codebook[indices]`` of ``z`` ``[B, D, *spatial]`` with the straight-through estimator, and the
    commitment loss: ``(z + sg(q - z), beta * mean((z - sg(q))^2))`` in one pass forward and one backward.

    The output is exactly ``q``; its gradient goes to ``z`` unchanged, plus ``2 beta (z - q) / numel`` times the
    loss gradient. The codebook receives no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, beta: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = _codes_channels_first(codebook, indices, list(z.shape))
        diff = z.detach() - q
        ctx.save_for_backward(diff)
        ctx.scale = 2.0 * beta / max(1, diff.numel())
        return q, diff.square().mean() * beta

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, grad_loss: torch.Tensor | None):  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        if grad_loss is None:
            grad_z = grad_q
        elif grad_q is None:
            grad_z = diff * (grad_loss * ctx.scale)
        else:
            grad_z = torch.addcmul(grad_q, diff, grad_loss * ctx.scale)
        return grad_z, None, None, None


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` of a code histogram ``counts`` ``[K]`` (``p = counts / sum``), in the dtype of ``counts``.

    1 when one code is used, ``K`` when all ``K`` are used equally, 0 for an empty histogram. The package's only
    perplexity: the quantizers' per-batch value, the evaluation metrics' per-epoch value and the prior report's
    marginal entropy (``log2`` of it) all call it. No host synchronisation (``torch.special.entr`` gives 0 at 0).
    """
    counts = counts if counts.is_floating_point() else counts.float()
    total = counts.sum()
    entropy = torch.special.entr(counts / total.clamp_min(1.0)).sum()
    return torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))


def _maps(x: torch.Tensor) -> torch.Tensor:
    """``[B, D, *spatial]`` -> ``[B, D, S]`` (fp32; a view when the layout allows)."""
    return x.float().reshape(x.shape[0], x.shape[1], -1)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, D, *spatial]`` -> ``[B * prod(spatial), D]`` (fp32)."""
    d = x.shape[1]
    return x.float().movedim(1, -1).reshape(-1, d)


#: torch.multinomial draws from at most 2**24 categories
_MAX_MULTINOMIAL = 2**24


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _VectorQuantizerBase(nn.Module):
    """Shared codebook geometry, look-ups and usage tracking of the quantizers."""

    def __init__(
        self,
        spatial_dims: int,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        usage_window: int = 64,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_embeddings and embedding_dim must be positive, got {num_embeddings} and {embedding_dim}."
            )
        if usage_window < 1:
            raise ValueError(f"usage_window must be at least 1, got {usage_window}.")
        self.spatial_dims = spatial_dims
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = float(commitment_cost)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.usage_window = usage_window
        # ring buffer of the codes used by the last `usage_window` training batches (usage and dead-code restarts)
        self.register_buffer("recent_usage", torch.zeros(usage_window, num_embeddings, dtype=torch.bool), False)
        self.register_buffer("usage_step", torch.zeros((), dtype=torch.long), False)

    def get_codebook(self) -> torch.Tensor:
        """The ``[K, D]`` codebook (fp32)."""
        raise NotImplementedError

    def _check_input(self, z: torch.Tensor) -> None:
        if z.ndim != self.spatial_dims + 2 or z.shape[1] != self.embedding_dim:
            raise ValueError(
                f"expected a [B, {self.embedding_dim}, ...] tensor with {self.spatial_dims} spatial dims, "
                f"got shape {list(z.shape)}."
            )

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, *spatial]`` of an encoder output ``[B, D, *spatial]``; never changes any state."""
        self._check_input(z)
        with torch.no_grad():
            if torch.jit.is_scripting():
                idx = nearest_code(_to_channels_last(z), self.get_codebook(), self.max_chunk_bytes)
            else:
                idx = self._nearest_fp32(z)
        return idx.view([z.shape[0]] + list(z.shape[2:]))

    @torch.jit.unused
    def _nearest_fp32(self, z):  # untyped: TorchScript reads unused signatures without the future import
        with torch.autocast(device_type=z.device.type, enabled=False):
            return _nearest_code_maps(_maps(z), self.get_codebook().detach(), self.max_chunk_bytes)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, D, *spatial]`` (fp32) for indices ``[B, *spatial]``; never changes any state."""
        return F.embedding(indices.long(), self.get_codebook()).movedim(-1, 1)

    def _record_usage(self, counts: torch.Tensor) -> torch.Tensor:
        """Store this batch's used codes in the ring buffer and return the fraction used over the window."""
        slot = int(self.usage_step.item()) % self.usage_window
        self.recent_usage[slot] = counts > 0
        self.usage_step += 1
        filled = min(int(self.usage_step.item()), self.usage_window)
        return self.recent_usage[:filled].any(0).float().mean()

    def _stats(self, indices: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if counts is None:
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_embeddings).float()
        if self.training:
            usage = self._record_usage(counts)
        else:
            usage = (counts > 0).float().mean()
        return perplexity(counts), usage

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, commitment_cost={self.commitment_cost}"
        )


class EMAVectorQuantizer(_VectorQuantizerBase):
    """Vector quantizer whose codebook follows an exponential moving average of its assigned encoder outputs.

    van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017, arXiv 1711.00937 (appendix A.1).
    Compared with MONAI's ``EMAQuantizer`` (see the module docstring) it is stable from the first step, restarts
    dead codes, keeps all codebook arithmetic in fp32 under autocast and never materialises an ``N x K`` matrix
    beyond ``max_chunk_bytes``.

    Args:
        spatial_dims: number of spatial dimensions of the feature maps (1, 2 or 3).
        num_embeddings: codebook size ``K``.
        embedding_dim: code dimension ``D`` (channels of the encoder output).
        commitment_cost: weight ``beta`` of the commitment loss ``||z - sg(e)||^2``.
        decay: EMA decay of the cluster sizes and sums.
        epsilon: Laplace smoothing of the cluster sizes.
        init: codebook initialisation: ``"data"`` (random encoder outputs of the first training batch),
            ``"kmeans"`` (a few Lloyd iterations on the first batch) or ``"random"`` (unit normal, no data).
        kmeans_iters: Lloyd iterations for ``init="kmeans"``.
        dead_code_threshold: codes whose EMA cluster size falls below this (in encoder vectors per batch), or
            that no vector chose in the last ``usage_window`` training batches, are re-seeded from current
            encoder outputs; ``0`` disables restarts. (The second test matters early in training: a code the
            drifting encoder abandons keeps its large EMA cluster size for ``ln(size / threshold) / (1 - decay)``
            steps, about 280 at decay 0.99, while it is already dead.)
        usage_window: number of recent training batches over which the fraction of used codes is reported and
            unused codes are restarted.
        ddp_sync: all-reduce the statistics (and broadcast initialisation and restarts) under ``torch.distributed``
            so that every rank holds the same codebook.
        max_chunk_bytes: memory cap of one block of the nearest-code search.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        init: str = "data",
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        usage_window: int = 64,
        ddp_sync: bool = True,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        super().__init__(spatial_dims, num_embeddings, embedding_dim, commitment_cost, usage_window, max_chunk_bytes)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        if init not in ("data", "kmeans", "random"):
            raise ValueError(f"init must be 'data', 'kmeans' or 'random', got {init!r}.")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be non-negative, got {dead_code_threshold}.")
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.init = init
        self.kmeans_iters = int(kmeans_iters)
        self.dead_code_threshold = float(dead_code_threshold)
        self.ddp_sync = ddp_sync
        codebook = torch.randn(num_embeddings, embedding_dim)
        self.register_buffer("codebook", codebook)
        # cluster sizes start at one vector per code (not zero) so the first updates cannot divide by ~0
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(init == "random"))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def get_codebook(self) -> torch.Tensor:
        return self.codebook

    @torch.jit.unused
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``[B, D, *spatial]``; in training mode also update the codebook."""
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            with torch.no_grad():
                z3 = _maps(z32.detach())
                if self.training and not bool(self.initialized):
                    self._initialise(z3)
                indices = _nearest_code_maps(z3, self.codebook, self.max_chunk_bytes)
            # z + sg(q - z) and beta * ||z - sg(q)||^2, with the codes searched: before the EMA update changes them
            quantized, loss = _StraightThrough.apply(z32, self.codebook, indices, self.commitment_cost)
            with torch.no_grad():
                if self.training:
                    counts = self._update(z3, indices)
                else:
                    counts = torch.bincount(indices.view(-1), minlength=self.num_embeddings).float()
            perplexity, usage = self._stats(indices, counts)
        return QuantizerOutput(quantized, loss, indices.view((z.shape[0],) + tuple(z.shape[2:])), perplexity, usage)

    # ------------------------------------------------------------------ training-time updates
    def _all_reduce(self, *tensors: torch.Tensor) -> None:
        if self.ddp_sync and _is_distributed():
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.ddp_sync and _is_distributed():
            dist.broadcast(t, src=0)
        return t

    def _sample_rows(self, z3: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` vectors ``[n, D]`` of ``z3`` ``[B, D, S]`` drawn at random (with replacement when it has fewer)."""
        total, s = z3.shape[0] * z3.shape[2], z3.shape[2]
        if total >= n:
            pick = torch.randperm(total, device=z3.device)[:n]
        else:
            pick = torch.randint(0, total, (n,), device=z3.device)
        return z3[pick // s, :, pick % s].contiguous()

    def _initialise(self, z3: torch.Tensor) -> None:
        """Seed the codebook from encoder outputs of the first training batch (rank 0's under DDP)."""
        k = self.num_embeddings
        codebook = self._sample_rows(z3, k)
        if self.init == "kmeans":
            sample = self._sample_rows(z3, min(z3.shape[0] * z3.shape[2], max(20 * k, 4096)))
            for _ in range(self.kmeans_iters):
                assign = nearest_code(sample, codebook, self.max_chunk_bytes)
                counts = torch.bincount(assign, minlength=k).float()
                sums = torch.zeros_like(codebook).index_add_(0, assign, sample)
                used = counts > 0
                codebook[used] = sums[used] / counts[used, None]
        codebook = self._broadcast(codebook.contiguous())
        # each code starts with the weight of one vector: never zero (no division by ~0), yet small enough that
        # codes the encoder abandons early fall under the restart threshold within a few dozen steps
        self.codebook.copy_(codebook)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(codebook)
        self.initialized.fill_(True)

    def _update(self, z3: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """EMA update of cluster sizes and sums (Laplace-smoothed), then dead-code restart. Returns batch counts."""
        counts = torch.bincount(indices.view(-1), minlength=self.num_embeddings).float()
        sums = _code_sums(z3, indices, self.num_embeddings)
        self._all_reduce(counts, sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(z3, indices, counts)
        return counts

    def _restart_dead_codes(self, z3: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Re-seed dead codes from current encoder outputs: those whose EMA cluster size fell below
        ``dead_code_threshold``, and, once ``usage_window`` batches have been seen, those unused in all of them and
        in this batch (``counts`` are the all-reduced counts, so every DDP rank picks the same codes).

        The new codes are drawn k-means++-style (Arthur and Vassilvitskii 2007): each vector with probability
        proportional to its squared distance to its code. Uniform draws mostly land in the densest region (the
        background of medical images), where the new codes duplicate a live one and die again at once.
        """
        dead = self.cluster_size < self.dead_code_threshold
        if int(self.usage_step.item()) >= self.usage_window:
            dead |= ~(self.recent_usage.any(0) | (counts > 0))
        n_dead = int(dead.sum().item())
        if n_dead == 0:
            return
        b, d, s = z3.shape
        codes = F.embedding(indices.view(b, s), self.codebook).transpose(1, 2)
        weight = (z3 - codes).pow(2).sum(1).view(-1)
        if weight.numel() > _MAX_MULTINOMIAL:
            weight = weight[:_MAX_MULTINOMIAL]
        if not bool(torch.isfinite(weight).all()) or float(weight.sum()) <= 0.0:
            weight = torch.ones_like(weight)
        pick = torch.multinomial(weight, n_dead, replacement=int((weight > 0).sum()) < n_dead)
        fresh = self._broadcast(z3[pick // s, :, pick % s].contiguous())
        self.codebook[dead] = fresh
        self.cluster_size[dead] = self.dead_code_threshold
        self.embed_sum[dead] = fresh * self.dead_code_threshold
        self.restarts += n_dead


class GradientVectorQuantizer(_VectorQuantizerBase):
    """Vector quantizer whose codebook is learned by gradient descent.

    van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017, arXiv 1711.00937, eq. 3:
    ``loss = ||sg(z) - e||^2 + beta * ||z - sg(e)||^2``, as in the OASIS and ISIC seed models.

    Args:
        spatial_dims: number of spatial dimensions of the feature maps (1, 2 or 3).
        num_embeddings: codebook size ``K``.
        embedding_dim: code dimension ``D``.
        commitment_cost: weight ``beta`` of the commitment loss.
        usage_window: number of recent training batches over which the fraction of used codes is reported.
        max_chunk_bytes: memory cap of one block of the nearest-code search.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        usage_window: int = 64,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        super().__init__(spatial_dims, num_embeddings, embedding_dim, commitment_cost, usage_window, max_chunk_bytes)
        bound = 1.0 / num_embeddings
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim).uniform_(-bound, bound))

    def get_codebook(self) -> torch.Tensor:
        return self.weight.float()

    @torch.jit.unused
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``[B, D, *spatial]``; the codebook learns through the codebook loss."""
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            with torch.no_grad():
                indices = _nearest_code_maps(_maps(z32.detach()), self.weight.detach().float(), self.max_chunk_bytes)
            indices = indices.view(-1)
            quantized = F.embedding(indices, self.weight.float()).view(z32.shape[0], *z32.shape[2:], -1).movedim(-1, 1)
            loss = F.mse_loss(quantized, z32.detach()) + self.commitment_cost * F.mse_loss(z32, quantized.detach())
            quantized = z32 + (quantized - z32).detach()
            perplexity, usage = self._stats(indices)
        return QuantizerOutput(quantized, loss, indices.view((z.shape[0],) + tuple(z.shape[2:])), perplexity, usage)


def make_quantizer(
    kind: str,
    spatial_dims: int,
    num_embeddings: int,
    embedding_dim: int,
    commitment_cost: float = 0.25,
    codebook_init: str = "data",
    **ema_settings: Any,
) -> nn.Module:
    """A quantizer by name, as the autoencoders' ``quantizer`` setting names it: ``"ema"`` (:class:`EMAVectorQuantizer`
    with ``codebook_init`` as its ``init`` and ``ema_settings``, e.g. ``decay``, ``epsilon``,
    ``dead_code_threshold``, ``ddp_sync``) or ``"gradient"`` (:class:`GradientVectorQuantizer`, which has no EMA
    settings: ``codebook_init`` and ``ema_settings`` are not used)."""
    if kind == "ema":
        return EMAVectorQuantizer(
            spatial_dims, num_embeddings, embedding_dim, commitment_cost, init=codebook_init, **ema_settings
        )
    if kind == "gradient":
        return GradientVectorQuantizer(spatial_dims, num_embeddings, embedding_dim, commitment_cost=commitment_cost)
    raise ValueError(f"quantizer must be 'ema' or 'gradient', got {kind!r}.")
