"""ContinuousConsistencyModule: continuous-time consistency models (sCT and sCD; Lu & Song 2024, "sCM"), thin.

The objective is ``core.trigflow.ContinuousConsistency``; f_θ in σ-space is the EDM parametrisation of the same
network (``core.trigflow``'s docstring), so samplers, grids, FID, ``predict``, the step search and every edit work
unchanged; the learned weight w_φ(t) is ``nets.adaptive_weight.LogVarianceHead``. With ``--model.teacher`` it
distils that diffusion model (sCD, ``methods.teacher.FrozenTeacher``), without it it trains from the data (sCT),
from a diffusion model's weights with ``--model.init_from`` or from scratch.
"""

from typing import Literal

import torch
from torch import Tensor, nn

from cm_lightning.core.karras import karras_sigmas
from cm_lightning.core.noise import indexed_noise
from cm_lightning.core.trigflow import (ContinuousConsistency, ct_velocity, sigma_of_t, t_of_sigma, tangent_warmup, trajectory,
                                        trigflow_F)
from cm_lightning.methods.consistency import ConsistencyModule
from cm_lightning.methods.teacher import FrozenTeacher, refuse_unconditional_guidance
from cm_lightning.nets.adaptive_weight import LogVarianceHead
from cm_lightning.nets.preconditioning import ConsistencyFunction

T_MID = 1.1  # the paper's second level of two-step sampling, a TrigFlow angle (σ = σ_d tan 1.1 ≈ 0.98 at σ_d = 0.5)
WEIGHT_CURVE_SIGMAS = (0.01, 0.1, 0.5, 1.0, 5.0, 80.0)  # where w_φ is logged, as a curve over σ


