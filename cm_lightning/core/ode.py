"""The probability-flow ODE dx/dσ = (x − D(x, σ))/σ of a denoiser D: EDM's time steps and one solver step.

Sampling (``sampling.samplers.ODESampler``) chains the steps; consistency distillation
(``core.objectives.ConsistencyDistillation``) takes one teacher step per training pair.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from cm_lightning.core.karras import RHO, SIGMA_MAX, SIGMA_MIN

Denoiser = Callable[[Tensor, Tensor], Tensor]


def edm_time_steps(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """t_0 > … > t_{N−1} = σ_min, then t_N = 0: t_i = (σ_max^(1/ρ) + i/(N−1)(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (EDM eq. 5)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (EDM's time steps need two ends), got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def ode_step(denoiser: Denoiser, x: Tensor, t_cur: Tensor, t_next: Tensor, heun: bool = True) -> Tensor:
    """One step of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ from t_cur to t_next (EDM Algorithm 1).

    d = (x − D(x, t_cur))/t_cur, x' = x + (t_next − t_cur) d (Euler); with ``heun`` also
    d' = (x' − D(x', t_next))/t_next and x' = x + (t_next − t_cur)(d + d')/2, which needs t_next > 0.
    ``t_cur`` and ``t_next`` hold one σ per sample (B,).
    """
    tc, tn = t_cur.reshape(-1, 1, 1, 1), t_next.reshape(-1, 1, 1, 1)
    d = (x - denoiser(x, t_cur)) / tc
    x_next = x + (tn - tc) * d
    if not heun:
        return x_next
    d_next = (x_next - denoiser(x_next, t_next)) / tn
    return x + (tn - tc) * (d + d_next) / 2
