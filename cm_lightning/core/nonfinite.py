"""The non-finite policy: a non-finite loss or gradient never reaches the weights, non-finite weights never
reach a checkpoint. The run stops with what is known (``stop``), or drops the step and counts it (``skip``).

The module checks its loss (``finite_on_all_ranks``, ``nonfinite_loss``); ``NonFiniteGuard``, which every
method brings itself, checks the gradients and the checkpoints. The module provides ``hparams.on_nonfinite``
and ``count_skipped_step()``.
"""

import torch
from lightning.pytorch import Callback
from torch import Tensor

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

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # GradScaler unscales, finds the inf and skips the step: its job, not ours
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

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise FloatingPointError(
                f"refusing to save a checkpoint at global step {trainer.global_step}: non-finite values in "
                f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}. The previous checkpoint is kept."
            )
