"""Exact resume: 2K steps straight equal K steps + a new process resuming K steps; SIGKILL leaves a usable run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.interrupt import _requeue_signal
from cli import main
from tests.helpers import tiny_args

K = 5  # mid-epoch: 118 training images, batch 8 → 14 batches per epoch
ROOT = Path(__file__).parents[1]


def resume_args(data_dir: Path, save_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "fit", *tiny_args(data_dir), "--model.recipe=ct", "--model.net.dropout=0.1", "--model.ema_decays=[0.9, 0.99]",
        f"--model.total_steps={2 * K}", "--model.lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
        f"--model.lr_scheduler.T_max={2 * K}", f"--trainer.max_steps={max_steps}", "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0", f"--checkpoint.every_n_train_steps={K}",
        f"--trainer.logger.init_args.save_dir={save_dir}", *extra,
    ]


def run_dir(save_dir: Path) -> Path:
    return save_dir / "lightning_logs" / "version_0"


def straight_run(data_dir: Path, save_dir: Path, steps: int, *extra: str) -> Path:
    """The ``last.ckpt`` of an uninterrupted run of ``steps`` steps, to compare a resumed run with."""
    main(resume_args(data_dir, save_dir, steps, *extra))
    return run_dir(save_dir) / "checkpoints" / "last.ckpt"


def max_weight_difference(a: Path, b: Path) -> float:
    """Over online, target θ⁻ and every EMA network."""
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def scalars(run: Path, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Scalars(tag)}


@pytest.mark.slow
def test_resumed_run_matches_the_straight_run(fake_mnist, tmp_path):
    straight_ckpt = straight_run(fake_mnist, tmp_path / "straight", 2 * K)
    main(resume_args(fake_mnist, tmp_path / "split", K))
    first = run_dir(tmp_path / "split")
    done = subprocess.run(  # a new process, as after a crash or a requeue
        [sys.executable, "cli.py", *resume_args(fake_mnist, tmp_path / "split", 2 * K), "--ckpt_path=last"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "split" / "lightning_logs" / "version_1").exists()  # "last" continued version_0

    straight, resumed = torch.load(straight_ckpt), torch.load(first / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 2 * K
    assert max_weight_difference(straight_ckpt, first / "checkpoints" / "last.ckpt") <= 1e-6
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]
    for tag in ("train/num_scales", "train/target_ema", "train/loss", "lr-Adam"):
        expected, got = scalars(run_dir(tmp_path / "straight"), tag), scalars(first, tag)
        assert sorted(got) == list(range(2 * K))
        assert got == pytest.approx(expected, rel=1e-5), tag


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_between_periodic_saves(fake_mnist, tmp_path):
    main(resume_args(fake_mnist, tmp_path / "split", K + 2))  # periodic saves every K steps: one at K, none at the end
    folder = run_dir(tmp_path / "split") / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == [f"epoch=0-step={K}.ckpt", "last.ckpt"]
    periodic = torch.load(folder / f"epoch=0-step={K}.ckpt", weights_only=True)
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert (periodic["global_step"], last["global_step"]) == (K, K + 2)  # Lightning alone leaves last.ckpt at K
    assert max_weight_difference(folder / f"epoch=0-step={K}.ckpt", folder / "last.ckpt") > 0

    # saved inside the epoch, after the EMA update: going on from it is the same as never stopping
    main(resume_args(fake_mnist, tmp_path / "split", 2 * K, "--ckpt_path=last"))
    assert max_weight_difference(straight_run(fake_mnist, tmp_path / "straight", 2 * K), folder / "last.ckpt") == 0.0


@pytest.mark.slow
def test_a_resumed_run_keeps_the_run_seed_whatever_seed_the_relaunch_gives(fake_mnist, tmp_path):
    straight_ckpt = straight_run(fake_mnist, tmp_path / "straight", 2 * K, "--seed_everything=0")
    main(resume_args(fake_mnist, tmp_path / "split", K, "--seed_everything=0"))
    main(resume_args(fake_mnist, tmp_path / "split", 2 * K, "--seed_everything=123", "--ckpt_path=last"))
    resumed = run_dir(tmp_path / "split") / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["run_seed"] == 0
    assert max_weight_difference(straight_ckpt, resumed) == 0.0  # data order, noise and dropout as in one run


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(fake_mnist, tmp_path):
    every = "--checkpoint.every_n_train_steps=2"
    args = [sys.executable, "cli.py", *resume_args(fake_mnist, tmp_path, 400, every)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = run_dir(tmp_path) / "checkpoints"
    deadline = time.time() + 240
    while not list(folder.glob("epoch=*-step=*.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # well inside the run, between or during checkpoint writes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped = torch.load(folder / "last.ckpt", weights_only=True)["global_step"]  # complete, loadable
    assert 0 < stopped < 400
    for path in folder.glob("*.ckpt"):
        torch.load(path, weights_only=True)
    main(resume_args(fake_mnist, tmp_path, stopped + 4, every, "--ckpt_path=last"))
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == stopped + 4  # the same file goes on
    assert not list(folder.glob("last-v*.ckpt"))


def slurm_env(tmp_path: Path) -> dict[str, str]:
    """What ``srun`` sets for one task of job 42, and an ``scontrol`` on PATH that logs its arguments."""
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "cm", "SLURM_JOB_ID": "42", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}
    return {**os.environ, **slurm, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("environment, expected", [
    (None, (signal.SIGUSR1,)), (SLURMEnvironment(), (signal.SIGUSR1,)),
    (SLURMEnvironment(requeue_signal=signal.SIGHUP), (signal.SIGHUP,)), (SLURMEnvironment(auto_requeue=False), ()),
])
def test_requeue_signal_follows_lightnings_slurm_settings(environment, expected, monkeypatch, tmp_path):
    for key, value in slurm_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, plugins=[environment] if environment else None)
    assert isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)  # detected from srun's variables
    assert _requeue_signal(trainer) == expected


STOPPED = {signal.SIGINT: ("Ctrl-C", 0), signal.SIGUSR1: ("SIGUSR1", 0),
           signal.SIGTERM: ("SIGTERM", 128 + signal.SIGTERM)}  # (what the run says, its exit status)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1, signal.SIGTERM],
                         ids=["ctrl-c", "slurm-requeue", "sigterm-preemption"])
def test_stop_signal_saves_last_checkpoint_and_the_run_resumes_exactly(fake_mnist, tmp_path, signum):
    env = slurm_env(tmp_path) if signum == signal.SIGUSR1 else None
    args = [sys.executable, "cli.py", *resume_args(fake_mnist, tmp_path, 400, "--checkpoint.every_n_train_steps=1000",
                                                   f"--trainer.default_root_dir={tmp_path}")]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = run_dir(tmp_path)
    deadline = time.time() + 240
    while not (run / "hparams.yaml").exists() and time.time() < deadline:  # written as training starts
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    said, status = STOPPED[signum]
    # a clean stop, before the first periodic checkpoint; a preempted job's status asks its supervisor for a restart
    assert proc.returncode == status, out[-3000:]
    assert said + ": finishing this step" in out
    if signum == signal.SIGUSR1:
        assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"
        assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # not Lightning's mid-step save, which "last" ignores
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped < 400
    main(resume_args(fake_mnist, tmp_path, stopped + 3, "--ckpt_path=last"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped + 3
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))  # one last.ckpt, not a second beside it
    # saved after the EMA update, inside the epoch: the same weights as a run that was never interrupted
    straight = straight_run(fake_mnist, tmp_path / "straight", stopped + 3, "--checkpoint.every_n_train_steps=1000")
    assert max_weight_difference(straight, run / "checkpoints" / "last.ckpt") == 0.0


class SigintAtBatch(Callback):
    """Presses Ctrl-C as batch ``batch`` of the first epoch starts (given to the CLI as a callback)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_ctrl_c_inside_gradient_accumulation_stops_after_the_optimizer_step(fake_mnist, tmp_path):
    accumulate = ["--trainer.accumulate_grad_batches=2", "--checkpoint.every_n_train_steps=1000"]
    # batch 4 is the first half of step 3: stopping after it would lose it on resume
    main(resume_args(fake_mnist, tmp_path, 400, *accumulate, "--trainer.callbacks+=tests.test_resume.SigintAtBatch",
                     "--trainer.callbacks.batch=4"))
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    main(resume_args(fake_mnist, tmp_path, 2 * K, *accumulate, "--ckpt_path=last"))
    assert max_weight_difference(straight_run(fake_mnist, tmp_path / "straight", 2 * K, *accumulate), last) == 0.0


