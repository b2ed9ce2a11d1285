"""Ctrl-C during ``fit`` finishes the step, saves ``last.ckpt`` and stops; a second Ctrl-C aborts at once.
SIGTERM (a preemption: Kubernetes, Docker, systemd, spot instances) does the same, then exits with status 143;
SLURM's requeue signal (SIGUSR1) does the same, then requeues the job. SIGTERM during ``test``, ``validate`` and
``predict`` stops at once (status 143): they have nothing to save, and their files are written atomically."""

import os
import signal
import subprocess
import threading
from functools import partial

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

    SIGTERM stops the same way, and ``terminated`` tells the CLI to exit with status 143 (128 + SIGTERM, what
    the signal's default action reports) rather than 0, so a supervisor that restarts failed jobs restarts this
    one, with ``--ckpt_path last``. Lightning's own SIGTERM handler ends ``fit`` at the next step without saving.
    A fit's in-run validation (its FID samples) runs to its end before the step's checkpoint is written: a
    grace period shorter than that loses the step, as it would lose any unsaved work.

    SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) stops the same way and then, under SLURM, requeues the job
    (``scontrol requeue``, from global rank zero). This replaces Lightning's SLURM handler, which saves
    ``hpc_ckpt_N.ckpt`` wherever in the step the signal lands, into the working directory, where
    ``--ckpt_path last`` does not look: a requeued run went back to the last periodic checkpoint.

    Outside ``fit``, SIGTERM raises :class:`Terminated` where the program is (after the running tensor
    operation): Lightning's handler would only mark it, and ``test`` then generated its 10,000 FID samples to
    the end. Every file the project writes goes through ``atomic_write``, so none is left half-written.
    """

    def __init__(self):
        self._interrupted = False
        self._requeue = False
        self._terminated = False
        self.terminated = False  # after fit: every rank agreed to stop because of a SIGTERM
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._interrupted = self._requeue = self._terminated = self.terminated = False
        checkpoint = trainer.checkpoint_callback
        if not (isinstance(checkpoint, FinalCheckpoint) and checkpoint.save_last):
            rank_zero_warn("GracefulInterrupt: without FinalCheckpoint(save_last=True) Ctrl-C stops without saving")
        self._install((signal.SIGINT, signal.SIGTERM, *_requeue_signal(trainer)), self._handle)

    def _install(self, signals: tuple, handler) -> None:
        self._restore()
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, handler) for sig in signals}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGTERM:
            if not self._terminated:
                rank_zero_info("\nSIGTERM: finishing this step, saving last.ckpt, then exiting with status 143")
            self._interrupted = self._terminated = True
            return
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
            # (a second collective only when stopping: every rank exits with the same status)
            self.terminated = trainer.strategy.reduce_boolean_decision(self._terminated, all=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self._interrupted and trainer.checkpoint_callback is not None:
            rank_zero_info(f"stopped at step {trainer.global_step}: {trainer.checkpoint_callback.last_model_path};"
                           " resume with --ckpt_path last")
        requeue = trainer.strategy.reduce_boolean_decision(self._requeue, all=False)
        if requeue and "SLURM_JOB_ID" in os.environ and trainer.is_global_zero:
            _requeue_slurm_job()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":  # a fit's validation keeps the fit's handlers: the step is saved after it
            self._install((signal.SIGTERM,), partial(_terminate, trainer))

    def on_test_start(self, trainer, pl_module) -> None:
        self._install((signal.SIGTERM,), partial(_terminate, trainer))

    def on_predict_start(self, trainer, pl_module) -> None:
        self._install((signal.SIGTERM,), partial(_terminate, trainer))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Terminated(SystemExit):
    """SIGTERM during ``test``, ``validate`` or ``predict``: the command stops with status 143."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _terminate(trainer, signum, frame) -> None:
    """Stop a ``test``/``validate``/``predict`` now; the processes a launcher started get the signal too (as
    Lightning's handler forwards it), so no rank waits in a collective for one that has gone."""
    rank_zero_info("\nSIGTERM: stopping now (nothing to save outside fit)")
    if trainer.strategy.launcher is not None:
        trainer.strategy.launcher.kill(signum)
    raise Terminated


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
