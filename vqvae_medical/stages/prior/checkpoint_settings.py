"""The settings a prior checkpoint was trained with, read from the shapes of its tensors, so that a checkpoint loaded
into a network built with other settings is refused with the settings to pass.

Where it matters most: ``python -m monai.bundle ckpt_export network_def --ckpt_file <model.pt> ...`` builds
``network_def`` from the configs alone, with the bundle's defaults unless the settings are given again on the command
line, and loads the checkpoint with Ignite's strict ``load_objects``; without this check it ends in a list of a
hundred size mismatches. A transformer's ``num_heads`` is not in the shapes (the heads split the same projections):
the message asks for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vqvae_medical.training.mismatch import class_embedding_hint, register_mismatch_hint
from vqvae_medical.utils.io import CheckpointError

__all__ = ["check_prior_checkpoint", "class_hint", "prior_mismatch_hint", "prior_settings", "settings_to_pass"]


def _layers(state: Mapping[str, Any], stem: str) -> int:
    pattern = re.compile(re.escape(stem) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def prior_settings(state: Mapping[str, Any], prefix: str = "model.") -> dict[str, Any] | None:
    """What the shapes of a one-level prior's state dict (keys ``<prefix>...``) show of its settings: for a
    transformer ``channels``, ``num_layers``, ``max_seq_len`` and ``tokens`` (``num_embeddings`` plus
    ``num_classes``, or plus 1 without classes); for a gated PixelCNN ``num_embeddings``, ``channels``,
    ``num_layers``, ``kernel_size`` and ``num_classes`` (0 without). ``None`` when it is neither."""
    tokens = state.get(f"{prefix}transformer.token_embeddings.weight")
    if isinstance(tokens, torch.Tensor):
        positions = state.get(f"{prefix}transformer.position_embeddings.embedding.weight")
        return {
            "kind": "transformer",
            "channels": int(tokens.shape[1]),
            "num_layers": _layers(state, f"{prefix}transformer.blocks."),
            "max_seq_len": None if positions is None else int(positions.shape[0]),
            "tokens": int(tokens.shape[0]),
        }
    embedding = state.get(f"{prefix}embedding.weight")
    if isinstance(embedding, torch.Tensor):
        classes = state.get(f"{prefix}layers.0.class_embed.weight")
        v_conv = state.get(f"{prefix}layers.0.v_conv.weight")
        return {
            "kind": "gated",
            "num_embeddings": int(embedding.shape[0]),
            "channels": int(embedding.shape[1]),
            "num_layers": _layers(state, f"{prefix}layers."),
            "kernel_size": None if v_conv is None else int(v_conv.shape[-1]),
            "num_classes": 0 if classes is None else int(classes.shape[0]),
        }
    return None


def _own_settings(model: nn.Module) -> dict[str, Any] | None:
    """The same settings of a network (its ``model``, a TransformerPrior or GatedPixelCNN)."""
    return prior_settings(model.state_dict(), "model.") if hasattr(model, "model") else None


def settings_to_pass(saved: Mapping[str, Any], own: Mapping[str, Any]) -> str | None:
    """The command-line settings that make a network of settings ``own`` fit a checkpoint of settings ``saved``, as
    one sentence; ``None`` when the shapes show no difference."""
    if saved["kind"] != own["kind"]:
        if saved["kind"] == "gated":
            return "it holds a gated PixelCNN prior and the network is a transformer: add configs/gated.json"
        return "it holds a transformer prior and the network is a gated PixelCNN: leave out configs/gated.json"
    names = [k for k in saved if k not in ("kind", "tokens") and saved[k] is not None and saved[k] != own.get(k)]
    parts = [f"--{k} {saved[k]}" for k in names]
    if not parts and saved.get("tokens") == own.get("tokens"):
        return None
    sentence = f"pass {' '.join(parts)}" if parts else ""
    if saved["kind"] == "transformer":
        if saved["tokens"] != own["tokens"]:
            tokens = (
                f"its vocabulary is {saved['tokens']} tokens and {own['tokens']} here (num_embeddings plus "
                "num_classes, plus 1 without classes): pass the --num_embeddings of its autoencoder and its "
                "--num_classes"
            )
            sentence = f"{sentence}; {tokens}" if sentence else tokens
        sentence += ", and the --num_heads it was trained with (the weights do not show it)"
    return sentence


def check_prior_checkpoint(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """A ``load_state_dict`` pre-hook of :class:`~vqvae_medical.stages.prior.network.PriorNetwork`: a strict load of a
    checkpoint whose shapes show other settings than the network's raises a :class:`CheckpointError` naming the
    settings to pass (:func:`settings_to_pass`), e.g. to ``monai.bundle ckpt_export``.

    Raises:
        CheckpointError: the settings differ.
    """
    if not strict:
        return
    saved = prior_settings(state_dict, f"{prefix}model.")
    own = _own_settings(module)
    if saved is None or own is None:
        return
    fix = settings_to_pass(saved, own)
    if fix is not None:
        raise CheckpointError(
            f"the checkpoint holds a {saved['kind']} prior trained with other settings than this network's "
            f"({', '.join(f'{k} {v}' for k, v in saved.items() if k not in ('kind', 'tokens'))} in the checkpoint): "
            f"{fix}. The same settings go to ckpt_export, verify_net_in_out, inference and evaluate."
        )


def _kind_hint(own: Mapping[str, Any], saved: Mapping[str, Any]) -> str | None:
    """A prior checkpoint of the other network (transformer or gated PixelCNN; the default changed in
    pixelcnn_prior 0.4.0): which overlay loads it."""

    def transformer(keys, prefix: str) -> bool | None:
        keys = [k for k in keys if k.startswith(prefix)]
        return any(".transformer." in f".{k}" for k in keys) if keys else None

    for prefix, overlay in (("model.", "configs/gated.json"), ("top.", "configs/vqvae2_gated_top.json")):
        mine, theirs = transformer(own, prefix), transformer(saved, prefix)
        if mine is None or theirs is None or mine == theirs:
            continue
        if theirs:
            return f"it holds a transformer prior and the network is a gated PixelCNN: leave out {overlay}"
        return f"it holds a gated PixelCNN prior and the network is a transformer: add {overlay} after the first config"
    return None


#: a gated PixelCNN's class embeddings (``class_embed``) of another number of classes: the ``num_classes`` to pass
class_hint = register_mismatch_hint(class_embedding_hint("class_embed.", "num_classes", "0"))


@register_mismatch_hint
def prior_mismatch_hint(
    module: nn.Module, own: Mapping[str, tuple], saved: Mapping[str, tuple], key: str | None
) -> str | None:
    """The prior's hints for :func:`~vqvae_medical.training.mismatch.describe_mismatch`: a transformer trained
    with another number of classes (its vocabulary holds one start token per class), another ``max_seq_len`` (its
    position table), or the other kind of prior network (the overlay that loads it)."""
    for name, sub in module.named_modules():
        token_key = f"{name}.transformer.token_embeddings.weight".lstrip(".")
        if not hasattr(sub, "num_classes") or token_key not in saved or token_key not in own:
            continue
        if saved[token_key] == own[token_key]:
            continue
        start = saved[token_key][0] - int(sub.num_embeddings)
        if start >= 1 and start != (sub.num_classes or 1):
            fix = "--num_classes 0" if start == 1 else f"--num_classes {start}"
            kind = "without class conditioning" if start == 1 else f"with {start} classes"
            return f"it was trained {kind} (num_embeddings {sub.num_embeddings}): pass {fix}"
    if key is None:
        return _kind_hint(own, saved)
    old, new = saved[key], own[key]
    if key.endswith("position_embeddings.embedding.weight") and old and new and old[0] != new[0]:
        return f"max_seq_len is {old[0]} in the checkpoint and {new[0]} here: pass --max_seq_len {old[0]}"
    return None
