"""Post-hoc EMA (EDM2 Section 3, Algorithm 3): the power profiles, the reconstruction, the callback's snapshots
across resumes and DDP ranks, the reconstruction command and the σ_rel sweep."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from callbacks import PostHocEMA, PostHocEMASweep
from cli import main
from cm_lightning import (ConsistencyDistillationModule, ConsistencyTrainingModule, ContinuousConsistencyModule, DiffusionModule,
                          EasyConsistencyTuningModule)
from cm_lightning.core.post_hoc_ema import (MAX_SIGMA_REL, gamma_to_sigma_rel, power_beta, profile_inner_product,
                                            sigma_rel_to_gamma, solve_coefficients, update_power_ema)
from cm_lightning.io import post_hoc_ema as phema
from datamodules import MNISTDataModule
from tests.helpers import make_trainer, module_checkpoint, tiny, tiny_args

ROOT = Path(__file__).parents[1]


# -- the formulas ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2, MAX_SIGMA_REL])
def test_gamma_solves_the_width_equation(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma >= -1e-9
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)  # EDM2 Eq. 123 back


def test_known_exponents_and_bad_widths():
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)  # the plain mean: p(τ) constant
    # σ_rel = 0.05 and 0.10 (EDM2's tracked pair): γ from the cubic by hand, γ³ + 7γ² + (16 − 400)γ + 12 − 400 = 0 …
    for sigma_rel in (0.05, 0.10):
        g, t = sigma_rel_to_gamma(sigma_rel), sigma_rel ** -2
        assert abs(g ** 3 + 7 * g ** 2 + (16 - t) * g + 12 - t) < 1e-6 * t
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match=f"got {bad}"):
            sigma_rel_to_gamma(bad)


def test_power_ema_is_the_integral_of_the_power_profile_over_each_step():
    """After t steps, θ_k's share is (k^(γ+1) − (k−1)^(γ+1)) / t^(γ+1): the profile integrated over (k − 1, k]."""
    gamma, t = 3.7, 9
    thetas = [torch.tensor([float(k) ** 1.5, -2.0 * k]) for k in range(1, t + 1)]
    average = [torch.zeros(2)]
    for k, theta in enumerate(thetas, start=1):
        update_power_ema(average, [theta], gamma, k)
    shares = [(k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1) for k in range(1, t + 1)]
    expected = sum(s * th.double() for s, th in zip(shares, thetas))
    assert torch.allclose(average[0].double(), expected, rtol=1e-6)
    assert power_beta(gamma, 1) == 0.0  # the first update replaces the initial value
    with pytest.raises(ValueError, match="step 0"):
        power_beta(gamma, 0)


def test_profile_inner_product_matches_numerical_integration():
    def profile(tau, t, g):
        return torch.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), torch.zeros_like(tau))

    tau = torch.linspace(0, 700, 2_000_001, dtype=torch.float64)[1:]
    for t_a, g_a, t_b, g_b in [(500.0, 6.9, 700.0, 16.9), (700.0, 2.0, 300.0, 0.5), (400.0, 3.0, 400.0, 3.0)]:
        numeric = torch.trapezoid(profile(tau, t_a, g_a) * profile(tau, t_b, g_b), tau)
        closed = profile_inner_product(*(torch.tensor(v, dtype=torch.float64) for v in (t_a, g_a, t_b, g_b)))
        assert closed.item() == pytest.approx(numeric.item(), rel=1e-4)


