"""Ctrl-C during ``fit`` finishes the step, saves ``last.ckpt`` and stops; a second Ctrl-C aborts at once."""

import signal
import threading

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.checkpoint import FinalCheckpoint


class GracefulInterrupt(Callback):
    """Turns SIGINT into a clean stop at the next step boundary, with a checkpoint a resume can trust.

    Lightning's own handling of Ctrl-C stops wherever the signal lands (possibly between the optimizer
    step and the EMA update) and saves nothing, so a run interrupted before its first periodic
    checkpoint is lost. Here the signal only raises a flag; after the current optimizer step every
    rank agrees to stop and sets ``trainer.should_stop``, and ``FinalCheckpoint`` (the CLI's
    ``--checkpoint``) writes ``last.ckpt`` at the end of that step, after the EMA update and inside the
    epoch, as a periodic checkpoint would be. ``--ckpt_path last`` resumes it exactly.
    """

    def __init__(self):
        self._interrupted = False
        self._previous = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._interrupted = False
        checkpoint = trainer.checkpoint_callback
        if not (isinstance(checkpoint, FinalCheckpoint) and checkpoint.save_last):
            rank_zero_warn("GracefulInterrupt: without FinalCheckpoint(save_last=True) Ctrl-C stops without saving")
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._interrupted:  # the second Ctrl-C: the user means it
            self._restore()
            raise KeyboardInterrupt
        self._interrupted = True
        rank_zero_info("\nCtrl-C: finishing this step and saving last.ckpt (press Ctrl-C again to abort now)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.reduce_boolean_decision(self._interrupted, all=False):
            trainer.should_stop = True  # FinalCheckpoint, the last callback, saves this step

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self._interrupted and trainer.checkpoint_callback is not None:
            rank_zero_info(f"stopped at step {trainer.global_step}: {trainer.checkpoint_callback.last_model_path};"
                           " resume with --ckpt_path last")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
