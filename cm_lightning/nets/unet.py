"""A UNet of the DDPM++/NCSN++ family (Song et al. 2021; EDM's ``SongUNet`` layout).

Residual blocks with adaptive group-norm scale/shift from the noise embedding,
skip scaling 1/√2, self-attention at chosen resolutions, a noise embedding of c_noise
(random Fourier features as NCSN++, or sinusoids in the official CM code's or EDM's
convention; DESIGN §2.7 in ../shared), and zero-initialised output layers so that
F_θ starts at 0 and f_θ at c_skip·x.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBEDDINGS = ("fourier", "positional", "positional_edm")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class FourierEmbedding(nn.Module):
    """Random Fourier features cos / sin(2π f c) of c_noise, f ~ N(0, scale²) fixed at init (NCSN++, Song et al.
    2021, Appendix H). Scale 16 is NCSN++'s and the CM paper's; iCT §3.1 takes 0.02, since at 16 two close
    noise levels get unrelated features. The frequencies are a buffer: a checkpoint keeps its own."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        with torch.autocast(c.device.type, enabled=False):  # phases of |x| up to ~100: float32 under AMP
            x = c.float().outer(2 * math.pi * self.freqs.float())
            return torch.cat([x.cos(), x.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids cos / sin(scale · c · ω_i), ω_i = max_positions^(−i/(n − endpoint)), i < n = dim/2.

    scale 1000 without endpoint: the official CM code's (ADM's embedding of 1000·c_noise); scale 1 with
    endpoint: EDM's DDPM++ (frequencies from 1 down to 1/max_positions, of c_noise itself).
    """

    def __init__(self, dim: int, max_positions: int = 10000, scale: float = 1000.0, endpoint: bool = False):
        super().__init__()
        freqs = (1 / max_positions) ** (torch.arange(dim // 2) / (dim // 2 - int(endpoint)))
        self.register_buffer("freqs", freqs)
        self.scale = scale

    def forward(self, c: Tensor) -> Tensor:
        with torch.autocast(c.device.type, enabled=False):  # phases up to ~1000: float32 under AMP
            x = (self.scale * c.float()).outer(self.freqs.float())
            return torch.cat([x.cos(), x.sin()], dim=1)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v over the last two dimensions: PyTorch's fused kernel, or where that kernel has no
    forward-mode rule (the sCM tangent's ``torch.func.jvp``: SDPA's CPU and flash kernels have none in torch 2.14)
    the same product written out, whose operations all have one."""
    try:
        return F.scaled_dot_product_attention(q, k, v)
    except NotImplementedError:
        weights = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        return weights @ v


class Attention(nn.Module):
    """Multi-head self-attention over pixels, 64 channels per head as in NCSN++."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = max(1, channels // 64)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return self.proj(out)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, adaptive scale/shift from the embedding, optional resampling and attention."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, resample: str = "", attention: bool = False):
        super().__init__()
        self.resample = resample
        self.norm0 = _norm(c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * c_out)
        self.norm1 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out) if attention else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        x = (self.skip(self._resample(x)) + self.conv1(self.dropout(h))) / math.sqrt(2)
        if self.attn is not None:
            x = (x + self.attn(x)) / math.sqrt(2)
        return x


def make_embedding(embedding_type: str, channels: int, fourier_scale: float) -> nn.Module:
    """The noise embedding named by ``embedding_type`` (``EMBEDDINGS``), ``channels`` features wide."""
    if embedding_type == "fourier":
        return FourierEmbedding(channels, fourier_scale)
    if embedding_type == "positional":
        return PositionalEmbedding(channels)
    return PositionalEmbedding(channels, scale=1.0, endpoint=True)


def validate_unet(image_size: int, channel_mult: list[int], attn_resolutions: list[int], embedding_type: str) -> None:
    """Refuse a layout the UNet cannot build, naming the argument and what is accepted."""
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult}")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"image_size={image_size} cannot be halved {len(channel_mult) - 1} times "
            f"(channel_mult={channel_mult}): it must be a multiple of {factor}"
        )
    present = [image_size // 2**i for i in range(len(channel_mult))]
    missing = sorted(set(attn_resolutions) - set(present))
    if missing:
        raise ValueError(f"attn_resolutions={attn_resolutions} has {missing}, not in the net; resolutions present: {present}")
    if embedding_type not in EMBEDDINGS:
        raise ValueError(f"embedding_type must be one of {EMBEDDINGS}, got {embedding_type!r}")


class UNet(nn.Module):
    """F_θ(c_in x, c_noise) for square images of side ``image_size``."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        model_channels: int = 128,
        channel_mult: list[int] = (2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: list[int] = (16,),
        dropout: float = 0.0,
        embedding_type: str = "fourier",
        fourier_scale: float = 16.0,
        embedding_channels: int | None = None,
        num_classes: int = 0,
    ):
        """
        Args:
            image_size: side of the square images (linked from the data by the CLI).
            channels: image channels (linked from the data).
            model_channels: channels of the first level.
            channel_mult: channels of each level, as multiples of ``model_channels``; the image halves per level.
            num_res_blocks: residual blocks per level.
            attn_resolutions: resolutions with self-attention.
            dropout: dropout rate of the residual blocks.
            embedding_type: the noise embedding of c_noise = ¼ ln σ: "fourier" (random Fourier features, NCSN++ and
                the CM paper), "positional" (sinusoids of 1000·c_noise, the official CM code) or "positional_edm"
                (sinusoids of c_noise, frequencies 1 … 1e-4: EDM's DDPM++).
            fourier_scale: standard deviation of the Fourier frequencies (NCSN++ / CM paper 16; iCT 0.02).
            embedding_channels: width of the embedding's features; None: ``model_channels`` (NCSN++ takes twice that).
            num_classes: K > 0 makes the network class-conditional: a learned embedding of the label is added to the
                noise embedding before the mapping MLP (EDM's DDPM++; label −1, "no label", adds nothing, which is
                what label dropout and guidance use); 0 (the default): unconditional, the network of every model
                before labels existed, with the same weights and outputs.
        """
        super().__init__()
        validate_unet(image_size, list(channel_mult), list(attn_resolutions), embedding_type)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if not fourier_scale > 0:
            raise ValueError(f"fourier_scale must be > 0, got {fourier_scale}")
        if embedding_channels is not None and (embedding_channels < 2 or embedding_channels % 2):
            raise ValueError(f"embedding_channels must be an even number >= 2 (cos and sin pairs) or None, got {embedding_channels}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {num_classes!r}")
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes  # what the modules read
        self.init_args = dict(  # how to build it again, for checkpoints made without the CLI
            image_size=image_size, channels=channels, model_channels=model_channels, channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions), dropout=dropout,
            embedding_type=embedding_type, fourier_scale=fourier_scale, embedding_channels=embedding_channels,
            num_classes=num_classes,
        )
        emb_dim, noise_channels = 4 * model_channels, embedding_channels or model_channels
        self.embed = make_embedding(embedding_type, noise_channels, fourier_scale)
        if num_classes:  # only then: an unconditional net keeps today's state-dict keys
            self.map_label = nn.Embedding(num_classes, noise_channels)
        self.map = nn.Sequential(nn.Linear(noise_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.conv_in = nn.Conv2d(channels, model_channels, 3, padding=1)

        self.down, skips, c = nn.ModuleList(), [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            res = image_size >> level
            if level > 0:
                self.down.append(ResBlock(c, c, emb_dim, dropout, resample="down"))
                skips.append(c)
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, model_channels * mult, emb_dim, dropout, attention=res in attn_resolutions))
                c = model_channels * mult
                skips.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, attention=True), ResBlock(c, c, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = image_size >> level
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), model_channels * mult, emb_dim, dropout, attention=res in attn_resolutions))
                c = model_channels * mult
            if level > 0:
                self.up.append(ResBlock(c, c, emb_dim, dropout, resample="up"))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), _zero(nn.Conv2d(c, channels, 3, padding=1)))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """F(x, c_noise) of an unconditional net; with ``num_classes`` > 0 also the labels (B,), −1 for none."""
        with torch.autocast(x.device.type, enabled=False):  # the embedding stays float32 under AMP
            emb = self.embed(c_noise.float())
            if class_labels is not None:
                emb = emb + self.label_embedding(class_labels)
        emb = self.map(emb)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1) if block.resample != "up" else h, emb)
        return self.out(h)

    def label_embedding(self, labels: Tensor) -> Tensor:
        """The learned row of each label, zeros for −1 (no label): a gather, no host read."""
        if not self.num_classes:
            raise ValueError("class labels were given to an unconditional UNet (num_classes=0); build it with "
                             "num_classes=K to train or sample a class-conditional model")
        return self.map_label(labels.clamp(min=0)) * (labels >= 0).unsqueeze(1)
