"""Training objectives, one small class per paper (as NVlabs/edm's ``training/loss.py``).

Each is called with the networks and a clean batch x, draws its own noise levels and noise from
torch's current RNG (the module seeds it per step and rank), and returns one loss per sample.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cm_lightning.core import losses
from cm_lightning.core.karras import karras_sigmas
from cm_lightning.core.noise import forked_rng
from cm_lightning.core.ode import ode_step
from cm_lightning.core.recipes import Recipe

Metric = Callable[[Tensor, Tensor], Tensor]


def consistency_distance(
    student: nn.Module, target: nn.Module, x_student: Tensor, sigma_student: Tensor, x_target: Tensor,
    sigma_target: Tensor, weight: Tensor, metric: Metric,
) -> Tensor:
    """λ d(f_θ(x_student, σ_student), sg f_θ⁻(x_target, σ_target)) per sample: the loss of every consistency method.

    The target forward replays the student's RNG state, so with dropout both see the same mask.
    """
    with forked_rng(x_student.device):
        out = student(x_student, sigma_student)
    with torch.no_grad():  # the RNG is back where the student's forward found it
        ref = target(x_target, sigma_target)
    return weight * metric(out, ref)


def consistency_loss(
    student: nn.Module, target: nn.Module, x: Tensor, z: Tensor, sigma_n: Tensor, sigma_next: Tensor,
    weight: Tensor, metric: Metric,
) -> Tensor:
    """λ(σ_n) d(f_θ(x + σ_{n+1} z, σ_{n+1}), f_θ⁻(x + σ_n z, σ_n)) per sample (CM eq. 10; iCT eq. 9)."""
    return consistency_distance(
        student, target, x + _bcast(sigma_next) * z, sigma_next, x + _bcast(sigma_n) * z, sigma_n, weight, metric
    )


class ConsistencyTraining:
    """Consistency training: CT (CM paper, Algorithm 3) or iCT (Song & Dhariwal 2023), after ``recipe``.

    At step k of K: N(k) Karras levels, n drawn from the recipe's p(n), z ~ N(0, I), θ⁻ the target.
    """

    def __init__(self, recipe: Recipe, metric: Metric, sigma_min: float, sigma_max: float, rho: float):
        self.recipe, self.metric = recipe, metric
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def num_scales(self, k: int, total_steps: int) -> int:
        """N(k), clamped to N(K) past the end of the curriculum."""
        return self.recipe.num_scales(min(k, total_steps), total_steps)

    def draw(self, x: Tensor, k: int, total_steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """(z, σ_n, σ_{n+1}) for a batch: n from the recipe's p(n) on the N(k)-level grid, then z ~ N(0, I)."""
        sigmas = karras_sigmas(self.num_scales(k, total_steps), self.sigma_min, self.sigma_max, self.rho)
        sigma_n, sigma_next = (s.to(x.device, torch.float32) for s in self.recipe.draw_pairs(sigmas, len(x)))
        return torch.randn_like(x), sigma_n, sigma_next

    def loss(self, student: nn.Module, target: nn.Module, x: Tensor, z: Tensor, sigma_n: Tensor, sigma_next: Tensor) -> Tensor:
        """Per-sample λ(σ_n) d(f_θ(x + σ_{n+1} z, σ_{n+1}), f_θ⁻(x + σ_n z, σ_n)) with the recipe's λ and d."""
        weight = self.recipe.weight(sigma_n, sigma_next)
        return consistency_loss(student, target, x, z, sigma_n, sigma_next, weight, self.metric)

    def __call__(self, online: nn.Module, target: nn.Module, x: Tensor, k: int, total_steps: int) -> Tensor:
        return self.loss(online, target, x, *self.draw(x, k, total_steps))


