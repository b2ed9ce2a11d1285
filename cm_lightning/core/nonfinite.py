"""The non-finite policy: a non-finite loss or gradient never reaches the weights, non-finite weights never
reach a checkpoint. The run stops with what is known (``stop``), or drops the step and counts it (``skip``).

The module checks its loss (``finite_on_all_ranks``, ``nonfinite_loss``); ``NonFiniteGuard``, which every
method brings itself, checks the gradients and the checkpoints. The module provides ``hparams.on_nonfinite``
and ``count_skipped_step()``.

Those checks read the device on the host twice per step, which stalls a GPU's launch queue. ``skip_on_device``
reads nothing: a step whose gradients are not all finite is dropped by the optimizer itself (the ``found_inf``
input that fused optimizers take from AMP's gradient scaler: parameters, moments and step count stay as they
were), the averages (EMAs, θ⁻) are moved by 0 instead of 1 − β, and the count is kept on the device. The host
looks once per logging interval, and stops the run if every step of the interval was dropped.
"""

import torch
from lightning.pytorch import Callback
from torch import Tensor

ON_DEVICE = "skip_on_device"
POLICIES = ("stop", "skip", ON_DEVICE)

ADVICE = ("Try a lower learning rate, --trainer.precision 32-true, gradient clipping (--trainer.gradient_clip_val 1.0), "
          "or --model.on_nonfinite skip; resume with --ckpt_path last.")


def finite_on_all_ranks(loss: Tensor, trainer) -> bool:
    """Whether the loss is finite on every rank: all ranks must take the same branch, or DDP hangs."""
    finite = torch.isfinite(loss.detach()).float()
    if trainer.world_size > 1:
        finite = trainer.strategy.reduce(finite, reduce_op="min")
    return bool(finite.item())


def nonfinite_loss(loss: Tensor, step: int, detail: str = "") -> FloatingPointError:
    """The error that stops a run at a non-finite loss, with what is known about the step's noise levels."""
    return FloatingPointError(
        f"non-finite training loss ({loss.item()}) at global step {step}{detail}. The weights were not updated "
        f"and the checkpoints on disk are intact. {ADVICE}"
    )


class NonFiniteGuard(Callback):
    """Checks the gradients before every optimizer step and the weights before every checkpoint save.

    The module checks its loss; a finite loss can still give infinite gradients. Without a gradient
    scaler (which skips such steps itself, under 16-mixed), a non-finite gradient stops the run, or with
    ``on_nonfinite="skip"`` its gradients are dropped (the optimizer leaves every weight as it is) and
    the step is counted in ``train/skipped_steps``. A checkpoint is never written over the last good one
    with non-finite weights. Every method adds this callback itself (``configure_callbacks``).
    """

    _checked_skips = 0  # skipped_on_device at the last host look (``skip_on_device``)

    def on_fit_start(self, trainer, pl_module) -> None:
        if pl_module.hparams.on_nonfinite != ON_DEVICE:
            return
        unable = [type(o).__name__ for o in trainer.optimizers if not getattr(o, "_step_supports_amp_scaling", False)]
        if unable:
            raise ValueError(
                f"on_nonfinite={ON_DEVICE!r} needs an optimizer that skips a step on the device (a fused one: "
                f"--model.optimizer.init_args.fused true for Adam, AdamW or SGD); {', '.join(unable)} is not. Or use "
                "--model.on_nonfinite skip / stop, which check on the host every step")
        self._checked_skips = int(pl_module.skipped_on_device)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # GradScaler unscales, finds the inf and skips the step: its job, not ours
        if pl_module.hparams.on_nonfinite == ON_DEVICE:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            finite = torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else torch.ones((), dtype=torch.bool)
            optimizer.found_inf = (~finite).float()  # read by the fused step: 1 skips it on the device
            pl_module.keep_step(finite.float())  # gradients are averaged over ranks by now: the same on every rank
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params or torch.stack(torch._foreach_norm([p.grad for p in params])).isfinite().all():
            return  # DDP averaged the gradients: every rank takes the same branch
        if pl_module.hparams.on_nonfinite == "skip":
            for p in params:
                p.grad = None  # optimizers leave parameters without a gradient untouched
            pl_module.count_skipped_step()
            return
        raise FloatingPointError(
            f"non-finite gradients at global step {trainer.global_step} (the loss was finite). The weights were "
            f"not updated and the checkpoints on disk are intact. {ADVICE}"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """``skip_on_device``: one host look per logging interval; a run that dropped every step of it stops."""
        interval = max(1, trainer.log_every_n_steps)
        if pl_module.hparams.on_nonfinite != ON_DEVICE or trainer.global_step % interval:
            return
        skipped = int(pl_module.skipped_on_device)
        if skipped - self._checked_skips >= interval:
            raise FloatingPointError(
                f"every one of the last {interval} steps (to global step {trainer.global_step}) had non-finite "
                f"gradients and was dropped on the device: the weights and averages are those of the last finite step "
                f"and the checkpoints on disk are intact. {ADVICE}")
        self._checked_skips = skipped

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise FloatingPointError(
                f"refusing to save a checkpoint at global step {trainer.global_step}: non-finite values in "
                f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}. The previous checkpoint is kept."
            )
