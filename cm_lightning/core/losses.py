"""Distance metrics d(a, b) for the consistency loss, one value per sample.

All are reduced in float32 whatever the autocast dtype of the inputs.
"""

import math

from torch import Tensor


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per sample, as the official CM code's ``l2`` (CM paper, Section 5)."""
    return (a.float() - b.float()).square().flatten(1).mean(1)


def l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute error per sample (CM paper, Section 5)."""
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """√(‖a − b‖² + c²) − c over the whole sample; c = None is iCT's 0.00054 √(C·H·W) (iCT Section 3.3),
    c = 0 the plain L2 norm ‖a − b‖₂ (ECT's default).

    Evaluated as ‖a − b‖² / (√(‖a − b‖² + c²) + c), the same value without the float32
    cancellation that the direct form suffers once ‖a − b‖ ≪ c (late in training).
    """
    if c is None:
        c = 0.00054 * math.sqrt(a[0].numel())
    sq = (a.float() - b.float()).square().flatten(1).sum(1)
    return sq.sqrt() if c == 0 else sq / ((sq + c**2).sqrt() + c)


METRICS = {"l2": squared_l2, "l1": l1, "pseudo_huber": pseudo_huber}
