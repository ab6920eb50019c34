"""What every bundle config calls around its engines: the start of a run and the handlers of a rank.

``start_run`` is the ``initialize`` section of a bundle (error hook, command-line check, writable output folders,
seeds); ``handlers_of_rank`` is what ``multi_gpu_train.json`` hands an engine: every handler on rank 0, and on the
other ranks all but the writers (files and logs are rank 0's), chosen by type, not by place in the list.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from monai.handlers import StatsHandler, TensorBoardHandler
from monai.utils import set_determinism

from vqvae_medical.training.checkpoints import BestModelSaver, CheckpointSaver
from vqvae_medical.training.command_line import check_command_line
from vqvae_medical.training.handlers import MetricsHistory, ProgressBar
from vqvae_medical.training.runtime import check_writable, install_error_hook

__all__ = ["WRITERS", "handlers_of_rank", "handlers_of_rank_with", "is_writer", "start_run"]

#: handler types that write files or logs: rank 0 runs them, the other ranks leave them out
WRITERS: tuple[type, ...] = (
    StatsHandler,
    TensorBoardHandler,
    CheckpointSaver,
    BestModelSaver,
    MetricsHistory,
    ProgressBar,
)


def start_run(
    seed: int | None = 0, writable: Sequence[str | os.PathLike | None] = (), setting: str = "output_dir"
) -> bool:
    """A bundle's ``initialize``: one-line errors (:func:`install_error_hook`), no misspelled or JSON-worded
    command-line setting (:func:`check_command_line`), each ``writable`` folder created and writable (else an error
    naming ``setting``), MONAI's determinism with ``seed``. Returns ``True`` (for config lists).

    Args:
        seed: seed of ``monai.utils.set_determinism`` (``None`` reseeds at random, as MONAI does).
        writable: output folders that must be writable before anything runs.
        setting: the setting named when a folder is not writable.
    """
    install_error_hook()
    check_command_line()
    if writable:
        check_writable(*writable, setting=setting)
    set_determinism(seed=seed)
    return True


def is_writer(handler: Any, writers: Iterable[type] = ()) -> bool:
    """Whether ``handler`` (an instance or a class) writes files or logs: one of :data:`WRITERS` or ``writers``
    (the stage's own writer types)."""
    kinds = WRITERS + tuple(writers)
    return issubclass(handler, kinds) if isinstance(handler, type) else isinstance(handler, kinds)


def handlers_of_rank(handlers: Sequence[Any], rank: int, writers: Iterable[type] = ()) -> list[Any]:
    """The handlers rank ``rank`` attaches: all of them on rank 0; on the other ranks those that are not writers
    (:func:`is_writer`), in their order: the same resume point, schedule, validation and stop on every rank.

    Args:
        handlers: the engine's handler list of ``train.json``.
        rank: this process's rank (``init_distributed``).
        writers: the stage's own writer types, beside :data:`WRITERS`.
    """
    if int(rank) == 0:
        return list(handlers)
    writers = tuple(writers)
    return [h for h in handlers if not is_writer(h, writers)]


def handlers_of_rank_with(writers: Iterable[type]) -> Callable[[Sequence[Any], int], list[Any]]:
    """:func:`handlers_of_rank` with a stage's own writer types: the ``handlers_of_rank(handlers, rank)`` of a
    stage's workflow module, which its ``multi_gpu_train.json`` names.

    Args:
        writers: the stage's own writer types, beside :data:`WRITERS`.
    """
    return functools.partial(handlers_of_rank, writers=tuple(writers))
