"""Karras noise levels and the consistency-model parametrisation.

Song et al. 2023 (arXiv 2303.01469), eq. 7 and Appendix C; the discretisation
is Karras et al. 2022 (EDM), eq. 5. All scalings are computed in float32 (or
the caller's higher precision), never in the autocast dtype.
"""

import math

import torch
from torch import Tensor

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0


def karras_sigmas(
    num_scales: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """σ_1 < … < σ_N: σ_i = (σ_min^(1/ρ) + (i−1)/(N−1)(σ_max^(1/ρ) − σ_min^(1/ρ)))^ρ (EDM eq. 5)."""
    if num_scales < 2:
        raise ValueError(f"num_scales must be >= 2, got {num_scales}")
    ramp = torch.linspace(0, 1, num_scales, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((lo + ramp * (hi - lo)) ** rho).to(dtype)


def c_skip(sigma: Tensor, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA) -> Tensor:
    """c_skip(σ) = σ_data² / ((σ − σ_min)² + σ_data²) (CM paper, Appendix C); equals 1 at σ_min."""
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def c_out(sigma: Tensor, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA) -> Tensor:
    """c_out(σ) = (σ − σ_min) σ_data / √(σ² + σ_data²) (CM paper, Appendix C); equals 0 at σ_min."""
    return (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """c_in(σ) = 1 / √(σ² + σ_data²): unit-variance network input (EDM Table 1)."""
    return (sigma**2 + sigma_data**2).rsqrt()


def c_noise(sigma: Tensor) -> Tensor:
    """c_noise(σ) = ¼ ln σ: the noise conditioning fed to the embedding (EDM Table 1), with σ floored at 1e-6 so that
    the boundary σ = 0 of a parametrisation with σ_min = 0 (EDM's, TrigFlow's t = 0) gives F finite inputs and
    f(x, 0) = x exactly; no level a model trains or samples at is below the floor."""
    return 0.25 * sigma.clamp_min(1e-6).log()


def validate_sigma_range(sigma_min: float, sigma_max: float, sigma_data: float, rho: float) -> None:
    """Reject ranges the parametrisation cannot use, naming the argument."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number > 0, got {rho}")
