"""Which run owns an output folder, and what its outputs were built from: ``<ckpt_dir>/provenance.json``.

Every training bundle gives its :class:`ResumeOrStartFresh` handler the identity of what the run is built from
(stage 1: data folder, layout, split fractions and seed, preprocessing, network settings, see
:func:`vqvae_medical.stages.autoencoder.record.autoencoder_run_provenance`; stage 2: the identity of the frozen
autoencoder and the data, see :func:`vqvae_medical.stages.provenance.stage2_run_provenance`). Then:

- a run that resumes must have the identity recorded in ``provenance.json``; otherwise it stops with one line
  naming both sides (a :class:`~vqvae_medical.utils.io.CheckpointError`) before loading anything;
- a run that starts from scratch (``--resume False``, or no checkpoint to resume) owns the folder: it first moves
  the files an earlier run left in ``models/``, ``logs/`` and ``eval/`` into ``<output_dir>/previous/<time>/``
  (one log line says so), so that no earlier best score, checkpoint or history is taken for its own, then writes
  its ``provenance.json``.

Files written by this process before the run starts (e.g. TensorBoard's event file) are left in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

from vqvae_medical.training.checkpoints import ResumeFromCheckpoint, checkpoints_newest_first
from vqvae_medical.training.mismatch import describe_mismatch
from vqvae_medical.utils.io import PROCESS_START, CheckpointError, atomic_write_json

__all__ = [
    "PREVIOUS_DIR",
    "PROVENANCE_FILE",
    "ResumeOrStartFresh",
    "describe_differences",
    "identity_differences",
    "identity_sha256",
    "move_aside",
    "read_json_object",
    "read_provenance",
    "stored_or_computed",
    "write_provenance",
]

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
"""File of a run's identity, in the checkpoint folder (``models/``) next to ``model.pt``."""

PREVIOUS_DIR = "previous"
"""Folder of ``output_dir`` that a fresh run moves an earlier run's files into (one sub-folder per run)."""

_VERSION = 1


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists), so that recorded and current identities compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def identity_sha256(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys): equal iff the JSON values are equal."""
    text = json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when there is none (no file; one that cannot be read: a warning says
    so; another JSON value)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning(f"{path}: cannot be read ({e}); treated as missing")
        return None
    return record if isinstance(record, dict) else None


def read_provenance(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``<folder>/provenance.json``, or ``None`` when there is none (or it cannot be read: a warning says so)."""
    record = read_json_object(Path(folder) / PROVENANCE_FILE)
    return record if record is not None and isinstance(record.get("identity"), dict) else None


