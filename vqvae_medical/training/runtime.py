"""Device and AMP selection for a bundle run, and the hook that prints user errors in one line."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["SettingError", "install_error_hook", "check_writable", "require_setting", "select_device", "amp_enabled"]


class SettingError(ValueError):
    """A bundle setting is missing or cannot be used (e.g. an output folder that cannot be written)."""


#: exceptions whose message already says what is wrong and how to fix it
_USER_ERRORS = (
    "DataError",
    "NonFiniteLossError",
    "SettingError",
    "CheckpointError",
    "MissingCheckpointError",
    "UntrustedCheckpointError",
    "AutoencoderDirError",
    "RecordMismatchError",
)


def check_writable(*folders: str | os.PathLike | Sequence[str | os.PathLike] | None, setting: str = "output_dir") -> bool:
    """Create each folder and write and remove a file in it, so that a run that cannot save stops before the first
    epoch instead of at the first checkpoint. ``None`` entries are skipped; returns ``True`` (for config
    expressions).

    Raises:
        SettingError: a folder cannot be created or written, naming it and ``setting``.
    """
    flat: list = []
    for f in folders:
        flat.extend(f if isinstance(f, (list, tuple)) else [f])
    for folder in flat:
        if folder in (None, "", "None"):
            continue
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write_test_", suffix=".tmp", dir=path)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise SettingError(
                f"{path}: cannot write to this folder ({reason}). Pass --{setting} <a folder you can write to>."
            ) from None
    return True


def require_setting(value: object, name: str, what: str) -> object:
    """``value`` unless it is unset (``None``/empty), else a :class:`SettingError` asking for ``--name``."""
    if value in (None, "", "None"):
        raise SettingError(f"{name} is not set: pass --{name} <{what}>.")
    return value


#: how MONAI's ``ConfigComponent.instantiate`` wraps an exception raised by a component's constructor
_INSTANTIATE_FAILED = re.compile(r"Failed to instantiate component '([^']+)'")


def _chain(exc: BaseException | None):
    """``exc`` and its ``__cause__``/``__context__`` chain, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _user_error(exc: BaseException | None) -> BaseException | None:
    """The first exception of our user-facing kinds in the ``__cause__``/``__context__`` chain, if any; else a
    :class:`SettingError` for a config component whose constructor refused its arguments (a ``ValueError`` or
    ``TypeError`` that MONAI's config parser wrapped, e.g. ``--network_def#model#normalize_latents l1``): its
    message names the component and the bad value."""
    for e in _chain(exc):
        if type(e).__name__ in _USER_ERRORS or "Weights only load failed" in str(e):
            return e
    for e in _chain(exc):
        match = _INSTANTIATE_FAILED.match(str(e))
        if match and isinstance(e.__cause__, (ValueError, TypeError)):
            reason = str(e.__cause__).rstrip(".")
            return SettingError(f"{match.group(1)}: {reason}. Check that setting in the config or on the command line.")
    return None


def install_error_hook() -> None:
    """Make ``python -m monai.bundle run`` end with one plain message for bad data, a diverged loss, a missing,
    unreadable, untrusted or unfitting checkpoint, or an unusable setting, instead of a traceback through the config
    parser. Other errors keep their traceback; set ``VQVAE_MEDICAL_TRACEBACK=1`` to always see it. Bundles call
    this in their ``initialize`` section."""
    import sys

    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # noqa: ANN001
        found = _user_error(exc)
        if found is None or os.environ.get("VQVAE_MEDICAL_TRACEBACK"):
            previous(exc_type, exc, tb)
            return
        message, name = str(found), type(found).__name__
        if "Weights only load failed" in message:  # torch's own message: keep none of its advice to unpickle
            name = "UntrustedCheckpointError"
            message = (
                "refused to load a checkpoint that contains pickled Python objects, not only tensors (loading it "
                "could run arbitrary code). Only load checkpoints from sources you trust."
            )
        sys.stderr.write(f"\nERROR ({name}): {message}\n")

    sys.excepthook = hook


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) -> ``cuda`` when available (the local rank's GPU under torchrun), else ``cpu``."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available; use device='cpu' or 'auto'.")
    return device


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """AMP is used on CUDA only (on the CPU it would slow convolutions down); quantizers stay fp32 either way."""
    return bool(amp) and torch.device(device).type == "cuda"
