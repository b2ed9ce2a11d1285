"""Consistency distillation: the teacher's ODE step, the CD loss on an analytic Gaussian teacher, the frozen
teacher in real Trainer steps, its checks, exact resume with the teacher read from its path."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from cli import main
from cm_lightning import ConsistencyDistillationModule, ConsistencyTrainingModule
from cm_lightning.core.karras import karras_sigmas
from cm_lightning.core.losses import squared_l2
from cm_lightning.core.objectives import ConsistencyDistillation
from cm_lightning.core.ode import ode_step
from tests.helpers import make_trainer, module_checkpoint, tiny, tiny_args

S = 0.5  # data ~ N(0, S² I)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def gaussian_denoiser(x, sigma):
    """The ideal denoiser for data ~ N(0, S² I): D(x, σ) = S² x / (S² + σ²)."""
    return S**2 * x / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


def exact_consistency(s: float = S):
    """f(x, t) = x √(s² + σ_min²)/√(s² + t²): the probability-flow ODE of N(0, s² I) data, run from t to σ_min."""
    return lambda x, t: x * math.sqrt(s**2 + SIGMA_MIN**2) / (s**2 + t.reshape(-1, 1, 1, 1) ** 2).sqrt()


@pytest.mark.parametrize("heun", [True, False])
def test_teacher_ode_step_matches_hand_computed_values(heun):
    x, t, t_next = 1.5, 2.0, 1.0
    d = (x - S**2 * x / (S**2 + t**2)) / t  # Euler slope at (x, t)
    expected = x + (t_next - t) * d
    if heun:  # the slope at the Euler point, then the average of both slopes
        d_next = (expected - S**2 * expected / (S**2 + t_next**2)) / t_next
        expected = x + (t_next - t) * (d + d_next) / 2
    got = ode_step(gaussian_denoiser, torch.full((1, 1, 2, 2), x, dtype=torch.float64),
                   torch.tensor([t], dtype=torch.float64), torch.tensor([t_next], dtype=torch.float64), heun=heun)
    assert got.flatten().tolist() == pytest.approx([expected] * 4, rel=1e-12)
    assert expected == pytest.approx(x * math.sqrt(S**2 + t_next**2) / math.sqrt(S**2 + t**2), rel=0.05)  # near the ODE


def cd_loss_over_all_pairs(f, num_scales: int, heun: bool = True) -> float:
    """The mean CD loss of f with the Gaussian teacher, every σ pair, fixed data and noise (float64)."""
    cd = ConsistencyDistillation(squared_l2, num_scales, SIGMA_MIN, SIGMA_MAX, RHO, heun)
    index = torch.arange(num_scales - 1).repeat(8)
    g = torch.Generator().manual_seed(0)
    x = S * torch.randn(len(index), 1, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(len(index), 1, 4, 4, generator=g, dtype=torch.float64)
    sigma_n, sigma_next = (s.double() for s in cd.pair(index))
    return cd.loss(f, f, gaussian_denoiser, x, z, sigma_n, sigma_next).mean().item()


def test_cd_loss_of_the_exact_consistency_function_is_solver_error_only():
    heun = {n: cd_loss_over_all_pairs(exact_consistency(), n) for n in (18, 36, 72)}
    euler = {n: cd_loss_over_all_pairs(exact_consistency(), n, heun=False) for n in (18, 36, 72)}
    assert heun[18] < 2e-5
    for n in (18, 36):  # halving the step: squared local error h³ (Heun) falls ~2⁶, h² (Euler) ~2⁴; measured 67-79 and 14-18
        assert heun[n] / heun[2 * n] > 40
        assert 10 < euler[n] / euler[2 * n] < 30
        assert euler[n] > 5 * heun[n]
    wrong = cd_loss_over_all_pairs(exact_consistency(2 * S), 18)  # the consistency function of other data
    assert wrong > 100 * heun[18]  # measured 220 times


class Watch(Callback):
    """Records the networks at the start of training and the target update of every step."""

    def __init__(self):
        self.steps = []

    def on_train_start(self, trainer, m):
        self.start = {name: f.net.state_dict() for name, f in (("online", m.online), ("ema", m.ema["0"]), ("target", m.target))}
        self.start = {k: {n: t.clone() for n, t in v.items()} for k, v in self.start.items()}
        self.teacher = {n: t.clone() for n, t in m.teacher().net.state_dict().items()}

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        self.before = [p.clone() for p in m.target.parameters()]

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        self.steps.append((self.before, [p.clone() for p in m.target.parameters()], [p.clone() for p in m.online.parameters()]))


def test_trainer_steps_keep_the_teacher_frozen_start_from_it_and_move_the_target_by_mu(tmp_path):
    path = module_checkpoint(tmp_path / "teacher.ckpt")
    m = tiny(ConsistencyDistillationModule, teacher=str(path), mu=0.5, ema_decays=[0.9], num_scales=6)
    watch = Watch()
    data = DataLoader(torch.rand(16, 1, 16, 16) * 2 - 1, batch_size=4)
    make_trainer(tmp_path, max_steps=3, callbacks=[watch]).fit(m, data)

    saved = torch.load(path, weights_only=True)["state_dict"]
    teacher_weights = {k.removeprefix("ema.0.net."): v for k, v in saved.items() if k.startswith("ema.0.net.")}  # its eval_weights
    for n, t in m.teacher().net.state_dict().items():
        assert torch.equal(t, teacher_weights[n]) and torch.equal(t, watch.teacher[n])  # bit-identical, before and after
    assert not m._teacher.training and not any(p.requires_grad for p in m._teacher.parameters())
    for name in ("online", "ema", "target"):  # student, EMA and θ⁻ start as the teacher's F
        assert all(torch.equal(t, teacher_weights[n]) for n, t in watch.start[name].items()), name
    assert any(not torch.equal(t, teacher_weights[n]) for n, t in m.online.net.state_dict().items())  # the student learnt
    assert len(watch.steps) == 3
    for before, after, online in watch.steps:  # θ⁻ ← μ θ⁻ + (1 − μ) θ after every optimizer step
        for b, a, o in zip(before, after, online):
            torch.testing.assert_close(a, 0.5 * b + 0.5 * o, rtol=0, atol=1e-6)
    assert not any("teacher" in k for k in m.state_dict())  # named by path, not stored


def test_mu_zero_distils_against_the_stop_gradient_of_the_student(tmp_path):
    m = tiny(ConsistencyDistillationModule, teacher=str(module_checkpoint(tmp_path / "teacher.ckpt")), num_scales=6)
    assert m.target is None and not any(k.startswith("target.") for k in m.state_dict())
    m.load_teacher()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(0)
    loss = m.losses(x).mean()
    loss.backward()  # gradients reach the student through its own branch only
    assert loss.item() > 0 and all(p.grad is not None for p in m.online.parameters() if p.requires_grad)


def test_bad_teachers_are_refused_by_name(tmp_path):
    def refuse(error, teacher, match, **kwargs):
        m = tiny(ConsistencyDistillationModule, teacher=teacher, **kwargs)
        with pytest.raises(error, match=match):
            m.load_teacher()

    refuse(FileNotFoundError, str(tmp_path / "nowhere.ckpt"), "nowhere.ckpt' does not exist")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    refuse(ValueError, str(tmp_path / "notes.ckpt"), "notes.ckpt' is not a checkpoint")
    ct = module_checkpoint(tmp_path / "ct.ckpt", ConsistencyTrainingModule)
    refuse(ValueError, str(ct), "ct.ckpt' is a ConsistencyTrainingModule checkpoint; the teacher must be a DiffusionModule")
    wide = module_checkpoint(tmp_path / "wide.ckpt", model_channels=16)
    refuse(ValueError, str(wide), "net.model_channels: teacher 16, student 8")
    refuse(ValueError, str(wide), "has no weights 'ema_0.5'", model_channels=16, teacher_weights="ema_0.5")
    refuse(ValueError, None, "needs a teacher: --model.teacher")
    other = module_checkpoint(tmp_path / "other_sigma_data.ckpt", sigma_data=0.62)
    refuse(ValueError, str(other), "sigma_data: teacher 0.62, student 0.5")  # F's weights are tied to its c_in, c_out
    with pytest.raises(ValueError, match="mu must lie in"):
        tiny(ConsistencyDistillationModule, mu=1.0)
    m = tiny(ConsistencyDistillationModule, teacher=str(wide))  # refused at start-up, before any step
    with pytest.raises(ValueError, match="another network than the student"):
        make_trainer(tmp_path, max_steps=1).fit(m, DataLoader(torch.rand(4, 1, 16, 16), batch_size=4))
    assert m.global_step == 0


def test_a_student_samples_and_loads_without_its_teacher(tmp_path):
    path = module_checkpoint(tmp_path / "teacher.ckpt")
    m = tiny(ConsistencyDistillationModule, teacher=str(path))
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(m, DataLoader(torch.rand(4, 1, 16, 16) * 2 - 1, batch_size=4))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    checkpoint = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert checkpoint["teacher_sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    path.unlink()
    student = ConsistencyDistillationModule.load_from_checkpoint(tmp_path / "student.ckpt")
    assert student.sample(2, seed=0).shape == (2, 1, 16, 16)


def cd_args(data_dir: Path, teacher: Path, save_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", *tiny_args(data_dir, "ConsistencyDistillationModule"), f"--model.teacher={teacher}",
            "--model.num_scales=8", "--model.mu=0.5", "--model.net.dropout=0.1", "--model.ema_decays=[0.9]",
            f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3",
            "--checkpoint.every_n_train_steps=3", f"--trainer.logger.init_args.save_dir={save_dir}", *extra]


@pytest.mark.slow
def test_a_resumed_distillation_matches_the_straight_run_and_a_changed_teacher_is_refused(fake_mnist, tmp_path):
    main(["fit", *tiny_args(fake_mnist, "DiffusionModule"), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
          f"--trainer.logger.init_args.save_dir={tmp_path / 'edm'}"])
    teacher = tmp_path / "edm" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    main(cd_args(fake_mnist, teacher, tmp_path / "straight", 8))
    main(cd_args(fake_mnist, teacher, tmp_path / "split", 4))
    main(cd_args(fake_mnist, teacher, tmp_path / "split", 8, "--seed_everything=7", "--ckpt_path=last"))
    straight, resumed = (tmp_path / d / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt" for d in ("straight", "split"))
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["global_step"] == b["global_step"] == 8 and a["state_dict"].keys() == b["state_dict"].keys()
    assert max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]) == 0.0

    changed = torch.load(teacher, weights_only=True)  # someone retrains or replaces the teacher file
    changed["state_dict"]["online.net.out.2.bias"] += 0.1
    torch.save(changed, teacher)
    with pytest.raises(ValueError, match="is not the one this run was distilled from"):
        main(cd_args(fake_mnist, teacher, tmp_path / "split", 10, "--ckpt_path=last"))
    main(cd_args(fake_mnist, teacher, tmp_path / "split", 10, "--ckpt_path=last", "--model.allow_teacher_change=true"))
    assert torch.load(resumed, weights_only=True)["global_step"] == 10


def test_cd_samples_two_steps_at_a_level_it_was_trained_on():
    """``sampling_levels="grid"``: grids and FID sample the second step at the trained level nearest 0.8 (1.0882 of
    the 18-level grid), not at 0.8 between two trained levels; "free" keeps [80, 0.8]."""
    levels = karras_sigmas(18).tolist()
    one, two = tiny(ConsistencyDistillationModule).eval_samplers
    assert one == [80.0] and two[0] == 80.0 and two[1] in levels and round(two[1], 4) == 1.0882
    assert tiny(ConsistencyDistillationModule, num_scales=10).eval_samplers[1][1] in karras_sigmas(10).tolist()
    assert tiny(ConsistencyDistillationModule, sampling_levels="free").eval_samplers == [[80.0], [80.0, 0.8]]
    with pytest.raises(ValueError, match="sampling_levels must be 'grid' or 'free', got 'trained'"):
        tiny(ConsistencyDistillationModule, sampling_levels="trained")
