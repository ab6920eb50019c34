"""Loading a network's weights from a ``model.pt`` or a training checkpoint, with one message naming the file and,
when the weights do not fit, the tensor and the setting to pass
(:func:`~vqvae_medical.training.mismatch.describe_mismatch`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

from vqvae_medical.training.mismatch import describe_mismatch
from vqvae_medical.utils.io import CheckpointError, MissingCheckpointError, safe_load

__all__ = ["LoadWeights", "load_into", "load_weights", "model_state"]

logger = logging.getLogger(__name__)


def load_into(obj: Any, state: Any, path: Path, name: str, fix: str) -> None:
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
        raise MissingCheckpointError(
            "no checkpoint given: pass --ckpt_path <file.pt>, or --output_dir of a trained run."
        )
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(
            f"{path}: no such checkpoint. Train into this --output_dir first (the best model is written to "
            "<output_dir>/models/model.pt), or pass the --output_dir of a trained run (inference also takes "
            "--ckpt_path <file.pt>)."
        )
    state = model_state(safe_load(path, map_location=map_location))
    load_into(network, state, path, "network", "Or pass --ckpt_path of a checkpoint trained with these settings.")
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

    def __init__(
        self, load_path: str | os.PathLike | None, network: torch.nn.Module, map_location: Any = "cpu"
    ) -> None:
        self.load_path = load_path
        self.network = network
        self.map_location = map_location
        self.loaded_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        self(engine)

    def __call__(self, engine: Engine | None = None) -> None:
        self.loaded_from = load_weights(self.network, self.load_path, self.map_location)
