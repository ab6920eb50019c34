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
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from ignite.engine import Engine, Events

from vqvae_medical.training.mismatch import describe_mismatch

__all__ = [
    "CheckpointError",
    "MissingCheckpointError",
    "UntrustedCheckpointError",
    "atomic_save",
    "atomic_write_json",
    "safe_load",
    "RNGState",
    "CheckpointSaver",
    "ResumeFromCheckpoint",
    "BestModelSaver",
    "latest_checkpoint",
    "checkpoints_newest_first",
    "remove_stale_temporary_files",
    "describe_mismatch",
    "load_weights",
    "model_state",
    "LoadWeights",
]

logger = logging.getLogger(__name__)
_EPOCH_RE = re.compile(r"_(?:epoch|iteration)=(\d+)\.pt$")
#: temporary files older than this process were left by an interrupted (e.g. ``kill -9``) earlier run
_PROCESS_START = time.time()
_START_OVER = "To start over instead, pass --resume False or a new --output_dir."


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the network; the message names the file and the fix."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects other than tensors and plain containers, and was refused."""


def _file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would give: those of the file it replaces, else ``0o666`` less the umask
    (``mkstemp`` makes ``0o600`` files, which colleagues sharing an output folder could not read)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        pass
    try:  # Linux: read the umask without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file in the folder of ``path``, fsync, then rename it over ``path``; the file
    gets the permissions a plain write would give it (:func:`_file_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
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
        raise MissingCheckpointError(f"{path}: no such checkpoint file.") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file.") from None
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError wrapping it) for unsafe content
        text = str(e)
        if "weights_only" in text or "Unpickl" in type(e).__name__ or "Unsupported global" in text:
            raise UntrustedCheckpointError(
                f"{path}: refused to load this checkpoint because it contains pickled Python objects, not only "
                "tensors (loading it could run arbitrary code). Only load checkpoints from sources you trust; "
                "re-save a trusted one as a plain state_dict to use it here."
            ) from None
        reason = text.strip().split(". ")[0].splitlines()[0] if text.strip() else f"{type(e).__name__}: ends early"
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({reason}); it is truncated or not a torch file."
        ) from None


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


def remove_stale_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``*.tmp`` files of ``folder`` written before this process started.

    :func:`atomic_save` (checkpoints, ``model.pt``) and :class:`BestModelSaver` (``model.pt.json``) write to a
    temporary file and rename it; a process killed in between (``kill -9``, out of memory) leaves that file, often
    with 0 bytes. Files newer than this process are kept: another process (a rank of the same run) may be writing.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for stale in folder.glob("*.tmp"):
        try:
            if stale.is_file() and stale.stat().st_mtime < _PROCESS_START:
                stale.unlink()
                removed.append(stale)
                logger.info(f"removed {stale}, left by an interrupted write")
        except FileNotFoundError:  # removed by another rank meanwhile
            continue
    return removed


def _load_into(obj: Any, state: Any, path: Path, name: str, fix: str) -> None:
    """``obj.load_state_dict(state)`` with a :class:`CheckpointError` naming the file and the mismatch."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        why = describe_mismatch(obj, state) if isinstance(obj, torch.nn.Module) and isinstance(state, Mapping) else None
        if why is None:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = f"its {name!r} entry does not fit ({first})"
        raise CheckpointError(f"{path} does not fit the {name}: {why} {fix}") from None


def model_state(state: Any) -> Any:
    """The network's ``state_dict`` in a ``model.pt`` (a plain state dict) or a training checkpoint (``"model"``)."""
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        return state["model"]
    return state


def load_weights(network: torch.nn.Module, path: str | os.PathLike | None, map_location: Any = "cpu") -> Path:
    """Load ``path`` (``weights_only``) into ``network`` and log which file it was.

    Raises:
        CheckpointError: the file is missing, unreadable, untrusted, or does not fit ``network``; the message names
            the file and, for a mismatch, the tensor and the setting to pass.
    """
    if path in (None, "", "None"):
        raise MissingCheckpointError("no checkpoint given: pass --ckpt_path <file.pt>, or --output_dir of a trained run.")
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(
            f"{path}: no such checkpoint. Train into this --output_dir first (the best model is written to "
            "<output_dir>/models/model.pt), or pass the --output_dir of a trained run (inference also takes "
            "--ckpt_path <file.pt>)."
        )
    state = model_state(safe_load(path, map_location=map_location))
    _load_into(network, state, path, "network", "Or pass --ckpt_path of a checkpoint trained with these settings.")
    logger.info(f"loaded weights from {path}")
    return path


class LoadWeights:
    """Handler: load a checkpoint into a network when it is attached to the engine, with :func:`load_weights`.

    Replaces MONAI's ``CheckpointLoader`` in the inference and evaluate configs: it accepts both a ``model.pt`` and
    a training checkpoint, and says in one line which file is missing or unreadable, or which tensor does not fit.
    It loads at ``attach`` (when the config builds the engine), not at ``STARTED``: an exception inside the run
    reaches MONAI's ``StatsHandler``, which logs it with its whole traceback before the one-line message.

    Args:
        load_path: the checkpoint.
        network: the module to load into.
        map_location: passed to ``torch.load``.
    """

    def __init__(self, load_path: str | os.PathLike | None, network: torch.nn.Module, map_location: Any = "cpu") -> None:
        self.load_path = load_path
        self.network = network
        self.map_location = map_location
        self.loaded_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        self(engine)

    def __call__(self, engine: Engine | None = None) -> None:
        self.loaded_from = load_weights(self.network, self.load_path, self.map_location)


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
            _load_into(obj, state[name], path, "network" if isinstance(obj, torch.nn.Module) else name, _START_OVER)
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
    for sched, wanted in zip(schedulers, config["base_lrs"]):
        saved = list(sched.base_lrs)
        if len(saved) != len(wanted) or not any(_differs(a, b) for a, b in zip(saved, wanted)):
            continue
        for group, old, new in zip(sched.optimizer.param_groups, saved, wanted):
            group["lr"] = group["lr"] * new / old if old else new
            group["initial_lr"] = new
        sched.base_lrs = list(wanted)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        changed["learning_rate"] = (saved[0], wanted[0])
    scheduled = {id(s.optimizer) for s in schedulers}
    for opt, wanted in zip(_optimizers(load_dict), config["lrs"]):
        if id(opt) in scheduled:
            continue
        saved = [g["lr"] for g in opt.param_groups]
        if len(saved) == len(wanted) and any(_differs(a, b) for a, b in zip(saved, wanted)):
            for group, new in zip(opt.param_groups, wanted):
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
