"""Calibration of the anomaly maps' NLL threshold on held-out healthy images (see :mod:`.anomaly`).

The NLL threshold of each code level is the ``quantile``-th percentile of the per-code NLL of the prior over the code
maps of held-out healthy images: the ``section`` (default ``validation``) of the stage-1 model's own split, i.e.
images neither the VQ-VAE nor the prior trained on. With ``quantile=0.99`` about 1% of the codes of a healthy image
are resampled. The result is stored as JSON next to the prior's checkpoint (:data:`CALIBRATION_FILE`) with the SHA-256
of the checkpoint and the fingerprint of the autoencoder's weights, and recomputed when either, the quantile, the
section or the class changes. The calibration also refuses a prior that does not model this autoencoder's codes (its
NLL no better than the codes' own histogram: a prior trained on another autoencoder), and a stored calibration of the
same checkpoint made with another autoencoder.

The image score is calibrated on the same held-out healthy images (:func:`load_score_calibration`): with the NLL
thresholds fixed, each of them (at most ``max_images``) gets its anomaly map and image scores exactly as an input
would (same healing settings and seed); their sorted scores are stored in :data:`SCORE_CALIBRATION_FILE` next to the
checkpoint. An input's ``healthy_percentile`` is the share of these healthy scores below its own, and it is
``anomalous`` when its score is above the ``score_quantile``-th quantile of them (the ``image_threshold``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqvae_medical.data.lists import section
from vqvae_medical.networks.quantizers import perplexity
from vqvae_medical.stages.encodings import cached_section
from vqvae_medical.stages.frozen import FrozenAutoencoder, encode_cached
from vqvae_medical.stages.prior.anomaly import IMAGE_SCORES, anomaly_maps, code_nll
from vqvae_medical.stages.provenance import file_sha256
from vqvae_medical.training.provenance import stored_or_computed
from vqvae_medical.training.runtime import SettingError

__all__ = [
    "CALIBRATION_FILE",
    "SCORE_CALIBRATION_FILE",
    "calibrate",
    "healthy_image_scores",
    "load_calibration",
    "load_score_calibration",
    "resolve_thresholds",
]

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "anomaly_calibration.json"
"""The calibration's file name, next to the prior's ``model.pt``."""

SCORE_CALIBRATION_FILE = "anomaly_score_calibration.json"
"""The image-score calibration's file name, next to the prior's ``model.pt``."""

_VERSION = 1


def _where(autoencoder: FrozenAutoencoder) -> str:
    return str(autoencoder.directory) if autoencoder.directory else "the autoencoder"


def _marginal_nats(codes: torch.Tensor, num_embeddings: int) -> float:
    counts = torch.bincount(codes.flatten().long(), minlength=num_embeddings).double()
    return float(torch.log(perplexity(counts)))


@torch.no_grad()
def calibrate(
    autoencoder: FrozenAutoencoder,
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    quantile: float = 0.99,
    class_label: int | None = None,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Per-level NLL thresholds: the ``quantile`` of the per-code NLL (nats) over the code maps of ``items``
    (held-out healthy images), and the statistics that go with them.

    Args:
        autoencoder: the frozen stage-1 model.
        network: the prior.
        items: datalist items of the held-out healthy images.
        quantile: in ``(0, 1)``; the share of healthy codes left untouched.
        class_label: class of a class-conditioned prior.
        cache_path: the code-map cache (e.g. the prior's own ``cache/codes_validation.pt``), or ``None``.
        batch_size: code maps per forward pass.

    Raises:
        SettingError: the prior's NLL on these codes is no better than the codes' own histogram (a prior trained
            on another autoencoder's codes).
    """
    if not 0 < quantile < 1:
        raise SettingError(f"quantile must be in (0, 1), got {quantile}.")
    encoded = encode_cached(autoencoder, items, "codes", cache_path)
    levels = encoded.values if isinstance(encoded.values, tuple) else (encoded.values,)
    codebooks = autoencoder.num_embeddings
    codebooks = codebooks if isinstance(codebooks, tuple) else (codebooks,)
    nll: list[list[torch.Tensor]] = [[] for _ in levels]
    for start in range(0, int(levels[0].shape[0]), batch_size):
        batch = tuple(lv[start : start + batch_size].long() for lv in levels)
        for i, n in enumerate(code_nll(network, batch if len(batch) > 1 else batch[0], class_label)):
            nll[i].append(n.flatten().cpu())
    stats: dict[str, Any] = {"thresholds_nats": [], "mean_nll_bits": [], "marginal_bits": [], "n_codes": []}
    for i, (parts, k) in enumerate(zip(nll, codebooks, strict=True)):
        values = torch.cat(parts).double()
        mean, marginal = float(values.mean()), _marginal_nats(levels[i], k)
        if mean >= marginal:
            level = "" if len(levels) == 1 else f" ({('top', 'bottom')[i]} level)"
            raise SettingError(
                f"the prior does not model the codes of autoencoder_dir {_where(autoencoder)}{level}: "
                f"{mean / math.log(2):.2f} bits per held-out code, no better than the codes' own histogram "
                f"({marginal / math.log(2):.2f}); pass the ckpt_path of the prior trained on this autoencoder's codes."
            )
        stats["thresholds_nats"].append(float(torch.quantile(values, quantile)))
        stats["mean_nll_bits"].append(mean / math.log(2))
        stats["marginal_bits"].append(marginal / math.log(2))
        stats["n_codes"].append(int(values.numel()))
    return {"quantile": float(quantile), "n_images": len(items), **stats}


