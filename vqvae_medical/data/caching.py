"""Where the preprocessed training set lives: RAM, a disk cache or nowhere, chosen from its size.

MONAI caches the output of the deterministic transforms (everything before the first random one): in RAM with
``CacheDataset``, on disk with ``PersistentDataset`` (one ``.pt`` file per item, read back every epoch), or not at
all with ``Dataset`` (every item is loaded and preprocessed every epoch). :func:`make_dataset` picks one of them
(``cache="auto"``) from :func:`estimate_cache_bytes` and :func:`available_memory`, and refuses ``"memory"`` with
one plain message when the estimate cannot fit, before any item is cached (instead of the OOM killer or a
``MemoryError`` traceback half-way through).

The memory limit is read by hand (``/proc``, ``resource``, cgroup files) because neither MONAI nor PyTorch reports
it, and it must include the limits a scheduler or container sets (``ulimit -v``, cgroup ``memory.max``), which
``psutil`` does not.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, RandomizableTrait, Transform, apply_transform

from vqvae_medical.data.checks import DataError

__all__ = [
    "AUTO_MEMORY_FRACTION",
    "CACHE_MODES",
    "MemoryLimit",
    "available_memory",
    "choose_cache",
    "estimate_cache_bytes",
    "make_dataset",
]

logger = logging.getLogger(__name__)

CACHE_MODES = ("auto", "memory", "disk", "none")

#: ``cache="auto"`` keeps the data set in RAM when it needs at most this fraction of the available memory; the rest
#: is left to the network, its activations, the optimiser and the loader's worker processes
AUTO_MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class MemoryLimit:
    """Memory this process can still allocate, and which limit binds.

    Attributes:
        available: bytes.
        source: ``"RLIMIT_AS"`` (``ulimit -v`` / ``prlimit --as``: address-space limit minus this process's
            address space), ``"cgroup"`` (``memory.max`` or ``memory.limit_in_bytes`` minus the cgroup's usage) or
            ``"MemAvailable"`` (``/proc/meminfo``: free RAM the kernel can hand out without swapping).
    """

    available: int
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _proc_kib(path: str, field: str) -> int | None:
    """A ``kB`` field of a ``/proc`` file (``/proc/meminfo``, ``/proc/self/status``) in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """``limit - usage`` of this process's memory cgroup (v2 ``memory.max``/``memory.current``, v1
    ``memory.limit_in_bytes``/``memory.usage_in_bytes``), or ``None`` without a limit."""
    paths: list[str] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in ("", "memory") or "memory" in controllers.split(","):
                paths.append(path.lstrip("/"))
    except (OSError, ValueError):
        pass
    root = Path("/sys/fs/cgroup")
    candidates = []
    for rel in [*paths, ""]:  # the process's own cgroup path, then a cgroup namespace's root
        candidates.append((root / rel / "memory.max", root / rel / "memory.current"))
        candidates.append(
            (root / "memory" / rel / "memory.limit_in_bytes", root / "memory" / rel / "memory.usage_in_bytes")
        )
    for limit_file, usage_file in candidates:
        limit = _read_int(limit_file)
        if limit is None or limit >= 2**60:  # no limit ("max" or v1's page-rounded LONG_MAX)
            continue
        usage = _read_int(usage_file) or 0
        return max(0, limit - usage)
    return None


def available_memory() -> MemoryLimit:
    """The smallest of: the address-space limit (``RLIMIT_AS``) minus this process's address space (``VmSize``),
    the memory cgroup's limit minus its usage, and the system's ``MemAvailable``."""
    found: list[MemoryLimit] = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _proc_kib("/proc/self/status", "VmSize") or 0
        found.append(MemoryLimit(max(0, soft - used), "RLIMIT_AS"))
    cgroup = _cgroup_available()
    if cgroup is not None:
        found.append(MemoryLimit(cgroup, "cgroup"))
    system = _proc_kib("/proc/meminfo", "MemAvailable")
    if system is not None:
        found.append(MemoryLimit(system, "MemAvailable"))
    if not found:  # not Linux: no limit known
        return MemoryLimit(2**63 - 1, "unknown")
    return min(found, key=lambda m: m.available)


def _deterministic_part(transform: Compose) -> Compose:
    """The transforms a MONAI cache stores: those before the first random (or non-MONAI) transform."""
    head = []
    for xform in transform.flatten().transforms:
        if isinstance(xform, RandomizableTrait) or not isinstance(xform, Transform):
            break
        head.append(xform)
    return Compose(head)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def estimate_cache_bytes(data: Sequence[Mapping], transform: Compose, samples: int = 3) -> tuple[int, int]:
    """Estimated bytes of the cached (deterministically preprocessed) data set, and of its largest sampled item.

    Preprocesses up to ``samples`` items spread over ``data`` (first, middle, last) and multiplies the largest by
    ``len(data)``: exact when the preprocessing gives every item the same size (a ``spatial_size``), an upper
    estimate from the sample otherwise.
    """
    if len(data) == 0:
        return 0, 0
    head = _deterministic_part(transform)
    picks = sorted({round(i * (len(data) - 1) / max(1, samples - 1)) for i in range(min(samples, len(data)))})
    largest = max(_nbytes(apply_transform(head, dict(data[i]))) for i in picks)
    return largest * len(data), largest


def _local_processes() -> int:
    """Processes of this job on this machine (``torchrun`` sets ``LOCAL_WORLD_SIZE``); each holds its own cache."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose_cache(
    data: Sequence[Mapping], transform: Compose, cache: str = "auto", name: str = "training"
) -> tuple[str, int | None]:
    """Resolve ``cache`` for ``data`` and check that ``"memory"`` fits.

    Rule of ``"auto"``: ``"memory"`` when the estimated cache of all processes of this job on this machine (each
    ``torchrun`` process caches its own copy) needs at most :data:`AUTO_MEMORY_FRACTION` of
    :func:`available_memory`, else ``"disk"``. The choice and the estimate are logged.

    Returns:
        the mode, and the estimate in bytes (``None`` for ``"disk"`` and ``"none"``, which are not estimated).

    Raises:
        DataError: ``cache="memory"`` and the estimate exceeds the available memory.
        ValueError: an unknown ``cache``.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(repr(c) for c in CACHE_MODES)}, got {cache!r}.")
    if cache in ("disk", "none") or len(data) == 0:
        return cache if cache != "auto" else "memory", None
    per_process, largest = estimate_cache_bytes(data, transform)
    needed = per_process * _local_processes()
    limit = available_memory()
    copies = f" x {_local_processes()} processes" if _local_processes() > 1 else ""
    what = f"{len(data)} {name} items x {_gib(largest)}{copies} = {_gib(needed)}"
    if cache == "auto":
        chosen = "memory" if needed <= AUTO_MEMORY_FRACTION * limit.available else "disk"
        logger.info(
            "cache='auto' -> '%s' for the %s set: estimated %s, available %s (%s)",
            chosen,
            name,
            what,
            _gib(limit.available),
            limit.source,
        )
        return chosen, needed
    if needed > limit.available:
        raise DataError(
            f"cache='memory' cannot hold the {name} set: estimated {what}, but only {_gib(limit.available)} "
            f"is available ({limit.source}). Use --cache disk (or auto) to cache it on disk, or --cache none."
        )
    logger.info(
        "cache='memory' for the %s set: estimated %s, available %s (%s)",
        name,
        what,
        _gib(limit.available),
        limit.source,
    )
    return "memory", needed


