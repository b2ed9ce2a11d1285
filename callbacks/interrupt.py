"""Ctrl-C during ``fit`` finishes the step, saves ``last.ckpt`` and stops; a second Ctrl-C aborts at once."""

import signal
import threading
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info


class GracefulInterrupt(Callback):
    """Turns SIGINT into a clean stop at the next step boundary, with a checkpoint a resume can trust.

    Lightning's own handling of Ctrl-C stops wherever the signal lands (possibly between the optimizer
    step and the EMA update) and saves nothing, so a run interrupted before its first periodic
    checkpoint is lost. Here the signal only raises a flag; after the current optimizer step every
    rank agrees to stop, ``last.ckpt`` is written as a periodic checkpoint would be, and ``fit``
    returns. ``--ckpt_path last`` resumes it exactly.
    """

    def __init__(self):
        self._interrupted = False
        self._previous = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._interrupted:  # the second Ctrl-C: the user means it
            self._restore()
            raise KeyboardInterrupt
        self._interrupted = True
        rank_zero_info("\nCtrl-C: finishing this step and saving last.ckpt (press Ctrl-C again to abort now)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._interrupted, all=False):
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath is not None:
            path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            rank_zero_info(f"saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
