"""Periodic checkpoints of a training run and resuming from them (:class:`CheckpointSaver`,
:class:`ResumeFromCheckpoint`). The other roles have modules of their own: whole-or-absent writes and safe reads
(:mod:`vqvae_medical.utils.io`), random states (:mod:`~vqvae_medical.training.rng`), loading weights
(:mod:`~vqvae_medical.training.weights`), the best model (:mod:`~vqvae_medical.training.best_model`).

Why not MONAI's ``CheckpointSaver``/``CheckpointLoader`` alone: MONAI's saver writes with ``atomic=False`` (a crash
mid-write leaves a truncated latest checkpoint), it needs the path of the checkpoint to resume from to be known when
the config is parsed, and it does not save RNG states. The files written here have the same layout as MONAI's and
Ignite's (``{name: state_dict}``), so ``monai.handlers.CheckpointLoader`` reads them too.

Why not Ignite's ``Checkpoint`` with ``DiskSaver(atomic=True)`` (checked against pytorch-ignite 0.5):

- ``DiskSaver``'s atomic write renames a ``tempfile.NamedTemporaryFile`` (``tmpXXXXXXXX``) without ``fsync``: after
  a power loss the renamed file may be empty, and a killed process leaves a temporary file that nothing can tell
  from a user's file. :func:`atomic_save` fsyncs before the rename and names its temporary ``.<name>.*.tmp``, which
  :class:`ResumeFromCheckpoint` removes.
- ``Checkpoint`` keeps ``n_saved`` files by its in-memory list of what this process saved: after a resume (a new
  process) the previous run's checkpoints are never deleted, so every restart leaves ``n_saved`` more files.
  :class:`CheckpointSaver` keeps the ``n_saved`` newest files of the folder, whoever wrote them.
- For the best model, ``Checkpoint`` names files by score (``model_0.8123.pt``); with the fixed Model Zoo name
  ``models/model.pt`` it first deletes the old file, then writes the new one, so a crash in between leaves no model.
  Its best score also lives in memory only: a resumed run would overwrite a better ``model.pt`` with the first
  validation's. :class:`BestModelSaver` replaces the file in one rename and keeps the score next to it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

# re-exported: bundle configs cite them as vqvae_medical.training.checkpoints.<name> (BestModelSaver, LoadWeights,
# RNGState) and callers of 0.4 import the rest from here; their homes are the modules named
from vqvae_medical.training.best_model import BestModelSaver
from vqvae_medical.training.mismatch import describe_mismatch
from vqvae_medical.training.rng import RNGState
from vqvae_medical.training.weights import LoadWeights, load_into, load_weights, model_state
from vqvae_medical.utils.io import (
    CheckpointError,
    MissingCheckpointError,
    UntrustedCheckpointError,
    atomic_save,
    atomic_write_json,
    remove_stale_temporary_files,
    safe_load,
)

__all__ = [
    "CheckpointSaver",
    "ResumeFromCheckpoint",
    "checkpoints_newest_first",
    "latest_checkpoint",
    # re-exported
    "BestModelSaver",
    "CheckpointError",
    "LoadWeights",
    "MissingCheckpointError",
    "RNGState",
    "UntrustedCheckpointError",
    "atomic_save",
    "atomic_write_json",
    "describe_mismatch",
    "load_weights",
    "model_state",
    "remove_stale_temporary_files",
    "safe_load",
]

logger = logging.getLogger(__name__)
_EPOCH_RE = re.compile(r"_(?:epoch|iteration)=(\d+)\.pt$")
_START_OVER = "To start over instead, pass --resume False or a new --output_dir."


def _state_dicts(save_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.state_dict() for k, v in save_dict.items() if v is not None}


def checkpoints_newest_first(save_dir: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """The ``{prefix}_epoch=N.pt`` (or ``_iteration=N``) files of ``save_dir``, largest ``N`` first."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.glob(f"{prefix}_*.pt") if (m := _EPOCH_RE.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(save_dir: str | os.PathLike, prefix: str = "checkpoint") -> Path | None:
    """The ``{prefix}_epoch=N.pt`` (or ``_iteration=N``) file with the largest ``N`` in ``save_dir``, if any."""
    found = checkpoints_newest_first(save_dir, prefix)
    return found[0] if found else None


