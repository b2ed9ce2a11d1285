"""Samplers as values: what FID, grids and ``predict`` are told to draw with, for any module.

``ConsistencySampler``: multistep consistency sampling (CM paper, Algorithm 1) over a σ list.
``ODESampler``: the deterministic Heun (EDM, Algorithm 1) or Euler solver of the probability-flow
ODE dx/dσ = (x − D(x, σ))/σ on the EDM time steps, for diffusion denoisers.
A sampler takes a network, the stacked noise draws it needs (``num_draws``, B, C, H, W) and the
model's σ range, and returns images in [-1, 1]; ``nfe`` is its network evaluations per image.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_lightning.consistency import multistep_sample, validate_sampling_sigmas
from cm_lightning.karras import RHO, SIGMA_MAX, SIGMA_MIN

Network = Callable[[Tensor, Tensor], Tensor]


def edm_time_steps(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """t_0 > … > t_{N−1} = σ_min, then t_N = 0: t_i = (σ_max^(1/ρ) + i/(N−1)(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (EDM eq. 5)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (EDM's time steps need two ends), got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def ode_step(denoiser: Network, x: Tensor, t_cur: Tensor, t_next: Tensor, heun: bool = True) -> Tensor:
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


@torch.no_grad()
def ode_sample(denoiser: Network, noise: Tensor, t: Tensor, heun: bool = True) -> Tensor:
    """Deterministic probability-flow ODE solve from x_0 = t_0 z (EDM Algorithm 1; ``heun=False``: Euler).

    ``ode_step`` from each t_i to t_{i+1}; the last step, to t_N = 0, is Euler. N time steps cost
    2N − 1 network evaluations with Heun and N with Euler. ``noise`` is z (B, C, H, W).
    """
    ones = noise.new_ones(noise.shape[0])
    x = noise * t[0].item()
    for t_cur, t_next in zip(t[:-1].tolist(), t[1:].tolist()):
        x = ode_step(denoiser, x, t_cur * ones, t_next * ones, heun=heun and t_next > 0)
    return x


@dataclass(frozen=True)
class ConsistencySampler:
    """One step per σ in ``sigmas`` (CM paper, Algorithm 1); clamps between steps when ``clip_denoised``."""

    sigmas: tuple[float, ...] = (80.0,)
    clip_denoised: bool = True

    @property
    def name(self) -> str:
        return f"{len(self.sigmas)}step"

    @property
    def num_draws(self) -> int:
        return len(self.sigmas)

    @property
    def nfe(self) -> int:
        return len(self.sigmas)

    def validate(self, sigma_min: float, sigma_max: float) -> None:
        validate_sampling_sigmas(self.sigmas, sigma_min, sigma_max)

    def __call__(self, f: Network, noise: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
        return multistep_sample(f, noise, self.sigmas, sigma_min, self.clip_denoised)


@dataclass(frozen=True)
class ODESampler:
    """Heun (EDM Algorithm 1) or Euler with ``num_steps`` EDM time steps, for a diffusion denoiser D."""

    num_steps: int = 18
    method: str = "heun"

    @property
    def name(self) -> str:
        return f"{self.method}{self.num_steps}"

    @property
    def num_draws(self) -> int:
        return 1

    @property
    def nfe(self) -> int:
        return 2 * self.num_steps - 1 if self.method == "heun" else self.num_steps

    def validate(self, sigma_min: float, sigma_max: float) -> None:
        if self.method not in ("heun", "euler") or self.num_steps < 2:
            raise ValueError(f"an ODE sampler is 'heun<N>' or 'euler<N>' with N >= 2, got {self.name!r}")

    def __call__(self, denoiser: Network, noise: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
        t = edm_time_steps(self.num_steps, sigma_min, sigma_max, rho)
        return ode_sample(denoiser, noise[0], t, heun=self.method == "heun").clamp(-1, 1)


Sampler = ConsistencySampler | ODESampler


def parse_sampler(spec: "Sampler | Sequence[float] | str", clip_denoised: bool = True) -> Sampler:
    """A sampler from a config value: a σ list ([80.0, 0.8]) or "heun<N>" / "euler<N>" ("heun18")."""
    if isinstance(spec, (ConsistencySampler, ODESampler)):
        return spec
    if isinstance(spec, str):
        method = spec.rstrip("0123456789")
        steps = spec[len(method):]
        if method not in ("heun", "euler") or not steps:
            raise ValueError(f"a sampler is a σ list such as [80.0, 0.8], or 'heun<N>' / 'euler<N>' such as 'heun18'; got {spec!r}")
        return ODESampler(int(steps), method)
    return ConsistencySampler(tuple(float(s) for s in spec), clip_denoised)
