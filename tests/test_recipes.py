"""Curricula N(k), target decay μ(k), the iCT index law, λ and the distance metrics."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cm_lightning.core.karras import karras_sigmas
from cm_lightning.core.losses import l1, pseudo_huber, squared_l2
from cm_lightning.core.recipes import ct_num_scales, ct_target_ema, ict_num_scales, ict_weight, make_recipe


def ct_n_reference(k, K, s0=2, s1=150):
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


@pytest.mark.parametrize(
    "k, K, want",
    [(0, 800_000, 2), (400_000, 800_000, 107), (800_000, 800_000, 151), (1, 800_000, 3), (100, 200, 107), (200, 200, 151)],
)
def test_ct_num_scales(k, K, want):
    # start: ⌈√4 − 1⌉ + 1 = 2; middle: ⌈√(½(151² − 4) + 4) − 1⌉ + 1 = ⌈105.78⌉ + 1 = 107; end: s1 + 1.
    assert ct_num_scales(k, K) == want == ct_n_reference(k, K)


@pytest.mark.parametrize("num_scales, want", [(2, 0.81), (107, 0.9 ** (2 / 106)), (151, 0.9 ** (2 / 150))])
def test_ct_target_ema(num_scales, want):
    # μ = exp(s0 ln μ0 / (N − 1)) = μ0^(s0 / (N − 1))
    assert ct_target_ema(num_scales, s0=2, mu0=0.9) == pytest.approx(want, rel=1e-12)
    assert ct_target_ema(num_scales, s0=2, mu0=0.0) == 0.0  # μ0 = 0: the target is sg θ at every N


@pytest.mark.parametrize(
    "k, K, want",
    [(0, 400_000, 11), (49_999, 400_000, 11), (50_000, 400_000, 21), (200_000, 400_000, 161), (399_999, 400_000, 1281),
     (400_000, 400_000, 1281), (0, 200, 11), (24, 200, 11), (25, 200, 21), (100, 200, 161), (199, 200, 1281)],
)
def test_ict_num_scales(k, K, want):
    # K' = ⌊K / (log2⌊1280/10⌋ + 1)⌋ = ⌊K / 8⌋; N = min(10 · 2^⌊k/K'⌋, 1280) + 1
    assert ict_num_scales(k, K) == want


def test_ict_num_scales_non_power_of_two_ratio():
    # s1/s0 = 15 → ⌊15⌋ = 15, log2 15 ≈ 3.907, K' = ⌊1000 / 4.907⌋ = 203
    assert [ict_num_scales(k, 1000, 10, 150) for k in (0, 202, 203, 406, 812, 1000)] == [11, 11, 21, 41, 151, 151]


def test_recipe_target_ema_is_zero_for_ict():
    assert make_recipe("ict", None, None, 0.9, -1.1, 2.0).target_ema(1281) == 0.0


def test_ict_index_law_matches_lognormal_and_draws_follow_it():
    sigmas = karras_sigmas(41)
    recipe = make_recipe("ict", None, None, 0.9, -1.1, 2.0)
    log_s = np.log(sigmas.numpy())
    mass = stats.norm.cdf(log_s[1:], -1.1, 2.0) - stats.norm.cdf(log_s[:-1], -1.1, 2.0)
    want = mass / mass.sum()
    assert recipe.index_probs(sigmas).numpy() == pytest.approx(want, rel=1e-9)

    sigma_n, sigma_next = recipe.draw_pairs(sigmas, 200_000, torch.Generator().manual_seed(0))
    counts = np.bincount(torch.searchsorted(sigmas, sigma_n).numpy(), minlength=40)
    assert torch.equal(torch.searchsorted(sigmas, sigma_next), torch.searchsorted(sigmas, sigma_n) + 1)
    keep = want * 200_000 >= 5  # chi-square needs ≥ 5 expected per cell
    expected = want[keep] * 200_000
    chi2 = stats.chisquare(counts[keep], expected * counts[keep].sum() / expected.sum())
    assert chi2.pvalue > 1e-3
    # and it is not uniform (the ct law): the mode sits near σ = e^(−1.1)
    assert counts.argmax() == int(np.argmax(want)) and counts.max() > 3 * counts.min()


def test_ct_index_law_is_uniform():
    sigmas = karras_sigmas(11)
    probs = make_recipe("ct", None, None, 0.9, -1.1, 2.0).index_probs(sigmas)
    assert probs.tolist() == pytest.approx([0.1] * 10)


def test_ict_weight():
    sn, snext = torch.tensor([0.002, 1.0]), torch.tensor([0.004, 1.5])
    assert ict_weight(sn, snext).tolist() == pytest.approx([500.0, 2.0])


def test_pseudo_huber_is_per_sample():
    a, b = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randn(3, 3, 8, 8, dtype=torch.float64)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    want = [math.sqrt(((a[i] - b[i]) ** 2).sum().item() + c**2) - c for i in range(3)]
    assert pseudo_huber(a, b).tolist() == pytest.approx(want, rel=1e-6)
    # not the per-element mean of the pseudo-Huber
    per_element = ((a - b) ** 2 + c**2).sqrt().sub(c).flatten(1).mean(1)
    assert not torch.allclose(pseudo_huber(a, b).double(), per_element, rtol=1e-2)
    # tiny differences are quadratic: ≈ ‖a − b‖² / (2c)
    d = torch.full((1, 3, 8, 8), 1e-6)
    assert pseudo_huber(d, torch.zeros_like(d)).item() == pytest.approx(192 * 1e-12 / (2 * c), rel=1e-2)


def test_l2_and_l1_are_per_sample_means():
    a, b = torch.arange(8.0).reshape(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert squared_l2(a, b).tolist() == pytest.approx([(0 + 1 + 4 + 9) / 4, (16 + 25 + 36 + 49) / 4])
    assert l1(a, b).tolist() == pytest.approx([6 / 4, 22 / 4])


@pytest.mark.parametrize(
    "args, message",
    [
        (("lct", None, None, 0.9, -1.1, 2.0), r"recipe must be one of \('ct', 'ict'\), got 'lct'"),
        (("ict", 0, None, 0.9, -1.1, 2.0), "s0 must be >= 1, got s0=0"),
        (("ict", 10, 5, 0.9, -1.1, 2.0), "s1 must be >= s0, got s0=10, s1=5"),
        (("ct", None, None, 1.0, -1.1, 2.0), r"mu0 must lie in \[0, 1\), got mu0=1.0"),
        (("ict", None, None, 0.9, -1.1, 0.0), "p_std must be > 0, got p_std=0.0"),
    ],
)
def test_bad_recipe_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        make_recipe(*args)
