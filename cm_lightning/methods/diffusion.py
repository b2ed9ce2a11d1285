"""DiffusionModule: the EDM diffusion model (Karras et al. 2022), the teacher the other methods start from.

Thin: the objective is ``core.objectives.EDMLoss``, the denoiser ``nets.preconditioning.EDMDenoiser`` over the same
network class as the consistency models (so its weights can start one), sampling is the Heun or Euler
solver of the probability-flow ODE (``sampling.samplers.ODESampler``), and everything else comes from
``GenerativeModule``.
"""

import torch
from torch import Tensor, nn

from cm_lightning.core.noise import indexed_noise
from cm_lightning.core.objectives import EDMLoss
from cm_lightning.methods.base import GenerativeModule
from cm_lightning.nets.preconditioning import EDMDenoiser


class DiffusionModule(GenerativeModule):
    """EDM denoiser D_φ trained with the EDM loss (Karras et al. 2022, Table 1); sampled with Heun."""

    default_sampler = "heun18"
    eval_samplers = ["heun18"]

    def __init__(self, net: nn.Module | None = None, p_mean: float = -1.2, p_std: float = 1.2, val_num_sigmas: int = 32, **kwargs):
        """
        Args:
            net: the network F_φ; see GenerativeModule (default: the UNet at the papers' CIFAR-10 size).
            p_mean: mean of ln σ in training (EDM: −1.2).
            p_std: standard deviation of ln σ in training (EDM: 1.2).
            val_num_sigmas: the validation loss cycles through this many fixed σ (quantiles of the training law).
            **kwargs: the settings every method shares (GenerativeModule): σ range, EMAs, sampling,
                optimizer, ...
        """
        if val_num_sigmas < 1:
            raise ValueError(f"val_num_sigmas must be >= 1, got {val_num_sigmas}")
        super().__init__(net=net, **kwargs)
        self.objective = EDMLoss(p_mean, p_std, self.hparams.sigma_data)

    def wrap(self, net: nn.Module) -> EDMDenoiser:
        return EDMDenoiser(net, self.hparams.sigma_data)

    def losses(self, x: Tensor) -> Tensor:
        return self.objective(self.online, x)

    def validation_loss(self, x: Tensor, index: Tensor) -> Tensor:
        """The EDM loss of the ``eval_weights`` denoiser at fixed σ (image i: level i mod val_num_sigmas) and noise."""
        sigmas = self.objective.fixed_levels(self.hparams.val_num_sigmas)
        sigma = sigmas[index % len(sigmas)].to(x.device, torch.float32)
        noise = indexed_noise(0, index.tolist(), 1, x.shape[1:])[0].to(x.device)
        return self.objective.loss(self.network(self.hparams.eval_weights), x, sigma, noise)
