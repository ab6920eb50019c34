"""Why a state dict does not fit a network, in one sentence that names the setting to pass: the message of every
checkpoint loader of the package (:func:`~vqvae_medical.training.weights.load_weights`, resuming, the diffusion
generator). Built in: codebook shapes name ``num_embeddings``/``embedding_dim``, class embeddings ``num_classes``
(``num_class_embeds`` for the diffusion UNet). A stage adds hints for its own networks with
:func:`register_mismatch_hint` (the prior: a transformer's ``max_seq_len`` and start tokens, the other kind of prior
network's overlay, in :mod:`vqvae_medical.stages.prior.checkpoint_settings`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["MismatchHint", "describe_mismatch", "register_mismatch_hint"]

#: ``hint(module, own, saved, key) -> sentence | None``: ``own``/``saved`` map tensor names to shapes (the network's,
#: the checkpoint's), ``key`` is the first tensor whose shape differs, ``None`` when tensors are missing or unexpected
MismatchHint = Callable[[torch.nn.Module, Mapping[str, tuple], Mapping[str, tuple], "str | None"], "str | None"]

_HINTS: list[MismatchHint] = []


def register_mismatch_hint(hint: MismatchHint) -> MismatchHint:
    """Add ``hint`` to the hints :func:`describe_mismatch` asks (after the built-in class-embedding hint, before the
    codebook hint), once; usable as a decorator. Stages register the hints of their own networks and settings."""
    if hint not in _HINTS:
        _HINTS.append(hint)
    return hint


def _setting_hint(key: str, saved: tuple[int, ...], wanted: tuple[int, ...]) -> str:
    """Which bundle setting a tensor's shape comes from, for the few that users change."""
    if re.search(r"quanti[sz]er.*\.(codebook|embed_sum|weight|cluster_size)$", key) and saved and wanted:
        level = m.group(1) if (m := re.search(r"quanti[sz]er_([a-z]+)", key)) else None
        where = f" of the {level} level" if level else ""
        for i, name in ((0, "num_embeddings"), (1, "embedding_dim")):
            if len(saved) > i and len(wanted) > i and saved[i] != wanted[i]:
                arg = f"{saved[i]}" if not level else f"a list with {saved[i]} for the {level} level"
                return f"{name}{where} is {saved[i]} in the checkpoint and {wanted[i]} here: pass --{name} {arg}"
    return (
        "the network settings differ from the run that wrote it (channels, res_channels, num_res_units, "
        "in_channels, num_embeddings, embedding_dim): pass the settings it was trained with"
    )


def _class_hint(
    module: torch.nn.Module, own: Mapping[str, tuple], saved: Mapping[str, tuple], key: str | None = None
) -> str | None:
    """A class-conditioned checkpoint loaded into an unconditioned network, or the other way round (or another
    number of classes): the setting to pass, instead of a list of every setting that changes shapes."""
    for name in sorted(
        set(own) | set(saved)
    ):  # gated PixelCNN layers' class_embed, the diffusion UNet's class_embedding
        if "class_embed" not in name or own.get(name) == saved.get(name):
            continue
        setting = "num_class_embeds" if "class_embedding" in name else "num_classes"
        if name not in saved:
            return f"it was trained without class conditioning: pass --{setting} {'None' if 'embeds' in setting else 0}"
        return f"it was trained with {saved[name][0]} classes: pass --{setting} {saved[name][0]}"
    return None


def describe_mismatch(module: torch.nn.Module, state: Mapping[str, Any]) -> str | None:
    """One sentence on why ``state`` does not fit ``module.state_dict()``, or ``None`` when it fits.

    Quantizer codebooks are examined first, so that the message names ``num_embeddings``/``embedding_dim`` when
    they are the cause (they also change the shapes of the encoder's last and the decoder's first layer).
    """
    own = module.state_dict()
    shape = {k: tuple(v.shape) for k, v in own.items()}
    saved = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    differing = [k for k in shape if k in saved and saved[k] != shape[k]]
    differing.sort(key=lambda k: 0 if re.search(r"quanti[sz]er", k) else 1)
    key = differing[0] if differing else None
    hint = next((h for f in (_class_hint, *_HINTS) if (h := f(module, shape, saved, key))), None)
    if differing:
        k = differing[0]
        more = f" (and {len(differing) - 1} more tensors)" if len(differing) > 1 else ""
        return (
            f"tensor {k} has shape {list(saved[k])} in the checkpoint but {list(shape[k])} in the network{more}; "
            f"{hint or _setting_hint(k, saved[k], shape[k])}."
        )
    missing = [k for k in shape if k not in state]
    unexpected = [k for k in state if k not in shape]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of the network are not in it (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensors the network lacks (e.g. {unexpected[0]})")
        return "; ".join(parts) + f"; {hint or _setting_hint('', (), ())}."
    return None
