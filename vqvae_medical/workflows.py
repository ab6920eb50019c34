"""Small functions the bundle configs call, so that every bundle's JSON stays short and free of logic.

Each function does one thing a config needs at parse time: pick the device, build and check the datalist of a data
folder (or of the embedded MNI152 default), and list the files of an inference folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vqvae_medical.data import (
    DataError,
    build_datalist,
    check_datalist,
    list_images,
    mni152_slices,
    mni152_volumes,
)

__all__ = [
    "select_device",
    "amp_enabled",
    "training_datalist",
    "inference_datalist",
    "section",
    "init_distributed",
    "rank_zero_handlers",
    "rank_zero_first",
    "install_error_hook",
]

logger = logging.getLogger(__name__)


#: exceptions whose message already says what is wrong and how to fix it
_USER_ERRORS = ("DataError", "NonFiniteLossError", "UntrustedCheckpointError")


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


def init_distributed() -> int:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on the CPU) once; returns this process's rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank()


#: handlers that write files or logs; under DDP only rank 0 keeps them
_WRITER_HANDLERS = (
    "CheckpointSaver",
    "BestModelSaver",
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "MetricsHistory",
    "ProgressBar",
    "EvaluationReport",
    "ReconstructionWriter",
    "PriorSampleWriter",
    "SampleGrid",
)


def rank_zero_handlers(handlers: Sequence[Any]) -> list[Any]:
    """The handler list for this rank: all handlers on rank 0; on other ranks, all but those that write files or
    logs (checkpoints, TensorBoard, history, progress bars, sample grids), so that every rank keeps resuming,
    validating (with metrics reduced across ranks), averaging weights and stopping on the same time budget."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if type(h).__name__ not in _WRITER_HANDLERS]


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Under ``torch.distributed`` (more than one process): rank 0 runs the block first while the other ranks wait
    at a barrier, then the other ranks run it. Wrap a cached computation in it (code maps, latents): rank 0
    computes and writes the cache once, every other rank then reads the same file, so all ranks hold identical
    data and the work is not repeated. Without a process group it is a no-op.

    The block must not itself use collectives (it runs on the ranks at different times). Rank 0 reaches its
    barrier even when the block raises, so the other ranks do not hang; they then run the block themselves.
    """
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if active and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if active and dist.get_rank() == 0:
            dist.barrier()


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """AMP is used on CUDA only (on the CPU it would slow convolutions down); quantizers stay fp32 either way."""
    return bool(amp) and torch.device(device).type == "cuda"


def training_datalist(
    dataset_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    spatial_dims: int = 2,
    channels: int = 1,
    layout: str = "auto",
    expected_size: Sequence[int] | None = None,
    skip_bad: bool = False,
    check: bool = True,
    require_same_size: bool = False,
    **kwargs: Any,
) -> dict[str, list[dict]]:
    """Datalist with ``training``, ``validation`` and ``test`` sections, checked file by file.

    With ``dataset_dir=None`` the embedded default is used: axial slices of the MNI152 template shipped in the
    nilearn wheel (2D) or augmented copies of it (3D), written once under ``cache_dir``. Sections missing from the
    data set are filled by the builders (a validation split carved from training; test falls back to validation).

    Args:
        dataset_dir: data folder, ``dataset.json`` file, or ``None`` for the embedded default.
        cache_dir: where the embedded default data is written.
        spatial_dims: 2 or 3.
        channels: channels the network expects.
        layout: datalist layout (see :func:`vqvae_medical.data.build_datalist`).
        expected_size: required image size, if the config needs one.
        skip_bad: skip unusable files with a warning instead of stopping with one error listing them.
        check: open every file once to report bad input before training starts.
        require_same_size: within each section, images of a size other than the most common one are unusable (set
            it when the config batches images at their own size, i.e. ``spatial_size`` is null: a batch of mixed
            sizes would otherwise fail in the data loader, without naming any file).
        kwargs: passed to the datalist builder (e.g. ``val_fraction``, ``test_fraction``, ``seed``).
    """
    if dataset_dir in (None, "", "None"):
        with rank_zero_first():  # under torchrun, rank 0 writes the files and the other ranks find them
            if spatial_dims == 2:
                # three planes (192 slices, 144/24/24): more varied shapes than one plane's 64
                datalist = mni152_slices(Path(cache_dir) / "mni152_slices", planes=("axial", "coronal", "sagittal"))
            else:
                datalist = mni152_volumes(Path(cache_dir) / "mni152_volumes")
        logger.info("no dataset_dir given: using the embedded MNI152 template data under %s", cache_dir)
    else:
        datalist = build_datalist(dataset_dir, layout=layout, **kwargs)
    datalist = {k: list(v) for k, v in datalist.items() if k in ("training", "validation", "test")}
    if not datalist.get("training"):
        raise DataError(f"{dataset_dir}: no training images found. Point dataset_dir at a folder of images.")
    if not datalist.get("validation"):
        raise DataError(
            f"{dataset_dir}: no validation images. Add a validation split or set val_fraction > 0 for a flat folder."
        )
    datalist.setdefault("test", datalist["validation"])
    if not datalist["test"]:
        datalist["test"] = datalist["validation"]
    if check:
        for name, items in datalist.items():
            report = check_datalist(
                items,
                spatial_dims=spatial_dims,
                channels=channels,
                expected_size=expected_size,
                skip_bad=skip_bad,
                require_same_size=require_same_size,
                source=f"{dataset_dir or cache_dir} ({name})",
            )
            datalist[name] = list(report.items)
    return datalist


def section(datalist: Mapping[str, list[dict]], name: str, limit: int | None = None) -> list[dict]:
    """One section of a datalist, optionally its first ``limit`` items (quick runs and tests)."""
    if name not in datalist:
        raise DataError(f"the datalist has no {name!r} section (it has {sorted(datalist)}).")
    items = list(datalist[name])
    return items[:limit] if limit else items


def inference_datalist(
    input_path: str | os.PathLike | Sequence[str], spatial_dims: int = 2, channels: int = 1, skip_bad: bool = False
) -> list[dict]:
    """Items ``{"image": path}`` for inference: every image under a folder, a ``dataset.json`` (its ``test``
    section, else all sections), or an explicit list of paths; checked like the training data."""
    if isinstance(input_path, (list, tuple)):
        items = [{"image": os.path.abspath(p)} for p in input_path]
    elif str(input_path).endswith(".json"):
        datalist = build_datalist(input_path, layout="decathlon")
        items = datalist.get("test") or [i for v in datalist.values() for i in v]
    elif Path(input_path).is_dir():
        items = [{"image": p} for p in list_images(input_path)]
    elif Path(input_path).is_file():
        items = [{"image": os.path.abspath(input_path)}]
    else:
        raise DataError(f"{input_path}: no such file or folder to run inference on.")
    if not items:
        raise DataError(f"{input_path}: no images found (PNG, JPEG, NIfTI, ...).")
    return list(check_datalist(items, spatial_dims=spatial_dims, channels=channels, skip_bad=skip_bad, source=input_path).items)
