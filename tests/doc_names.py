"""Dotted package names cited in the docs: finding them and checking that they resolve (used by the docs tests)."""

from __future__ import annotations

import importlib
import re

_ROOTS = ("networks", "data", "training", "evaluation", "stages")
_NAME = re.compile(r"(?<![\w./-])((?:vqvae_medical\.)?(?:{})(?:\.[A-Za-z_]\w*)+)".format("|".join(_ROOTS)))


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` (with or without the ``vqvae_medical.`` prefix) is a module or an attribute path in one."""
    parts = dotted.removeprefix("vqvae_medical.").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("vqvae_medical." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def cited_names(text: str) -> set[str]:
    return {m.group(1).rstrip(".") for m in _NAME.finditer(text) if not m.group(1).endswith((".py", ".json", ".md"))}