class CheckpointSaver:
    """Saves ``{name: obj.state_dict()}`` atomically every ``interval`` epochs (or iterations), keeping ``n_saved``.

    Put the trainer, network, optimizer, AMP scaler, LR scheduler and a :class:`RNGState` in ``save_dict`` to resume
    a run exactly where it stopped (the quantizer buffers are part of the network's state dict).

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict``; ``None`` values are skipped.
        interval: save every ``interval`` epochs (``epoch_level``) or iterations.
        epoch_level: count epochs (``True``) or iterations.
        n_saved: how many recent checkpoints to keep.
        prefix: file name prefix.
        engine_key: the engine the handler is attached to is saved under this key (its epoch and iteration);
            ``None`` to leave it out. Config files cannot name the trainer inside its own handler list, hence this.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        interval: int = 1,
        epoch_level: bool = True,
        n_saved: int = 2,
        prefix: str = "checkpoint",
        engine_key: str | None = "trainer",
    ) -> None:
        if interval < 1 or n_saved < 1:
            raise ValueError(f"interval and n_saved must be at least 1, got {interval} and {n_saved}.")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.interval = interval
        self.epoch_level = epoch_level
        self.n_saved = n_saved
        self.prefix = prefix
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.save_dict.setdefault(self.engine_key, engine)
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        unit = "epoch" if self.epoch_level else "iteration"
        path = atomic_save(_state_dicts(self.save_dict), self.save_dir / f"{self.prefix}_{unit}={step}.pt")
        logger.info(f"saved checkpoint {path}")
        found = sorted(
            (
                (int(m.group(1)), p)
                for p in self.save_dir.glob(f"{self.prefix}_*.pt")
                if (m := _EPOCH_RE.search(p.name))
            ),
            reverse=True,
        )
        for _, old in found[self.n_saved :]:
            old.unlink(missing_ok=True)


class ResumeFromCheckpoint:
    """At the start of a run, loads the newest intact checkpoint of ``save_dir`` (if any) into ``load_dict``.

    Loading uses ``torch.load(..., weights_only=True)``. A newest checkpoint that cannot be read (truncated by a
    full disk or a copy) is skipped with a warning and the next older one is used. Settings of the command line
    that differ from the checkpoint's take effect: ``max_epochs`` (larger continues training, smaller ends it), the
    learning rate (the schedule's base rates are replaced and the current rate rescaled, so the schedule continues
    from the new start value), and the number of iterations per epoch (batch size or data set changed). A setting
    that changes the network's tensors stops the run with a :class:`CheckpointError` naming the checkpoint, the
    tensor, both values when known, and ``--resume False``. Temporary files left by an interrupted save are
    removed even with ``enabled=False`` (see :func:`remove_stale_temporary_files`).

    Args:
        save_dir: folder searched with :func:`checkpoints_newest_first`.
        load_dict: the same objects as the saver's ``save_dict``.
        prefix: file name prefix.
        enabled: set ``False`` to always start from scratch.
        engine_key: the engine the handler is attached to is restored from this key (see :class:`CheckpointSaver`).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        prefix: str = "checkpoint",
        enabled: bool = True,
        engine_key: str | None = "trainer",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.load_dict = dict(load_dict)
        self.prefix = prefix
        self.enabled = enabled
        self.engine_key = engine_key
        self.loaded_from: Path | None = None
        self.skipped: list[Path] = []
        self.changed: dict[str, tuple[Any, Any]] = {}

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.load_dict.setdefault(self.engine_key, engine)
        engine.add_event_handler(Events.STARTED, self)

    def start_fresh(self, engine: Engine) -> None:
        """Called when the run starts from scratch (``enabled=False``, or no checkpoint); does nothing here (see
        :class:`~vqvae_medical.training.provenance.ResumeOrStartFresh`)."""

    def _newest_intact(self, map_location: Any) -> tuple[Path, Any] | None:
        candidates = checkpoints_newest_first(self.save_dir, self.prefix)
        for path in candidates:
            try:
                return path, safe_load(path, map_location=map_location)
            except UntrustedCheckpointError:
                raise
            except CheckpointError as e:
                self.skipped.append(path)
                warnings.warn(
                    f"{e} Resuming from the previous checkpoint instead (pass --resume False to start over).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if candidates:
            raise CheckpointError(
                f"{self.save_dir}: none of its {len(candidates)} checkpoints can be read (see the warnings above). "
                + _START_OVER
            )
        return None

    def __call__(self, engine: Engine) -> None:
        # a process killed while writing a checkpoint leaves its temporary file (never a truncated checkpoint)
        remove_stale_temporary_files(self.save_dir)
        device = engine.state.device if hasattr(engine.state, "device") else "cpu"
        found = self._newest_intact(device) if self.enabled else None
        if found is None:
            self.start_fresh(engine)
            return
        path, state = found
        config = _run_settings(engine, self.load_dict)
        for name, obj in self.load_dict.items():
            if obj is None:
                continue
            if name not in state:
                raise CheckpointError(
                    f"{path}: checkpoint has no entry {name!r} (it has {sorted(state)}); it was written by another "
                    f"bundle or version. {_START_OVER}"
                )
            load_into(obj, state[name], path, "network" if isinstance(obj, torch.nn.Module) else name, _START_OVER)
        self.changed = _apply_run_settings(engine, self.load_dict, config, path)
        self.loaded_from = path
        logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


def _optimizers(load_dict: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    return [o for o in load_dict.values() if isinstance(o, torch.optim.Optimizer)]


def _schedulers(load_dict: Mapping[str, Any]) -> list[Any]:
    return [o for o in load_dict.values() if isinstance(o, torch.optim.lr_scheduler.LRScheduler)]


def _run_settings(engine: Engine, load_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of this run that a checkpoint's state would silently replace, read before loading it."""
    return {
        "max_epochs": engine.state.max_epochs,
        "epoch_length": engine.state.epoch_length,
        "lrs": [[g.get("initial_lr", g["lr"]) for g in o.param_groups] for o in _optimizers(load_dict)],
        "base_lrs": [list(s.base_lrs) for s in _schedulers(load_dict)],
    }


def _differs(a: float, b: float) -> bool:
    return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def _apply_run_settings(engine: Engine, load_dict: Mapping[str, Any], config: Mapping[str, Any], path: Path) -> dict:
    """Give the settings of this run precedence over the checkpoint's; returns ``{setting: (checkpoint, now)}``."""
    changed: dict[str, tuple[Any, Any]] = {}
    state = engine.state
    # learning rate: the checkpoint holds the scheduler's base_lrs and the optimizer's current lr
    schedulers = _schedulers(load_dict)
    for sched, wanted in zip(schedulers, config["base_lrs"], strict=True):
        saved = list(sched.base_lrs)
        if len(saved) != len(wanted) or not any(_differs(a, b) for a, b in zip(saved, wanted, strict=True)):
            continue
        for group, old, new in zip(sched.optimizer.param_groups, saved, wanted, strict=True):
            group["lr"] = group["lr"] * new / old if old else new
            group["initial_lr"] = new
        sched.base_lrs = list(wanted)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        changed["learning_rate"] = (saved[0], wanted[0])
    scheduled = {id(s.optimizer) for s in schedulers}
    for opt, wanted in zip(_optimizers(load_dict), config["lrs"], strict=True):
        if id(opt) in scheduled:
            continue
        saved = [g["lr"] for g in opt.param_groups]
        if len(saved) == len(wanted) and any(_differs(a, b) for a, b in zip(saved, wanted, strict=True)):
            for group, new in zip(opt.param_groups, wanted, strict=True):
                group["lr"] = new
            changed["learning_rate"] = (saved[0], wanted[0])
    # iterations per epoch (batch size or data changed): keep the finished epochs, count with the new length
    if config["epoch_length"] and state.epoch_length and config["epoch_length"] != state.epoch_length:
        changed["iterations per epoch"] = (state.epoch_length, config["epoch_length"])
        state.epoch_length = config["epoch_length"]
        state.iteration = state.epoch * state.epoch_length
    if config["max_epochs"] is not None and state.max_epochs != config["max_epochs"]:
        changed["max_epochs"] = (state.max_epochs, config["max_epochs"])
        state.max_epochs = config["max_epochs"]
        if state.epoch >= state.max_epochs:
            logger.warning(
                f"max_epochs={state.max_epochs} but {path} is already at epoch {state.epoch}: nothing left to "
                "train. Raise --max_epochs to continue, or pass --resume False to start over."
            )
    for name, (old, new) in changed.items():
        logger.warning(f"{name} is {old} in {path} and {new} in this run: continuing with {new}")
    return changed
