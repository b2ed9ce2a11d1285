"""The parametrisations that wrap any network F: the consistency function f_θ (CM paper, eq. 7) and the
EDM denoiser D_φ (EDM Table 1). Both take (x, σ) and hand F the scaled input and c_noise(σ)."""

import torch
from torch import Tensor, nn

from cm_lightning.core.conditioning import call_network
from cm_lightning.core.karras import SIGMA_DATA, SIGMA_MIN, c_in, c_noise, c_out, c_skip


class ConsistencyFunction(nn.Module):
    """f_θ(x, σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x, c_noise(σ)); f_θ(x, σ_min) = x exactly."""

    def __init__(self, net: nn.Module, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_min = sigma_min
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, guidance_scale: float = 1.0) -> Tensor:
        """f(x, σ); a class-conditional network also takes the labels (B,) and, w ≠ 1, classifier-free guidance
        with scale w (``core.conditioning.call_network``)."""
        sigma = sigma.float().reshape(-1, 1, 1, 1)
        with torch.autocast(x.device.type, enabled=False):  # scalings in float32 under AMP
            skip, out = c_skip(sigma, self.sigma_min, self.sigma_data), c_out(sigma, self.sigma_min, self.sigma_data)
            net_in, noise = c_in(sigma, self.sigma_data) * x.float(), c_noise(sigma.flatten())
        F_x = call_network(self.net, net_in, noise, class_labels, guidance_scale).float()
        return skip * x.float() + out * F_x


class EDMDenoiser(ConsistencyFunction):
    """D_φ(x, σ) = c_skip(σ) x + c_out(σ) F_φ(c_in(σ) x, c_noise(σ)) with the plain EDM scalings (EDM Table 1):
    c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²), which are the consistency ones at σ_min = 0.
    The same F_φ can therefore start a consistency model f_θ (ECT, CD)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__(net, 0.0, sigma_data)