def _tracked_run(sigma_rels, steps, every):
    """A weight sequence we control (a drifting random walk), its power EMAs, and snapshots every ``every`` steps."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.zeros(64)
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    averages = [[torch.zeros(64)] for _ in gammas]
    snapshots = []
    for k in range(1, steps + 1):
        theta = theta + 0.05 + torch.randn(64, generator=generator) * 0.2
        for g, a in zip(gammas, averages):
            update_power_ema(a, [theta], g, k)
        if k % every == 0:
            snapshots.append((k, [a[0].clone() for a in averages]))
    return gammas, averages, snapshots


def test_reconstruction_of_a_tracked_profile_is_that_profile_and_an_untracked_one_matches_its_direct_ema():
    gammas, averages, snapshots = _tracked_run([0.05, 0.10, 0.07], steps=400, every=10)
    steps = [k for k, _ in snapshots for _ in gammas[:2]]
    profile_gammas = [g for _ in snapshots for g in gammas[:2]]
    values = [v for _, vs in snapshots for v in vs[:2]]  # the snapshots of the 0.05 and 0.10 averages only

    def rebuilt(gamma, step):
        x = solve_coefficients(steps, profile_gammas, step, gamma)
        assert x.sum().item() == pytest.approx(1.0)
        return sum(float(c) * v.double() for c, v in zip(x, values))

    direct = averages[1][0].double()
    assert torch.allclose(rebuilt(gammas[1], 400), direct, rtol=1e-6, atol=1e-6)  # tracked: itself
    untracked, ema_07 = rebuilt(gammas[2], 400), averages[2][0].double()
    spread = (averages[0][0].double() - averages[1][0].double()).abs().max()  # how far apart the tracked ones are
    assert (untracked - ema_07).abs().max() < 1e-3 * spread  # measured: 3e-5
    # and as of an earlier step, from the snapshots up to it: the 0.10 snapshot there
    earlier = dict(snapshots)[200][1].double()
    x = solve_coefficients(steps[: 2 * 20], profile_gammas[: 2 * 20], 200, gammas[1])
    assert torch.allclose(sum(float(c) * v.double() for c, v in zip(x, values[: 2 * 20])), earlier, rtol=1e-6, atol=1e-6)


# -- the callback, the command and the sweep -------------------------------------------------------------------------

def _fit(tmp_path, steps, callback, ckpt_path=None, data_dir=None, **kwargs):
    """A tiny diffusion model's fit: on random 16×16 images, or (``data_dir``) on MNIST, whose loader resumes exactly."""
    torch.manual_seed(0)
    module = tiny(DiffusionModule, ema_decays=[0.9], image_size=32 if data_dir else 16)
    data = (MNISTDataModule(data_dir=str(data_dir), batch_size=8) if data_dir else
            DataLoader(torch.rand(64, 1, 16, 16) * 2 - 1, batch_size=4))
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[callback], **kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def test_callback_snapshots_reconstruct_the_tracked_average_and_stay_bounded(tmp_path):
    callback = PostHocEMA(sigma_rels=[0.05, 0.1], every_n_steps=2, max_snapshots=4, folder=str(tmp_path / "ph"))
    trainer, module = _fit(tmp_path, 13, callback)
    steps = phema.snapshot_steps(tmp_path / "ph")
    # 2 … 8; at 10, five files: the interval doubles to 4 (2 and 6 go; the newest stays); 12; the end of fit adds
    # 13: five again, the interval doubles to 8 and only 8 and the newest remain
    assert steps == [8, 13] and callback.interval == 8
    assert not [p for p in (tmp_path / "ph").iterdir() if p.name.startswith(".")]  # no temporary files left
    last = phema.read_snapshot(phema.snapshot_path(tmp_path / "ph", 13))
    assert last["sigma_rels"] == [0.05, 0.1] and last["step"] == 13
    assert last["networks"][0].keys() == module.online.state_dict().keys()
    for j, average in enumerate(callback.averages):
        assert all(torch.equal(average[k].cpu(), last["networks"][j][k]) for k in average)
    (result,) = phema.reconstruct(tmp_path / "ph", [0.1])
    assert all(torch.allclose(result.state_dict[k], last["networks"][1][k], atol=1e-6) for k in result.state_dict)
    assert all(not torch.equal(last["networks"][0][k], module.online.state_dict()[k])
               for k in last["networks"][0] if k.endswith("out.2.weight"))


@pytest.mark.parametrize("cls", [ConsistencyTrainingModule, ConsistencyDistillationModule, EasyConsistencyTuningModule,
                                 ContinuousConsistencyModule])
def test_every_method_in_mixed_precision_averages_its_online_network_in_float32(cls, tmp_path):
    distils = cls in (ConsistencyDistillationModule, ContinuousConsistencyModule)
    extra = {"teacher": str(module_checkpoint(tmp_path / "teacher.ckpt"))} if distils else {}
    torch.manual_seed(0)
    module = tiny(cls, ema_decays=[0.9], **extra)
    callback = PostHocEMA(every_n_steps=2, folder=str(tmp_path / "ph"))
    trainer = make_trainer(tmp_path, max_steps=4, precision="bf16-mixed", callbacks=[callback])
    trainer.fit(module, DataLoader(torch.rand(16, 1, 16, 16) * 2 - 1, batch_size=4))
    snapshot = phema.read_snapshot(phema.snapshot_path(tmp_path / "ph", 4))["networks"]
    online = module.online.state_dict()
    assert all(n.keys() == online.keys() for n in snapshot)
    assert all(v.dtype == torch.float32 for n in snapshot for v in n.values() if v.is_floating_point())
    # the two averages weight the steps differently, so they differ once training moved the weights
    assert any(not torch.equal(snapshot[0][k], snapshot[1][k]) for k in online)


def test_bad_settings_are_refused_by_value(tmp_path):
    with pytest.raises(ValueError, match="got 0.5"):
        PostHocEMA(sigma_rels=[0.05, 0.5])
    with pytest.raises(ValueError, match="got 0 and 32"):
        PostHocEMA(every_n_steps=0)
    folder = tmp_path / "ph"
    _fit(tmp_path, 2, PostHocEMA(every_n_steps=1, folder=str(folder)))
    with pytest.raises(FileExistsError, match="another run"):  # a new run never mixes with another run's snapshots
        _fit(tmp_path, 2, PostHocEMA(every_n_steps=1, folder=str(folder)))
    assert phema.snapshot_steps(folder) == [1, 2]
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        next(phema.reconstruct(tmp_path / "empty", [0.1]))
    with pytest.raises(ValueError, match="step 7 is outside"):
        next(phema.reconstruct(folder, [0.1], step=7))


