"""Ignite handlers every stage uses: codebook monitor, time budget / wall-clock ceiling, metrics history, progress
bar."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar

from vqvae_medical.utils.curves import plot_training_curves

__all__ = ["CodebookMonitor", "MetricsHistory", "ProgressBar", "TimeBudget", "level_names", "read_history"]

logger = logging.getLogger(__name__)


def level_names(n_levels: int) -> tuple[str, ...]:
    """Suffixes of per-level keys: ``("",)`` for one level, ``("_top", "_bottom")`` for two."""
    if n_levels == 1:
        return ("",)
    if n_levels == 2:
        return ("_top", "_bottom")
    return tuple(f"_{i}" for i in range(n_levels))


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a :class:`MetricsHistory` file (JSON lines); empty when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class CodebookMonitor:
    """Warns (once per epoch and level) when the fraction of codes used in recent training batches drops below
    ``min_usage`` — the sign of codebook collapse. With an EMA quantizer whose ``dead_code_threshold > 0`` the
    quantizer restarts the dead codes itself; this handler makes the event visible in the log.

    Args:
        min_usage: usage fraction under which to warn.
        every: check every ``every`` iterations.
    """

    def __init__(self, min_usage: float = 0.1, every: int = 10) -> None:
        self.min_usage = float(min_usage)
        self.every = int(every)
        self._warned: set[tuple[int, str]] = set()
        self.warnings = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if not isinstance(out, dict):
            return
        for key, value in out.items():
            if not key.startswith("usage"):
                continue
            usage = float(value)
            tag = (engine.state.epoch, key)
            if usage < self.min_usage and tag not in self._warned:
                self._warned.add(tag)
                self.warnings += 1
                msg = (
                    f"codebook collapse: only {usage:.1%} of the codes were used in recent batches ({key}) at "
                    f"epoch {engine.state.epoch}, iteration {engine.state.iteration} (threshold {self.min_usage:.1%})."
                    " Consider codebook_init='data'/'kmeans', dead_code_threshold > 0 or a lower decay."
                )
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)


class TimeBudget:
    """Ends training on time, in one of two modes; without either, training ends on ``max_epochs`` only.

    - **Budget** (``minutes`` > 0; the docs' experiments): training ends once ``minutes`` of ``clock`` are spent, and
      :func:`vqvae_medical.training.schedules.cosine_decay` decays the learning rate by the share of the budget spent
      (``fraction_spent``), so the run ends at the low rate. ``clock="process"`` counts the CPU seconds of this
      process (all its threads), which stays fair when other jobs share the machine: on 2 cores, 10 minutes of an
      otherwise idle run are about 20 process-minutes. The model then depends on the machine's speed.
    - **Ceiling** (``ceiling_minutes`` > 0 and no budget; the bundles' default guard): a wall-clock limit far above
      the run's idle time. It never changes the learning rate (``fraction_spent`` stays 0), so a run it does not cut
      gives the same model on a fast or a loaded machine, only later; when it cuts one, it logs one WARNING line
      saying at which epoch and that the model is not the documented one.

    Either way the current epoch is cut short after the running iteration, the epoch-end handlers (validation,
    checkpoints) still run, then the run stops. Under DDP every rank stops at the same iteration.

    Args:
        minutes: the budget; ``None`` or ``0``: none (on ``monai.bundle run``'s command line only ``0`` does: it
            reads ``null`` as the text ``'null'`` and ignores an override whose value is ``None``).
        clock: clock of the budget, ``"process"`` or ``"wall"``.
        ceiling_minutes: the wall-clock ceiling (``wall_ceiling_minutes`` in the configs); ``None`` or ``0``: none.
            Ignored when a budget is set.
    """

    def __init__(
        self, minutes: float | None = None, clock: str = "process", ceiling_minutes: float | None = None
    ) -> None:
        if clock not in ("wall", "process"):
            raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}.")
        self.minutes = _check_minutes(minutes, "time_budget_minutes")
        self.ceiling_minutes = _check_minutes(ceiling_minutes, "wall_ceiling_minutes")
        self.clock = clock
        self._start = 0.0
        self.spent_s = 0.0
        self.cut = False

    @property
    def mode(self) -> str | None:
        """``"budget"``, ``"ceiling"`` or ``None`` (training ends on epochs only)."""
        if self.minutes:
            return "budget"
        return "ceiling" if self.ceiling_minutes else None

    @property
    def limit_s(self) -> float:
        """Seconds after which training stops (infinite without a budget or ceiling)."""
        if self.mode == "budget":
            return float(self.minutes) * 60.0
        if self.mode == "ceiling":
            return float(self.ceiling_minutes) * 60.0
        return float("inf")

    def _now(self) -> float:
        return time.process_time() if self.mode == "budget" and self.clock == "process" else time.perf_counter()

    def attach(self, engine: Engine) -> None:
        if self.mode is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stop_if_spent)

    def _started(self, engine: Engine) -> None:
        self._start = self._now()

    @property
    def fraction_spent(self) -> float:
        """Share of the budget used so far; 0 without a budget, and always 0 for the ceiling (the learning rate
        must not depend on the machine's speed)."""
        return self.spent_s / self.limit_s if self.mode == "budget" else 0.0

    @property
    def spent(self) -> bool:
        return self.mode is not None and self.spent_s >= self.limit_s

    def __call__(self, engine: Engine) -> None:
        self.spent_s = self._now() - self._start
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same iteration, or the others would wait forever in DDP's all-reduce
            spent = torch.tensor([self.spent_s], dtype=torch.float64)
            if torch.distributed.get_backend() == "nccl":
                spent = spent.cuda()
            torch.distributed.all_reduce(spent, op=torch.distributed.ReduceOp.MAX)
            self.spent_s = float(spent.item())
        if self.spent:
            engine.terminate_epoch()

    def _stop_if_spent(self, engine: Engine) -> None:
        if not self.spent or self.cut:
            return
        self.cut = True
        state = engine.state
        if self.mode == "budget":
            logger.info(
                f"time budget of {self.minutes} {self.clock}-minutes spent ({self.spent_s:.0f} s) at epoch "
                f"{state.epoch}, iteration {state.iteration}: stopping"
            )
        else:
            logger.warning(
                f"wall-clock ceiling of {self.ceiling_minutes} minutes (wall_ceiling_minutes) cut training at epoch "
                f"{state.epoch} of {state.max_epochs} (iteration {state.iteration}, {self.spent_s:.0f} s): the model "
                f"is not the documented one; rerun with --wall_ceiling_minutes 0 and a new --output_dir to train all "
                f"{state.max_epochs} epochs"
            )
        engine.terminate()


def _check_minutes(minutes: Any, name: str) -> float | None:
    """``minutes`` when it is a number >= 0 or ``None``; otherwise a ValueError naming the setting ``name``."""
    if isinstance(minutes, (bool, str)) or (minutes is not None and not isinstance(minutes, (int, float))):
        hint = ""
        if isinstance(minutes, str):
            hint = (
                " (on the command line write 0 for no budget or ceiling: MONAI reads `null` as text and drops `None`)"
            )
        raise ValueError(f"{name} must be a number of minutes or None, got {minutes!r}{hint}.")
    if minutes is not None and minutes < 0:
        raise ValueError(f"{name} must be >= 0 (0 or None: none), got {minutes}.")
    return minutes


class MetricsHistory:
    """Appends one JSON line per epoch to ``path``: the mean of the step's scalar outputs (training) or the
    engine's metrics (validation). The evaluation report and ``plot_training_curves`` read it.

    Args:
        path: JSON-lines file.
        phase: ``"train"`` or ``"validation"``.
        curves_png: optionally redraw the training curves to this PNG after each epoch.
    """

    def __init__(self, path: str | os.PathLike, phase: str = "train", curves_png: str | os.PathLike | None = None):
        self.path = Path(path)
        self.phase = phase
        self.curves_png = curves_png
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        if self.phase == "train":
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, dict):
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:
                    self._sums[k] = self._sums.get(k, 0.0) + float(v)
            self._count += 1

    def _write(self, engine: Engine) -> None:
        if self.phase == "train":
            values = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        else:
            values = {
                k: float(v) for k, v in engine.state.metrics.items() if np.isscalar(v) or isinstance(v, (int, float))
            }
        record = {
            "phase": self.phase,
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "time": time.time(),
            **values,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.curves_png is not None:
            plot_training_curves(read_history(self.path), self.curves_png)


class ProgressBar(_IgniteProgressBar):
    """Ignite's tqdm progress bar, attachable from a MONAI handler list, showing the running loss.

    Args:
        persist: keep the bar after each epoch.
        keys: scalar keys of the step output to show.
    """

    def __init__(self, persist: bool = False, keys: Sequence[str] = ("loss",)) -> None:
        super().__init__(persist=persist)
        self.keys = tuple(keys)

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not args and "output_transform" not in kwargs:
            kwargs["output_transform"] = self._scalars
        super().attach(engine, *args, **kwargs)

    def _scalars(self, output: Any) -> dict[str, float]:
        if not isinstance(output, dict):
            return {}
        return {k: float(output[k]) for k in self.keys if k in output}
