"""The architecture of a network as a plain-JSON MONAI bundle component, rebuilt with ``monai.bundle.ConfigParser``.

A bundle's ``network_def`` is a config with references (``"@in_channels"``) and overrides; once parsed, only the
module is left. :func:`recorded` makes a network class remember the arguments it was built with (defaults filled
in), so that :func:`network_config` can write the *resolved* definition next to the weights and
:func:`build_network` can rebuild the same module from that file alone, as the bundle's parser would.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from monai.bundle import ConfigParser
from torch import nn

__all__ = ["TRAINING_ONLY", "recorded", "network_config", "build_network"]

_ATTR = "_constructor_config"

#: constructor arguments that act only in training (codebook updates, memory, memory format): two definitions that
#: differ only in these compute the same function of the same weights
TRAINING_ONLY = frozenset(
    {
        "decay",
        "epsilon",
        "codebook_init",
        "dead_code_threshold",
        "commitment_cost",
        "use_checkpointing",
        "ddp_sync",
        "channels_last",
        "kmeans_iters",
        "usage_window",
        "max_chunk_bytes",
    }
)
T = TypeVar("T", bound=type)


def _plain(value: Any, name: str) -> Any:
    """``value`` as JSON (tuples become lists, recorded modules their config); anything else is refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, str) and value[:1] in ("$", "@", "%"):
            raise ValueError(f"argument {name}={value!r} would be read as a config expression; cannot record it.")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, nn.Module):
        return network_config(value)
    raise ValueError(f"argument {name} of type {type(value).__name__} cannot be written as JSON.")


def recorded(cls: T) -> T:
    """Class decorator: every instance keeps ``{"_target_": "<module>.<class>", **constructor arguments}``.

    The arguments are bound to the signature with defaults applied, so the record does not depend on the
    defaults of a later version. Subclasses are recorded only when decorated themselves.
    """
    init = cls.__init__
    signature = inspect.signature(init)
    target = f"{cls.__module__}.{cls.__qualname__}"

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self) is cls:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))  # self
            config: dict[str, Any] = {"_target_": target}
            for name, value in arguments.items():
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    config.update({k: _plain(v, k) for k, v in value.items()})
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    raise TypeError(f"{target}: *{name} arguments cannot be recorded by name.")
                else:
                    config[name] = _plain(value, name)
            object.__setattr__(self, _ATTR, config)

    cls.__init__ = __init__
    return cls


def network_config(network: nn.Module) -> dict[str, Any]:
    """The recorded definition of ``network`` (a copy): plain JSON, a MONAI bundle component.

    Raises:
        ValueError: the class is not decorated with :func:`recorded`.
    """
    config = getattr(network, _ATTR, None)
    if config is None:
        raise ValueError(
            f"{type(network).__name__} does not record its constructor arguments (decorate it with "
            "vqvae_medical.networks.config.recorded), so its architecture cannot be written."
        )
    return _plain(config, type(network).__name__)


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """The module of a recorded definition, built by ``monai.bundle.ConfigParser`` (untrained weights)."""
    if "_target_" not in config:
        raise ValueError(f"a network definition needs a _target_, got keys {sorted(config)}.")
    parser = ConfigParser({"network_def": dict(config)})
    return parser.get_parsed_content("network_def")
