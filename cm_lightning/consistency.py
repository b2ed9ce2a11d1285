"""The consistency function f_θ and the samplers built on it (CM paper, eq. 7 and Algorithm 1)."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cm_lightning.karras import SIGMA_DATA, SIGMA_MIN, c_in, c_noise, c_out, c_skip


class ConsistencyFunction(nn.Module):
    """f_θ(x, σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x, c_noise(σ)); f_θ(x, σ_min) = x exactly."""

    def __init__(self, net: nn.Module, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_min = sigma_min
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.float().reshape(-1, 1, 1, 1)
        with torch.autocast(x.device.type, enabled=False):  # scalings in float32 under AMP
            skip, out = c_skip(sigma, self.sigma_min, self.sigma_data), c_out(sigma, self.sigma_min, self.sigma_data)
            net_in, noise = c_in(sigma, self.sigma_data) * x.float(), c_noise(sigma.flatten())
        F_x = self.net(net_in, noise).float()
        return skip * x.float() + out * F_x


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
    f: nn.Module,
    shape: Sequence[int],
    sigmas: Sequence[float],
    sigma_min: float = SIGMA_MIN,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Multistep consistency sampling (CM paper, Algorithm 1); one step when ``len(sigmas) == 1``.

    x ← σ_1 z, x ← f(x, σ_1); then for each τ: x ← x + √(τ² − σ_min²) z, x ← f(x, τ).
    Noise is drawn on the generator's device, so a seeded CPU generator gives the
    same images on every accelerator.
    """
    noise_device = generator.device if generator is not None else device

    def randn() -> Tensor:
        return torch.randn(shape, generator=generator, device=noise_device).to(device)

    ones = torch.ones(shape[0], device=device)
    x = f(sigmas[0] * randn(), sigmas[0] * ones)
    for tau in sigmas[1:]:
        x = x + (tau**2 - sigma_min**2) ** 0.5 * randn()
        x = f(x, tau * ones)
    return x.clamp(-1, 1)
