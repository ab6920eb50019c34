"""The stage-1 record: ``models/autoencoder.json``, what a later stage needs to rebuild and feed the autoencoder.

Written by every autoencoder bundle next to ``models/model.pt``, each time ``model.pt`` is written, as plain JSON
(atomically): the resolved ``network_def`` (see :mod:`vqvae_medical.networks.config`), the preprocessing settings
(the same dict the bundle's transforms are built from, so the two cannot disagree), the data settings (data set
folder or the embedded MNI152 data, layout, split fractions and seed), the size of the images it was validated on,
and :func:`state_fingerprint` of the weights in ``model.pt``, so that a checkpoint swapped under the record is
detected. Since record version 2 it also holds ``identity_sha256`` (:func:`record_identity`: a hash over the weights'
fingerprint, ``network_def``, preprocessing, image size and data settings) and a hash of each of these sections, so
that a record edited by hand is detected and named (:func:`edited_sections`); stage 2 records the identity of the
autoencoder it was trained on. :mod:`vqvae_medical.stages.frozen` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose
from torch import nn

from vqvae_medical.data import image_transforms_2d, volume_transforms_3d
from vqvae_medical.data.lists import training_datalist
from vqvae_medical.data.volumes import volume_training_datalist
from vqvae_medical.networks.config import TRAINING_ONLY, build_network, network_config
from vqvae_medical.training.command_line import command_line_value
from vqvae_medical.training.weights import LoadWeights
from vqvae_medical.utils.io import CheckpointError, atomic_write_json, safe_load

__all__ = [
    "RECORD_FILE",
    "RECORD_VERSION",
    "EMBEDDED_DATA",
    "TRANSFORMS",
    "state_fingerprint",
    "weights_of",
    "preprocessing_transforms",
    "data_settings",
    "record_datalist",
    "write_record",
    "AutoencoderRecordWriter",
    "RecordMismatchError",
    "check_against_record",
    "LoadRecordedWeights",
    "IDENTITY_SECTIONS",
    "record_identity",
    "edited_sections",
    "autoencoder_run_provenance",
]

logger = logging.getLogger(__name__)

RECORD_FILE = "autoencoder.json"
"""File name of the record, in the ``models`` folder next to ``model.pt``."""

RECORD_VERSION = 2

IDENTITY_SECTIONS: tuple[str, ...] = (
    "weights_sha256",
    "network_def",
    "spatial_dims",
    "preprocessing",
    "image_size",
    "data",
)
"""The parts of a record that make the autoencoder's identity (:func:`record_identity`)."""

EMBEDDED_DATA = "embedded MNI152"
"""``data.source`` of a model trained without ``dataset_dir`` (the MNI152 template shipped with nilearn)."""

TRANSFORMS = {"image_transforms_2d": image_transforms_2d, "volume_transforms_3d": volume_transforms_3d}
"""Transform factories a record may name (``preprocessing.transforms``); a record cannot import anything else."""


