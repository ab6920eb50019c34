"""The autoencoder's hints on a checkpoint that does not fit
(:func:`~vqvae_medical.training.mismatch.describe_mismatch`), registered when the stage is imported: a codebook of
another size names ``num_embeddings`` or ``embedding_dim`` (of one level of a VQ-VAE-2), any other shape the settings
that change shapes."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from vqvae_medical.training.mismatch import register_mismatch_hint

__all__ = ["autoencoder_mismatch_hint"]

_QUANTIZER = re.compile(r"quanti[sz]er")
_CODEBOOK = re.compile(r"quanti[sz]er.*\.(codebook|embed_sum|weight|cluster_size)$")


def _codebook_hint(key: str, saved: tuple[int, ...], wanted: tuple[int, ...]) -> str | None:
    if not (_CODEBOOK.search(key) and saved and wanted):
        return None
    level = m.group(1) if (m := re.search(r"quanti[sz]er_([a-z]+)", key)) else None
    where = f" of the {level} level" if level else ""
    for i, name in ((0, "num_embeddings"), (1, "embedding_dim")):
        if len(saved) > i and len(wanted) > i and saved[i] != wanted[i]:
            arg = f"{saved[i]}" if not level else f"a list with {saved[i]} for the {level} level"
            return f"{name}{where} is {saved[i]} in the checkpoint and {wanted[i]} here: pass --{name} {arg}"
    return None


def autoencoder_mismatch_hint(
    module: nn.Module, own: Mapping[str, tuple], saved: Mapping[str, tuple], key: str | None
) -> str | None:
    """For a network with quantizers (a VQ-VAE, or a network that holds one): the codebook setting that differs,
    else the settings that change shapes. Asked after every other stage's hint (``fallback``)."""
    if not any(_QUANTIZER.search(k) for k in own):
        return None
    if key is not None and (hint := _codebook_hint(key, saved[key], own[key])):
        return hint
    return (
        "the network settings differ from the run that wrote it (channels, res_channels, num_res_units, "
        "in_channels, num_embeddings, embedding_dim): pass the settings it was trained with"
    )


register_mismatch_hint(autoencoder_mismatch_hint, fallback=True)
