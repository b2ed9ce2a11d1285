"""Ctrl-C during ``fit`` finishes the step, saves ``last.ckpt`` and stops; a second Ctrl-C aborts at once.
SLURM's requeue signal (SIGUSR1) does the same, then requeues the job."""

import os
import signal
import subprocess
import threading

from lightning.fabric.plugins.environments import SLURMEnvironment
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

    SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) stops the same way and then, under SLURM, requeues the job
    (``scontrol requeue``, from global rank zero). This replaces Lightning's SLURM handler, which saves
    ``hpc_ckpt_N.ckpt`` wherever in the step the signal lands, into the working directory, where
    ``--ckpt_path last`` does not look: a requeued run went back to the last periodic checkpoint.
    """

    def __init__(self):
        self._interrupted = False
        self._requeue = False
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._interrupted = self._requeue = False
        checkpoint = trainer.checkpoint_callback
        if not (isinstance(checkpoint, FinalCheckpoint) and checkpoint.save_last):
            rank_zero_warn("GracefulInterrupt: without FinalCheckpoint(save_last=True) Ctrl-C stops without saving")
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT, *_requeue_signal(trainer))
            self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        if signum != signal.SIGINT:  # SLURM's warning before the time limit
            self._interrupted = self._requeue = True
            then = " and requeueing the job" if "SLURM_JOB_ID" in os.environ else ""
            rank_zero_info(f"\n{signal.Signals(signum).name}: finishing this step, saving last.ckpt{then}")
            return
        if self._interrupted:  # the second Ctrl-C: the user means it
            self._restore()
            raise KeyboardInterrupt
        self._interrupted = True
        rank_zero_info("\nCtrl-C: finishing this step and saving last.ckpt (press Ctrl-C again to abort now)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _inside_accumulation(trainer, batch_idx):
            return  # stopping here would drop the micro-batches taken
        if trainer.strategy.reduce_boolean_decision(self._interrupted, all=False):
            trainer.should_stop = True  # FinalCheckpoint, the last callback, saves this step

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self._interrupted and trainer.checkpoint_callback is not None:
            rank_zero_info(f"stopped at step {trainer.global_step}: {trainer.checkpoint_callback.last_model_path};"
                           " resume with --ckpt_path last")
        requeue = trainer.strategy.reduce_boolean_decision(self._requeue, all=False)
        if requeue and "SLURM_JOB_ID" in os.environ and trainer.is_global_zero:
            _requeue_slurm_job()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _inside_accumulation(trainer, batch_idx: int) -> bool:
    """Whether the batch just taken leaves a gradient accumulation unfinished: the optimizer steps after every
    ``accumulate_grad_batches`` batches, and after the epoch's last batch unless the strategy accumulates itself."""
    taken = batch_idx + 1
    last = taken == trainer.num_training_batches and not trainer.strategy.handles_gradient_accumulation
    return taken % trainer.accumulate_grad_batches != 0 and not last


def _requeue_signal(trainer) -> tuple[int, ...]:
    """SIGUSR1, or what ``SLURMEnvironment(requeue_signal=...)`` says; none if its ``auto_requeue`` is off."""
    # Private: no public API gives a single-device run's cluster environment; Lightning's own handler reads this.
    environment = trainer._accelerator_connector.cluster_environment  # tests/test_lightning_private_api.py
    if isinstance(environment, SLURMEnvironment):
        return (environment.requeue_signal,) if environment.auto_requeue and environment.requeue_signal else ()
    return (signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()  # no SIGUSR1 on Windows


def _requeue_slurm_job() -> None:
    """Put this SLURM job (or array task) back in the queue; SLURM then ends the running one."""
    job = os.environ["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        error = result.stderr.strip() if result.returncode else None
    except OSError as err:
        error = str(err)
    if error is None:
        rank_zero_info(f"requeued SLURM job {job}")
    else:
        rank_zero_warn(f"scontrol requeue {job} failed ({error}); submit the job again with --ckpt_path last")
