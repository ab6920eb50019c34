"""The memorisation audit of a stage-2 evaluate: samples against the decoded training images of the same
autoencoder (the measures are :mod:`vqvae_medical.evaluation.memorisation`).

:class:`MemorisationAudit` is built by both generative bundles' ``evaluate.json`` (``memorisation``) and called
by the prior's :func:`~vqvae_medical.stages.prior.report.evaluate_prior_samples` and latent diffusion's
:func:`~vqvae_medical.stages.diffusion.evaluation.evaluate_samples`. Everything is compared in one domain, the
frozen decoder's output at the evaluation resolution: the training images are their code maps (the code-map cache
the prior trains on, :func:`~vqvae_medical.stages.encodings.encode_cached`) decoded; the held-out real images that
calibrate the copy threshold are encoded and decoded the same way; the samples are decoded already.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vqvae_medical.evaluation.figures import save_sample_grid
from vqvae_medical.evaluation.memorisation import (
    COPY_QUANTILE,
    longest_shared_runs,
    memorisation_metrics,
    nearest_images,
)
from vqvae_medical.stages.encodings import encode_cached
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.utils.io import atomic_write_json

__all__ = ["MemorisationAudit"]

logger = logging.getLogger(__name__)


def _bottom(codes: Any) -> torch.Tensor:
    """The code map of a level-less VQ-VAE, or the bottom (larger) map of a VQ-VAE-2's ``(top, bottom)`` pair."""
    return codes[-1] if isinstance(codes, (tuple, list)) else codes


def _index(codes: Any, start: int, stop: int) -> Any:
    if isinstance(codes, (tuple, list)):
        return tuple(c[start:stop].long() for c in codes)
    return codes[start:stop].long()


