"""DDP on CPU (gloo, 2 processes): same weights and curriculum on every rank, different noise, rank-free FID."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import FID
from cm_lightning import (ConsistencyDistillationModule, ConsistencyTrainingModule, ContinuousConsistencyModule, DiffusionModule,
                          EasyConsistencyTuningModule)
from cm_lightning.core.recipes import ct_num_scales, ct_target_ema
from datamodules import MNISTDataModule
from tests.helpers import make_trainer, module_checkpoint, tiny, tiny_args, tiny_net

K = 4


class Recording(ConsistencyTrainingModule):
    """Keeps the noise and σ of every training loss, to compare ranks."""

    def consistency_loss(self, x, z, sigma_n, sigma_next, f=None):
        if f is None:
            self.draws.append((z.clone(), sigma_n.clone()))
        return super().consistency_loss(x, z, sigma_n, sigma_next, f)


class SaveRankState(Callback):
    """Every rank writes its weights, draws and curriculum to ``folder/rank<r>.pt`` at the end of training."""

    def __init__(self, folder: Path):
        self.folder, self.curriculum = folder, []

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        n = m.num_scales(trainer.global_step)
        self.curriculum.append((trainer.global_step, n, m.recipe.target_ema(n)))

    def on_train_end(self, trainer, m):
        state = {k: v.clone() for k, v in m.state_dict().items()}
        torch.save({"state": state, "draws": m.draws, "curriculum": self.curriculum}, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_ranks_share_weights_and_curriculum_but_not_noise(tmp_path):
    torch.manual_seed(0)
    m = Recording(net=tiny_net(dropout=0.1), recipe="ct", ema_decays=[0.9, 0.99])
    m.draws = []
    data = DataLoader(torch.rand(64, 1, 16, 16) * 2 - 1, batch_size=4, shuffle=True)
    initial = {k: v.clone() for k, v in m.state_dict().items()}
    trainer = make_trainer(tmp_path, max_steps=K, strategy="ddp_spawn", devices=2, callbacks=[SaveRankState(tmp_path)])
    trainer.fit(m, data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    worst = max((r0["state"][k] - r1["state"][k]).abs().max().item() for k in r0["state"])
    assert worst == 0.0  # online, target and both EMAs: bit-identical across ranks
    assert all(not torch.equal(r0["state"][f"{net}.net.out.2.weight"], initial[f"{net}.net.out.2.weight"])
               for net in ("online", "target", "ema.0", "ema.1"))  # every copy moved
    expected = [(k, ct_num_scales(k, K), ct_target_ema(ct_num_scales(k, K))) for k in range(K)]
    assert r0["curriculum"] == r1["curriculum"] == expected
    assert len(r0["draws"]) == len(r1["draws"]) == K
    assert all(not torch.equal(z0, z1) for (z0, _), (z1, _) in zip(r0["draws"], r1["draws"]))
    sigmas0, sigmas1 = (torch.cat([s for _, s in r["draws"][1:]]) for r in (r0, r1))  # step 0 has one pair: N(0) = 2
    assert not torch.equal(sigmas0, sigmas1)


class Records:
    """Keeps the first noise value of every training batch, and writes its state at the end of training."""

    def losses(self, x, labels=None):
        with torch.random.fork_rng():
            self.draws.append(torch.randn(1).item())  # the first draw of this batch's seeded stream
        return super().losses(x) if labels is None else super().losses(x, labels)

    def on_train_end(self):
        state = {k: v.clone() for k, v in self.state_dict().items()}
        teacher = getattr(self, "_teacher", None)
        teacher = {k: v.clone() for k, v in teacher.net.state_dict().items()} if teacher is not None else {}
        torch.save({"state": state, "draws": self.draws, "teacher": teacher}, self.folder / f"rank{self.global_rank}.pt")


class RecordingDiffusion(Records, DiffusionModule):
    pass


class RecordingDistillation(Records, ConsistencyDistillationModule):
    pass


class RecordingTuning(Records, EasyConsistencyTuningModule):
    pass


class RecordingContinuous(Records, ContinuousConsistencyModule):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("cls, conditional", [
    (RecordingDiffusion, {}), (RecordingDistillation, {}), (RecordingTuning, {}), (RecordingContinuous, {}),
    (RecordingDiffusion, {"label_dropout": 0.2}), (RecordingContinuous, {"guidance_scale": 2.0}),
], ids=["edm", "cd", "ect", "scd", "edm_labels", "scd_guided"])
def test_ddp_spawn_diffusion_distillation_and_tuning_ranks_share_weights_but_not_noise(cls, conditional, tmp_path):
    """sCD: the JVP runs on the network inside DDP's wrapper, the gradient forward through it, so ranks stay equal.
    Class-conditional runs: labelled batches, label dropout and a guided teacher keep the ranks equal too."""
    net = {"num_classes": 3} if conditional else {}
    extra = {RecordingDistillation: "teacher", RecordingTuning: "init_from", RecordingContinuous: "teacher"}.get(cls)
    teacher = {**net, "label_dropout": 0.1} if conditional else {}  # (guidance needs a teacher trained with it)
    extra = {extra: str(module_checkpoint(tmp_path / "teacher.ckpt", **teacher))} if extra else {}
    torch.manual_seed(0)
    m = tiny(cls, dropout=0.1, ema_decays=[0.9], **extra, **net, **conditional)
    m.draws, m.folder = [], tmp_path
    initial = m.state_dict()["ema.0.net.out.2.weight"].clone()
    images = torch.rand(32, 1, 16, 16) * 2 - 1
    data = DataLoader(TensorDataset(images, torch.arange(32) % 3) if conditional else images, batch_size=4, shuffle=True)
    make_trainer(tmp_path, max_steps=2, strategy="ddp_spawn", devices=2).fit(m, data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert max((r0["state"][k] - r1["state"][k]).abs().max().item() for k in r0["state"]) == 0.0
    assert not torch.equal(r0["state"]["ema.0.net.out.2.weight"], initial)
    assert len(r0["draws"]) == 2 and all(a != b for a, b in zip(r0["draws"], r1["draws"]))
    if "teacher" in extra:  # each rank read the same teacher from its path, and kept it out of the synchronised state
        saved = torch.load(extra["teacher"], weights_only=True)["state_dict"]
        assert all(torch.equal(v, r1["teacher"][k]) and torch.equal(v, saved[f"ema.0.net.{k}"]) for k, v in r0["teacher"].items())
        assert not any("teacher" in k for k in r0["state"])


class Pixels(nn.Module):
    """A fixed random projection of the pixels: a tiny feature extractor for FID tests."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32 * 32, self.num_features)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.num_features, 32 * 32, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.proj(x.flatten(1))


