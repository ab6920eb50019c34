"""The network inside a wrapper: the one accessor for ``DistributedDataParallel``/``DataParallel`` and the
package's own single-network wrappers."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]

#: attributes under which the package's wrappers keep the network they wrap: ``FrozenAutoencoder.autoencoder``,
#: ``ReconstructionNetwork.model``, ``PriorNetwork.model``
WRAPPED_ATTRIBUTES: tuple[str, ...] = ("autoencoder", "model")


def unwrap(network: nn.Module, wrappers: bool = False) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers (what a checkpoint of ``network``
    holds); with ``wrappers=True`` also inside the package's wrappers (:data:`WRAPPED_ATTRIBUTES`), e.g. the
    ``VQVAE`` of a ``FrozenAutoencoder`` of a ``ReconstructionNetwork``.

    Args:
        network: the module.
        wrappers: also peel the package's single-network wrappers.
    """
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
            continue
        inner = next((getattr(network, a) for a in WRAPPED_ATTRIBUTES if hasattr(network, a)), None)
        if not wrappers or inner is None:
            return network
        network = inner
