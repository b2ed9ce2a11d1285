"""Moves the module's evaluation EMA networks after every optimizer step."""

from lightning.pytorch import Callback

from cm_lightning.ema import ema_decay, update_ema


class EMAUpdate(Callback):
    """θ_ema ← β θ_ema + (1 − β) θ once per optimizer step (not per accumulated micro-batch).

    The ConsistencyTrainingModule adds this callback itself (``configure_callbacks``), so training
    is correct without any wiring. The EMA weights live in the module, hence in every checkpoint.
    Module callbacks run after the Trainer's, so another callback's ``on_train_batch_end`` still sees
    the EMA of the previous step: read it when the next batch starts (SampleGrid) or in the last
    callback (FinalCheckpoint, like every ModelCheckpoint).
    """

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # also right after a resume

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # no optimizer step since the last call: gradient accumulation
        self._last_step = step
        for decay, ema in zip(pl_module.hparams.ema_decays, pl_module.ema.values()):
            update_ema(ema, pl_module.online, ema_decay(decay, step - 1, pl_module.hparams.ema_warmup))
