"""Continuous-time consistency models in TrigFlow (Lu & Song 2024, arXiv 2410.11081, "sCM"; DESIGN §2.5).

x_t = cos t · x_0 + sin t · z, z ~ N(0, σ_d² I), t ∈ [0, π/2]; the EDM level of the same point is σ = σ_d tan t
with x_σ = x_t / cos t. The consistency function is f_θ(x_t, t) = cos t · x_t − sin t · σ_d F_θ(x_t/σ_d, t).

Over the project's networks F_raw(c_in x_σ, c_noise(σ)) with the plain EDM scalings (σ_min = 0), c_in x_σ = x_t/σ_d,
c_skip x_σ = cos t · x_t and c_out = σ_d sin t, so D(x_σ, σ) = cos t · x_t + σ_d sin t · F_raw exactly: the TrigFlow
F_θ is −F_raw and f_θ(x_t, t) = D(x_t / cos t, σ_d tan t). An EDM network therefore starts a student unchanged, and
every σ-space tool (samplers, editing, FID) serves these models. Computing F this way (not as (cos t x_t − D)/(σ_d
sin t)) has no 0/0 at small t and no 1/cos t at t → π/2.

The training tangent (Algorithm 1) takes dF_θ⁻/dt along the trajectory by one forward-mode JVP with the tangents
(cos t sin t · dx_t/dt, cos t sin t) in (x_t, t): the rearranged form whose terms stay bounded at both ends.
"""

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from cm_lightning.core.conditioning import call_network
from cm_lightning.core.karras import c_noise
from cm_lightning.core.noise import forked_rng

# F(x_t, t) as a function of the point and the angle (batch of t, shape [B]); the object the JVP differentiates
TrigFlowF = Callable[[Tensor, Tensor], Tensor]
JVP_MODES = ("exact", "finite_difference")


def sigma_of_t(t: Tensor, sigma_data: float) -> Tensor:
    """σ = σ_d tan t: the EDM noise level of TrigFlow time t."""
    return sigma_data * torch.tan(t)


def t_of_sigma(sigma: Tensor, sigma_data: float) -> Tensor:
    """t = arctan(σ / σ_d), computed as atan2 (exact at both ends)."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():  # (an integer σ would round σ_d in full_like: 0.5 → 0, t → π/2)
        sigma = sigma.to(torch.get_default_dtype())
    return torch.atan2(sigma, torch.full_like(sigma, sigma_data))


def _bcast(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)


def _wide(x: Tensor) -> Tensor:
    """x in float32, or float64 if it is (a low-precision tensor is never the result)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def trigflow_F(net: nn.Module, x_t: Tensor, t: Tensor, sigma_data: float, labels: Tensor | None = None,
               guidance_scale: float = 1.0) -> Tensor:
    """F_θ(x_t, t) = −F_raw(x_t / σ_d, c_noise(σ_d tan t)) for a network of the EDM parametrisation (module
    docstring), in float32 (float64 for float64 inputs and network); the network runs under the ambient autocast,
    its inputs are computed without it. A class-conditional network takes ``labels`` (and guidance, which commutes
    with the sign: ``core.conditioning``)."""
    with torch.autocast(x_t.device.type, enabled=False):
        net_in, noise = _wide(x_t) / sigma_data, c_noise(sigma_of_t(_wide(t), sigma_data))
    return -_wide(call_network(net, net_in, noise, labels, guidance_scale))