def state_fingerprint(state: nn.Module | Mapping[str, Any]) -> str:
    """SHA-256 of a state dict (sorted names, dtypes, shapes and bytes): equal iff the tensors are bit-identical."""
    state = state.state_dict() if isinstance(state, nn.Module) else state
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            digest.update(f"{key}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def weights_of(state: Any) -> Mapping[str, torch.Tensor]:
    """The network state dict of a ``model.pt`` (a state dict) or of a training checkpoint (``{"model": ...}``)."""
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError("a checkpoint must hold a state dict or a {'model': state dict} training checkpoint.")
    return state


def preprocessing_transforms(settings: Mapping[str, Any], **overrides: Any) -> Compose:
    """The transform chain of a preprocessing dict ``{"transforms": name, **arguments}``.

    The bundle builds its training and validation transforms from this dict and writes the same dict into the
    record. ``overrides`` add the settings that are not part of the autoencoder's input (``augment``,
    ``patch_size`` for training).
    """
    settings = dict(settings)
    name = settings.pop("transforms", None)
    if name not in TRANSFORMS:
        raise ValueError(f"preprocessing 'transforms' must be one of {sorted(TRANSFORMS)}, got {name!r}.")
    return TRANSFORMS[name](**settings, **overrides)


def data_settings(
    dataset_dir: str | os.PathLike | None,
    layout: str = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_files: bool = False,
) -> dict[str, Any]:
    """The data settings of a run as the record stores them (``dataset_dir`` absolute, or ``None``: embedded)."""
    embedded = dataset_dir in (None, "", "None")
    folder = None if embedded else os.path.abspath(os.fspath(dataset_dir))
    return {
        "source": EMBEDDED_DATA if embedded else folder,
        "dataset_dir": folder,
        "layout": layout,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "skip_bad_files": bool(skip_bad_files),
    }


def record_datalist(
    spatial_dims: int,
    channels: int,
    data: Mapping[str, Any],
    cache_dir: str | os.PathLike,
    require_same_size: bool = False,
    min_size: int | None = None,
) -> dict[str, list[dict]]:
    """The training/validation/test datalist of the data settings ``data`` (see :func:`data_settings`), built as the
    autoencoder bundle built it (2D: ``training_datalist``, where ``min_size`` refuses a folder whose images are all
    smaller than that; 3D: ``volume_training_datalist``)."""
    kwargs = {
        "layout": data.get("layout", "auto"),
        "val_fraction": data.get("val_fraction", 0.1),
        "test_fraction": data.get("test_fraction", 0.1),
        "seed": data.get("seed", 0),
        "skip_bad": bool(data.get("skip_bad_files", False)),
        "require_same_size": require_same_size,
    }
    if int(spatial_dims) == 3:
        return volume_training_datalist(data.get("dataset_dir"), cache_dir, channels=channels, **kwargs)
    return training_datalist(
        data.get("dataset_dir"), cache_dir, spatial_dims=2, channels=channels, min_size=min_size, **kwargs
    )


def _sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def record_identity(record: Mapping[str, Any]) -> str:
    """The identity of a stage-1 autoencoder: SHA-256 over its record's :data:`IDENTITY_SECTIONS` (weights,
    architecture, preprocessing, image size, data and split). Stage 2 records it; any change (stage 1 trained on,
    another folder, an edited record) changes it."""
    return _sha256({k: record.get(k) for k in IDENTITY_SECTIONS})


def edited_sections(record: Mapping[str, Any]) -> list[str] | None:
    """The sections of a record that no longer hash to what was written with it (edited by hand), ``[]`` when none,
    ``None`` for a record without hashes (version 1: nothing can be checked)."""
    stored = record.get("identity_sha256")
    if not isinstance(stored, str):
        return None
    sections = record.get("sections_sha256") if isinstance(record.get("sections_sha256"), Mapping) else {}
    edited = [k for k in IDENTITY_SECTIONS if k in sections and sections[k] != _sha256(record.get(k))]
    if not edited and record_identity(record) != stored:
        edited = ["identity_sha256"]
    return edited


def autoencoder_run_provenance(
    network: nn.Module, preprocessing: Mapping[str, Any], data: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """What an autoencoder bundle's run is built from, for
    :class:`~vqvae_medical.training.provenance.ResumeOrStartFresh`: the data and split (:func:`data_settings`), the
    preprocessing, and the network settings that change what it computes (training-only settings such as the EMA
    ``decay`` may change on resume)."""
    return {"identity": {"data": dict(data), "preprocessing": dict(preprocessing), "network": _settings(network)}}


def write_record(
    model_path: str | os.PathLike,
    network: nn.Module,
    preprocessing: Mapping[str, Any],
    data: Mapping[str, Any],
    image_size: list[int] | None = None,
) -> Path:
    """Write ``<folder of model_path>/autoencoder.json`` for the weights now in ``model_path``.

    Args:
        model_path: the ``models/model.pt`` just written (its weights are fingerprinted).
        network: the bundle's ``network_def`` (its recorded architecture is written).
        preprocessing: the preprocessing dict the bundle's transforms are built from.
        data: data settings (:func:`data_settings`).
        image_size: spatial size of the (validation) images the autoencoder was run on.
    """
    model_path = Path(model_path)
    preprocessing = dict(preprocessing)
    preprocessing_transforms(preprocessing)  # refuse settings a later stage could not rebuild
    architecture = network_config(network)
    model = architecture.get("model", architecture)
    record = {
        "version": RECORD_VERSION,
        "model_file": model_path.name,
        "weights_sha256": state_fingerprint(weights_of(safe_load(model_path))),
        "network_def": architecture,
        "spatial_dims": int(model["spatial_dims"]),
        "preprocessing": preprocessing,
        "image_size": None if image_size is None else [int(s) for s in image_size],
        "data": dict(data),
    }
    record = json.loads(json.dumps(record))  # plain JSON only (tuples as lists, as the record is read back)
    record["identity_sha256"] = record_identity(record)
    record["sections_sha256"] = {k: _sha256(record[k]) for k in IDENTITY_SECTIONS}
    return atomic_write_json(record, model_path.parent / RECORD_FILE)


class AutoencoderRecordWriter:
    """Writes the record whenever ``model_path`` has been (re)written; attach to the validation evaluator after
    the handler that saves ``model.pt`` (``BestModelSaver``).

    Args:
        model_path: ``models/model.pt``.
        network: the bundle's ``network_def``.
        preprocessing: the preprocessing dict of the bundle (:func:`preprocessing_transforms`).
        data: data settings (:func:`data_settings`).
        image_key: key of the images in the evaluator's batches (their size is recorded).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        network: nn.Module,
        preprocessing: Mapping[str, Any],
        data: Mapping[str, Any],
        image_key: str = "image",
    ) -> None:
        self.model_path = Path(model_path)
        self.network = network
        self.preprocessing = dict(preprocessing)
        self.data = dict(data)
        self.image_key = image_key
        self._written: tuple[int, int] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.model_path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def __call__(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # rank 0 writes model.pt and its record
        stamp = self._stamp()
        record = self.model_path.parent / RECORD_FILE
        if stamp is None or (stamp == self._written and record.is_file()):
            return
        batch = engine.state.batch
        images = batch.get(self.image_key) if isinstance(batch, Mapping) else None
        size = list(images.shape[2:]) if images is not None else None
        path = write_record(self.model_path, self.network, self.preprocessing, self.data, size)
        self._written = stamp
        logger.info(f"wrote {path}")


class RecordMismatchError(CheckpointError):
    """The network a config builds computes something else than the one ``models/autoencoder.json`` recorded."""


def _settings(network: nn.Module) -> dict[str, Any]:
    """The constructor settings of a recorded network that change what it computes."""
    config = network_config(network)
    inner = config.get("model", config)
    return {k: v for k, v in inner.items() if k not in TRAINING_ONLY}


def _shapes(network: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def check_against_record(network: nn.Module, model_path: str | os.PathLike) -> None:
    """Refuse to run ``network`` with the weights of ``model_path`` when the stage-1 record next to them
    (``models/autoencoder.json``) says they were trained in a network with other settings.

    Only settings that change no weight's shape are checked here (``normalize_latents``, activations,
    ``upsample_mode`` between two modes of the same shapes): they would otherwise load without error and silently
    compute something else; a shape mismatch is left to the loader, whose message names the tensor and the bundle
    setting. Nothing is checked when there is no record (a checkpoint copied on its own) or it cannot be read.

    Raises:
        RecordMismatchError: one line naming the record, each differing setting and the override to pass.
    """
    record_path = Path(model_path).parent / RECORD_FILE
    if not record_path.is_file():
        return
    try:
        recorded = json.loads(record_path.read_text())["network_def"]
        # rebuilt with today's code: a record written before a setting existed gets that setting's default, which
        # is what its network computed
        trained_network = build_network(recorded)
    except Exception as e:
        logger.warning(f"{record_path}: not checked against the config ({e})")
        return
    if _shapes(trained_network) != _shapes(network):
        return  # the weights do not fit: loading says which tensor and which setting, in the bundle's own terms
    trained, current = _settings(trained_network), _settings(network)
    differ = sorted(k for k in set(trained) | set(current) if trained.get(k) != current.get(k))
    if not differ:
        return
    prefix = "network_def#model#" if "model" in recorded else "network_def#"
    what = ", ".join(f"{k}={json.dumps(trained.get(k))} (config: {json.dumps(current.get(k))})" for k in differ)
    fix = " ".join(f"--{prefix}{k} {command_line_value(trained.get(k))}" for k in differ)
    raise RecordMismatchError(
        f"{model_path} was trained with {what} according to {record_path}; run it with the settings it was trained "
        f"with: {fix}"
    )


class LoadRecordedWeights(LoadWeights):
    """:class:`~vqvae_medical.training.weights.LoadWeights` for an autoencoder: before loading, checks the
    network against the record next to the checkpoint (:func:`check_against_record`), so an ``inference.json``
    or ``evaluate.json`` whose ``network_def`` differs from the trained one in a shape-free setting stops with one
    line instead of producing wrong images."""

    def __call__(self, engine: Engine | None = None) -> None:
        if self.load_path not in (None, "", "None"):
            check_against_record(self.network, self.load_path)
        super().__call__(engine)
