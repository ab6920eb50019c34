"""Shared check: a module scripts, survives save/load, and matches its eager output exactly."""

from __future__ import annotations

import io

import torch


def assert_scripted_equals_eager(module: torch.nn.Module, x: torch.Tensor) -> None:
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        eager = module(x)
        assert eager.shape == x.shape
        assert torch.equal(scripted(x), eager)
        assert torch.equal(loaded(x), eager)
