"""Memorisation audit of a generator: is each sample closer to a training image than held-out real images are?

A memorised sample scores well on a two-sample test, so every generative evaluate reports, beside the c2st:

- each sample's nearest training image (:func:`nearest_images`): the root-mean-square pixel difference
  ``sqrt(mean((a - b)^2))`` of the images at the evaluation resolution (``[0, 1]`` intensities), streamed over
  batches of training images so that a large training set never sits in memory at once;
- the copy rate (:func:`memorisation_metrics`): the share of samples closer to their nearest training image than
  the ``copy_quantile`` (default 5 %) quantile of the same distance for held-out real images. Calibration: each
  held-out real image's distance to its nearest training image gives a reference distribution; a held-out image
  below its 5th percentile is as close to the training set as one real image in twenty, so a generator that does
  not copy scores about 5 % and one that copies scores more (up to 100 %);
- for code priors, the longest run of codes shared with a training code map (:func:`longest_shared_runs`): the
  longest common substring of the sample's code map and any training map, both read in raster order (row after
  row); a copied map shares all its codes.

Compare like with like: the stages pass the samples, the held-out images and the training images through the same
decoder (see :mod:`vqvae_medical.stages.memorisation`), so the autoencoder's own smoothing is no distance.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "COPY_QUANTILE",
    "DISTANCE",
    "Nearest",
    "longest_shared_runs",
    "memorisation_metrics",
    "nearest_images",
]

#: the quantile of the held-out images' nearest-training distances below which a sample counts as a copy.
COPY_QUANTILE = 0.05
#: how the distances are measured (written into ``metrics.json`` as ``nearest_train_distance_kind``).
DISTANCE = "rms pixel difference at the evaluation resolution"


class Nearest(NamedTuple):
    """The nearest training image of each query.

    Attributes:
        distance: ``[N]`` float64 root-mean-square pixel differences.
        index: ``[N]`` int64 position of the nearest image in the training stream.
        images: ``[k, C, ...]`` the nearest training images of the first ``k`` queries (``keep`` of
            :func:`nearest_images`), or ``None``.
        n_train: training images searched.
    """

    distance: torch.Tensor
    index: torch.Tensor
    images: torch.Tensor | None
    n_train: int


def _flat(x: torch.Tensor) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return x.detach().reshape(len(x), -1).double().cpu()


def nearest_images(queries: torch.Tensor, train_batches: Iterable[torch.Tensor], keep: int = 0) -> Nearest:
    """The nearest training image (root-mean-square pixel difference) of each of ``queries`` ``[N, C, ...]``,
    searched over ``train_batches`` (an iterable of ``[B, C, ...]`` tensors with the same shape after the first
    axis; the index counts across batches). The nearest images of the first ``keep`` queries are kept.
    """
    q = _flat(queries)
    q2 = (q**2).sum(1, keepdim=True)
    best = torch.full((len(q),), float("inf"), dtype=torch.float64)
    index = torch.full((len(q),), -1, dtype=torch.long)
    keep = min(int(keep), len(q))
    kept = None
    seen = 0
    for batch in train_batches:
        t = _flat(batch)
        if t.shape[1] != q.shape[1]:
            raise ValueError(
                f"training images {list(batch.shape[1:])} and queries {list(queries.shape[1:])} differ in shape; "
                "give both the evaluation preprocessing."
            )
        d2 = (q2 + (t**2).sum(1)[None] - 2.0 * q @ t.T).clamp_min(0) / q.shape[1]
        d, j = d2.min(1)
        better = d < best
        best = torch.where(better, d, best)
        index = torch.where(better, j + seen, index)
        if keep:
            chosen = batch.detach().cpu().float()[j[:keep]]
            kept = (
                chosen if kept is None else torch.where(better[:keep].view(-1, *[1] * (chosen.ndim - 1)), chosen, kept)
            )
        seen += len(t)
    if seen == 0:
        raise ValueError("no training images to compare with: the training section is empty.")
    return Nearest(best.sqrt(), index, kept, seen)


def _prefix_hashes(seqs: np.ndarray, base: np.uint64) -> np.ndarray:
    """Polynomial prefix hashes (mod 2^64) ``[N, L + 1]`` of each row of ``seqs`` ``[N, L]``."""
    prefix = np.zeros((seqs.shape[0], seqs.shape[1] + 1), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(seqs.shape[1]):
            prefix[:, i + 1] = prefix[:, i] * base + seqs[:, i]
    return prefix


def _window_hashes(prefix: np.ndarray, k: int, base: np.uint64) -> np.ndarray:
    """Hashes of every window of length ``k`` from prefix hashes ``[N, L + 1]``: ``[N, L - k + 1]``."""
    with np.errstate(over="ignore"):
        power = np.uint64(1)
        for _ in range(k):
            power = power * base
        return prefix[:, k:] - prefix[:, : prefix.shape[1] - k] * power


def longest_shared_runs(samples: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """For each sample code map, the length of the longest run of codes it shares with any training code map:
    the longest common substring of the two maps read in raster order (row after row), at any positions.

    Windows are compared by 64-bit polynomial hashes (a collision, about one in 10^19 per pair of windows, could
    only overstate a run); the length is found by binary search per sample, all samples at once.

    Args:
        samples: ``[N, ...]`` integer code maps.
        train: ``[M, ...]`` integer code maps of the training images (any number of positions).

    Returns:
        ``[N]`` int64 run lengths (0 when not even one code value is shared).
    """
    s = samples.reshape(len(samples), -1).cpu().numpy().astype(np.uint64) + np.uint64(1)
    t = train.reshape(len(train), -1).cpu().numpy().astype(np.uint64) + np.uint64(1)
    if len(t) == 0:
        raise ValueError("no training code maps to compare with.")
    base = np.uint64(1_000_003)
    longest = min(s.shape[1], t.shape[1])
    lo = np.zeros(len(s), dtype=np.int64)  # every sample shares a run of at least lo
    hi = np.full(len(s), longest, dtype=np.int64)  # and none longer than hi
    s_prefix, t_prefix = _prefix_hashes(s, base), _prefix_hashes(t, base)
    while (lo < hi).any():
        mids = np.where(lo < hi, (lo + hi + 1) // 2, -1)
        for k in np.unique(mids[mids > 0]):
            k = int(k)
            rows = np.nonzero(mids == k)[0]
            known = np.sort(_window_hashes(t_prefix, k, base), axis=None)
            query = _window_hashes(s_prefix[rows], k, base)
            found = (known[np.searchsorted(known, query).clip(max=len(known) - 1)] == query).any(1)
            lo[rows[found]] = k
            hi[rows[~found]] = k - 1
    return torch.from_numpy(lo)


def memorisation_metrics(
    samples: Nearest,
    held_out: Nearest,
    copy_quantile: float = COPY_QUANTILE,
    sample_runs: torch.Tensor | None = None,
    held_out_runs: torch.Tensor | None = None,
    code_positions: int | None = None,
) -> dict[str, Any]:
    """The audit's keys for ``metrics.json`` from the nearest training images of the samples and of held-out real
    images (the calibration).

    Keys: ``copy_rate`` (share of samples whose distance is below ``copy_threshold``), ``copy_threshold`` (the
    ``copy_quantile`` quantile of the held-out distances), ``copy_quantile``, ``nearest_train_distance_median``,
    ``nearest_train_distance_min`` (samples), ``held_out_nearest_train_distance_median``,
    ``nearest_train_distance_kind`` (:data:`DISTANCE`), ``n_train_images``, ``n_held_out``; with code runs
    ``longest_shared_code_run`` (the longest over the samples), ``longest_shared_code_run_median``,
    ``held_out_longest_shared_code_run_median`` (held-out real maps: what an honest generator shares) and
    ``code_positions`` (codes per map).
    """
    if not 0.0 < copy_quantile < 1.0:
        raise ValueError(f"copy_quantile must be in (0, 1), got {copy_quantile}.")
    if len(held_out.distance) < 1 or len(samples.distance) < 1:
        raise ValueError("the audit needs at least one sample and one held-out real image.")
    threshold = float(torch.quantile(held_out.distance, float(copy_quantile)))
    out: dict[str, Any] = {
        "copy_rate": float((samples.distance < threshold).double().mean()),
        "copy_threshold": threshold,
        "copy_quantile": float(copy_quantile),
        "nearest_train_distance_median": float(samples.distance.median()),
        "nearest_train_distance_min": float(samples.distance.min()),
        "held_out_nearest_train_distance_median": float(held_out.distance.median()),
        "nearest_train_distance_kind": DISTANCE,
        "n_train_images": int(samples.n_train),
        "n_held_out": len(held_out.distance),
    }
    if sample_runs is not None:
        out["longest_shared_code_run"] = int(sample_runs.max())
        out["longest_shared_code_run_median"] = float(sample_runs.double().median())
        if held_out_runs is not None:
            out["held_out_longest_shared_code_run_median"] = float(held_out_runs.double().median())
        out["code_positions"] = None if code_positions is None else int(code_positions)
    return out
