"""EasyConsistencyTuningModule: easy consistency tuning (ECT; Geng et al. 2024) as a thin LightningModule.

The objective is ``core.objectives.EasyConsistencyTuning``; the curriculum stage s = ⌊k / d⌋ comes from the
global step k (so a resumed run is in the right stage); ``init_from`` (a DiffusionModule checkpoint) and
f_θ come from ``ConsistencyModule``; everything else (network, EMAs, sampling, checkpoints) from
``GenerativeModule``. The target is sg f_θ, the online network itself (no θ⁻ copy).

``train_scalings="edm"`` trains f with the plain EDM scalings (c_skip = σ_d²/(σ² + σ_d²), …), as locuslab/ect
does, so that f = D of the diffusion model exactly at the start; sampling and validation always use the
σ_min-shifted ones (f(x, σ_min) = x), as their evaluation does. The two differ by O(σ_min / σ) in c_skip, c_out.
"""

import math
from typing import Literal

from torch import Tensor, nn

from cm_lightning.core.conditioning import bind_labels
from cm_lightning.core.objectives import EasyConsistencyTuning
from cm_lightning.methods.consistency import ConsistencyModule, fixed_pairs
from cm_lightning.nets.preconditioning import EDMDenoiser


class EasyConsistencyTuningModule(ConsistencyModule):
    """Easy consistency tuning of f_θ, meant to start from a diffusion model (``init_from``); from scratch
    (no ``init_from``) it is the paper's ablation, slower than iCT."""

    def __init__(
        self,
        net: nn.Module | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        mapping: Literal["sigmoid", "const"] = "sigmoid",
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        c: float = 0.0,
        stage_steps: int | None = None,
        num_stages: int = 8,
        val_num_scales: int = 40,
        train_scalings: Literal["edm", "consistency"] = "edm",
        **kwargs,
    ):
        """
        Args:
            net: the network F_θ, with the settings of the ``init_from`` checkpoint; see GenerativeModule.
            p_mean: mean of ln t (ECT: −1.1).
            p_std: standard deviation of ln t (ECT: 2.0).
            mapping: r(t) at stage s: "sigmoid" r = t (1 − q^−(s+1) (1 + k·sigmoid(−b t))) (ECT's default) or
                "const" r = t (1 − q^−(s+1)); r < σ_min is 0 (the clean image is the target).
            q: the gap t − r shrinks by q per stage (ECT CIFAR-10: 2; 256 in their 1-hour run).
            k: sigmoid mapping: the extra gap at small t (ECT: 8).
            b: sigmoid mapping: its slope in t (ECT: 1).
            c: pseudo-Huber constant of the distance √(‖Δ‖² + c²) − c; 0 (ECT's default) is ‖Δ‖₂.
            stage_steps: d, optimizer steps per stage (ECT CIFAR-10: 25,000); None: the run's total steps
                divided by ``num_stages``.
            num_stages: stages over the run when ``stage_steps`` is None.
            val_num_scales: the validation loss uses the fixed σ pairs of this Karras grid.
            train_scalings: the parametrisation of f in training: "edm" (the plain EDM scalings, ECT's code: f = D at
                the start) or "consistency" (the σ_min-shifted ones that sampling uses). Sampling and validation use
                the shifted ones either way.
            **kwargs: ``init_from`` / ``init_weights`` (ConsistencyModule) and the settings every method
                shares (GenerativeModule): σ range, EMAs, sampling, optimizer, ...
        """
        if stage_steps is not None and stage_steps < 1:
            raise ValueError(f"stage_steps must be >= 1 or None, got {stage_steps}")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        if val_num_scales < 2:
            raise ValueError(f"val_num_scales must be >= 2, got {val_num_scales}")
        if train_scalings not in ("edm", "consistency"):
            raise ValueError(f"train_scalings must be 'edm' or 'consistency', got {train_scalings!r}")
        super().__init__(net=net, **kwargs)
        h = self.hparams
        self.objective = EasyConsistencyTuning(p_mean, p_std, mapping, q, k, b, c, h.sigma_min, h.sigma_max)
        self._stage_steps = stage_steps
        # f with the plain EDM scalings over the online F: a view built once, not a submodule (no second state-dict copy)
        object.__setattr__(self, "_edm_view", EDMDenoiser(self.online.net, self.hparams.sigma_data))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.stage_steps is None:
            self._stage_steps = max(1, math.ceil(self.trainer_steps() / self.hparams.num_stages))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A file from before ``train_scalings`` existed trained with the shifted scalings: it resumes with them."""
        super().on_load_checkpoint(checkpoint)
        if "train_scalings" not in checkpoint.get("hyper_parameters", {}):
            self.hparams.train_scalings = "consistency"

    def stage(self, k: int | None = None) -> int:
        """s = ⌊k / d⌋ at global step k (default: now)."""
        if self._stage_steps is None:
            raise RuntimeError("the stage length is set when fit starts (stage_steps=None: total steps / num_stages)")
        return (self.global_step if k is None else k) // self._stage_steps

    def losses(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        stage = self.stage()
        z, self._t, self._r = self.objective.draw(x, stage)
        self.log_at_logging_steps({"train/stage": float(stage), "train/mean_t_minus_r": (self._t - self._r).mean()})
        f = bind_labels(self.training_function(), labels)
        return self.objective.loss(f, f, x, z, self._t, self._r)

    def training_function(self) -> nn.Module:
        """f_θ as training sees it: the online network in the ``train_scalings`` parametrisation (its weights)."""
        return self.online if self.hparams.train_scalings == "consistency" else self._edm_view

    def describe_step(self) -> str:
        return (f", with t in [{self._t.min().item():.4g}, {self._t.max().item():.4g}] and r up to "
                f"{self._r.max().item():.4g} (stage {self.stage()})")

    def validation_loss(self, x: Tensor, index: Tensor, labels: Tensor | None = None) -> Tensor:
        """The ECT distance of the ``eval_weights`` network between fixed adjacent Karras levels (t = σ_n+1,
        r = σ_n) and seeded noise: a self-consistency error comparable across steps, stages and runs."""
        h = self.hparams
        z, sigma_n, sigma_next = fixed_pairs(x, index, h.val_num_scales, h.sigma_min, h.sigma_max, h.rho)
        f = bind_labels(self.network(h.eval_weights), labels)
        return self.objective.loss(f, f, x, z, sigma_next, sigma_n).mean()
