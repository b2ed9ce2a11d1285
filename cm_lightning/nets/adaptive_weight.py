"""The learned log-variance w_φ(t) of the continuous-time consistency loss (sCM, Lu & Song 2024, §4.3; EDM2's
uncertainty weighting): a small head of its own, so that it works with any network of the ``net`` contract."""

import torch
from torch import Tensor, nn

from cm_lightning.core.karras import c_noise
from cm_lightning.core.trigflow import sigma_of_t
from cm_lightning.nets.unet import PositionalEmbedding


class LogVarianceHead(nn.Module):
    """w_φ(t) = Linear(PositionalEmbedding(c_noise(σ_d tan t))): EDM's sinusoids of c_noise (scale 1, endpoint) and
    one linear layer, as the sCM reference heads on the network's own noise embedding. The layer starts at zero
    (ours), so the loss starts unweighted (w = 0)."""

    def __init__(self, sigma_data: float, channels: int = 128):
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"the log-variance head's channels must be an even number >= 2, got {channels}")
        self.sigma_data = sigma_data
        self.embedding = PositionalEmbedding(channels, scale=1.0, endpoint=True)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        """w_φ(t), one per t, in float32."""
        with torch.autocast(t.device.type, enabled=False):
            return self.linear(self.embedding(c_noise(sigma_of_t(t.float(), self.sigma_data)))).reshape(-1)
