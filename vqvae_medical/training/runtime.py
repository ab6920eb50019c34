"""Device and AMP selection for a bundle run, and the hook that prints user errors in one line."""

from __future__ import annotations

import os

import torch

__all__ = ["install_error_hook", "select_device", "amp_enabled"]


#: exceptions whose message already says what is wrong and how to fix it
_USER_ERRORS = ("DataError", "NonFiniteLossError", "UntrustedCheckpointError", "AutoencoderDirError")


def _user_error(exc: BaseException | None) -> BaseException | None:
    """The first exception of our user-facing kinds in the ``__cause__``/``__context__`` chain, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _USER_ERRORS or "Weights only load failed" in str(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def install_error_hook() -> None:
    """Make ``python -m monai.bundle run`` end with one plain message for bad data, a diverged loss or an
    untrusted checkpoint, instead of a traceback through the config parser. Other errors keep their traceback;
    set ``VQVAE_MEDICAL_TRACEBACK=1`` to always see it. Bundles call this in their ``initialize`` section."""
    import sys

    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # noqa: ANN001
        found = _user_error(exc)
        if found is None or os.environ.get("VQVAE_MEDICAL_TRACEBACK"):
            previous(exc_type, exc, tb)
            return
        message = str(found)
        if "Weights only load failed" in message:
            message = (
                "refused to load a checkpoint that contains pickled Python objects, not only tensors (loading it "
                "could run arbitrary code). Only load checkpoints from sources you trust.\n" + message.splitlines()[0]
            )
        sys.stderr.write(f"\nERROR ({type(found).__name__}): {message}\n")

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