def make_dataset(
    data: Sequence[dict],
    transform: Compose,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    name: str = "training",
) -> Dataset:
    """Wrap a datalist section in a MONAI dataset that caches its deterministic preprocessing.

    Args:
        data: datalist items.
        transform: transform chain; the transforms before the first random one are cached.
        cache: ``"memory"`` (``CacheDataset``, every item in RAM; refused with a :class:`DataError` when the
            estimate exceeds :func:`available_memory`), ``"disk"`` (``PersistentDataset``: one file per item in
            ``cache_dir``, named by a hash of the item and of the cached transforms, so a changed preprocessing
            writes new files), ``"none"`` (``Dataset``: preprocess every item every epoch) or ``"auto"``
            (see :func:`choose_cache`).
        cache_dir: folder for ``"disk"`` (and for ``"auto"`` when it picks the disk).
        num_workers: threads that fill the memory cache (0 or 1: the calling thread).
        name: the section's name in log lines and messages.
    """
    mode, _ = choose_cache(data, transform, cache, name)
    if mode == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=max(1, num_workers), progress=False)
    if mode == "disk":
        if cache_dir is None:
            raise ValueError(f"cache={cache!r} needs cache_dir, the folder for the cached items.")
        os.makedirs(cache_dir, exist_ok=True)
        logger.info("caching the preprocessed %s set on disk in %s", name, cache_dir)
        return PersistentDataset(data, transform, cache_dir=cache_dir, hash_transform=pickle_hashing)
    return Dataset(data, transform)