class PerturbAfter(PostHocEMA):
    """Saves a checkpoint at step ``at``, then moves the weights: the steps after it are a lost continuation."""

    def __init__(self, at, path, **kwargs):
        super().__init__(**kwargs)
        self.at, self.path = at, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self.at:
            trainer.save_checkpoint(self.path)
            with torch.no_grad():
                for p in pl_module.online.parameters():
                    p.add_(0.5)


@pytest.mark.slow
def test_snapshots_survive_a_resume_and_the_lost_continuation_is_replaced(fake_mnist, tmp_path):
    kw = dict(sigma_rels=[0.05, 0.1], every_n_steps=2)
    _fit(tmp_path / "c", 8, PostHocEMA(folder=str(tmp_path / "straight"), **kw), data_dir=fake_mnist)
    ckpt = tmp_path / "at4.ckpt"
    _fit(tmp_path / "a", 8, PerturbAfter(4, ckpt, folder=str(tmp_path / "split"), **kw), data_dir=fake_mnist)
    stale = phema.read_snapshot(phema.snapshot_path(tmp_path / "split", 8))["networks"][0]
    resumed = PostHocEMA(**kw)  # no folder given: the checkpoint's
    _fit(tmp_path / "b", 8, resumed, ckpt_path=ckpt, data_dir=fake_mnist)
    assert resumed.folder == tmp_path / "split"
    assert phema.snapshot_steps(tmp_path / "split") == phema.snapshot_steps(tmp_path / "straight") == [2, 4, 6, 8]
    for step in (2, 4, 6, 8):
        a, b = (phema.read_snapshot(phema.snapshot_path(tmp_path / f, step))["networks"] for f in ("straight", "split"))
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x), step
    assert any(not torch.equal(stale[k], a[0][k]) for k in stale)  # the stale step-8 file was replaced


class CountWrites(PostHocEMA):
    def _snapshot(self, step):
        super()._snapshot(step)
        marks = self.folder.parent / "writes"
        marks.mkdir(exist_ok=True)
        (marks / f"{os.getpid()}-{step}").touch()


@pytest.mark.slow
def test_under_ddp_one_rank_writes_each_snapshot_once(tmp_path):
    _fit(tmp_path, 4, CountWrites(every_n_steps=2, folder=str(tmp_path / "ph")), strategy="ddp_spawn", devices=2)
    writes = sorted(p.name for p in (tmp_path / "writes").iterdir())
    assert len({w.split("-")[0] for w in writes}) == 1  # one process wrote …
    assert sorted(int(w.split("-")[1]) for w in writes) == [2, 4]  # … each snapshot once
    assert phema.snapshot_steps(tmp_path / "ph") == [2, 4]


@pytest.mark.slow
def test_command_writes_evaluation_checkpoints_that_sample_the_reconstruction_and_the_sweep_scores_them(fake_mnist, tmp_path):
    run = tmp_path / "runs"
    main(["fit", *tiny_args(fake_mnist, "DiffusionModule"), "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
          f"--trainer.logger.init_args.save_dir={run}", "--trainer.callbacks+=callbacks.PostHocEMA",
          "--trainer.callbacks.every_n_steps=3"])
    version = run / "lightning_logs" / "version_0"
    assert phema.snapshot_steps(version / "post_hoc_ema") == [3, 6]
    last = version / "checkpoints" / "last.ckpt"
    done = subprocess.run([sys.executable, "-m", "cm_lightning.io.post_hoc_ema", str(last), "--sigma-rel", "0.07", "0.2",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "out" / "phema_0.070.ckpt"
    module = DiffusionModule.load_from_checkpoint(written, map_location="cpu")
    (expected,) = phema.reconstruct(version / "post_hoc_ema", [0.07])
    network = module.network(module.hparams.eval_weights)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in expected.state_dict.items())
    assert torch.load(written, weights_only=True)["post_hoc_ema"]["sigma_rel"] == 0.07
    again = subprocess.run([sys.executable, "-m", "cm_lightning.io.post_hoc_ema", str(last), "--sigma-rel", "0.07",
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode != 0 and "never replaced" in again.stderr  # an existing file is kept

    sweep = PostHocEMASweep(sigma_rels=[0.07, 0.2], num_samples=8, samplers=["euler2"], batch_size=8,
                            feature=torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()))
    trained = DiffusionModule.load_from_checkpoint(last, map_location="cpu")
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    data = MNISTDataModule(data_dir=str(fake_mnist), batch_size=8)
    make_trainer(tmp_path, callbacks=[sweep], limit_test_batches=1).test(trained, datamodule=data, ckpt_path=last)
    assert set(sweep.result["fid"]["euler2"]) == {"0.07", "0.2"}
    assert sweep.result["best_sigma_rel"]["euler2"] in (0.07, 0.2)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # weights put back
