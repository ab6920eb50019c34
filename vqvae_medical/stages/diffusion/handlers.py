"""Ignite handlers of the diffusion stage: EMA weights, the model writer, sample grids."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from torch import nn

from vqvae_medical.evaluation.figures import save_sample_grid
from vqvae_medical.stages.diffusion.sampling import LatentSampler
from vqvae_medical.utils.io import atomic_save

__all__ = ["DiffusionEMA", "ModelWriter", "SampleGrid"]

logger = logging.getLogger(__name__)


class DiffusionEMA(EMAHandler):
    """Ignite's ``EMAHandler`` for the diffusion UNet, with a warm-up that resumes exactly.

    After every iteration ``ema = (1 - m) * ema + m * network`` (Ignite's update; buffers such as the scale factor
    are copied), with ``m = 1 - min(decay, (1 + n) / (10 + n))`` at iteration ``n``: the average follows the network
    closely at first, then settles at ``decay``. The average (``ema_model``) is what validation and sampling use:
    diffusion samples are much cleaner from averaged weights, most of all after short training.

    Why not Ignite's own ``momentum_warmup``: its ``LambdaStateScheduler`` counts events itself and restarts at 0
    when a run resumes, so a resumed run would warm up again; here ``m`` is read from ``engine.state.iteration``,
    which the checkpoint restores. Put this object in the checkpoint's objects: its state is ``ema_model``'s state
    dict (a checkpoint of bundle version 0.1.x, ``{"model": ..., "num_updates": ...}``, loads too).

    Args:
        model: the trained network (DDP wrappers are unwrapped by Ignite).
        decay: EMA decay, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}.")
        super().__init__(model, momentum=1.0 - decay, handle_buffers="copy")
        self.ema_model.requires_grad_(False)
        self.decay = float(decay)

    def momentum_at(self, iteration: int) -> float:
        """``m`` after iteration ``iteration`` (1 for the first)."""
        return 1.0 - min(self.decay, (1.0 + iteration) / (10.0 + iteration))

    def attach(  # type: ignore[override]
        self, engine: Engine, name: str = "ema_momentum", warn_if_exists: bool = False, event: Any = None
    ) -> None:
        event = Events.ITERATION_COMPLETED if event is None else event
        engine.add_event_handler(event, self._set_momentum, name)  # before Ignite's update on the same event
        super().attach(engine, name, warn_if_exists=warn_if_exists, event=event)

    def _set_momentum(self, engine: Engine, name: str) -> None:
        setattr(engine.state, name, self.momentum_at(engine.state.iteration))

    def state_dict(self) -> dict[str, Any]:
        return self.ema_model.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "model" in state and isinstance(state["model"], Mapping):  # EMAWeights of bundle version 0.1.x
            state = state["model"]
        self.ema_model.load_state_dict(state)


class ModelWriter:
    """Writes ``network``'s state dict to ``path`` (atomically) at the end of every epoch; ``path=None`` (e.g. on
    ranks other than 0) disables it. In the diffusion bundle ``network`` is the generator holding the averaged
    weights, and ``path`` is ``models/model.pt``.

    Args:
        network: the module to save.
        path: the file, or ``None``.
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike | None) -> None:
        self.network = network
        self.path = None if path is None else Path(path)

    def attach(self, engine: Engine) -> None:
        if self.path is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        atomic_save(self.network.state_dict(), self.path)
        iteration = "" if engine is None else f" (iteration {engine.state.iteration})"
        logger.info(f"saved {type(self.network).__name__}{iteration} to {self.path}")


class SampleGrid:
    """Writes ``<output_dir>/samples_epoch=N.png`` (a grid; 3D: mid-slices) every ``interval`` epochs.

    Args:
        sampler: the :class:`LatentSampler` (sampling from the averaged weights).
        output_dir: folder of the PNGs.
        n: samples per grid.
        interval: every how many epochs; 0 disables.
        seed: noise seed (the same noise every time, so grids are comparable across epochs).
    """

    def __init__(
        self, sampler: LatentSampler, output_dir: str | os.PathLike, n: int = 8, interval: int = 5, seed: int = 0
    ):
        self.sampler = sampler
        self.output_dir = Path(output_dir)
        self.n = int(n)
        self.interval = int(interval)
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        if self.interval > 0 and self.n > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        images, labels = self.sampler.sample(self.n, seed=self.seed)
        path = self.output_dir / f"samples_epoch={engine.state.epoch}.png"
        save_sample_grid(path, images, labels)
        logger.info(f"wrote {path}")
