"""Device and AMP selection for a bundle run, CPU bf16, and the hook that prints user errors in one line."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from vqvae_medical.utils.errors import UserError, register_user_error, user_error_types

__all__ = [
    "SettingError",
    "UserError",
    "amp_enabled",
    "check_writable",
    "install_error_hook",
    "native_cpu_bf16",
    "register_user_error",
    "require_setting",
    "resolve_cpu_bf16",
    "select_device",
    "user_error_types",
]

logger = logging.getLogger(__name__)


class SettingError(UserError, ValueError):
    """A bundle setting is missing or cannot be used (e.g. an output folder that cannot be written)."""


def check_writable(
    *folders: str | os.PathLike | Sequence[str | os.PathLike] | None, setting: str = "output_dir"
) -> bool:
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
    kinds = user_error_types()
    for e in _chain(exc):
        if isinstance(e, kinds) or "Weights only load failed" in str(e):
            return e
    for e in _chain(exc):
        match = _INSTANTIATE_FAILED.match(str(e))
        if match and isinstance(e.__cause__, (ValueError, TypeError)):
            reason = str(e.__cause__).rstrip(".")
            return SettingError(f"{match.group(1)}: {reason}. Check that setting in the config or on the command line.")
    return None


def _running_bundle_cli() -> bool:
    """Whether this process is ``python -m monai.bundle`` (also each worker that ``torchrun -m monai.bundle``
    starts): its ``__main__`` module is MONAI's bundle command line."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in ("monai.bundle.__main__", "monai.bundle")


def install_error_hook() -> bool:
    """Make ``python -m monai.bundle run`` end with one plain message for bad data, a diverged loss, a missing,
    unreadable, untrusted or unfitting checkpoint, or an unusable setting, instead of a traceback through the config
    parser. Other errors keep their traceback; set ``VQVAE_MEDICAL_TRACEBACK=1`` to always see it. Bundles call
    this in their ``initialize`` section.

    The hook replaces ``sys.excepthook``, which belongs to the whole process, so it is installed only when the
    process is MONAI's bundle command line (``python -m monai.bundle``, also under ``torchrun``). A program that
    embeds a bundle (``monai.bundle.create_workflow(...)``, ``monai.bundle.run`` called from Python) keeps its own
    hook and every traceback: its errors are its own to report. Within the command line, only this package's
    exception types (:func:`user_error_types`, by ``isinstance``) and the config parser's wrapping of a component
    that refused its arguments are shortened. Returns whether the hook was installed."""
    if not _running_bundle_cli():
        return False
    if getattr(sys.excepthook, "_vqvae_medical", False):  # installed already (at import, or by another initialize)
        return True
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
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

    hook._vqvae_medical = True
    sys.excepthook = hook
    return True


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) -> ``cuda`` when available (the local rank's GPU under torchrun), else ``cpu``."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available; use device='cpu' or 'auto'.")
    return device


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """AMP is used on CUDA only (on the CPU it would slow convolutions down); quantizers stay fp32 either way."""
    return bool(amp) and torch.device(device).type == "cuda"


#: ``/proc/cpuinfo`` flags of native bf16 arithmetic: AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and later
#: Xeons; AMD Zen 4 and later) and AMX-BF16 (Intel Sapphire Rapids and later)
NATIVE_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")

#: where :func:`native_cpu_bf16` reads the CPU's flags (Linux)
CPUINFO_PATH = Path("/proc/cpuinfo")

#: the ``cpu_bf16`` value that uses bf16 even on a CPU without native bf16 instructions
CPU_BF16_FORCE = "force"

#: measured (issue #31): one conv3d training step of the vqvae_3d network on an AVX2-only AMD EPYC
_SLOW_BF16 = "48x slower than fp32 there (one 3D training step: 16.4 s in bf16, 0.34 s in fp32, AVX2-only AMD EPYC)"


def native_cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively: one of :data:`NATIVE_BF16_FLAGS` in the ``flags`` of ``cpuinfo``
    (the text of ``/proc/cpuinfo``; read from :data:`CPUINFO_PATH` when ``None``). ``False`` where that file does not
    exist (not Linux): bf16 is then used only when forced. Without these instructions oneDNN emulates bf16, which
    was 48x slower than fp32 for a 3D convolution step on an AVX2-only CPU."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO_PATH.read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and any(flag in value.split() for flag in NATIVE_BF16_FLAGS):
            return True
    return False


def resolve_cpu_bf16(cpu_bf16: bool | str, cpuinfo: str | None = None) -> bool:
    """Whether a CPU training step runs under bf16 autocast, given the ``cpu_bf16`` setting.

    ``False``: fp32. ``True``: bf16 where the CPU has native bf16 (:func:`native_cpu_bf16`), otherwise fp32 with
    one warning that says so. ``"force"``: bf16 on any CPU (e.g. to compare, or on a CPU whose flags this check
    does not know).

    Args:
        cpu_bf16: the setting (``False``, ``True`` or ``"force"``).
        cpuinfo: text of ``/proc/cpuinfo`` (read when ``None``; give it to test another CPU).

    Raises:
        ValueError: any other value, naming the three.
    """
    if cpu_bf16 is False or cpu_bf16 is None:
        return False
    if isinstance(cpu_bf16, str) and cpu_bf16.lower() == CPU_BF16_FORCE:
        return True
    if cpu_bf16 is not True:
        raise ValueError(f"cpu_bf16 must be False, True or '{CPU_BF16_FORCE}', got {cpu_bf16!r}.")
    if native_cpu_bf16(cpuinfo):
        return True
    logger.warning(
        f"cpu_bf16: this CPU has no native bf16 instructions ({' or '.join(NATIVE_BF16_FLAGS)} in /proc/cpuinfo), so "
        f"CPU training runs in fp32: bf16 was {_SLOW_BF16}. Pass --cpu_bf16 {CPU_BF16_FORCE} to use bf16 anyway."
    )
    return False