def stored_or_computed(
    path: str | os.PathLike,
    key: Mapping[str, Any],
    compute: Callable[[], Mapping[str, Any]],
    what: str,
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A result stored as JSON with the identity of what it was computed from: the record in ``path`` when it holds
    every entry of ``key`` with the same value, else ``{**key, **compute()}``, written to ``path`` (a folder that
    cannot be written only logs a warning: the result is recomputed next time).

    Args:
        path: the JSON file.
        key: what the result depends on (plain JSON values).
        compute: the result when the stored one does not fit.
        what: the result's name in the log lines.
        check: called with the stored record (``{}`` when there is none) before it is used; may raise.
    """
    path = Path(path)
    stored = read_json_object(path) or {}
    if check is not None:
        check(stored)
    if stored and all(stored.get(k) == v for k, v in key.items()):
        logger.info(f"read the {what} {path}")
        return stored
    result = {**key, **compute()}
    try:
        atomic_write_json(result, path)
        logger.info(f"wrote the {what} {path}")
    except OSError as e:
        logger.warning(f"could not write the {what} to {path} ({e}); it is recomputed next time")
    return result


def write_provenance(
    folder: str | os.PathLike, identity: Mapping[str, Any], about: Mapping[str, Any] | None = None
) -> Path:
    """Write ``<folder>/provenance.json``: ``identity`` (checked when a run resumes or a model is used) and
    ``about`` (informational: folders, fingerprints of parts already covered by the identity)."""
    record = {
        "version": _VERSION,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "identity": _plain(dict(identity)),
        "about": _plain(dict(about or {})),
    }
    return atomic_write_json(record, Path(folder) / PROVENANCE_FILE)


def identity_differences(recorded: Any, current: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(key path, recorded value, current value)`` (``"data/seed"``) for every leaf where two identities differ."""
    recorded, current = _plain(recorded), _plain(current)
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(recorded) | set(current)):
            out += identity_differences(recorded.get(k), current.get(k), f"{key}/{k}" if key else k)
        return out
    return [] if recorded == current else [(key, recorded, current)]


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a SHA-256: its start names it well enough in a message
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_differences(
    differences: Iterable[tuple[str, Any, Any]],
    recorded_about: Mapping[str, Any] | None = None,
    current_about: Mapping[str, Any] | None = None,
) -> str:
    """``"data/seed: 0 then, 1 now; ..."``; a key with a folder in ``about`` (``about[key]["dir"]``) names it."""

    def where(about: Mapping[str, Any] | None, key: str) -> str:
        entry = (about or {}).get(key.split("/")[0])
        return f" ({entry['dir']})" if isinstance(entry, Mapping) and entry.get("dir") else ""

    return "; ".join(
        f"{k}: {_show(old)}{where(recorded_about, k)} then, {_show(new)}{where(current_about, k)} now"
        for k, old, new in differences
    )


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _destination(output_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(PROCESS_START))
    root = output_dir / PREVIOUS_DIR
    dest, n = root / stamp, 1
    while dest.exists():
        dest, n = root / f"{stamp}-{n}", n + 1
    return dest


def move_aside(
    folders: Iterable[str | os.PathLike | None], output_dir: str | os.PathLike, before: float = PROCESS_START
) -> tuple[Path | None, int]:
    """Move the files of ``folders`` (recursively) last modified before ``before`` into
    ``<output_dir>/previous/<time>/``, keeping their paths relative to ``output_dir`` (a folder outside it keeps
    its name); emptied sub-folders are removed, the folders themselves kept. Returns the destination and the number
    of files moved (``(None, 0)`` when there were none)."""
    output_dir = Path(output_dir).absolute()
    dest: Path | None = None
    moved = 0
    for folder in folders:
        if folder in (None, "", "None") or not Path(folder).is_dir():
            continue
        folder = Path(folder).absolute()
        try:
            relative = folder.relative_to(output_dir)
        except ValueError:
            relative = Path(folder.name)
        if relative.parts[:1] == (PREVIOUS_DIR,):
            continue
        for root, _dirs, files in os.walk(folder, topdown=False):
            for name in files:
                path = Path(root) / name
                try:
                    if path.stat().st_mtime >= before:
                        continue  # written by this run (e.g. TensorBoard's event file, opened before the run starts)
                except FileNotFoundError:
                    continue
                dest = dest or _destination(output_dir)
                target = dest / relative / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                moved += 1
            if Path(root) != folder and not any(Path(root).iterdir()):
                Path(root).rmdir()
    return (dest, moved) if moved else (None, 0)


