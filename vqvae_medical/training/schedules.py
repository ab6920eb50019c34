"""Learning-rate schedules for the bundles' ``torch.optim.lr_scheduler.LambdaLR``.

By default the rate follows the epoch count only, so a run gives the same model on a fast or a loaded machine. In
the explicit time-budget mode of ``vqvae_medical.training.handlers.TimeBudget`` (``time_budget_minutes`` > 0, the
docs' CPU-minute experiments) a run does not know in advance how many epochs it will reach; PyTorch's
``CosineAnnealingLR`` would then stop with the rate still high, so the factor here follows whichever of the two ends
comes first, the epoch count or the budget. The wall-clock ceiling (``wall_ceiling_minutes``) never moves the rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["cosine_decay"]


def cosine_decay(max_epochs: int, time_budget: Any = None, final_factor: float = 0.01) -> Callable[[int], float]:
    """Cosine decay of the learning rate (Loshchilov and Hutter, "SGDR", ICLR 2017) from 1 to ``final_factor``,
    as a ``lr_lambda`` for ``LambdaLR`` stepped once per epoch (MONAI's ``LrScheduleHandler``).

    The progress after ``epoch`` epochs is ``epoch / max_epochs``; with a time budget set (``time_budget``'s
    ``fraction_spent`` > 0, budget mode only) it is ``max(epoch / max_epochs, time spent / time budget)``, so a run
    that ends on its budget still finishes at the low rate (the rate then depends on measured time, so such runs are
    not bit-identical between machines or reruns). A ``TimeBudget`` with only a wall-clock ceiling, or none, leaves the
    rate a function of the epoch alone. A plain function is returned (not a callable object), so
    ``LambdaLR.state_dict()`` stays tensors-and-numbers only and checkpoints load with ``weights_only=True``.

    Args:
        max_epochs: epochs over which the rate decays.
        time_budget: a ``TimeBudget`` handler (its ``fraction_spent`` is read: 0 unless in budget mode), or ``None``.
        final_factor: the factor reached at the end; ``1.0`` keeps the learning rate constant.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    if not 0.0 <= final_factor <= 1.0:
        raise ValueError(f"final_factor must be in [0, 1], got {final_factor}.")

    def factor(epoch: int) -> float:
        progress = epoch / max_epochs
        if time_budget is not None:
            progress = max(progress, time_budget.fraction_spent)
        progress = min(max(progress, 0.0), 1.0)
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
