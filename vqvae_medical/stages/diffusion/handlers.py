"""Ignite handlers of the diffusion stage: EMA weights and sample grids."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from vqvae_medical.stages.diffusion.sampling import LatentSampler, _save_grid
from vqvae_medical.training.checkpoints import atomic_save

__all__ = ["EMAWeights", "SampleGrid"]

logger = logging.getLogger(__name__)


class EMAWeights:
    """Exponential moving average of the network's weights, updated after every iteration.

    The average (not the raw weights) is what sampling uses: diffusion samples are much cleaner from averaged
    weights, most of all after short training. ``save_path`` (``models/model.pt``) receives the averaged
    network's state dict at the end of every epoch. Put this object in the checkpoint's objects to resume it.

    Args:
        network: the trained network (on its device).
        decay: EMA decay; the first updates use ``min(decay, (1 + n) / (10 + n))``.
        save_path: file written at each epoch end, or ``None``.
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, save_path: str | os.PathLike | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        self.network = network
        self.decay = float(decay)
        self.save_path = None if save_path is None else Path(save_path)
        self.ema = copy.deepcopy(network).eval().requires_grad_(False)
        self.num_updates = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        if self.save_path is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    @torch.no_grad()
    def update(self, engine: Engine | None = None) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        ema_p = [p for p in self.ema.parameters()]
        net_p = [p.detach() for p in self.network.parameters()]
        torch._foreach_lerp_(ema_p, net_p, 1.0 - d)
        for b_ema, b in zip(self.ema.buffers(), self.network.buffers()):
            b_ema.copy_(b)

    def save(self, engine: Engine | None = None) -> None:
        atomic_save(self.ema.state_dict(), self.save_path)
        logger.info(f"saved the averaged weights ({self.num_updates} updates) to {self.save_path}")

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.ema.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


class SampleGrid:
    """Writes ``<output_dir>/samples_epoch=N.png`` (a grid; 3D: mid-slices) every ``interval`` epochs.

    Args:
        sampler: the :class:`LatentSampler` (sampling from the averaged weights).
        output_dir: folder of the PNGs.
        n: samples per grid.
        interval: every how many epochs; 0 disables.
        seed: noise seed (the same noise every time, so grids are comparable across epochs).
    """

    def __init__(self, sampler: LatentSampler, output_dir: str | os.PathLike, n: int = 8, interval: int = 5, seed: int = 0):
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
        _save_grid(path, images, labels)
        logger.info(f"wrote {path}")