class ResumeOrStartFresh(ResumeFromCheckpoint):
    """:class:`~vqvae_medical.training.checkpoints.ResumeFromCheckpoint` for a folder owned by one run.

    Resuming (``enabled`` and a checkpoint in ``save_dir``): the identity in ``provenance.json`` must equal
    ``provenance["identity"]``, else a ``CheckpointError`` names each differing entry with both values (and the
    folders, for the autoencoder of stage 2) and the fix; a folder without ``provenance.json`` (written by an
    earlier version) resumes with a warning. Starting from scratch (``enabled=False``, or no checkpoint): the files
    of ``save_dir`` and ``folders`` from before this process are moved into ``<output_dir>/previous/<time>/``
    (:func:`move_aside`), then ``provenance.json`` is written. Only rank 0 moves and writes.

    Args:
        save_dir: the checkpoint folder (``models/``), where ``provenance.json`` is kept.
        load_dict: see ``ResumeFromCheckpoint``.
        provenance: ``{"identity": {...}, "about": {...}}`` of this run, or ``None`` (nothing recorded or checked).
        folders: other folders the run writes (``logs/``, ``eval/``), moved aside with ``save_dir``.
        output_dir: the run's output folder (``previous/`` goes there); default: the parent of ``save_dir``.
        prefix: see ``ResumeFromCheckpoint``.
        enabled: ``False`` (``--resume False``): start from scratch.
        engine_key: see ``ResumeFromCheckpoint``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        provenance: Mapping[str, Any] | None = None,
        folders: Iterable[str | os.PathLike | None] = (),
        output_dir: str | os.PathLike | None = None,
        prefix: str = "checkpoint",
        enabled: bool = True,
        engine_key: str | None = "trainer",
    ) -> None:
        super().__init__(save_dir, load_dict, prefix=prefix, enabled=enabled, engine_key=engine_key)
        self.identity = None if provenance is None else dict(provenance["identity"])
        self.about = {} if provenance is None else dict(provenance.get("about") or {})
        self.folders = [f for f in folders if f not in (None, "", "None")]
        self.output_dir = Path(output_dir) if output_dir not in (None, "", "None") else self.save_dir.parent
        self.moved_to: Path | None = None
        self._recorded_about: Mapping[str, Any] | None = None

    def _differences(self) -> list[tuple[str, Any, Any]]:
        if self.identity is None:
            return []
        recorded = read_provenance(self.save_dir)
        if recorded is None:
            logger.warning(
                f"{self.save_dir} has no {PROVENANCE_FILE} (written by an earlier version): resuming without "
                "checking that its checkpoints were made from the same data, settings and autoencoder."
            )
            return []
        self._recorded_about = recorded.get("about")
        return identity_differences(recorded["identity"], self.identity)

    def _refuse(self, differences: list[tuple[str, Any, Any]]) -> None:
        raise CheckpointError(
            f"{self.save_dir} holds checkpoints of another run ({self.save_dir / PROVENANCE_FILE}): "
            f"{describe_differences(differences, self._recorded_about, self.about)}. Resume it with what it was made "
            "from, or pass --resume False to move that run aside and start over (or a new --output_dir)."
        )

    def _newest_intact(self, map_location: Any) -> tuple[Path, Any] | None:
        """Refuses the checkpoints of another run before reading them; when only network settings differ, reads
        the newest and leaves a setting that changes a tensor's shape to the loader (its message names the tensor
        and the value to pass) and refuses the others (e.g. ``normalize_latents``, which no shape shows)."""
        differences = self._differences() if checkpoints_newest_first(self.save_dir, self.prefix) else []
        if any(not key.startswith("network/") for key, _, _ in differences):
            self._refuse(differences)
        found = super()._newest_intact(map_location)
        if differences and found is not None:
            state = found[1]
            modules = [(o, state.get(n)) for n, o in self.load_dict.items() if isinstance(o, torch.nn.Module)]
            if not any(isinstance(s, Mapping) and describe_mismatch(o, s) for o, s in modules):
                self._refuse(differences)
        return found

    def start_fresh(self, engine: Engine) -> None:
        if _rank() != 0:
            return
        self.moved_to, moved = move_aside([self.save_dir, *self.folders], self.output_dir)
        if moved:
            why = "--resume False" if not self.enabled else "no checkpoint to resume"
            logger.warning(f"starting a new run ({why}): moved {moved} files of the earlier run to {self.moved_to}")
        if self.identity is not None:
            write_provenance(self.save_dir, self.identity, self.about)
