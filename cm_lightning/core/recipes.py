"""Consistency-training recipes: curriculum N(k), target decay μ(k), index law p(n), weight λ.

``ct``:  Song et al. 2023 (arXiv 2303.01469), Appendix C, as in the official code.
``ict``: Song & Dhariwal 2023 (arXiv 2310.14189), Sections 3.2-3.5.
Every function takes the global optimizer step k, so DDP ranks and resumed runs agree.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

RECIPES = ("ct", "ict")


def ct_num_scales(k: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) = ⌈√(k/K((s1+1)² − s0²) + s0²) − 1⌉ + 1 (CM paper, Appendix C)."""
    return math.ceil(math.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_ema(num_scales: int, s0: int = 2, mu0: float = 0.9) -> float:
    """μ(k) = exp(s0 ln μ0 / (N(k) − 1)) (CM paper, Appendix C); μ0 = 0 gives μ ≡ 0 (target sg θ, as iCT)."""
    if mu0 == 0:
        return 0.0
    return math.exp(s0 * math.log(mu0) / (num_scales - 1))


def ict_num_scales(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^⌊k/K'⌋, s1) + 1, K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (iCT eq. 7)."""
    k_prime = max(math.floor(total_steps / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def lognormal_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """p(n) ∝ erf((ln σ_{n+1} − P_mean)/(√2 P_std)) − erf((ln σ_n − P_mean)/(√2 P_std)) (iCT eq. 10)."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def uniform_index_probs(sigmas: Tensor) -> Tensor:
    """n uniform on {1, …, N − 1} (CM paper, Algorithm 3)."""
    return torch.full((len(sigmas) - 1,), 1 / (len(sigmas) - 1), dtype=torch.float64)


def ict_weight(sigma_n: Tensor, sigma_next: Tensor) -> Tensor:
    """λ(σ_n) = 1 / (σ_{n+1} − σ_n) (iCT Section 3.4)."""
    return 1 / (sigma_next - sigma_n)


def unit_weight(sigma_n: Tensor, sigma_next: Tensor) -> Tensor:
    """λ ≡ 1 (CM paper, Section 5)."""
    return torch.ones_like(sigma_n)


@dataclass(frozen=True)
class Recipe:
    """The schedule half of a recipe: what depends on the training step k of K."""

    name: str
    s0: int
    s1: int
    mu0: float = 0.9
    p_mean: float = -1.1
    p_std: float = 2.0

    def num_scales(self, k: int, total_steps: int) -> int:
        if self.name == "ct":
            return ct_num_scales(k, total_steps, self.s0, self.s1)
        return ict_num_scales(k, total_steps, self.s0, self.s1)

    def target_ema(self, num_scales: int) -> float:
        """μ(k); 0 for iCT, whose target is the stop-gradient online network."""
        return ct_target_ema(num_scales, self.s0, self.mu0) if self.name == "ct" else 0.0

    def index_probs(self, sigmas: Tensor) -> Tensor:
        if self.name == "ct":
            return uniform_index_probs(sigmas)
        return lognormal_index_probs(sigmas, self.p_mean, self.p_std)

    def draw_pairs(self, sigmas: Tensor, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(σ_n, σ_{n+1}) for ``batch_size`` indices n drawn from ``index_probs`` (CPU, float64)."""
        n = torch.multinomial(self.index_probs(sigmas), batch_size, replacement=True, generator=generator)
        return sigmas[n], sigmas[n + 1]

    def weight(self, sigma_n: Tensor, sigma_next: Tensor) -> Tensor:
        return unit_weight(sigma_n, sigma_next) if self.name == "ct" else ict_weight(sigma_n, sigma_next)


DEFAULTS = {"ct": {"s0": 2, "s1": 150, "loss": "l2"}, "ict": {"s0": 10, "s1": 1280, "loss": "pseudo_huber"}}


def make_recipe(name: str, s0: int | None, s1: int | None, mu0: float, p_mean: float, p_std: float) -> Recipe:
    """Build a recipe, filling unset s0/s1 with the paper's values and rejecting bad ones."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {name!r}")
    s0 = DEFAULTS[name]["s0"] if s0 is None else s0
    s1 = DEFAULTS[name]["s1"] if s1 is None else s1
    if s0 < 1:
        raise ValueError(f"s0 must be >= 1, got s0={s0}")
    if s1 < s0:
        raise ValueError(f"s1 must be >= s0, got s0={s0}, s1={s1}")
    if name == "ct" and not 0 <= mu0 < 1:
        raise ValueError(f"mu0 must lie in [0, 1), got mu0={mu0}")
    if not p_std > 0:
        raise ValueError(f"p_std must be > 0, got p_std={p_std}")
    return Recipe(name, s0, s1, mu0, p_mean, p_std)
