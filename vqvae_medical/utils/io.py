"""Whole-or-absent files: every file the package writes goes through :func:`atomic_write` (a temporary file in the
same folder, fsync, rename), so a reader never sees half a file; checkpoints are read with ``weights_only=True``
(:func:`safe_load`), and a missing, unreadable or untrusted one raises a :class:`CheckpointError` naming the file."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vqvae_medical.utils.errors import UserError

__all__ = [
    "CheckpointError",
    "MissingCheckpointError",
    "UntrustedCheckpointError",
    "atomic_write",
    "atomic_save",
    "atomic_write_json",
    "safe_load",
    "remove_stale_temporary_files",
    "PROCESS_START",
]

logger = logging.getLogger(__name__)
#: temporary files older than this process were left by an interrupted (e.g. ``kill -9``) earlier run
PROCESS_START = time.time()


class CheckpointError(UserError, RuntimeError):
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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file in the folder of ``path``, fsync, then rename it over ``path``; the file
    gets the permissions a plain write would give it (:func:`_file_mode`). :func:`atomic_save` and
    :func:`atomic_write_json` are the torch and JSON writers; use this one for any other format."""
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
    return atomic_write(path, lambda f: torch.save(obj, f))


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
    return atomic_write(path, lambda f: f.write(text.encode()))


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


def remove_stale_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``*.tmp`` files of ``folder`` written before this process started.

    :func:`atomic_write` (checkpoints, ``model.pt``, ``model.pt.json``, every JSON) writes to a temporary file
    and renames it; a process killed in between (``kill -9``, out of memory) leaves that file, often
    with 0 bytes. Files newer than this process are kept: another process (a rank of the same run) may be writing.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for stale in folder.glob("*.tmp"):
        try:
            if stale.is_file() and stale.stat().st_mtime < PROCESS_START:
                stale.unlink()
                removed.append(stale)
                logger.info(f"removed {stale}, left by an interrupted write")
        except FileNotFoundError:  # removed by another rank meanwhile
            continue
    return removed
