"""DiffusionModule: the EDM diffusion model (Karras et al. 2022), the teacher the other methods start from.

Thin: the objective is ``core.objectives.EDMLoss``, the denoiser ``nets.preconditioning.EDMDenoiser`` over the same
network class as the consistency models (so its weights can start one), sampling is the Heun or Euler
solver of the probability-flow ODE (``sampling.samplers.ODESampler``), and everything else comes from
``GenerativeModule``.
"""

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cm_lightning.core.conditioning import bind_labels, drop_labels
from cm_lightning.core.noise import indexed_noise
from cm_lightning.core.objectives import EDMLoss
from cm_lightning.methods.base import GenerativeModule
from cm_lightning.nets.preconditioning import EDMDenoiser


class DiffusionModule(GenerativeModule):
    """EDM denoiser D_φ trained with the EDM loss (Karras et al. 2022, Table 1); sampled with Heun."""

    default_sampler = "heun18"
    eval_samplers = ["heun18"]

    def __init__(self, net: nn.Module | None = None, p_mean: float = -1.2, p_std: float = 1.2, val_num_sigmas: int = 32,
                 label_dropout: float = 0.0, guidance_scale: float = 1.0, **kwargs):
        """
        Args:
            net: the network F_φ; see GenerativeModule (default: the UNet at the papers' CIFAR-10 size).
            p_mean: mean of ln σ in training (EDM: −1.2).
            p_std: standard deviation of ln σ in training (EDM: 1.2).
            val_num_sigmas: the validation loss cycles through this many fixed σ (quantiles of the training law).
            label_dropout: a class-conditional model trains on "no label" at this rate, so that it also learns
                the unconditional denoiser that classifier-free guidance needs (Ho & Salimans 2022: 0.1–0.2;
                EDM2 0.1); 0 for none.
            guidance_scale: w of classifier-free guidance when sampling (Heun / Euler: grids, FID, ``predict``):
                D_∅ + w (D_c − D_∅); 1 is the plain conditional model, > 1 guides (needs ``label_dropout`` > 0
                in training to mean anything).
            **kwargs: the settings every method shares (GenerativeModule): σ range, EMAs, sampling,
                optimizer, ...
        """
        if val_num_sigmas < 1:
            raise ValueError(f"val_num_sigmas must be >= 1, got {val_num_sigmas}")
        super().__init__(net=net, **kwargs)
        if not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if (label_dropout or guidance_scale != 1.0) and not self.num_classes:
            raise ValueError(f"label_dropout={label_dropout} and guidance_scale={guidance_scale} need a class-conditional "
                             f"network: {type(self.online.net).__name__} has num_classes=0 (UNet: --model.net.init_args.num_classes K)")
        if guidance_scale != 1.0 and not label_dropout:
            rank_zero_warn(f"guidance_scale={guidance_scale} with label_dropout=0: this model never trained its unconditional "
                           "branch (no label), so guidance extrapolates from an untrained one; train with "
                           "--model.label_dropout 0.1")
        self.objective = EDMLoss(p_mean, p_std, self.hparams.sigma_data)

    def wrap(self, net: nn.Module) -> EDMDenoiser:
        return EDMDenoiser(net, self.hparams.sigma_data)

    def losses(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """The EDM loss; a conditional model's labels first go through label dropout."""
        if labels is not None:
            labels = drop_labels(labels, self.hparams.label_dropout)
        return self.objective(bind_labels(self.online, labels), x)

    def sampling_guidance(self) -> float:
        """Classifier-free guidance of Heun / Euler sampling (``guidance_scale``)."""
        return self.hparams.guidance_scale

    def validation_loss(self, x: Tensor, index: Tensor, labels: Tensor | None = None) -> Tensor:
        """The EDM loss of the ``eval_weights`` denoiser at fixed σ (image i: level i mod val_num_sigmas) and noise;
        a conditional model's on the true labels (no dropout)."""
        sigmas = self.objective.fixed_levels(self.hparams.val_num_sigmas)
        sigma = sigmas[index % len(sigmas)].to(x.device, torch.float32)
        noise = indexed_noise(0, index.tolist(), 1, x.shape[1:])[0].to(x.device)
        return self.objective.loss(bind_labels(self.network(self.hparams.eval_weights), labels), x, sigma, noise)
