"""The shared layer (``vqvae_medical.utils`` and what the stages register with it): the rooms import one way, the
network inside a wrapper has one accessor, a stage's user errors and checkpoint hints reach the shared code without
the shared code naming them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from vqvae_medical.networks import VQVAE, GatedPixelCNN, ReconstructionNetwork, TransformerPrior
from vqvae_medical.stages.frozen import FrozenAutoencoder
from vqvae_medical.stages.prior.network import PriorNetwork
from vqvae_medical.training import mismatch
from vqvae_medical.training.mismatch import describe_mismatch, register_mismatch_hint
from vqvae_medical.training.runtime import _user_error
from vqvae_medical.utils.errors import UserError
from vqvae_medical.utils.modules import unwrap

PACKAGE = Path(__file__).resolve().parents[2] / "vqvae_medical"
#: the rooms each room may import (besides itself)
ALLOWED = {
    "utils": set(),
    "networks": {"utils"},
    "data": {"utils"},
    "training": {"utils"},
    "evaluation": {"utils", "networks"},
}


def _imported_rooms(path: Path) -> set[str]:
    """The package rooms (``vqvae_medical.<room>``) that a module imports, at any level of the module."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        rooms.update(n.split(".")[1] for n in names if n.startswith("vqvae_medical.") and n.count(".") >= 1)
    return rooms


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_one_way(room):
    """utils below everything; networks, data and training side by side; evaluation on networks; stages on top."""
    stacked = {
        str(path.relative_to(PACKAGE)): sorted(_imported_rooms(path) - ALLOWED[room] - {room})
        for path in sorted((PACKAGE / room).rglob("*.py"))
    }
    assert {k: v for k, v in stacked.items() if v} == {}


def _vqvae() -> VQVAE:
    return VQVAE(2, 1, channels=(4, 8), num_res_units=1, num_embeddings=8, embedding_dim=4)


def test_unwrap_peels_data_parallel_always_and_the_package_wrappers_on_request():
    vqvae = _vqvae()
    wrapped = ReconstructionNetwork(vqvae)
    parallel = nn.DataParallel(wrapped)
    assert unwrap(parallel) is wrapped  # what a checkpoint of the network holds: the keys keep "model."
    assert unwrap(parallel, wrappers=True) is vqvae
    assert unwrap(FrozenAutoencoder(wrapped), wrappers=True) is vqvae
    assert unwrap(nn.DataParallel(FrozenAutoencoder(vqvae)), wrappers=True) is vqvae
    prior = GatedPixelCNN(2, 8, 8, 2)
    assert unwrap(PriorNetwork(prior), wrappers=True) is prior
    assert unwrap(vqvae, wrappers=True) is vqvae


@pytest.mark.parametrize(
    "error_type",
    [
        "vqvae_medical.data.checks.DataError",
        "vqvae_medical.utils.io.CheckpointError",
        "vqvae_medical.stages.frozen.AutoencoderDirError",
        "vqvae_medical.training.runtime.SettingError",
        "vqvae_medical.training.steps.NonFiniteLossError",
    ],
)
def test_stage_errors_are_user_errors_by_their_base_class(error_type):
    module, name = error_type.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(cls, UserError)

    class Derived(cls):  # a subclass of a user error is one too, with no registration
        pass

    error = Derived("what went wrong; what to do")
    assert _user_error(RuntimeError("wrapped")) is None
    wrapper = RuntimeError("wrapped")
    wrapper.__cause__ = error
    assert _user_error(wrapper) is error


def test_the_prior_hints_come_from_the_hint_it_registers(monkeypatch):
    """The shared describe_mismatch names ``max_seq_len`` only through the prior's registered hint."""

    def transformer(max_seq_len: int) -> PriorNetwork:
        return PriorNetwork(TransformerPrior(2, 8, max_seq_len=max_seq_len, channels=8, num_layers=1, num_heads=2))

    state = transformer(64).state_dict()
    assert "pass --max_seq_len 64" in describe_mismatch(transformer(32), state)
    monkeypatch.setattr(mismatch, "_HINTS", [])
    generic = describe_mismatch(transformer(32), state)
    assert "max_seq_len" not in generic and "pass the settings it was trained with" in generic

    seen = []

    @register_mismatch_hint
    def hint(module, own, saved, key):
        seen.append(key)
        return "a stage's own hint"

    assert describe_mismatch(transformer(32), state).endswith("a stage's own hint.")
    assert seen == ["model.transformer.position_embeddings.embedding.weight"]
    register_mismatch_hint(hint)  # once only
    assert mismatch._HINTS == [hint]


def test_unwrap_leaves_state_dict_keys_as_saved():
    """BestModelSaver is given ``unwrap(network)``: the keys of the wrapper, which model.pt files hold."""
    wrapped = ReconstructionNetwork(_vqvae())
    assert list(unwrap(nn.DataParallel(wrapped)).state_dict()) == list(wrapped.state_dict())
    assert all(k.startswith("model.") for k in wrapped.state_dict())
    assert torch.equal(unwrap(wrapped, wrappers=True).quantizer.codebook, wrapped.model.quantizer.codebook)
