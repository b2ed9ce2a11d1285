"""Karras discretisation and the c_* parametrisation against independent float64 formulas."""

import math

import pytest
import torch

from cm_lightning.nets.preconditioning import ConsistencyFunction
from cm_lightning.core.karras import c_in, c_noise, c_out, c_skip, karras_sigmas, validate_sigma_range
from cm_lightning.nets.unet import UNet
from tests.helpers import TINY_NET

SIGMAS = [0.002, 0.0021, 0.01, 0.5, 1.0, 7.3, 80.0]


@pytest.mark.parametrize("num_scales", [2, 11, 151, 1281])
def test_karras_sigmas_match_formula(num_scales):
    got = karras_sigmas(num_scales)
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    want = [(a + (i - 1) / (num_scales - 1) * (b - a)) ** 7 for i in range(1, num_scales + 1)]
    assert got.dtype == torch.float64 and len(got) == num_scales
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert got[0].item() == pytest.approx(0.002) and got[-1].item() == pytest.approx(80.0)
    assert torch.all(got[1:] > got[:-1])


def test_karras_sigmas_rejects_one_level():
    with pytest.raises(ValueError, match="num_scales must be >= 2, got 1"):
        karras_sigmas(1)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_scalings_match_formula(sigma):
    s = torch.tensor(sigma, dtype=torch.float64)
    smin, sd = 0.002, 0.5
    assert c_skip(s).item() == pytest.approx(sd**2 / ((sigma - smin) ** 2 + sd**2), rel=1e-12)
    assert c_out(s).item() == pytest.approx((sigma - smin) * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12, abs=1e-15)
    assert c_in(s).item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_noise(s).item() == pytest.approx(0.25 * math.log(sigma), rel=1e-12)


def test_boundary_scalings():
    s = torch.tensor(0.002, dtype=torch.float64)
    assert c_skip(s).item() == 1.0 and c_out(s).item() == 0.0


def test_boundary_condition_holds_for_any_network():
    net = UNet(image_size=16, channels=3, **TINY_NET)
    for p in net.parameters():  # leave the zero init so F_θ is far from 0
        torch.nn.init.normal_(p, std=0.5)
    f = ConsistencyFunction(net)
    x = torch.randn(4, 3, 16, 16)
    assert f(x, torch.full((4,), 0.002)).sub(x).abs().max().item() == 0.0
    assert f(x, torch.full((4,), 1.0)).sub(x).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma_min=80.0, sigma_max=80.0, sigma_data=0.5, rho=7.0), "sigma_min < sigma_max"),
        (dict(sigma_min=1.0, sigma_max=0.5, sigma_data=0.5, rho=7.0), "sigma_min=1.0, sigma_max=0.5"),
        (dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=0.0), "rho must be a finite number > 0, got 0.0"),
        (dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.0, rho=7.0), "sigma_data must be > 0, got 0.0"),
    ],
)
def test_bad_sigma_ranges_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_sigma_range(**kwargs)
