"""Why a state dict does not fit a network, in one sentence that names the setting to pass: the message of every
checkpoint loader of the package (:func:`~vqvae_medical.training.checkpoints.load_weights`, resuming, the diffusion
generator). Codebook shapes name ``num_embeddings``/``embedding_dim``, a transformer's position table
``max_seq_len``, class embeddings and a transformer's start tokens ``num_classes`` (``num_class_embeds`` for the
diffusion UNet), the other kind of prior network its overlay."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["describe_mismatch"]


def _setting_hint(key: str, saved: tuple[int, ...], wanted: tuple[int, ...]) -> str:
    """Which bundle setting a tensor's shape comes from, for the few that users change."""
    if re.search(r"quanti[sz]er.*\.(codebook|embed_sum|weight|cluster_size)$", key) and saved and wanted:
        level = m.group(1) if (m := re.search(r"quanti[sz]er_([a-z]+)", key)) else None
        where = f" of the {level} level" if level else ""
        for i, name in ((0, "num_embeddings"), (1, "embedding_dim")):
            if len(saved) > i and len(wanted) > i and saved[i] != wanted[i]:
                arg = f"{saved[i]}" if not level else f"a list with {saved[i]} for the {level} level"
                return f"{name}{where} is {saved[i]} in the checkpoint and {wanted[i]} here: pass --{name} {arg}"
    if key.endswith("position_embeddings.embedding.weight") and saved and wanted and saved[0] != wanted[0]:
        return f"max_seq_len is {saved[0]} in the checkpoint and {wanted[0]} here: pass --max_seq_len {saved[0]}"
    return (
        "the network settings differ from the run that wrote it (channels, res_channels, num_res_units, "
        "in_channels, num_embeddings, embedding_dim): pass the settings it was trained with"
    )


def _prior_kind_hint(own: Mapping[str, Any], state: Mapping[str, Any]) -> str | None:
    """A prior checkpoint of the other network (transformer or gated PixelCNN; the default changed in
    pixelcnn_prior 0.4.0): which overlay loads it."""

    def transformer(keys, prefix: str) -> bool | None:
        keys = [k for k in keys if k.startswith(prefix)]
        return any(".transformer." in f".{k}" for k in keys) if keys else None

    for prefix, overlay in (("model.", "configs/gated.json"), ("top.", "configs/vqvae2_gated_top.json")):
        mine, theirs = transformer(own, prefix), transformer(state, prefix)
        if mine is None or theirs is None or mine == theirs:
            continue
        if theirs:
            return f"it holds a transformer prior and the network is a gated PixelCNN: leave out {overlay}"
        return f"it holds a gated PixelCNN prior and the network is a transformer: add {overlay} after the first config"
    return None


def _class_hint(module: torch.nn.Module, own: Mapping[str, tuple], saved: Mapping[str, tuple]) -> str | None:
    """A class-conditioned checkpoint loaded into an unconditioned network, or the other way round (or another
    number of classes): the setting to pass, instead of a list of every setting that changes shapes."""
    for key in sorted(set(own) | set(saved)):  # gated PixelCNN layers' class_embed, the diffusion UNet's class_embedding
        if "class_embed" not in key or own.get(key) == saved.get(key):
            continue
        setting = "num_class_embeds" if "class_embedding" in key else "num_classes"
        if key not in saved:
            return f"it was trained without class conditioning: pass --{setting} {'None' if 'embeds' in setting else 0}"
        return f"it was trained with {saved[key][0]} classes: pass --{setting} {saved[key][0]}"
    for name, sub in module.named_modules():  # a transformer prior's vocabulary holds one start token per class
        key = f"{name}.transformer.token_embeddings.weight".lstrip(".")
        if not hasattr(sub, "num_classes") or key not in saved or key not in own or saved[key] == own[key]:
            continue
        start = saved[key][0] - int(sub.num_embeddings)
        if start >= 1 and start != (sub.num_classes or 1):
            fix = "--num_classes 0" if start == 1 else f"--num_classes {start}"
            kind = "without class conditioning" if start == 1 else f"with {start} classes"
            return f"it was trained {kind} (num_embeddings {sub.num_embeddings}): pass {fix}"
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
    classes = _class_hint(module, shape, saved)
    if differing:
        k = differing[0]
        more = f" (and {len(differing) - 1} more tensors)" if len(differing) > 1 else ""
        return (
            f"tensor {k} has shape {list(saved[k])} in the checkpoint but {list(shape[k])} in the network{more}; "
            f"{classes or _setting_hint(k, saved[k], shape[k])}."
        )
    missing = [k for k in shape if k not in state]
    unexpected = [k for k in state if k not in shape]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of the network are not in it (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensors the network lacks (e.g. {unexpected[0]})")
        return "; ".join(parts) + f"; {classes or _prior_kind_hint(shape, state) or _setting_hint('', (), ())}."
    return None