def wait_for(condition, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.1)
    assert condition(), f"not within {seconds} s"


def stop_with_sigterm(proc: subprocess.Popen) -> float:
    """Sends SIGTERM; the seconds until the process has exited."""
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # still going: stop it, fail the test
        proc.kill()
        proc.communicate()
        return float("inf")
    return time.time() - sent


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_signal_during_predict_leaves_only_complete_files(trained_run, fake_mnist, tmp_path, signum):
    from torchvision.io import decode_png, read_file

    out = tmp_path / "samples"
    args = [sys.executable, "cli.py", "predict", *tiny_args(fake_mnist), "--trainer.logger=false",
            f"--ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "--data.predict_num_samples=100000",
            "--data.batch_size=50", f"--writer.output_dir={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list(out.glob("*.png"))) >= 200)
    if signum == signal.SIGKILL:
        proc.kill()
        proc.wait()
    else:
        assert stop_with_sigterm(proc) < 10  # Lightning's handler alone lets predict run through all 100,000
        assert proc.returncode == 128 + signal.SIGTERM
        assert not list(out.glob(".*.tmp"))  # a write the signal stopped removed its temporary file
    pngs = sorted(out.glob("*.png"))
    assert 200 <= len(pngs) < 100000 and not (out / "samples.npz").exists()  # no .npz passed off as complete
    for png in pngs:  # every file under a final name decodes: nothing half-written
        assert decode_png(read_file(str(png))).shape == (1, 32, 32)


@pytest.mark.slow
def test_a_resumed_diffusion_run_matches_the_straight_run(fake_mnist, tmp_path):
    def args(save_dir: Path, steps: int, *extra: str) -> list[str]:
        return ["fit", *tiny_args(fake_mnist, "DiffusionModule"), "--model.net.dropout=0.1", "--model.ema_decays=[0.9]",
                "--model.lr_scheduler=cm_lightning.CosineDecay", "--model.lr_scheduler.total_steps=10",
                f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--checkpoint.every_n_train_steps=4",
                f"--trainer.logger.init_args.save_dir={save_dir}", *extra]

    main(args(tmp_path / "straight", 2 * K))
    main(args(tmp_path / "split", K))
    main(args(tmp_path / "split", 2 * K, "--seed_everything=7", "--ckpt_path=last"))
    straight, resumed = (run_dir(tmp_path / d) / "checkpoints" / "last.ckpt" for d in ("straight", "split"))
    assert torch.load(resumed, weights_only=True)["global_step"] == 2 * K
    assert max_weight_difference(straight, resumed) == 0.0  # online and EMA; dropout masks and noise included


class MarkTestEpochEnd(Callback):
    """Creates ``path`` when the test epoch ends, just before the FID callback starts generating."""

    def __init__(self, path: str):
        self.path = path

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        Path(self.path).touch()


@pytest.mark.slow
def test_sigterm_during_test_stops_the_fid_generation_at_once(trained_run, fake_mnist, tmp_path):
    marker = tmp_path / "generating"
    args = [sys.executable, "cli.py", "test", *tiny_args(fake_mnist), "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
            "--trainer.callbacks+=tests.test_resume.MarkTestEpochEnd", f"--trainer.callbacks.path={marker}",
            "--trainer.callbacks+=callbacks.FID", "--trainer.callbacks.feature=mnist",
            "--trainer.callbacks.test_num_samples=1000000"]  # an hour of generation here
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(marker.exists)
    time.sleep(1)  # inside the generation
    assert stop_with_sigterm(proc) < 10
    assert proc.returncode == 128 + signal.SIGTERM