class EDMLoss:
    """EDM denoising loss (Karras et al. 2022, Table 1): ln σ ~ N(P_mean, P_std²), y = x + σ n,
    λ(σ) ‖D(y, σ) − x‖² with λ(σ) = (σ² + σ_d²)/(σ σ_d)², the squared norm averaged over pixels
    (EDM sums it; the constant factor C·H·W changes nothing under Adam)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + σ_d²)/(σ σ_d)²: unit loss scale at every σ for the ideal-ish denoiser (EDM eq. 8)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, denoiser: nn.Module, x: Tensor) -> Tensor:
        sigma = (torch.randn(len(x), device=x.device) * self.p_std + self.p_mean).exp()
        return self.loss(denoiser, x, sigma, torch.randn_like(x))

    def loss(self, denoiser: nn.Module, x: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        """λ(σ) ‖D(x + σ n, σ) − x‖² per sample, at given σ and noise n."""
        error = (denoiser(x + _bcast(sigma) * noise, sigma).float() - x.float()).square().flatten(1).mean(1)
        return self.weight(sigma) * error

    def fixed_levels(self, count: int) -> Tensor:
        """σ at the quantiles (i + ½)/count of the training law: validation noise levels that do not change."""
        quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        return (self.p_mean + self.p_std * math.sqrt(2) * torch.erfinv(2 * quantiles - 1)).exp()


class ConsistencyDistillation:
    """Consistency distillation (CM paper, Algorithm 2): N Karras levels σ_1 < … < σ_N, n uniform on
    {1, …, N − 1}, x_{n+1} = x + σ_{n+1} z, one Heun (or Euler) step of the teacher's probability-flow ODE
    from σ_{n+1} to σ_n gives x̂_n, and the loss is d(f_θ(x_{n+1}, σ_{n+1}), sg f_θ⁻(x̂_n, σ_n)) with λ ≡ 1."""

    def __init__(self, metric: Metric, num_scales: int, sigma_min: float, sigma_max: float, rho: float, heun: bool = True):
        if num_scales < 2:
            raise ValueError(f"num_scales must be >= 2 (CD needs at least one pair of levels), got {num_scales}")
        self.metric, self.heun = metric, heun
        self.sigmas = karras_sigmas(num_scales, sigma_min, sigma_max, rho)

    def draw(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z, σ_n, σ_{n+1}) for a batch: n uniform over the N − 1 adjacent pairs, z ~ N(0, I)."""
        n = torch.randint(0, len(self.sigmas) - 1, (len(x),))
        sigma_n, sigma_next = (s.to(x.device, torch.float32) for s in (self.sigmas[n], self.sigmas[n + 1]))
        return torch.randn_like(x), sigma_n, sigma_next

    def pair(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(σ_n, σ_{n+1}) of pair n = index mod (N − 1): fixed levels for a validation loss."""
        n = index % (len(self.sigmas) - 1)
        return self.sigmas[n].float(), self.sigmas[n + 1].float()

    def loss(
        self, student: nn.Module, target: nn.Module, teacher: nn.Module, x: Tensor, z: Tensor, sigma_n: Tensor,
        sigma_next: Tensor,
    ) -> Tensor:
        """Per-sample d(f_θ(x + σ_{n+1} z, σ_{n+1}), f_θ⁻(x̂_n, σ_n)), x̂_n the teacher's ODE step (no gradient)."""
        x_next = x + _bcast(sigma_next) * z
        with torch.no_grad():
            x_hat = ode_step(teacher, x_next, sigma_next, sigma_n, heun=self.heun)
        return consistency_distance(student, target, x_next, sigma_next, x_hat, sigma_n, 1.0, self.metric)

    def __call__(self, online: nn.Module, target: nn.Module, teacher: nn.Module, x: Tensor) -> Tensor:
        return self.loss(online, target, teacher, x, *self.draw(x))


class EasyConsistencyTuning:
    """Easy consistency tuning (ECT; Geng et al. 2024, DESIGN §2.3): continuous pairs r < t on one shared noise.

    ln t ~ N(P_mean, P_std²) truncated to [σ_min, σ_max]; at curriculum stage s,
    r = max(0, t (1 − q^−(s+1) a(t))) with a(t) = 1 + k·sigmoid(−b t) ("sigmoid") or 1 ("const"), so r → t
    as s grows; x_t = x + t z, x_r = x + r z; the loss is ‖f_θ(x_t, t) − sg f_θ(x_r, r)‖₂ / (t − r) per sample
    (√(‖·‖² + c²) − c for c > 0), the target being the clean x where r = 0. A level below σ_min counts as
    r = 0: f(x, σ_min) = x is the data there.
    """

    def __init__(
        self, p_mean: float = -1.1, p_std: float = 2.0, mapping: str = "sigmoid", q: float = 2.0, k: float = 8.0,
        b: float = 1.0, c: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
    ):
        if mapping not in ("sigmoid", "const"):
            raise ValueError(f"mapping must be 'sigmoid' or 'const', got {mapping!r}")
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        if not q > 1:
            raise ValueError(f"q must be > 1 (the gap t − r shrinks by q per stage), got {q}")
        if k < 0 or b < 0 or c < 0:
            raise ValueError(f"k, b and c must be >= 0, got k={k}, b={b}, c={c}")
        self.p_mean, self.p_std, self.mapping, self.q, self.k, self.b, self.c = p_mean, p_std, mapping, q, k, b, c
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        # Φ at the ends of [σ_min, σ_max] in ln t: the range of u that draw_t maps to t
        self._u_range = tuple(0.5 * math.erfc(-((math.log(s) - p_mean) / p_std) / math.sqrt(2)) for s in (sigma_min, sigma_max))

    def r_of_t(self, t: Tensor, stage: int) -> Tensor:
        """r(t) at curriculum stage s (ECT's mapping), with r < σ_min set to 0."""
        adjust = 1 + self.k * torch.sigmoid(-self.b * t) if self.mapping == "sigmoid" else torch.ones_like(t)
        r = (t * (1 - self.q ** -(stage + 1) * adjust)).clamp(min=0)
        return torch.where(r < self.sigma_min, torch.zeros_like(r), r)

    def draw_t(self, count: int, device=None) -> Tensor:
        """t = exp(P_mean + P_std·Φ⁻¹(u)), u uniform on [Φ(a), Φ(b)]: the log-normal truncated to [σ_min, σ_max]."""
        lo, hi = self._u_range
        u = lo + (hi - lo) * torch.rand(count, dtype=torch.float64)
        t = (self.p_mean + self.p_std * torch.special.ndtri(u)).exp().clamp(self.sigma_min, self.sigma_max)
        return t.to(device, torch.float32)

    def draw(self, x: Tensor, stage: int) -> tuple[Tensor, Tensor, Tensor]:
        """(z, t, r) for a batch at curriculum stage s."""
        t = self.draw_t(len(x), x.device)
        return torch.randn_like(x), t, self.r_of_t(t, stage)

    def loss(self, student: nn.Module, target: nn.Module, x: Tensor, z: Tensor, t: Tensor, r: Tensor) -> Tensor:
        """Per-sample ‖f_θ(x + t z, t) − sg f_θ(x + r z, r)‖ / (t − r); target x where r = 0."""
        sigma_min = self.sigma_min

        def reference(x_r: Tensor, r: Tensor) -> Tensor:  # (no host check for an all-zero r: a device sync)
            return torch.where(_bcast(r) > 0, target(x_r, r.clamp(min=sigma_min)), x)  # r = 0 rows: any level

        metric = lambda a, b: losses.pseudo_huber(a, b, self.c)  # noqa: E731
        return consistency_distance(student, reference, x + _bcast(t) * z, t, x + _bcast(r) * z, r, 1 / (t - r), metric)

    def __call__(self, online: nn.Module, x: Tensor, stage: int) -> Tensor:
        return self.loss(online, online, x, *self.draw(x, stage))


def _bcast(sigma: Tensor) -> Tensor:
    return sigma.reshape(-1, 1, 1, 1)
