"""ConsistencyDistillationModule: consistency distillation (CD) from a trained EDM teacher, thin.

The objective is ``core.objectives.ConsistencyDistillation``; the teacher D_φ (a DiffusionModule checkpoint,
frozen, named by path and hash) is ``methods.teacher.FrozenTeacher``'s.
Everything else (network, EMAs, sampling, checkpoints) comes from ``GenerativeModule``.
"""

import copy
import math
from typing import Literal

from torch import Tensor, nn

from cm_lightning.core.conditioning import bind_labels
from cm_lightning.core.losses import METRICS
from cm_lightning.core.noise import indexed_noise
from cm_lightning.core.objectives import ConsistencyDistillation
from cm_lightning.methods.consistency import ConsistencyModule
from cm_lightning.methods.teacher import FrozenTeacher, refuse_unconditional_guidance


class ConsistencyDistillationModule(FrozenTeacher, ConsistencyModule):
    """Consistency distillation of f_θ from a frozen diffusion teacher D_φ (CM paper, Algorithm 2)."""

    def __init__(
        self,
        net: nn.Module | None = None,
        teacher: str | None = None,
        teacher_weights: str | None = None,
        num_scales: int = 18,
        solver: Literal["heun", "euler"] = "heun",
        loss: Literal["l2", "l1", "pseudo_huber"] = "l2",
        mu: float = 0.0,
        allow_teacher_change: bool = False,
        sampling_levels: Literal["grid", "free"] = "grid",
        guidance_scale: float = 1.0,
        **kwargs,
    ):
        """
        Args:
            net: the student's network F_θ, with the teacher's settings (its weights start from the teacher's);
                see GenerativeModule.
            teacher: path of the DiffusionModule checkpoint to distil (read with weights_only=True when
                ``fit`` starts; not needed to sample or test the student).
            teacher_weights: which of the teacher's networks: "online", "ema", "ema_<decay>"; None takes
                the teacher's own eval_weights.
            num_scales: N, the number of Karras levels the σ pairs are drawn from (CM paper: 18 on CIFAR-10).
            solver: the teacher's ODE step from σ_n+1 to σ_n: "heun" (2 teacher evaluations, the paper's) or "euler" (1).
            loss: distance d: "l2" (squared, the paper's non-LPIPS choice), "l1" or "pseudo_huber" (iCT's).
            mu: fixed target decay μ of θ⁻ ← μ θ⁻ + (1 − μ) θ (paper: 0, stop-gradient, on CIFAR-10; 0.95 on
                ImageNet 64).
            allow_teacher_change: resume even if the teacher file differs from the one the run started with.
            sampling_levels: the two-step sampler of grids and FID: "grid" takes the second level from the training
                grid (the level nearest 0.8 in ln σ: 1.0882 for N = 18), where the student learned f; "free" is
                the usual [80, 0.8], between two trained levels.
            guidance_scale: w of classifier-free guidance of the teacher's ODE step, D_∅ + w (D_c − D_∅), so that
                the conditional student learns the guided teacher's trajectories and samples them in one step
                (FastGen's guided CD); 1: the plain conditional teacher. Needs a class-conditional teacher trained
                with label dropout.
            **kwargs: ``init_from`` (ConsistencyModule: start from other weights than the teacher's) and the
                settings every method shares (GenerativeModule): σ range, EMAs, sampling,
                optimizer, ...
        """
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
        if loss not in METRICS:
            raise ValueError(f"loss must be one of {tuple(METRICS)}, got {loss!r}")
        if not 0 <= mu < 1:
            raise ValueError(f"mu must lie in [0, 1) (0 is stop-gradient), got {mu}")
        if sampling_levels not in ("grid", "free"):
            raise ValueError(f"sampling_levels must be 'grid' or 'free', got {sampling_levels!r}")
        super().__init__(net=net, **kwargs)
        refuse_unconditional_guidance(self, guidance_scale)
        h = self.hparams
        self.objective = ConsistencyDistillation(METRICS[loss], num_scales, h.sigma_min, h.sigma_max, h.rho, solver == "heun")
        if mu > 0:  # μ = 0: the target is sg(θ), the online network itself
            self.target = copy.deepcopy(self.online).requires_grad_(False)

    @classmethod
    def structure_of(cls, hparams: dict) -> dict:
        out = super().structure_of(hparams)
        if "mu" in hparams:
            out["target network (mu > 0)"] = hparams["mu"] > 0
        return out

    def target_decay(self) -> float:
        """The fixed μ."""
        return self.hparams.mu

    def training_levels(self) -> list[float]:
        """The N Karras levels the student is trained on, descending (σ_max first)."""
        return self.objective.sigmas.flip(0).tolist()

    @property
    def eval_samplers(self) -> list[list[float]]:
        """One step, and two steps whose second level is a trained one ("grid") or 0.8 ("free")."""
        if self.hparams.sampling_levels == "free":
            return super().eval_samplers
        levels = self.training_levels()
        second = min(levels[1:-1], key=lambda s: abs(math.log(s / 0.8)))
        return [[levels[0]], [levels[0], second]]

    # -- training and validation ----------------------------------------------------------------

    def losses(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        z, self._sigma_n, self._sigma_next = self.objective.draw(x)
        target = self.target if self.target is not None else self.online
        student, target, teacher = self.conditioned(self.online, target, labels)
        return self.objective.loss(student, target, teacher, x, z, self._sigma_n, self._sigma_next)

    def conditioned(self, student: nn.Module, target: nn.Module, labels: Tensor | None):
        """Student, target and (guided) teacher, each conditioned on the same labels."""
        guidance = self.hparams.guidance_scale
        return bind_labels(student, labels), bind_labels(target, labels), bind_labels(self.teacher(), labels, guidance)

    def describe_step(self) -> str:
        return (f", with σ_n in [{self._sigma_n.min().item():.4g}, {self._sigma_n.max().item():.4g}] and σ_n+1 up to "
                f"{self._sigma_next.max().item():.4g}")

    def validation_loss(self, x: Tensor, index: Tensor, labels: Tensor | None = None) -> Tensor | None:
        """CD loss of the ``eval_weights`` network (as student and target) on fixed σ pairs (image i: pair
        i mod (N − 1)) and noise seeded by i; None without a teacher."""
        if self._teacher is None:
            return None
        sigma_n, sigma_next = (s.to(x.device) for s in self.objective.pair(index))
        z = indexed_noise(0, index.tolist(), 1, x.shape[1:])[0].to(x.device)
        f, _, teacher = self.conditioned(self.network(self.hparams.eval_weights), self.online, labels)
        return self.objective.loss(f, f, teacher, x, z, sigma_n, sigma_next)
