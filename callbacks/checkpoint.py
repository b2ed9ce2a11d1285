"""Lightning's ModelCheckpoint, with ``last.ckpt`` always holding the final step of a finished ``fit``."""

from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last`` also covers the steps after the last periodic save.

    Since Lightning 2.6 ``last.ckpt`` is written only together with a periodic checkpoint, and at the
    end of training only if none was written during the run. A run of ``max_steps=3400`` saving every
    500 steps therefore ended with ``last.ckpt`` at step 3000: the last 400 steps (the end of the
    learning-rate decay) were lost, and ``test``, ``predict`` and ``--ckpt_path last`` used the older
    weights. Here a finished ``fit`` writes ``last.ckpt`` at its final step unless that step is saved.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
