"""The prior stage's evaluation report."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from vqvae_medical.evaluation.figures import save_prior_report
from vqvae_medical.evaluation.sample_report import (
    load_real_images,
    real_image_count,
    sample_classes,
    save_samples_vs_real,
    score_samples,
)
from vqvae_medical.networks.quantizers import perplexity
from vqvae_medical.stages.prior.hierarchical import LEVEL_KEYS, LEVELS
from vqvae_medical.stages.prior.network import prior_of
from vqvae_medical.training.handlers import read_history
from vqvae_medical.training.runtime import SettingError
from vqvae_medical.utils.io import atomic_write_json

__all__ = ["PriorEvaluationReport", "PriorSampleQuality", "evaluate_prior_samples"]

logger = logging.getLogger(__name__)


class PriorEvaluationReport:
    """Writes ``metrics.json`` and ``report.png`` for an evaluation run of a prior.

    ``metrics.json``: ``nll_bits_per_code`` (the prior's negative log2-likelihood per code), ``uniform_bits_per_code``
    (``log2 K``, a uniform prior), ``marginal_bits_per_code`` (entropy of the evaluated maps' own code histogram: the
    best prior that ignores context could not do better), ``nll_fraction_of_uniform``, ``n_maps``, ``n_codes`` and,
    with labels, ``nll_bits_per_code_class<c>``. ``report.png``: the per-map bits-per-code histogram (by class) and
    the training curves from ``history_path``.

    For the hierarchical prior of a VQ-VAE-2 (``num_embeddings`` a ``(top, bottom)`` pair) the same keys cover all
    codes of both levels (``n_maps`` counts images; the uniform and marginal references are the per-level ones
    weighted by each level's codes), and each level adds ``nll_bits_per_code_<level>``,
    ``uniform_bits_per_code_<level>``, ``marginal_bits_per_code_<level>`` and ``n_codes_<level>``.

    ``metrics.json`` is written once, atomically, when the evaluator completes, with the keys that handlers attached
    after this one put in ``engine.state.sample_quality`` when the epoch completed (:class:`PriorSampleQuality`) and
    ``models``: it is whole or absent, never the bits per code of a run whose sampling failed. ``report.png`` is
    drawn when the epoch completes.

    Args:
        output_dir: folder of the two files.
        num_embeddings: number of codes ``K`` (a ``(top, bottom)`` pair for a VQ-VAE-2).
        history_path: the training :class:`~vqvae_medical.training.handlers.MetricsHistory` file.
        class_names: display names of the classes.
        models: the checkpoint and autoencoder evaluated (:func:`~vqvae_medical.stages.provenance.models_used`),
            written as ``models``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_embeddings: int | Sequence[int],
        history_path: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        models: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.models = None if models is None else dict(models)
        if isinstance(num_embeddings, (list, tuple)):
            if len(num_embeddings) != len(LEVELS):
                raise ValueError(f"num_embeddings must be one int or a (top, bottom) pair, got {num_embeddings}.")
            self.levels: dict[str, int] = {lv: int(k) for lv, k in zip(LEVELS, num_embeddings, strict=False)}
        else:
            self.levels = {"": int(num_embeddings)}
        self.history_path = history_path
        self.class_names = list(class_names) if class_names else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.bits: dict[str, list[float]] = {lv: [] for lv in self.levels}
        self.labels: list[int] = []
        self.counts = {lv: np.zeros(k, dtype=np.int64) for lv, k in self.levels.items()}
        self.n_codes = dict.fromkeys(self.levels, 0)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        self.labels += out["label"].cpu().tolist()
        for lv, k in self.levels.items():
            suffix = f"_{lv}" if lv else ""
            self.bits[lv] += out[f"nll_bits{suffix}"].double().cpu().tolist()
            self.n_codes[lv] = int(out[f"n_codes{suffix}"])
            codes = out[LEVEL_KEYS[lv]] if lv else out["codes"]
            self.counts[lv] += np.bincount(codes.reshape(-1).cpu().numpy(), minlength=k)

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else f"class {c}"

    def _report(self, engine: Engine) -> None:
        engine.state.sample_quality = {}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        bits = sum(np.asarray(b, dtype=np.float64) for b in self.bits.values())
        labels = np.asarray(self.labels, dtype=np.int64)
        n_codes = sum(self.n_codes.values())
        per_level: dict[str, Any] = {}
        uniform = marginal = 0.0
        for lv, k in self.levels.items():
            share = self.n_codes[lv] / n_codes
            level_marginal = math.log2(float(perplexity(torch.from_numpy(self.counts[lv]).double())))
            uniform += share * math.log2(k)
            marginal += share * level_marginal
            if lv:
                n_level = len(self.bits[lv]) * self.n_codes[lv]
                per_level[f"nll_bits_per_code_{lv}"] = float(np.sum(self.bits[lv]) / n_level)
                per_level[f"uniform_bits_per_code_{lv}"] = math.log2(k)
                per_level[f"marginal_bits_per_code_{lv}"] = level_marginal
                per_level[f"n_codes_{lv}"] = int(n_level)
        nll = float(bits.sum() / (len(bits) * n_codes))
        metrics: dict[str, Any] = {
            "nll_bits_per_code": nll,
            "uniform_bits_per_code": uniform,
            "marginal_bits_per_code": marginal,
            "nll_fraction_of_uniform": nll / uniform,
            "n_maps": len(bits),
            "n_codes": int(len(bits) * n_codes),
            **per_level,
        }
        classes = sorted(int(c) for c in set(labels.tolist()) if c >= 0)
        for c in classes:
            metrics[f"nll_bits_per_code_class{c}"] = float(bits[labels == c].sum() / ((labels == c).sum() * n_codes))
            metrics[f"n_maps_class{c}"] = int((labels == c).sum())
        self.metrics = metrics
        per_map = bits / max(n_codes, 1)
        groups = [(self._name(c), per_map[labels == c]) for c in classes] if classes else [("all", per_map)]
        history = read_history(self.history_path) if self.history_path else []
        save_prior_report(self.output_dir / "report.png", groups, nll, uniform, marginal, history)
        logger.info(f"evaluation: {metrics} -> {self.output_dir}")

    def _write(self, engine: Engine) -> None:
        extra = getattr(engine.state, "sample_quality", None) or {}
        atomic_write_json({**self.metrics, **extra, "models": self.models}, self.output_dir / "metrics.json")
        logger.info(f"wrote {self.output_dir / 'metrics.json'}")


class PriorSampleQuality:
    """The prior's sample quality: samples ``n_samples`` images, scores them against held-out real images, draws
    ``samples_vs_real.png`` and adds the keys to ``metrics.json``.

    As a handler of the prior's evaluator it runs when the epoch has run (after :class:`PriorEvaluationReport`,
    attached before it, has computed the bits per code) and hands the keys to the report, which writes
    ``metrics.json`` once when the evaluator completes (without the report, it writes them to ``metrics.json``
    itself). A test split of fewer than two images is refused when the handler is built, before anything is
    evaluated or written. :func:`evaluate_prior_samples` runs it outside an evaluator.

    The keys are those of :func:`~vqvae_medical.evaluation.sample_report.score_samples` (shared with the latent
    diffusion bundle), plus ``n_samples``, ``samples_per_class`` (class-conditioned prior), ``seconds_per_sample``
    and ``cpu_seconds_per_sample`` (process CPU time of sampling and decoding, per image), and the memorisation
    audit's. The real images are :func:`~vqvae_medical.evaluation.sample_report.real_image_count` items of
    ``real_data`` drawn with ``seed``, through ``transform``. A class-conditioned prior samples the classes in
    proportion to the labels of ``real_data`` (equally when none is in range); class ``c`` is drawn with seed
    ``seed + c``, as :func:`~vqvae_medical.stages.prior.generate.save_samples` does, so the samples are reproducible.
    The sampler has its own seeded generator and the two-sample test a private random state: the evaluator's
    metrics and the global random state are untouched.

    Args:
        output_dir: the evaluation folder.
        sampler: a :class:`~vqvae_medical.stages.prior.generate.PriorSampler` (its ``sample`` returns codes and
            images ``[N, C, H, W]`` in [0, 1]; its ``draw_settings`` go into the metrics).
        prior: the prior the evaluator runs (its weights are loaded when the evaluator starts).
        real_data: datalist items of the held-out real images.
        transform: their preprocessing (the frozen autoencoder's ``transforms()``).
        n_samples: images to generate; ``0`` disables the handler.
        seed: sampling and selection seed.
        power_check: run the power check when there are enough real images.
        c2st_settings: the two-sample tests and their settings
            (:func:`~vqvae_medical.evaluation.sample_report.split_c2st_settings`).
        memorisation: the memorisation audit (:class:`~vqvae_medical.stages.memorisation.MemorisationAudit`, given
            the samples' code maps; it writes its own files), or ``None``.
        image_key: key of the images in ``real_data``.
        label_key: key of the class labels in ``real_data``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        sampler: Any,
        prior: nn.Module,
        real_data: Sequence[Mapping[str, Any]],
        transform: Any,
        n_samples: int = 128,
        seed: int = 0,
        power_check: bool = True,
        c2st_settings: Mapping[str, Any] | None = None,
        memorisation: Any = None,
        image_key: str = "image",
        label_key: str | None = "label",
    ) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples == 1 or n_samples < 0:
            raise SettingError(f"n_samples is {n_samples!r}: pass --n_samples 0 (no sampling) or at least 2.")
        if n_samples > 0 and len(real_data) < 2:
            raise SettingError(
                f"the test split has {len(real_data)} image{'' if len(real_data) == 1 else 's'}, and the sample "
                "quality needs at least 2 real images: pass --n_samples 0 to evaluate the bits per code alone, or "
                "train the autoencoder with a larger --test_fraction."
            )
        self.output_dir = Path(output_dir)
        self.sampler = sampler
        self.prior = prior
        self.real_data = real_data
        self.transform = transform
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.power_check = bool(power_check)
        self.c2st_settings = dict(c2st_settings or {})
        self.memorisation = memorisation
        self.keys = (image_key, label_key)

    def attach(self, engine: Engine) -> None:
        if self.n_samples > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def sample_metrics(self) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """The sample-quality keys, with the samples and the real images they were scored against; nothing is
        written but the memorisation audit's own files."""
        n_samples, seed, real_data = self.n_samples, self.seed, self.real_data
        if n_samples < 2:
            raise ValueError(f"n_samples must be at least 2 for pairwise diversity, got {n_samples}.")
        image_key, label_key = self.keys
        real = load_real_images(real_data, self.transform, real_image_count(len(real_data), n_samples), image_key, seed)
        model = prior_of(self.prior)
        groups: list[tuple[int | None, int]] = [(None, n_samples)]
        if model.class_conditioned:
            labels = [item.get(label_key) for item in real_data] if label_key else []
            classes = sample_classes(labels, n_samples, int(model.num_classes))
            groups = [(int(c), int((classes == c).sum())) for c in classes.unique()]
        start, cpu_start = time.perf_counter(), time.process_time()
        drawn = [self.sampler.sample(self.prior, k, c, seed + (c or 0)) for c, k in groups]
        samples = torch.cat([images for _, images in drawn])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        metrics = score_samples(real, samples, seed, self.power_check, c2st_settings=self.c2st_settings)
        if self.memorisation is not None:
            codes = [c for c, _ in drawn]
            codes = tuple(map(torch.cat, zip(*codes, strict=True))) if isinstance(codes[0], tuple) else torch.cat(codes)
            metrics.update(self.memorisation(samples, real, codes))
        metrics.update(
            {
                "n_samples": n_samples,
                **self.sampler.draw_settings,
                "samples_per_class": {str(c): k for c, k in groups} if model.class_conditioned else None,
                "seconds_per_sample": seconds / n_samples,
                "cpu_seconds_per_sample": cpu_seconds / n_samples,
            }
        )
        logger.info(
            f"sampled {n_samples} images in {seconds:.1f} s ({cpu_seconds / n_samples:.3f} CPU-s per image); "
            f"sample quality: {metrics}"
        )
        return metrics, samples, real

    def write(self, merge: bool = True) -> dict[str, Any]:
        """Sample and score (:meth:`sample_metrics`), add the keys to ``<output_dir>/metrics.json`` (to those of the
        same run with ``merge``, else in place of them) and draw ``samples_vs_real.png``; returns the keys."""
        metrics, samples, real = self.sample_metrics()
        path = self.output_dir / "metrics.json"
        earlier = json.loads(path.read_text()) if merge and path.is_file() else {}
        atomic_write_json({**earlier, **metrics}, path)
        save_samples_vs_real(self.output_dir / "samples_vs_real.png", samples, real)
        logger.info(f"sample quality -> {self.output_dir}")
        return metrics

    def __call__(self, engine: Engine) -> None:
        report = getattr(engine.state, "sample_quality", None)
        if report is None:  # no PriorEvaluationReport: write metrics.json here
            self.write(merge=True)
            return
        metrics, samples, real = self.sample_metrics()
        save_samples_vs_real(self.output_dir / "samples_vs_real.png", samples, real)
        report.update(metrics)


def evaluate_prior_samples(
    sampler: Any,
    prior: nn.Module,
    real_data: Sequence[Mapping[str, Any]],
    transform: Any,
    output_dir: str | os.PathLike,
    n_samples: int = 128,
    seed: int = 0,
    merge: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Sample ``n_samples`` (at least 2) images from the prior, score them against held-out real images and add the
    sample-quality keys to ``<output_dir>/metrics.json`` (plus ``samples_vs_real.png``): :class:`PriorSampleQuality`
    outside an evaluator, whose arguments ``settings`` are (``power_check``, ``c2st_settings``, ``memorisation``,
    ``image_key``, ``label_key``); ``merge``: add to the ``metrics.json`` of the same run (the bits per code)
    instead of replacing it."""
    handler = PriorSampleQuality(output_dir, sampler, prior, real_data, transform, n_samples, seed, **settings)
    return handler.write(merge)
