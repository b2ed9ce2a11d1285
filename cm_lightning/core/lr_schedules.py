"""Learning-rate schedules whose length is the run's own unless the user fixes it."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class CosineDecay(LRScheduler):
    """lr_k = η_min + (lr_0 − η_min) · ½ (1 + cos(π k / T)) for k ≤ T, then η_min (SGDR, Loshchilov &
    Hutter 2017, one cycle without restarts).

    Unlike torch's ``CosineAnnealingLR``, T may be left unset: the module then sets it to the Trainer's
    total optimizer steps, so ``--trainer.max_steps 200`` decays to η_min at step 200; and past T the
    LR stays at η_min instead of rising again.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, eta_min: float = 0.0, last_epoch: int = -1):
        """
        Args:
            optimizer: the optimizer whose learning rate is scheduled.
            total_steps: T, optimizer steps from lr_0 to η_min; None: the Trainer's total optimizer steps.
            eta_min: the final learning rate η_min.
            last_epoch: index of the last step taken (-1 for a new run), as in every torch scheduler.
        """
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None (the Trainer's total steps), got {total_steps}")
        if eta_min < 0:
            raise ValueError(f"eta_min must be >= 0, got {eta_min}")
        self.total_steps, self.eta_min = total_steps, eta_min
        self.follows_run = total_steps is None
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        k = self.last_epoch
        if k > 0 and self.total_steps is None:
            raise RuntimeError("CosineDecay.total_steps is unset: give it, or let the LightningModule set it")
        share = 1.0 if k <= 0 else 0.5 * (1 + math.cos(math.pi * min(k, self.total_steps) / self.total_steps))
        return [self.eta_min + (base - self.eta_min) * share for base in self.base_lrs]

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.follows_run:  # a resumed run takes its own length, as the curriculum's K does
            state.pop("total_steps")
        return state