def load_calibration(
    path: str | os.PathLike,
    autoencoder: FrozenAutoencoder,
    network: nn.Module,
    ckpt_path: str | os.PathLike,
    quantile: float = 0.99,
    section_name: str = "validation",
    class_label: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The calibration stored at ``path`` when it was made for this checkpoint, autoencoder and settings; else
    :func:`calibrate` on the ``section_name`` of the stage-1 split, written to ``path`` (a folder that cannot be
    written only logs a warning).

    Raises:
        SettingError: the stored calibration of this same checkpoint was made with another autoencoder (the prior
            belongs to that one), or see :func:`calibrate`.
    """
    key = {
        "version": _VERSION,
        "prior_sha256": file_sha256(ckpt_path),
        "autoencoder": autoencoder.fingerprint,
        "quantile": float(quantile),
        "section": section_name,
        "class_label": class_label,
    }
    path = Path(path)

    def check(stored: Mapping[str, Any]) -> None:
        if stored.get("prior_sha256") == key["prior_sha256"] and stored.get("autoencoder") != key["autoencoder"]:
            raise SettingError(
                f"ckpt_path {ckpt_path} is a prior over the codes of another autoencoder than autoencoder_dir "
                f"{_where(autoencoder)} (its calibration {path} was made with other stage-1 weights): pass the "
                "autoencoder_dir it was trained on, or delete that file if the prior really belongs to this one."
            )

    def compute() -> dict[str, Any]:
        directory = cache_dir if cache_dir is not None else path.parent
        items, cache = cached_section(autoencoder.datalist(directory), section_name, directory, "codes")
        result = calibrate(autoencoder, network, items, quantile, class_label, cache)
        logger.info(f"calibrated the NLL thresholds {result['thresholds_nats']} on {len(items)} images")
        return result

    return stored_or_computed(path, key, compute, "anomaly calibration", check)


def resolve_thresholds(
    calibration: Mapping[str, Any], nll_threshold: float | Sequence[float] | None, levels: int
) -> list[float]:
    """The NLL threshold of each code level: ``nll_threshold`` when set (one value for every level, or one per
    level), else the calibrated ``thresholds_nats``."""
    if nll_threshold is None:
        thresholds = [float(t) for t in calibration["thresholds_nats"]]
    elif isinstance(nll_threshold, (list, tuple)):
        thresholds = [float(t) for t in nll_threshold]
    else:
        thresholds = [float(nll_threshold)] * levels
    if len(thresholds) != levels:
        raise SettingError(f"nll_threshold needs {levels} value(s), one per code level, got {thresholds}.")
    return thresholds


@torch.no_grad()
def healthy_image_scores(
    autoencoder: FrozenAutoencoder,
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    thresholds: Sequence[float],
    class_label: int | None = None,
    temperature: float = 1.0,
    mask_sigma: float = 0.0,
    top_fraction: float = 0.01,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, list[float]]:
    """Every :data:`~vqvae_medical.stages.prior.anomaly.IMAGE_SCORES` of ``items`` (held-out healthy images), each
    list sorted, computed as :func:`~vqvae_medical.stages.prior.anomaly.anomaly_maps` computes them for an input."""
    transform = autoencoder.transforms()
    generator = torch.Generator(device=autoencoder.device).manual_seed(int(seed))
    scores: dict[str, list[float]] = {k: [] for k in IMAGE_SCORES}
    for start in range(0, len(items), batch_size):
        images = torch.stack([transform(dict(i))["image"].as_tensor() for i in items[start : start + batch_size]])
        result = anomaly_maps(
            autoencoder, network, images, thresholds, class_label, temperature, mask_sigma, top_fraction, generator
        )
        for k in IMAGE_SCORES:
            scores[k].extend(float(v) for v in result.scores[k])
    return {k: sorted(v) for k, v in scores.items()}


def load_score_calibration(
    path: str | os.PathLike,
    autoencoder: FrozenAutoencoder,
    network: nn.Module,
    ckpt_path: str | os.PathLike,
    calibration: Mapping[str, Any],
    nll_threshold: float | Sequence[float] | None = None,
    section_name: str = "validation",
    class_label: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    temperature: float = 1.0,
    mask_sigma: float = 0.0,
    top_fraction: float = 0.01,
    seed: int = 0,
    max_images: int = 256,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The image scores of the held-out healthy images (the first ``max_images`` of ``section_name``, scored with
    these NLL thresholds and map settings), read from ``path`` when stored for this checkpoint, autoencoder and
    settings, else computed by :func:`healthy_image_scores` and written there (see the module docstring)."""
    levels = len(calibration["thresholds_nats"])
    thresholds = resolve_thresholds(calibration, nll_threshold, levels)
    key = {
        "version": _VERSION,
        "prior_sha256": calibration.get("prior_sha256") or file_sha256(ckpt_path),
        "autoencoder": autoencoder.fingerprint,
        "thresholds_nats": thresholds,
        "section": section_name,
        "class_label": class_label,
        "temperature": float(temperature),
        "mask_sigma": float(mask_sigma),
        "top_fraction": float(top_fraction),
        "seed": int(seed),
        "max_images": int(max_images),
    }
    path = Path(path)

    def compute() -> dict[str, Any]:
        directory = Path(cache_dir) if cache_dir is not None else path.parent
        items = section(autoencoder.datalist(directory), section_name)[: int(max_images)]
        settings = (class_label, temperature, mask_sigma, top_fraction, seed, batch_size)
        scores = healthy_image_scores(autoencoder, network, items, thresholds, *settings)
        logger.info(f"calibrated the image scores on {len(items)} held-out healthy images")
        return {"n_images": len(items), "scores": scores}

    return stored_or_computed(path, key, compute, "image-score calibration")
