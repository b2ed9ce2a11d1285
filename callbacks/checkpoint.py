"""Lightning's ModelCheckpoint, with ``last.ckpt`` always holding the final step of ``fit``."""

from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last`` also covers the steps after the last periodic save.

    Since Lightning 2.6 ``last.ckpt`` is written only together with a periodic checkpoint, and at the
    end of training only if none was written during the run. A run of ``max_steps=3400`` saving every
    500 steps therefore ended with ``last.ckpt`` at step 3000: the last 400 steps (the end of the
    learning-rate decay) were lost, and ``test``, ``predict`` and ``--ckpt_path last`` used the older
    weights. Here the final step is always in ``last.ckpt``.

    When ``fit`` is about to stop inside an epoch (``max_steps`` reached, or ``trainer.should_stop`` set
    by Ctrl-C or another callback), the file is written at the end of that step, like a periodic one:
    after every other callback's batch-end work (the EMA update) and with the loop position inside the
    epoch, so ``--ckpt_path last`` resumes exactly. A run that ends with its epoch is saved at the end.
    """

    _restoring = True  # set per restore by on_load_checkpoint

    # ModelCheckpoint's protected methods (_should_skip_saving_checkpoint, _save_last_checkpoint, _monitor_candidates)
    # are its subclassing interface: no public call writes last.ckpt with its bookkeeping. Checked by
    # tests/test_lightning_private_api.py.

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stops = trainer.should_stop and trainer.global_step >= (trainer.min_steps or 0)
        last_step = stops or 0 <= trainer.max_steps <= trainer.global_step
        if last_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # Lightning's rule: this step not saved yet, etc.
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._restoring = trainer.state.fn == "fit"

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the bookkeeping in ``fit`` only: ``test``/``predict`` save nothing, so they need none
        (and Lightning would warn that their fresh run folder differs from the checkpoint's)."""
        if self._restoring:
            super().load_state_dict(state_dict)