def fid_test(tmp_path, fake_mnist, **trainer_kwargs) -> dict[str, float]:
    torch.manual_seed(0)
    m = tiny(image_size=32, channels=1, eval_weights="online")
    with torch.no_grad():
        m.online.net.out[2].weight.normal_(0, 0.3)  # a generator that is not the zero-init identity
    dm = MNISTDataModule(str(fake_mnist), batch_size=7)
    fid = FID(num_samples=23, batch_size=5, feature=Pixels(), samplers=[[80.0], [80.0, 2.0]])
    (results,) = make_trainer(tmp_path, callbacks=[fid], **trainer_kwargs).test(m, datamodule=dm, verbose=False)
    return results


@pytest.mark.slow
def test_fid_over_two_ranks_equals_one_process(tmp_path, fake_mnist):
    one = fid_test(tmp_path, fake_mnist, devices=1)
    two = fid_test(tmp_path, fake_mnist, devices=2, strategy="ddp_spawn")
    assert one.keys() == two.keys() >= {"test/fid_1step", "test/fid_2step", "test/kid_1step", "test/kid_2step"}
    for key in ("test/fid_1step", "test/fid_2step"):
        assert one[key] > 0
        assert two[key] == pytest.approx(one[key], rel=1e-5)  # 23 images in all, the same 23, whatever the ranks
    for key in ("test/kid_1step", "test/kid_2step"):  # the same images; the ranks order the real ones otherwise,
        assert abs(two[key] - one[key]) < 2 * one[f"{key}_std"]  # so KID's random subsets differ: within its spread


@pytest.mark.slow
def test_real_ddp_launch_through_the_cli(fake_mnist, tmp_path):
    args = [
        sys.executable, "cli.py", "fit", *tiny_args(fake_mnist), "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.callbacks+=callbacks.SampleGrid",
        "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.num_samples=4",
    ]
    done = subprocess.run(args, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert done.stdout.count(f"Run folder: {run}\n") == 1  # said once, by rank zero
    assert not (tmp_path / "runs" / "lightning_logs" / "version_1").exists()  # one run, not one per rank
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Images("samples/sigmas_80")] == [2, 4]  # written once per step, by rank zero
    assert [e.step for e in events.Scalars("train/num_scales")] == [0, 1, 2, 3]
    assert sorted(p.name for p in (run / "samples").iterdir()) == sorted(
        f"step{s:07d}_sigmas_{n}.png" for s in (2, 4) for n in ("80", "80-0.8")
    )


@pytest.mark.slow
def test_sigterm_to_rank_zero_stops_every_rank_after_a_saved_step(fake_mnist, tmp_path):
    """What Kubernetes or Docker do (SIGTERM to the launching process only): every rank agrees to stop after the
    same step, ``last.ckpt`` holds it, no rank is left behind, and the job exits 143 to be restarted."""
    args = [
        sys.executable, "cli.py", "fit", *tiny_args(fake_mnist), "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.max_steps=1000", "--trainer.limit_val_batches=0", "--checkpoint.every_n_train_steps=5000",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    proc = subprocess.Popen(args, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    deadline = time.time() + 240
    while not (run / "hparams.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
        deadline = time.time() + 20
        while group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        left = group_alive(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind would hold the test's port and cores
    assert not left, "a rank was still running after the launcher exited"
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM: finishing this step" in out
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped < 1000



@pytest.mark.parametrize("strategy", ["ModelParallelStrategy", "FSDPStrategy"])
def test_sharded_strategies_are_refused_naming_what_works(strategy):
    """FSDP would shard the online network but not the EMAs, θ⁻ or teacher beside it: refused before any wrapping.
    (Given to the module's own check: a real fit would leave a process group, and its port, open in this process.)"""
    from types import SimpleNamespace
    import lightning.pytorch.strategies as strategies

    m = tiny()
    m._trainer = SimpleNamespace(strategy=getattr(strategies, strategy)())
    with pytest.raises(ValueError, match=rf"{strategy} is not supported.*What works: DDP"):
        m.setup("fit")


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
