"""The best model of a run: ``models/model.pt`` replaced in one rename when the validation metric improves, with
its score next to it, so that a resumed run never overwrites a better model (see
:mod:`vqvae_medical.training.checkpoints` for why not Ignite's ``Checkpoint``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from vqvae_medical.utils.io import atomic_save, atomic_write_json

__all__ = ["BestModelSaver"]

logger = logging.getLogger(__name__)


class BestModelSaver:
    """Writes the network's ``state_dict`` to ``path`` (atomically) whenever ``metric_name`` improves.

    Attach to the validation evaluator. The best value is kept next to the weights (``<path>.json``), so a resumed
    run does not overwrite a better model with a worse one.

    Args:
        path: output file, e.g. ``models/model.pt`` (Model Zoo layout).
        network: the module to save (unwrapped from DDP by the caller).
        metric_name: key of ``engine.state.metrics`` to maximise (or minimise with ``mode="min"``).
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module, metric_name: str, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.path = Path(path)
        self.network = network
        self.metric_name = metric_name
        self.mode = mode

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _best(self) -> float | None:
        meta = self.path.with_suffix(self.path.suffix + ".json")
        if meta.is_file() and self.path.is_file():
            value = json.loads(meta.read_text())["value"]
            return None if value is None else float(value)  # a NaN score is written as null
        return None

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        best = self._best()
        better = best is None or (value > best if self.mode == "max" else value < best)
        if not better:
            return
        atomic_save(self.network.state_dict(), self.path)
        atomic_write_json(
            {"metric": self.metric_name, "value": value}, self.path.with_suffix(self.path.suffix + ".json")
        )
        logger.info(f"new best {self.metric_name}={value:.4f}: saved {self.path}")
