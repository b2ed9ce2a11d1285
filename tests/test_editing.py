"""Zero-shot editing: the known part of every edit is kept exactly, the transforms are orthogonal, bad
requests are refused by name."""

import pytest
import torch
import torch.nn.functional as F

from cm_lightning.sampling.samplers import multistep_sample
from cm_lightning.sampling.editing import (LUMINANCE, colorize, denoise, inpaint, interpolate, orthogonal_completion, slerp,
                                  super_resolve)
from tests.helpers import randomise, tiny

SIGMAS = (80.0, 10.0, 0.8)


def random_f(channels: int = 1):
    """A tiny consistency function with random weights: outputs that depend on x and σ, not a toy."""
    torch.manual_seed(0)
    m = tiny(channels=channels)
    randomise(m.online)
    return m.online.eval()


def reference(channels: int = 1, n: int = 3) -> torch.Tensor:
    return torch.rand(n, channels, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


@torch.no_grad()
def test_inpainting_keeps_the_known_pixels_bit_for_bit_and_fills_the_rest():
    f, y = random_f(), reference()
    keep = torch.ones(16, 16)
    keep[4:12, 2:10] = 0  # a box to fill
    out = inpaint(f, y, keep, SIGMAS, generator=torch.Generator().manual_seed(0))
    known = keep.bool().expand_as(y)
    assert torch.equal(out[known], y[known])
    assert not torch.equal(out[~known], torch.zeros_like(out[~known])) and out[~known].abs().max() <= 1


@torch.no_grad()
def test_colourisation_keeps_the_luminance():
    f, y = random_f(3), reference(3)
    out = colorize(f, y, SIGMAS, generator=torch.Generator().manual_seed(0))
    w = torch.tensor(LUMINANCE).reshape(1, 3, 1, 1)
    torch.testing.assert_close((out * w).sum(1), (y * w).sum(1), rtol=0, atol=1e-5)
    assert not torch.allclose(out, y, atol=1e-2)  # the colours are the model's


@pytest.mark.parametrize("patch", [2, 4])
@torch.no_grad()
def test_super_resolution_keeps_every_patch_mean(patch):
    f, y = random_f(), reference()
    out = super_resolve(f, y, patch, SIGMAS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(F.avg_pool2d(out, patch), F.avg_pool2d(y, patch), rtol=0, atol=1e-5)
    assert not torch.allclose(out, y, atol=1e-2)


@torch.no_grad()
def test_interpolation_end_points_are_the_one_step_samples_of_the_two_noises():
    f = random_f()
    g = torch.Generator().manual_seed(2)
    z0, z1 = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    out = interpolate(f, z0, z1, [0.0, 0.5, 1.0])
    assert torch.equal(out[0], multistep_sample(f, z0[None], [80.0]))
    assert torch.equal(out[2], multistep_sample(f, z1[None], [80.0]))
    mid = slerp(z0, z1, 0.5)  # on the sphere between them: the norm stays that of Gaussian noise
    assert mid.flatten(1).norm(dim=1).tolist() == pytest.approx(z0.flatten(1).norm(dim=1).tolist(), rel=0.1)


@torch.no_grad()
def test_denoising_is_one_step_from_the_noise_level():
    f, y = random_f(), reference()
    noisy = y + 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(denoise(f, noisy, 0.5), f(noisy, torch.full((3,), 0.5)).clamp(-1, 1))


def test_the_transforms_are_orthogonal_with_the_kept_direction_first():
    for v in (LUMINANCE, [1.0] * 4, [1.0] * 16):
        q = orthogonal_completion(v)
        torch.testing.assert_close(q.T @ q, torch.eye(len(v), dtype=torch.float64))
        torch.testing.assert_close(q[:, 0], torch.tensor(v, dtype=torch.float64) / torch.tensor(v, dtype=torch.float64).norm())


def test_bad_edit_requests_are_refused_by_name():
    f, y = random_f(), reference()
    with pytest.raises(ValueError, match=r"mask is \(8, 8\) pixels but the images are \(16, 16\)"):
        inpaint(f, y, torch.ones(8, 8), SIGMAS)
    with pytest.raises(ValueError, match="3-channel .* has 1 channel"):
        colorize(f, y, SIGMAS)
    with pytest.raises(ValueError, match="must divide the image size 16, got 3"):
        super_resolve(f, y, 3, SIGMAS)
    with pytest.raises(ValueError, match="decreasing list"):
        inpaint(f, y, torch.ones(16, 16), (0.8, 80.0))
    with pytest.raises(ValueError, match=">= σ_min"):
        denoise(f, y, 0.0)
