"""Evaluation EMAs of the online weights (CM paper, Section 6; iCT Section 5), separate from the target θ⁻,
and the names a user picks networks by ("online", "ema", "ema_<decay>")."""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """β, or min(β, (1 + n) / (10 + n)) with warm-up, so that short runs are not dominated by the init."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, online: nn.Module, decay: float, keep: Tensor | None = None) -> None:
    """θ_ema ← β θ_ema + (1 − β) θ for parameters; buffers are copied. ``keep``, a 0-d tensor on the device
    (1 or 0), scales the move: 0 leaves the average where it is, for a step skipped on the device, without a host
    read."""
    averaged, current = list(ema.parameters()), list(online.parameters())
    if keep is None:
        torch._foreach_lerp_(averaged, current, 1 - decay)
    else:
        moves = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(moves, keep * (1 - decay))
        torch._foreach_add_(averaged, moves)
    for b_ema, b in zip(ema.buffers(), online.buffers()):
        b_ema.copy_(b)


def update_averages(averaged: Iterable[tuple[nn.Module, float]], online: nn.Module, keep: Tensor | None = None) -> None:
    """Move every (network, decay β) after an optimizer step: θ_avg ← β θ_avg + (1 − β) θ (scaled by ``keep``)."""
    for network, decay in averaged:
        update_ema(network, online, decay, keep)


def validate_decays(decays: list[float]) -> None:
    bad = [d for d in decays if not 0 <= d < 1]
    if bad:
        raise ValueError(f"ema_decays must lie in [0, 1), got {bad} in {decays}")


def weights_keys(decays: Sequence[float]) -> dict[str, str]:
    """Each weights name a user can give and the submodule holding it: "online" → "online", "ema" (the
    first decay) → "ema.0", "ema_<decay>" → "ema.<i>". The state-dict keys of F are "<key>.net.*"."""
    names = {"online": "online"} | ({"ema": "ema.0"} if decays else {})
    return names | {f"ema_{d}": f"ema.{i}" for i, d in enumerate(decays)}
