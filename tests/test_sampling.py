"""Sampler values and the EDM ODE solvers: time steps, Heun/Euler order on an analytic case, parsing."""

import math

import pytest
import torch

from cm_lightning.core.ode import edm_time_steps
from cm_lightning.sampling.samplers import ConsistencySampler, ODESampler, ode_sample, parse_sampler

S = 0.5  # data ~ N(0, S² I): the ideal denoiser is D(x, σ) = S² x / (S² + σ²)


def gaussian_denoiser(x, sigma):
    return S**2 * x / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_edm_time_steps_follow_the_formula_and_end_at_zero():
    t = edm_time_steps(18)
    i = torch.arange(18, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(t[:-1], expected, rtol=1e-12, atol=0)
    assert t[0] == pytest.approx(80.0) and t[-2] == pytest.approx(0.002) and t[-1] == 0.0 and len(t) == 19


@pytest.mark.parametrize("heun, order", [(True, 2), (False, 1)])
def test_ode_solvers_converge_at_their_order_on_gaussian_data(heun, order):
    """The probability-flow ODE maps x(σ_max) to x(σ_max) · S / √(S² + σ_max²) at σ = 0."""
    z = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = z * 80 * S / math.sqrt(S**2 + 80**2)
    errors = []
    for n in (16, 32, 64, 128):
        x = ode_sample(gaussian_denoiser, z, edm_time_steps(n), heun=heun)
        errors.append(((x - exact).abs().max() / exact.abs().max()).item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]  # measured: Heun 4.6, 4.3, 4.2; Euler 1.97, 1.99, 1.99
    assert all(2**order * 0.9 < r < 2**order * 1.3 for r in ratios), ratios
    assert errors[-1] < (1e-3 if heun else 3e-2)


def test_ode_sampler_costs_and_names():
    assert (ODESampler(18).nfe, ODESampler(18).name) == (35, "heun18")
    assert (ODESampler(10, "euler").nfe, ODESampler(10, "euler").name) == (10, "euler10")
    counter = []

    def counting(x, sigma):
        counter.append(1)
        return gaussian_denoiser(x, sigma)

    ODESampler(5)(counting, torch.randn(1, 2, 1, 4, 4), 0.002, 80.0, 7.0)
    assert len(counter) == 9  # 2N − 1


@pytest.mark.parametrize("spec, expected", [
    ([80.0], ConsistencySampler((80.0,))), ([80.0, 0.8], ConsistencySampler((80.0, 0.8))),
    ("heun18", ODESampler(18, "heun")), ("euler4", ODESampler(4, "euler")),
])
def test_parse_sampler(spec, expected):
    assert parse_sampler(spec) == expected


@pytest.mark.parametrize("spec", ["rk4", "heun", "18"])
def test_bad_sampler_names_are_explained(spec):
    with pytest.raises(ValueError, match="a sampler is a σ list such as \\[80.0, 0.8\\], or 'heun<N>'"):
        parse_sampler(spec)