def trajectory(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = cos t · x_0 + sin t · z."""
    return _bcast(t.cos()) * x0 + _bcast(t.sin()) * z


def ct_velocity(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """sCT's dx_t/dt = cos t · z − sin t · x_0 (the conditional velocity of the point's own x_0 and z)."""
    return _bcast(t.cos()) * z - _bcast(t.sin()) * x0


def draw_t(n: int, p_mean: float, p_std: float, sigma_data: float, sigma_min: float, sigma_max: float,
           device: torch.device | str = "cpu") -> Tensor:
    """t = arctan(σ/σ_d) with ln σ ~ N(P_mean, P_std²) truncated to [σ_min, σ_max] (by the inverse CDF, in float64;
    paper Algorithm 1: τ ~ N(P_mean, P_std²), t = arctan(e^τ / σ_d)). Draws from torch's RNG."""
    lo, hi = (torch.special.ndtr(torch.tensor((math.log(s) - p_mean) / p_std, dtype=torch.float64))
              for s in (sigma_min, sigma_max))
    u = lo + (hi - lo) * torch.rand(n, dtype=torch.float64)
    sigma = (p_mean + p_std * torch.special.ndtri(u)).exp().clamp(sigma_min, sigma_max)
    return t_of_sigma(sigma, sigma_data).to(device, torch.float32)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, k / H): the weight of the second tangent term at step k (H = 10,000 in the paper; 0: none)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def consistency_tangent(F_minus: Tensor, J: Tensor, x_t: Tensor, v: Tensor, t: Tensor, sigma_data: float, r: float) -> Tensor:
    """g = −cos²t (σ_d F⁻ − dx_t/dt) − r (cos t sin t · x_t + σ_d J), J = cos t sin t · dF⁻/dt (Algorithm 1):
    cos t times the time derivative of f_θ⁻ along the trajectory, its second term warmed up by r."""
    cos, sin = _bcast(t.cos()), _bcast(t.sin())
    return -cos.square() * (sigma_data * F_minus - v) - r * (cos * sin * x_t + sigma_data * J)


def normalise_tangent(g: Tensor, c: float) -> Tensor:
    """g / (‖g‖₂ + c), the per-sample L2 norm over all pixels (paper Algorithm 1, c = 0.1). FastGen's default divides
    by the per-sample RMS ‖g‖/√D instead, which makes c √D times smaller relative to the tangent."""
    return g / (g.flatten(1).norm(dim=1).reshape(-1, *[1] * (g.dim() - 1)) + c)


