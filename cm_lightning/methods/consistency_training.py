"""ConsistencyTrainingModule: consistency training (CT / iCT) as a thin LightningModule.

The objective is ``core.objectives.ConsistencyTraining``; the curriculum, the target θ⁻ and its decay μ(k)
come from the recipe; f_θ and ``init_from`` from ``ConsistencyModule``; everything else (network, EMAs,
sampling, checkpoints) from ``GenerativeModule``.
"""

import copy
from typing import Literal

from torch import Tensor, nn

from cm_lightning.core.conditioning import bind_labels
from cm_lightning.core.losses import METRICS
from cm_lightning.core.objectives import ConsistencyTraining
from cm_lightning.core.recipes import DEFAULTS, make_recipe
from cm_lightning.methods.consistency import ConsistencyModule, fixed_pairs


class ConsistencyTrainingModule(ConsistencyModule):
    """Consistency training of f_θ from data alone (CM paper Algorithm 3; iCT)."""

    def __init__(
        self,
        net: nn.Module | None = None,
        recipe: Literal["ct", "ict"] = "ict",
        loss: Literal["l2", "l1", "pseudo_huber"] | None = None,
        s0: int | None = None,
        s1: int | None = None,
        mu0: float = 0.9,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        total_steps: int | None = None,
        val_num_scales: int = 40,
        **kwargs,
    ):
        """
        Args:
            net: the network F_θ; see GenerativeModule (default: the UNet at the papers' CIFAR-10 size).
            recipe: "ct" (Song et al. 2023: N(k) from s0 = 2 to s1 = 150, target EMA μ(k), squared L2) or
                "ict" (Song & Dhariwal 2023: N(k) doubling from 10 to 1280, no target EMA, pseudo-Huber,
                log-normal σ sampling, λ(σ_n) = 1/(σ_n+1 − σ_n)).
            loss: distance d; None takes the recipe's ("l2" for ct, "pseudo_huber" for ict).
            s0: initial discretisation steps; None takes the recipe's (ct 2, ict 10).
            s1: final discretisation steps; None takes the recipe's (ct 150, ict 1280).
            mu0: target EMA decay at the start of the ct curriculum; 0: no EMA, the target is sg θ (as iCT).
            p_mean: mean of ln σ for the iCT index distribution.
            p_std: standard deviation of ln σ for the iCT index distribution.
            total_steps: K of the curriculum; None takes the Trainer's total optimizer steps.
            val_num_scales: the validation loss uses the fixed σ pairs of this Karras grid.
            **kwargs: ``init_from`` (ConsistencyModule) and the settings every method shares
                (GenerativeModule): σ range, EMAs, sampling, optimizer, ...
        """
        schedule = make_recipe(recipe, s0, s1, mu0, p_mean, p_std)
        if loss is not None and loss not in METRICS:
            raise ValueError(f"loss must be one of {tuple(METRICS)} or None, got {loss!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        if val_num_scales < 2:
            raise ValueError(f"val_num_scales must be >= 2, got {val_num_scales}")
        super().__init__(net=net, **kwargs)
        h, self.recipe = self.hparams, schedule
        self.metric = METRICS[loss or DEFAULTS[recipe]["loss"]]
        self.objective = ConsistencyTraining(self.recipe, self.metric, h.sigma_min, h.sigma_max, h.rho)
        # iCT's target (and CT's with μ0 = 0) is stop-gradient(θ): the online network itself, no copy (μ ≡ 0).
        if recipe == "ct" and schedule.mu0 > 0:
            self.target = copy.deepcopy(self.online).requires_grad_(False)
        self._total_steps = total_steps

    @classmethod
    def structure_of(cls, hparams: dict) -> dict:
        out = super().structure_of(hparams)
        if "recipe" in hparams:
            out["target network (recipe ct, mu0 > 0)"] = hparams["recipe"] == "ct" and hparams.get("mu0", 0.9) > 0
        return out

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.total_steps is None:
            self._total_steps = self.trainer_steps()

    def num_scales(self, k: int) -> int:
        """N(k) of the recipe at global step k (clamped to K)."""
        return self.objective.num_scales(k, self._total_steps)

    def losses(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        k = self.global_step
        self.log_at_logging_steps({"train/num_scales": float(self.num_scales(k)),
                                   "train/target_ema": self.recipe.target_ema(self.num_scales(k))})
        z, self._sigma_n, self._sigma_next = self.objective.draw(x, k, self._total_steps)
        if labels is None:  # (a subclass's consistency_loss of before labels existed keeps working)
            return self.consistency_loss(x, z, self._sigma_n, self._sigma_next)
        return self.consistency_loss(x, z, self._sigma_n, self._sigma_next, labels=labels)

    def consistency_loss(self, x: Tensor, z: Tensor, sigma_n: Tensor, sigma_next: Tensor, f: nn.Module | None = None,
                         labels: Tensor | None = None) -> Tensor:
        """The mean of λ(σ_n) d(f_θ(x + σ_{n+1} z, σ_{n+1}), f_θ⁻(x + σ_n z, σ_n)) (CM eq. 10; iCT eq. 9) for
        the online network and θ⁻; given ``f``, both branches use it (the self-consistency of an evaluation network).
        Both branches are conditioned on the same ``labels``."""
        student = f or self.online
        target = f or (self.target if self.target is not None else self.online)
        student, target = bind_labels(student, labels), bind_labels(target, labels)
        return self.objective.loss(student, target, x, z, sigma_n, sigma_next).mean()

    def describe_step(self) -> str:
        return (f", with σ_n in [{self._sigma_n.min().item():.4g}, {self._sigma_n.max().item():.4g}] and σ_n+1 up to "
                f"{self._sigma_next.max().item():.4g} (N(k) = {self.num_scales(self.global_step)})")

    def target_decay(self) -> float:
        """ct: μ(k) of the curriculum, with k the step just taken."""
        return self.recipe.target_ema(self.num_scales(self.global_step))

    def validation_loss(self, x: Tensor, index: Tensor, labels: Tensor | None = None) -> Tensor:
        """CT loss of the ``eval_weights`` network on fixed σ pairs and noise: comparable across steps and runs.

        Image i of the epoch (in loader order) gets pair n = i mod (val_num_scales − 1) and noise seeded by i.
        """
        h = self.hparams
        z, sigma_n, sigma_next = fixed_pairs(x, index, h.val_num_scales, h.sigma_min, h.sigma_max, h.rho)
        return self.consistency_loss(x, z, sigma_n, sigma_next, self.network(h.eval_weights), labels)