class ContinuousConsistencyModule(FrozenTeacher, ConsistencyModule):
    """sCT (no teacher) or sCD (``teacher``) of f_θ(x_t, t) = cos t · x_t − sin t · σ_d F_θ (paper Algorithm 1)."""

    teacher_required = False

    def __init__(
        self,
        net: nn.Module | None = None,
        teacher: str | None = None,
        teacher_weights: str | None = None,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        tangent_warmup_steps: int = 10000,
        tangent_norm: float = 0.1,
        prior_weight: bool = True,
        jvp: Literal["exact", "finite_difference"] = "exact",
        weight_channels: int = 128,
        val_num_scales: int = 40,
        allow_teacher_change: bool = False,
        guidance_scale: float = 1.0,
        **kwargs,
    ):
        """
        Args:
            net: the network F_θ (with a teacher or ``init_from``: that checkpoint's settings); see GenerativeModule.
            teacher: a DiffusionModule checkpoint to distil (sCD: the velocity dx_t/dt is σ_d F_teacher, and the
                student starts from its weights); None trains from the data (sCT: dx_t/dt = cos t · z − sin t · x_0).
            teacher_weights: which of the teacher's networks: "online", "ema", "ema_<decay>"; None: its eval_weights.
            p_mean: mean of ln σ of the training levels, t = arctan(σ / σ_d) (paper, CIFAR-10: −1.0).
            p_std: its standard deviation (paper, CIFAR-10: 1.4).
            tangent_warmup_steps: H, steps over which the second tangent term's weight r = min(1, k / H) grows to 1
                (paper: 10,000; 0: none).
            tangent_norm: c of the tangent normalisation g / (‖g‖ + c) (paper: 0.1).
            prior_weight: weight the distance by 1 / (σ_d tan t) (FastGen's default); false: unweighted.
            jvp: dF_θ⁻/dt by "exact" forward-mode AD (``torch.func.jvp``) or "finite_difference" (a central
                difference along the same tangent; for networks with layers that have no forward-mode rule).
            weight_channels: channels of the log-variance head's noise embedding.
            val_num_scales: the validation loss uses the levels of this Karras grid.
            allow_teacher_change: resume even if the teacher file differs from the one the run started with.
            guidance_scale: sCD: w of classifier-free guidance of the teacher's velocity, F_∅ + w (F_c − F_∅), so a
                conditional student learns the guided teacher's flow (FastGen's guided sCD); 1: unguided. Needs a
                class-conditional teacher trained with label dropout.
            **kwargs: ``init_from`` / ``init_weights`` (ConsistencyModule) and the settings every method shares
                (GenerativeModule): σ range, EMAs, sampling, optimizer, ...
        """
        if val_num_scales < 2:
            raise ValueError(f"val_num_scales must be >= 2, got {val_num_scales}")
        if kwargs.get("compile"):
            raise ValueError("compile=True is not supported by ContinuousConsistencyModule: its training step takes "
                             "torch.func.jvp of the network, which torch.compile does not trace; train eagerly")
        super().__init__(net=net, **kwargs)
        refuse_unconditional_guidance(self, guidance_scale)
        h = self.hparams
        self.objective = ContinuousConsistency(p_mean, p_std, h.sigma_data, h.sigma_min, h.sigma_max,
                                               tangent_warmup_steps, tangent_norm, prior_weight, jvp)
        self.log_weight = LogVarianceHead(h.sigma_data, weight_channels)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.guidance_scale != 1.0 and self.hparams.teacher is None:
            raise ValueError(f"guidance_scale={self.hparams.guidance_scale} guides sCD's teacher, and this run has none "
                             "(sCT): give --model.teacher <DiffusionModule checkpoint>, or --model.guidance_scale 1")
        super().setup(stage)

    def wrap(self, net: nn.Module) -> ConsistencyFunction:
        """f_θ(x_σ, σ) with the plain EDM scalings (σ_min = 0): the TrigFlow consistency function in σ-space,
        f(x, 0) = x."""
        return ConsistencyFunction(net, 0.0, self.hparams.sigma_data)

    @property
    def eval_samplers(self) -> list[list[float]]:
        """One step from σ_max, and two steps with the paper's t_mid = 1.1 (σ = σ_d tan 1.1)."""
        h = self.hparams
        return [[h.sigma_max], [h.sigma_max, round(float(sigma_of_t(torch.tensor(T_MID), h.sigma_data)), 4)]]

    def trained_parameters(self):
        """F_θ's and the log-variance head's (φ is trained with θ by the same optimizer)."""
        return [*self.online.parameters(), *self.log_weight.parameters()]

    def trigflow(self, f: ConsistencyFunction, labels: Tensor | None = None, guidance_scale: float = 1.0):
        """F(x_t, t) of a parametrised network (``core.trigflow.trigflow_F``), conditioned on ``labels``."""
        return lambda x_t, t: trigflow_F(f.net, x_t, t, self.hparams.sigma_data, labels, guidance_scale)

    def guided_teacher(self, labels: Tensor | None):
        """The teacher's F (sCD), conditioned on the labels and guided by ``guidance_scale``."""
        return self.trigflow(self.teacher(), labels, self.hparams.guidance_scale)

    def losses(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        z, self._t = self.objective.draw(x)
        teacher = self.guided_teacher(labels) if self._teacher is not None else None
        online = self.trigflow(self.online, labels)  # the student's forward: through DDP's forward, so gradients sync
        terms = self.objective.loss(online, online, self.log_weight, x, z, self._t, self.global_step, teacher)
        self.log_at_logging_steps({
            "train/tangent_rms": terms.tangent_rms.mean(), "train/log_weight": terms.log_weight.mean(),
            "train/tangent_warmup": tangent_warmup(self.global_step, self.hparams.tangent_warmup_steps)})
        return terms.loss

    def describe_step(self) -> str:
        return f", with t in [{self._t.min().item():.4g}, {self._t.max().item():.4g}]"

    def validation_loss(self, x: Tensor, index: Tensor, labels: Tensor | None = None) -> Tensor | None:
        """RMS of the unnormalised tangent g (r = 1) of the ``eval_weights`` network at fixed levels (image i: level
        i mod N of the Karras grid) and noise seeded by i: how far f is from constant along trajectories, comparable
        across steps and runs; sCD's needs the teacher (None without its file)."""
        h = self.hparams
        if h.teacher is not None and self._teacher is None:
            return None
        sigmas = karras_sigmas(h.val_num_scales, h.sigma_min, h.sigma_max, h.rho)
        t = t_of_sigma(sigmas[index.cpu() % len(sigmas)], h.sigma_data).to(x.device, torch.float32)
        z = h.sigma_data * indexed_noise(0, index.tolist(), 1, x.shape[1:])[0].to(x.device)
        F = self.trigflow(self.network(h.eval_weights), labels)
        x_t = trajectory(x, z, t)
        v = ct_velocity(x, z, t) if h.teacher is None else h.sigma_data * self.guided_teacher(labels)(x_t, t)
        _, g = self.objective.tangent(F, x_t, t, v, 1.0)
        return g.flatten(1).square().mean(1).sqrt()

    def on_validation_epoch_end(self) -> None:
        """w_φ as a curve over σ: ``val/log_weight_sigma<σ>``."""
        t = t_of_sigma(torch.tensor(WEIGHT_CURVE_SIGMAS), self.hparams.sigma_data).to(self.device, torch.float32)
        with torch.no_grad():
            for sigma, w in zip(WEIGHT_CURVE_SIGMAS, self.log_weight(t).tolist()):
                self.log(f"val/log_weight_sigma{sigma:g}", w)
