"""The UNet's noise embeddings: 0.2's reproduced bit for bit, each convention against its formula."""

import math
from pathlib import Path

import pytest
import torch

from cm_lightning import UNet
from cm_lightning.nets.unet import FourierEmbedding, PositionalEmbedding

FIXTURES = Path(__file__).parent / "fixtures" / "v0_2"
C_NOISE = torch.tensor([-1.5, -0.2, 0.0, 1.1])  # ¼ ln σ spans about −1.55 … 1.1 for σ in [0.002, 80]


def seeded_unet(**kwargs) -> UNet:
    """As ``make_v0_2.embedding_outputs``: seed 0, then every parameter moved by seeded noise."""
    torch.manual_seed(0)
    net = UNet(image_size=16, channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
               **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("kind", ["fourier", "positional"])
def test_the_0_2_embeddings_compute_what_they_computed(kind):
    net = seeded_unet(embedding_type=kind)
    with torch.no_grad():
        out = net(torch.randn(3, 1, 16, 16), torch.tensor([-1.5, 0.0, 1.1]))
    # bit for bit on the CPU that wrote the file; another CPU's kernels (AVX2 / AVX-512, Intel / AMD) sum in
    # another order, a few float32 ulps apart (2.4e-6 measured on outputs of size ~2). A changed embedding moves
    # the output by orders of magnitude more.
    assert (out - torch.load(FIXTURES / "embeddings.pt", weights_only=True)[kind]).abs().max() <= 1e-5


def sinusoids(c: torch.Tensor, freqs: list[float]) -> torch.Tensor:
    """cos and sin of c·ω for each frequency ω, by hand in float64."""
    phase = torch.tensor([[float(ci) * w for w in freqs] for ci in c], dtype=torch.float64)
    return torch.cat([phase.cos(), phase.sin()], dim=1)


def test_positional_is_the_official_cm_codes_sinusoids_of_1000_c_noise():
    expected = sinusoids(C_NOISE, [1000 * 10000 ** (-i / 4) for i in range(4)])
    assert torch.allclose(PositionalEmbedding(8)(C_NOISE).double(), expected, atol=2e-4)  # phases up to 1,500 rad in float32


def test_positional_edm_is_edms_ddpmpp_sinusoids_of_c_noise_from_1_to_1e_4():
    embed = UNet(image_size=16, channels=1, model_channels=8, channel_mult=[1], embedding_type="positional_edm").embed
    assert torch.allclose(embed.freqs.double(), torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4], dtype=torch.float64))
    assert torch.allclose(embed(C_NOISE).double(), sinusoids(C_NOISE, [10000 ** (-i / 3) for i in range(4)]), atol=1e-6)


def test_fourier_scale_is_the_standard_deviation_of_the_frequencies():
    torch.manual_seed(3)
    paper = FourierEmbedding(4096, scale=16.0).freqs
    torch.manual_seed(3)
    ict = FourierEmbedding(4096, scale=0.02).freqs
    assert torch.allclose(ict, paper * (0.02 / 16))
    assert abs(ict.std().item() - 0.02) < 0.001
    c, embed = C_NOISE, FourierEmbedding(8, 0.02)
    assert torch.allclose(embed(c), torch.cat([(2 * math.pi * c.outer(embed.freqs)).cos(), (2 * math.pi * c.outer(embed.freqs)).sin()], 1))


def test_embedding_channels_sets_the_width_of_the_features():
    net = UNet(image_size=16, channels=1, model_channels=8, channel_mult=[1], embedding_channels=16)
    assert net.embed.freqs.shape == (8,) and net.map[0].in_features == 16
    assert net(torch.randn(2, 1, 16, 16), C_NOISE[:2]).shape == (2, 1, 16, 16)
    assert UNet(image_size=16, channels=1, model_channels=8, channel_mult=[1]).map[0].in_features == 8


@pytest.mark.parametrize("kwargs, message", [
    ({"embedding_type": "sinusoidal"}, "embedding_type must be one of .*positional_edm.*, got 'sinusoidal'"),
    ({"fourier_scale": 0.0}, "fourier_scale must be > 0, got 0.0"),
    ({"embedding_channels": 7}, "embedding_channels must be an even number >= 2 .* got 7"),
])
def test_bad_embedding_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(image_size=16, channels=1, model_channels=8, channel_mult=[1], **kwargs)
