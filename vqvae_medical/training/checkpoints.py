"""Atomic, resumable, safely loaded checkpoints for Ignite engines.

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

import json
import logging
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = [
    "UntrustedCheckpointError",
    "atomic_save",
    "atomic_write_json",
    "safe_load",
    "RNGState",
    "CheckpointSaver",
    "ResumeFromCheckpoint",
    "BestModelSaver",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)
_EPOCH_RE = re.compile(r"_(?:epoch|iteration)=(\d+)\.pt$")


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint holds pickled objects other than tensors and plain containers, and was refused."""


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file in the folder of ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the previous file or the new one, never a truncated file.
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _strict_json(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN and infinities become ``null``) atomically, as :func:`atomic_save` does.

    Every JSON file the package writes (metrics, best-model records, sampling records) goes through this
    function, so that a reader never sees half a file and every file parses with any JSON reader.
    """
    text = json.dumps(_strict_json(obj), indent=indent, allow_nan=False)
    return _atomic_write(path, lambda f: f.write(text.encode()))


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a plain message when the file carries pickled code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError wrapping it) for unsafe content
        text = str(e)
        if "weights_only" in text or "Unpickl" in type(e).__name__ or "Unsupported global" in text:
            raise UntrustedCheckpointError(
                f"{path}: refused to load this checkpoint because it contains pickled Python objects, not only "
                "tensors (loading it could run arbitrary code). Only load checkpoints from sources you trust; "
                "re-save a trusted one as a plain state_dict to use it here."
            ) from None
        raise RuntimeError(f"{path}: cannot read the checkpoint ({e}). It may be truncated or not a torch file.") from e


class RNGState:
    """Python, NumPy and torch random states as a ``state_dict`` of tensors and ints (``weights_only``-loadable)."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_state = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]),
            "numpy_cached_gauss": float(np_state[4]),
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(
            (
                "MT19937",
                state["numpy_keys"].numpy().astype(np.uint32),
                int(state["numpy_pos"]),
                int(state["numpy_has_gauss"]),
                float(state["numpy_cached_gauss"]),
            )
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def _state_dicts(save_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.state_dict() for k, v in save_dict.items() if v is not None}


def latest_checkpoint(save_dir: str | os.PathLike, prefix: str = "checkpoint") -> Path | None:
    """The ``{prefix}_epoch=N.pt`` (or ``_iteration=N``) file with the largest ``N`` in ``save_dir``, if any."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.glob(f"{prefix}_*.pt") if (m := _EPOCH_RE.search(p.name))]
    return max(found)[1] if found else None


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
            ((int(m.group(1)), p) for p in self.save_dir.glob(f"{self.prefix}_*.pt") if (m := _EPOCH_RE.search(p.name))),
            reverse=True,
        )
        for _, old in found[self.n_saved :]:
            old.unlink(missing_ok=True)


class ResumeFromCheckpoint:
    """At the start of a run, loads the latest checkpoint of ``save_dir`` (if any) into ``load_dict``.

    Loading uses ``torch.load(..., weights_only=True)``. A larger ``max_epochs`` than the checkpoint's is honoured,
    so rerunning with more epochs continues training.

    Args:
        save_dir: folder searched with :func:`latest_checkpoint`.
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

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.load_dict.setdefault(self.engine_key, engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        # a process killed while writing a checkpoint leaves its temporary file (never a truncated checkpoint)
        for stale in self.save_dir.glob(f".{self.prefix}_*.tmp"):
            stale.unlink(missing_ok=True)
            logger.info(f"removed {stale}, left by an interrupted checkpoint write")
        if not self.enabled:
            return
        path = latest_checkpoint(self.save_dir, self.prefix)
        if path is None:
            return
        state = safe_load(path, map_location=engine.state.device if hasattr(engine.state, "device") else "cpu")
        max_epochs = engine.state.max_epochs
        for name, obj in self.load_dict.items():
            if obj is None:
                continue
            if name not in state:
                raise KeyError(f"{path}: checkpoint has no entry {name!r} (it has {sorted(state)}).")
            obj.load_state_dict(state[name])
        if max_epochs is not None and engine.state.max_epochs is not None and max_epochs > engine.state.max_epochs:
            engine.state.max_epochs = max_epochs
        self.loaded_from = path
        logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


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
        atomic_write_json({"metric": self.metric_name, "value": value}, self.path.with_suffix(self.path.suffix + ".json"))
        logger.info(f"new best {self.metric_name}={value:.4f}: saved {self.path}")