def tangent_jvp(F: TrigFlowF, x_t: Tensor, t: Tensor, dx: Tensor, dt: Tensor, mode: str = "exact",
                eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(F(x_t, t), the derivative of F along (dx, dt)), without gradients, in float32 (float64 for float64 inputs)
    whatever the autocast, each evaluation from the same RNG state (dropout masks equal those of a following forward).

    "exact": one forward-mode JVP (``torch.func.jvp``; give it the network itself, not a DDP wrapper).
    "finite_difference": for networks whose layers have no forward-mode rule, the central difference
    (F(x + h dx, t + h dt) − F(x − h dx, t − h dt)) / 2h per sample with h = eps · min(t, π/2 − t) / dt (t moves by
    eps of its distance to the nearer end); F is the centre evaluation. Along (dx, dt) = cos t sin t (dx_t/dt, 1) the
    step follows the velocity given, the teacher's in sCD (a difference along the data's own path would
    differentiate another trajectory)."""
    if mode not in JVP_MODES:
        raise ValueError(f"jvp must be one of {JVP_MODES}, got {mode!r}")
    x_t, t, dx, dt = _wide(x_t), _wide(t), _wide(dx), _wide(dt)
    with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
        if mode == "exact":
            with forked_rng(x_t.device):
                return torch.func.jvp(F, (x_t, t), (dx, dt))
        h = eps * torch.minimum(t, math.pi / 2 - t) / dt
        outs = []
        for step in (h, -h, None):
            with forked_rng(x_t.device):
                outs.append(F(x_t, t) if step is None else F(x_t + _bcast(step) * dx, t + step * dt))
        return outs[2], (outs[0] - outs[1]) / _bcast(2 * h)


class SCMTerms(NamedTuple):
    loss: Tensor  # per sample
    tangent_rms: Tensor  # ‖g‖ / √D per sample, before normalisation
    log_weight: Tensor  # w_φ(t) per sample


class ContinuousConsistency:
    """The sCM objective (paper Algorithm 1; sCT from the data, sCD from a teacher's velocity), per sample:

        L = e^{−w_φ(t)} / D · λ(t) ‖F_θ(x_t, t) − F_θ⁻(x_t, t) − g‖² + w_φ(t),   g ← g / (‖g‖ + c),

    F_θ⁻ = sg F_θ (same weights, same dropout mask; in the difference, the gradient pass's output detached), g from
    ``consistency_tangent`` with dF_θ⁻/dt by ``tangent_jvp``, w_φ the learned log-variance (the paper writes the
    same with e^{+w}, −w) and λ(t) = 1/(σ_d tan t) with ``prior_weight`` (FastGen's default), else 1.
    """

    def __init__(self, p_mean: float = -1.0, p_std: float = 1.4, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, warmup_steps: int = 10000, tangent_norm: float = 0.1,
                 prior_weight: bool = True, jvp: Literal["exact", "finite_difference"] = "exact"):
        if p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        if warmup_steps < 0:
            raise ValueError(f"tangent_warmup_steps must be >= 0, got {warmup_steps}")
        if tangent_norm <= 0:
            raise ValueError(f"tangent_norm must be > 0 (the c of g / (‖g‖ + c)), got {tangent_norm}")
        if jvp not in JVP_MODES:
            raise ValueError(f"jvp must be one of {JVP_MODES}, got {jvp!r}")
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.warmup_steps, self.tangent_norm, self.prior_weight, self.jvp = warmup_steps, tangent_norm, prior_weight, jvp

    def draw(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """(z, t) for a batch: z ~ N(0, σ_d² I) and t from ``draw_t``."""
        t = draw_t(len(x0), self.p_mean, self.p_std, self.sigma_data, self.sigma_min, self.sigma_max, x0.device)
        return self.sigma_data * torch.randn_like(x0), t

    def tangent(self, F_target: TrigFlowF, x_t: Tensor, t: Tensor, v: Tensor, r: float) -> tuple[Tensor, Tensor]:
        """(F_θ⁻(x_t, t), unnormalised g) for the velocity v = dx_t/dt."""
        s = t.cos() * t.sin()
        F_minus, J = tangent_jvp(F_target, x_t, t, _bcast(s) * v, s, self.jvp)
        return F_minus, consistency_tangent(F_minus, J, x_t, v, t, self.sigma_data, r)

    def loss(self, F_student: TrigFlowF, F_target: TrigFlowF, log_weight: Callable[[Tensor], Tensor], x0: Tensor,
             z: Tensor, t: Tensor, step: int, F_teacher: TrigFlowF | None = None) -> SCMTerms:
        """Per-sample loss at training step ``step`` (the tangent warm-up's position). ``F_target`` is the network
        the JVP differentiates (the online F, unwrapped from DDP: it is sg F_θ); ``F_student`` the same network
        through the module that synchronises gradients; ``F_teacher`` gives sCD's velocity σ_d F_teacher."""
        x_t = trajectory(x0, z, t)
        if F_teacher is None:
            v = ct_velocity(x0, z, t)
        else:
            with torch.no_grad():
                v = self.sigma_data * F_teacher(x_t, t)
        F_minus, g = self.tangent(F_target, x_t, t, v, tangent_warmup(step, self.warmup_steps))
        rms = g.flatten(1).square().mean(1).sqrt()
        g = normalise_tangent(g, self.tangent_norm)
        F = F_student(x_t, t)  # the RNG is where the JVP found it: the same dropout mask
        w = log_weight(t).float().reshape(-1)
        # F − sg F (not F − the JVP's float32 F⁻): zero in value at any precision, the gradient pulls F along g
        distance = (F - F.detach() - g).flatten(1).square().mean(1)  # ‖·‖² / D
        if self.prior_weight:
            distance = distance / sigma_of_t(t, self.sigma_data)
        return SCMTerms((-w).exp() * distance + w, rms, w)
