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


class EDMDenoiser(ConsistencyFunction):
    """D_φ(x, σ) = c_skip(σ) x + c_out(σ) F_φ(c_in(σ) x, c_noise(σ)) with the plain EDM scalings (EDM Table 1):
    c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²), which are the consistency ones at σ_min = 0.
    The same F_φ can therefore start a consistency model f_θ (ECT, CD)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__(net, 0.0, sigma_data)


def validate_sampling_sigmas(sigmas: Sequence[float], sigma_min: float, sigma_max: float) -> None:
    """A schedule is a non-empty, strictly decreasing list in (σ_min, σ_max]."""
    sigmas = list(sigmas)
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level, e.g. (80.0,)")
    if any(not sigma_min < s <= sigma_max for s in sigmas):
        raise ValueError(f"sigmas={sigmas} must lie in (sigma_min, sigma_max] = ({sigma_min}, {sigma_max}]")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas={sigmas} must be strictly decreasing")


def indexed_noise(seed: int, indices: Sequence[int], num_draws: int, shape: Sequence[int]) -> Tensor:
    """Standard normal noise (num_draws, len(indices), *shape); image i's draws depend on (seed, i) alone.

    So image i starts from the same noise whatever the batch size, the number of ranks or the order of
    generation: FID and exported samples do not change (beyond float rounding) when a run moves to more GPUs.
    """
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must lie in [0, 2**31), got {seed}")
    noise = torch.empty(num_draws, len(indices), *shape)
    for j, i in enumerate(indices):
        if not 0 <= int(i) < 2**32:
            raise ValueError(f"sample indices must lie in [0, 2**32), got {int(i)}")
        # The CPU generator keeps 32 bits of its seed: shift the index by a seed-dependent offset, a
        # bijection on the indices of one seed, so no two images of a run share their noise.
        generator = torch.Generator().manual_seed((int(i) + seed * 0x9E3779B9) % 2**32)
        noise[:, j] = torch.randn(num_draws, *shape, generator=generator)
    return noise


@torch.no_grad()
def multistep_sample(
    f: nn.Module, noise: Tensor, sigmas: Sequence[float], sigma_min: float = SIGMA_MIN, clip_denoised: bool = True
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
