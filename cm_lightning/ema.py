"""Evaluation EMA of the online weights (CM paper, Section 6; iCT Section 5), separate from θ⁻."""

import torch
from torch import nn


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """β, or min(β, (1 + n) / (10 + n)) with warm-up, so that short runs are not dominated by the init."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, online: nn.Module, decay: float) -> None:
    """θ_ema ← β θ_ema + (1 − β) θ for parameters; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(online.parameters()), 1 - decay)
    for b_ema, b in zip(ema.buffers(), online.buffers()):
        b_ema.copy_(b)


def validate_decays(decays: list[float]) -> None:
    bad = [d for d in decays if not 0 <= d < 1]
    if bad:
        raise ValueError(f"ema_decays must lie in [0, 1), got {bad} in {decays}")
