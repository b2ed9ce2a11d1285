"""Samplers as values: what FID, grids and ``predict`` are told to draw with, for any module.

``ConsistencySampler``: multistep consistency sampling (CM paper, Algorithm 1) over a σ list.
``ODESampler``: the deterministic Heun (EDM, Algorithm 1) or Euler solver of the probability-flow
ODE dx/dσ = (x − D(x, σ))/σ on the EDM time steps, for diffusion denoisers.
A sampler takes a network (any f(x, σ) or D(x, σ)), the stacked noise draws it needs (``num_draws``, B,
C, H, W) and the model's σ range, and returns images in [-1, 1]; ``nfe`` is its network evaluations per image.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_lightning.core.karras import SIGMA_MIN
from cm_lightning.core.ode import Denoiser, edm_time_steps, ode_step


def validate_sampling_sigmas(sigmas: Sequence[float], sigma_min: float, sigma_max: float) -> None:
    """A schedule is a non-empty, strictly decreasing list in (σ_min, σ_max]."""
    sigmas = list(sigmas)
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level, e.g. (80.0,)")
    if any(not sigma_min < s <= sigma_max for s in sigmas):
        raise ValueError(f"sigmas={sigmas} must lie in (sigma_min, sigma_max] = ({sigma_min}, {sigma_max}]")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas={sigmas} must be strictly decreasing")


@torch.no_grad()
def multistep_sample(
    f: Denoiser, noise: Tensor, sigmas: Sequence[float], sigma_min: float = SIGMA_MIN, clip_denoised: bool = True
) -> Tensor:
    """Multistep consistency sampling (CM paper, Algorithm 1); one step when ``len(sigmas) == 1``.

    x ← σ_1 z_1, x ← f(x, σ_1); then for each further τ_j: x ← x + √(τ_j² − σ_min²) z_j, x ← f(x, τ_j).
    ``noise`` holds z_1, z_2, … stacked: shape (len(sigmas), B, C, H, W). ``clip_denoised`` clamps every
    step's f output to [-1, 1] before the next noise is added, as the official code and diffusers do;
    the returned images are clamped either way, so one-step results do not depend on it.
    """
    if len(noise) != len(sigmas):
        raise ValueError(f"noise holds {len(noise)} draws but the schedule {list(sigmas)} needs {len(sigmas)}")
    ones = noise.new_ones(noise.shape[1])
    x = f(sigmas[0] * noise[0], sigmas[0] * ones)
    for tau, z in zip(sigmas[1:], noise[1:]):
        if clip_denoised:
            x = x.clamp(-1, 1)
        x = x + (tau**2 - sigma_min**2) ** 0.5 * z
        x = f(x, tau * ones)
    return x.clamp(-1, 1)


@torch.no_grad()
def ode_sample(denoiser: Denoiser, noise: Tensor, t: Tensor, heun: bool = True) -> Tensor:
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

    def __call__(self, f: Denoiser, noise: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
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

    def __call__(self, denoiser: Denoiser, noise: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
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
