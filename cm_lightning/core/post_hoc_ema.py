"""Post-hoc EMA (Karras et al. 2024, "EDM2", arXiv 2312.02696, Section 3 and Appendix C): power-function
averages of the weights, and the least-squares reconstruction of any averaging length from snapshots.

A power-function EMA with exponent γ, updated after optimizer step t = 1, 2, … with
β_t = (1 − 1/t)^(γ+1) (EDM2 Eq. 127), gives step k's weights θ_k the share
(k^(γ+1) − (k − 1)^(γ+1)) / t^(γ+1) = ∫_{k−1}^{k} p(τ) dτ of the profile p(τ) = (γ + 1) τ^γ / t^(γ+1) on
[0, t]: exactly, not approximately, when θ is taken as constant over each step. Its width relative to
its length is σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3))) (EDM2 Eq. 123).
"""

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# σ_rel at γ = 0 (the plain mean of all steps): wider profiles would need γ < 0, which EDM2 does not use.
MAX_SIGMA_REL = 1 / math.sqrt(12)


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power profile of exponent γ (EDM2 Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ ≥ 0 whose profile has width ``sigma_rel``: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²) γ + 12 − σ_rel⁻² = 0 (EDM2 Eq. 123 solved for γ, their Algorithm 2)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}] (1/√12, the plain mean of all steps), "
                         f"got {sigma_rel}")
    t = sigma_rel ** -2
    # the cubic has one root ≥ 0 for σ_rel ≤ 1/√12; bisection on [0, hi] (it grows like σ_rel^(−2/3))
    cubic = lambda g: ((g + 7) * g + 16 - t) * g + 12 - t  # noqa: E731
    lo, hi = 0.0, 1.0
    while cubic(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cubic(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def power_beta(gamma: float, step: int) -> float:
    """β_t = (1 − 1/t)^(γ+1) for the update after optimizer step t ≥ 1 (EDM2 Eq. 127); β_1 = 0."""
    if step < 1:
        raise ValueError(f"the power-function EMA counts optimizer steps from 1, got step {step}")
    return (1 - 1 / step) ** (gamma + 1)


def profile_inner_product(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of two power profiles ending at t_a and t_b (EDM2 Eq. 151):
    (γ_a + 1)(γ_b + 1) min(t_a, t_b)^(γ_a+γ_b+1) / ((γ_a + γ_b + 1) t_a^(γ_a+1) t_b^(γ_b+1)),
    computed as powers of t_min / t_max ≤ 1 so that large γ and t do not overflow. Broadcasts."""
    t_min, t_max = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    # the profile ending later is evaluated on [0, t_min]: (t_min / t_max)^(its γ + 1), over t_min
    gamma_late = torch.where(t_a >= t_b, gamma_a, gamma_b)
    ratio = (t_min / t_max) ** (gamma_late + 1)
    return (gamma_a + 1) * (gamma_b + 1) * ratio / ((gamma_a + gamma_b + 1) * t_min)


def solve_coefficients(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                       target_gamma: float) -> Tensor:
    """Weights x of the snapshots (profiles ending at ``steps`` with exponents ``gammas``) whose combination
    Σ x_i p_i is the least-squares fit of the target profile (EDM2 Algorithm 3): A x = b with
    A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩; then x / Σ x, so that the weights form an average. float64."""
    if not steps or len(steps) != len(gammas):
        raise ValueError(f"need one γ per snapshot step and at least one snapshot, got {len(steps)} steps and "
                         f"{len(gammas)} exponents")
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    if (t <= 0).any():
        raise ValueError(f"snapshot steps must be >= 1, got {list(steps)}")
    gram = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    target = profile_inner_product(t, g, torch.tensor(float(target_step), dtype=torch.float64),
                                   torch.tensor(float(target_gamma), dtype=torch.float64))
    x = torch.linalg.lstsq(gram, target[:, None], driver="gelsd").solution[:, 0]  # robust to near-equal profiles
    return x / x.sum()


def update_power_ema(averages: Sequence[Tensor], current: Sequence[Tensor], gamma: float, step: int) -> None:
    """θ_avg ← β_t θ_avg + (1 − β_t) θ after optimizer step ``step`` (EDM2 Eq. 127), for floating-point
    tensors (``current`` cast to the averages' dtype); other tensors (integer buffers) are copied."""
    beta = power_beta(gamma, step)
    floats = [(a, c) for a, c in zip(averages, current) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [c.to(a.dtype) for a, c in floats], 1 - beta)
    for a, c in zip(averages, current):
        if not a.is_floating_point():
            a.copy_(c)


def combine(weighted: Iterable[tuple[float, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Σ x_i θ_i over (x_i, state dict θ_i) pairs, read one at a time (snapshots of a large network need not
    fit in memory together), summed in float64 and cast back; non-float entries come from the last one."""
    total: dict[str, Tensor] = {}
    last: dict[str, Tensor] = {}
    for coefficient, state in weighted:
        for key, value in state.items():
            if value.is_floating_point():
                term = float(coefficient) * value.double()
                total[key] = total[key] + term if key in total else term
        last = state
    if not last:
        raise ValueError("nothing to combine: no snapshots were given")
    return {key: total[key].to(value.dtype) if value.is_floating_point() else value.clone() for key, value in last.items()}
