"""Inference of whole volumes through a MONAI inferer (e.g. ``SlidingWindowInferer``) with the code maps.

:class:`~vqvae_medical.stages.autoencoder.steps.VQEvalStep` calls ``engine.network(images)`` once and needs the
structured :class:`~vqvae_medical.networks.VQOutput`, so it cannot run window by window.
:class:`SlidingWindowReconstructionStep` runs ``engine.inferer`` over the single-tensor ``network_def``
(:class:`~vqvae_medical.networks.ReconstructionNetwork`, ``forward(image) -> reconstruction``), so volumes larger
than the training patch are reconstructed window by window and blended, and takes the code maps from
``encode_to_indices`` of the whole volume (the encoder alone, without gradients, needs a fraction of the decoder's
memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.utils import CommonKeys

from vqvae_medical.utils.modules import unwrap

__all__ = ["make_inferer", "SlidingWindowReconstructionStep"]


def make_inferer(
    roi_size: Sequence[int] | int | None = None,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
) -> Inferer:
    """``SimpleInferer`` (one pass over the whole volume) when ``roi_size`` is ``None``, else a
    ``SlidingWindowInferer`` with windows of ``roi_size`` overlapping by ``overlap`` and blended with ``mode``.

    Args:
        roi_size: window size (e.g. the training patch size), or ``None`` for whole volumes.
        overlap: fraction of a window shared with its neighbour.
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        sw_batch_size: windows run in one forward pass.
    """
    if roi_size is None:
        return SimpleInferer()
    return SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode)


class SlidingWindowReconstructionStep:
    """One inference iteration: ``pred = engine.inferer(images, engine.network)`` and the code maps of the volume.

    ``engine.network`` must be a single-tensor wrapper such as
    :class:`~vqvae_medical.networks.ReconstructionNetwork` whose ``model`` attribute has ``encode_to_indices``.
    The reconstruction is clipped to ``clip`` like :class:`~vqvae_medical.stages.autoencoder.steps.VQEvalStep`'s;
    under AMP (CUDA only) the quantizer still runs in fp32. The output dict has ``image``, ``label`` (the image),
    ``pred`` and ``indices`` (a tuple with one code map per level), the keys ``ReconstructionWriter`` reads.

    Args:
        clip: value range of the prediction, or ``None`` to keep it unclipped.
        image_key: key of the images in the batch dict.
    """

    def __init__(self, clip: tuple[float, float] | None = (0.0, 1.0), image_key: str = CommonKeys.IMAGE) -> None:
        self.clip = clip
        self.image_key = image_key

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        network = engine.network
        model = unwrap(network, wrappers=True)
        if model is network or not hasattr(model, "encode_to_indices"):
            raise TypeError(
                "SlidingWindowReconstructionStep needs engine.network to be a ReconstructionNetwork (a module with a "
                f"'model' that has encode_to_indices), got {type(network).__name__}."
            )
        network.eval()
        use_amp = bool(engine.amp) and images.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            pred = engine.inferer(images, network)
            codes = model.encode_to_indices(images)
        pred = pred.float()
        if self.clip is not None:
            pred = pred.clamp(*self.clip)
        indices = tuple(codes) if isinstance(codes, (tuple, list)) else (codes,)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {CommonKeys.IMAGE: images, CommonKeys.LABEL: images, CommonKeys.PRED: pred, "indices": indices}
