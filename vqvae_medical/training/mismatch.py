"""Why a state dict does not fit a network, in one sentence that names the setting to pass: the message of every
checkpoint loader of the package (:func:`~vqvae_medical.training.weights.load_weights`, resuming, the diffusion
generator). The shared layer knows no network's settings: each stage registers hints for its own networks with
:func:`register_mismatch_hint` when it is imported (the autoencoder's codebook and other shape settings in
:mod:`vqvae_medical.stages.autoencoder.checkpoint_settings`; the prior's classes, ``max_seq_len`` and prior kind in
:mod:`vqvae_medical.stages.prior.checkpoint_settings`; diffusion's ``num_class_embeds`` in
:mod:`vqvae_medical.stages.diffusion.network`). Without a hint that answers, the sentence asks for the settings the
checkpoint was trained with."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["MismatchHint", "class_embedding_hint", "describe_mismatch", "register_mismatch_hint"]

#: ``hint(module, own, saved, key) -> sentence | None``: ``own``/``saved`` map tensor names to shapes (the network's,
#: the checkpoint's), ``key`` is the first tensor whose shape differs, ``None`` when tensors are missing or unexpected
MismatchHint = Callable[[torch.nn.Module, Mapping[str, tuple], Mapping[str, tuple], "str | None"], "str | None"]

_HINTS: list[MismatchHint] = []
_FALLBACK_HINTS: list[MismatchHint] = []

_GENERIC = "the network settings differ from the run that wrote it: pass the settings it was trained with"


def register_mismatch_hint(hint: MismatchHint, fallback: bool = False) -> MismatchHint:
    """Add ``hint`` to the hints :func:`describe_mismatch` asks in the order they were registered, once; usable as
    a decorator. Stages register the hints of their own networks and settings.

    Args:
        hint: the hint (:data:`MismatchHint`).
        fallback: ask it only after every other hint (e.g. a network's list of the settings that change shapes).
    """
    hints = _FALLBACK_HINTS if fallback else _HINTS
    if hint not in _HINTS and hint not in _FALLBACK_HINTS:
        hints.append(hint)
    return hint


def class_embedding_hint(tensor: str, setting: str, unconditioned: str) -> MismatchHint:
    """A hint for class embeddings (one row per class, in tensors whose name holds ``tensor``) in the checkpoint and
    not in the network, the other way round, or for another number of classes: ``--<setting>`` with the value to
    pass (``unconditioned`` for a checkpoint trained without classes). For a stage to register."""

    def hint(
        module: torch.nn.Module, own: Mapping[str, tuple], saved: Mapping[str, tuple], key: str | None
    ) -> str | None:
        for name in sorted(set(own) | set(saved)):
            if tensor not in name or own.get(name) == saved.get(name):
                continue
            if name not in saved:
                return f"it was trained without class conditioning: pass --{setting} {unconditioned}"
            return f"it was trained with {saved[name][0]} classes: pass --{setting} {saved[name][0]}"
        return None

    return hint


def describe_mismatch(module: torch.nn.Module, state: Mapping[str, Any]) -> str | None:
    """One sentence on why ``state`` does not fit ``module.state_dict()``, or ``None`` when it fits: the first tensor
    whose shape differs (quantizer codebooks first: they also change the shapes of the encoder's last and the
    decoder's first layer, so a hint can name the codebook settings), or the missing and unexpected tensors, and the
    first registered hint's answer (:func:`register_mismatch_hint`)."""
    own = module.state_dict()
    shape = {k: tuple(v.shape) for k, v in own.items()}
    saved = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    differing = [k for k in shape if k in saved and saved[k] != shape[k]]
    differing.sort(key=lambda k: 0 if re.search(r"quanti[sz]er", k) else 1)
    key = differing[0] if differing else None
    hint = next((h for f in (*_HINTS, *_FALLBACK_HINTS) if (h := f(module, shape, saved, key))), None)
    if differing:
        k = differing[0]
        more = f" (and {len(differing) - 1} more tensors)" if len(differing) > 1 else ""
        return (
            f"tensor {k} has shape {list(saved[k])} in the checkpoint but {list(shape[k])} in the network{more}; "
            f"{hint or _GENERIC}."
        )
    missing = [k for k in shape if k not in state]
    unexpected = [k for k in state if k not in shape]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of the network are not in it (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensors the network lacks (e.g. {unexpected[0]})")
        return "; ".join(parts) + f"; {hint or _GENERIC}."
    return None