class MemorisationAudit:
    """Each sample's nearest training image, the copy rate and (code priors) the longest shared run of codes.

    Args:
        output_dir: the evaluation folder (``samples_vs_nearest_training.png``, ``memorisation.json``).
        autoencoder: the frozen stage-1 autoencoder the generator decodes through.
        train_data: datalist items of the training section the generator was trained on.
        cache_path: the code-map cache of those items (the prior's ``codes_training.pt``), or ``None`` to encode
            in memory.
        copy_quantile: a sample closer to its nearest training image than this quantile of the held-out real
            images' distances counts as a copy.
        n_shown: samples drawn beside their nearest training image in ``samples_vs_nearest_training.png``.
        batch_size: images per encoder or decoder call.
        enabled: ``False`` skips the audit (no keys written).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        autoencoder: FrozenAutoencoder,
        train_data: Sequence[Mapping[str, Any]],
        cache_path: str | os.PathLike | None = None,
        copy_quantile: float = COPY_QUANTILE,
        n_shown: int = 8,
        batch_size: int = 16,
        enabled: bool = True,
    ) -> None:
        if not 0.0 < float(copy_quantile) < 1.0:
            raise ValueError(f"copy_quantile must be in (0, 1), got {copy_quantile}.")
        self.output_dir = Path(output_dir)
        self.autoencoder = autoencoder
        self.train_data = list(train_data)
        self.cache_path = cache_path
        self.copy_quantile = float(copy_quantile)
        self.n_shown = int(n_shown)
        self.batch_size = max(1, int(batch_size))
        self.enabled = bool(enabled)

    def _decode(self, codes: Any, n: int, size: Sequence[int]) -> Iterator[torch.Tensor]:
        device = self.autoencoder.device
        for s in range(0, n, self.batch_size):
            batch = _index(codes, s, s + self.batch_size)
            batch = tuple(c.to(device) for c in batch) if isinstance(batch, tuple) else batch.to(device)
            yield self.autoencoder.decode_from_indices(batch, size).clamp(0, 1).cpu()

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images encoded to codes and decoded (clipped to [0, 1]), and their codes (a pair for a VQ-VAE-2)."""
        size = [int(s) for s in images.shape[2:]]
        parts, codes = [], []
        for s in range(0, len(images), self.batch_size):
            c = self.autoencoder.encode_to_indices(images[s : s + self.batch_size].to(self.autoencoder.device))
            c = tuple(x.cpu() for x in c) if isinstance(c, tuple) else c.cpu()
            codes.append(c)
            parts.append(next(self._decode(c, len(_bottom(c)), size)))
        joined = (
            tuple(torch.cat(level) for level in zip(*codes, strict=True))
            if isinstance(codes[0], tuple)
            else torch.cat(codes)
        )
        return torch.cat(parts), joined

    def __call__(self, samples: torch.Tensor, real: torch.Tensor, sample_codes: Any = None) -> dict[str, Any]:
        """Audit ``samples`` (decoded, ``[N, C, ...]`` in [0, 1]) with the held-out ``real`` images (same shape,
        the evaluate's test images) as calibration; ``sample_codes`` (code priors) adds the shared code runs.

        Writes ``samples_vs_nearest_training.png`` and ``memorisation.json`` (per sample: its nearest training
        image, the distance, whether it counts as a copy, the shared code run) into ``output_dir`` and returns the
        keys of :func:`~vqvae_medical.evaluation.memorisation.memorisation_metrics` plus
        ``memorisation_cpu_seconds``.
        """
        if not self.enabled:
            return {}
        start = time.process_time()
        size = [int(s) for s in samples.shape[2:]]
        with torch.no_grad():
            held_out, held_codes = self.reconstruct(real)
            maps = encode_cached(
                self.autoencoder, self.train_data, "codes", self.cache_path, batch_size=self.batch_size
            )
            n_train = len(_bottom(maps.values))
            k = min(self.n_shown, len(samples))
            both = nearest_images(torch.cat([samples, held_out]), self._decode(maps.values, n_train, size), keep=k)
        n = len(samples)
        sample_near = both._replace(distance=both.distance[:n], index=both.index[:n])
        held_near = both._replace(distance=both.distance[n:], index=both.index[n:], images=None)
        runs = held_runs = None
        if sample_codes is not None:
            train_maps = _bottom(maps.values)
            runs = longest_shared_runs(_bottom(sample_codes), train_maps)
            held_runs = longest_shared_runs(_bottom(held_codes), train_maps)
        positions = int(_bottom(maps.values)[0].numel())
        metrics = memorisation_metrics(sample_near, held_near, self.copy_quantile, runs, held_runs, positions)
        metrics["memorisation_cpu_seconds"] = time.process_time() - start
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        threshold = metrics["copy_threshold"]
        per_sample = [
            {
                "sample": i,
                "nearest_train_image": maps.paths[int(j)],
                "distance": float(d),
                "copy": bool(d < threshold),
                **({"longest_shared_code_run": int(runs[i])} if runs is not None else {}),
            }
            for i, (d, j) in enumerate(zip(sample_near.distance, sample_near.index, strict=True))
        ]
        atomic_write_json({**metrics, "samples": per_sample}, out / "memorisation.json")
        if k:
            names = [f"sample {i}" for i in range(k)] + [
                f"train {int(j)} d={float(d):.3f}{' COPY' if d < threshold else ''}"
                for j, d in zip(sample_near.index[:k], sample_near.distance[:k], strict=True)
            ]
            save_sample_grid(
                out / "samples_vs_nearest_training.png",
                torch.cat([samples[:k].float().cpu(), sample_near.images]),
                ncols=k if samples.ndim == 4 else None,
                names=names,
            )
        logger.info(
            f"memorisation audit: copy rate {metrics['copy_rate']:.3f} (threshold {threshold:.4f}, the "
            f"{self.copy_quantile:.0%} quantile of {len(real)} held-out images' distances), median nearest-training "
            f"distance {metrics['nearest_train_distance_median']:.4f} over {n_train} training images"
        )
        return metrics
