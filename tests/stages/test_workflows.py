"""What the stage-2 bundles' ``multi_gpu_train.json`` hands each rank (``stages/prior/workflow.py`` and
``stages/diffusion/workflow.py``): every handler on rank 0, and on the other ranks all but the writers, chosen by
type. Static: the handler classes of ``train.json`` are located, nothing is built."""

from __future__ import annotations

import importlib
from pydoc import locate

import pytest
from bundle_runner import BUNDLES
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

#: what ranks > 0 ran when multi_gpu_train.json listed them by place (pixelcnn_prior 0.5.0, latent_diffusion 0.5.0)
EVERY_RANK = {
    "pixelcnn_prior": {
        "train": ["ResumeOrStartFresh", "ValidationHandler", "TimeBudget"],
        "validate": [],
    },
    "latent_diffusion": {
        "train": ["ResumeOrStartFresh", "FiniteLossGuard", "DiffusionEMA", "ValidationHandler", "TimeBudget"],
        "validate": ["LatentDiffusionPrepareBatch"],
    },
}
ENGINE_KEYS = {"train": "train#trainer#train_handlers", "validate": "validate#evaluator#val_handlers"}


def _handler_class(parser: ConfigParser, item) -> type:
    """The class of a handler entry: ``{"_target_": ...}``, ``"@id"`` of one, or a ``typing.cast`` of one."""
    while isinstance(item, str) or item["_target_"] == "typing.cast":
        item = parser.get(item[1:]) if isinstance(item, str) else item["val"]
    name = item["_target_"]
    if "." in name:
        return locate(name)
    module = ComponentLocator().get_component_module_name(name)
    module = module[0] if isinstance(module, list) else module
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("bundle", sorted(EVERY_RANK))
@pytest.mark.parametrize("section", ["train", "validate"])
def test_ranks_above_zero_leave_out_exactly_the_writers(bundle, section):
    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    select = parser.get(ENGINE_KEYS[section])
    assert select["handlers"] == f"@{section}#handlers" and select["rank"] == "@rank"
    handlers_of_rank = locate(select["_target_"])
    classes = [_handler_class(parser, h) for h in parser.get(f"{section}#handlers")]
    assert handlers_of_rank(classes, 0) == classes
    assert [c.__name__ for c in handlers_of_rank(classes, 1)] == EVERY_RANK[bundle][section]
