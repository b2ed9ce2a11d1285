"""Continuous-time consistency models (sCT / sCD, TrigFlow): the formulas of DESIGN §2.5 against hand computations,
the JVP against finite differences, and the module through fit, sampling, resume, bf16 and a teacher file."""

import math

import pytest
import torch
from torch import nn
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from cm_lightning import ContinuousConsistencyModule, DiffusionModule, EDMDenoiser
from cm_lightning.core.trigflow import (ContinuousConsistency, consistency_tangent, ct_velocity, draw_t, normalise_tangent,
                                        sigma_of_t, t_of_sigma, tangent_jvp, tangent_warmup, trajectory, trigflow_F)
from cm_lightning.nets.unet import attention
from cli import main
from tests.helpers import make_trainer, module_checkpoint, randomise, tiny, tiny_args, tiny_net

SD = 0.5
T = torch.tensor([0.004, 0.1, 0.5, 1.0, 1.3, 1.5645])


class SmoothNet(nn.Module):
    """A small network with dropout and a smooth dependence on c_noise, in any dtype (finite differences in float64)."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.image_size, self.channels = 8, 1
        self.conv_in, self.conv_out = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 1, 3, padding=1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, c_noise):
        h = torch.nn.functional.silu(self.conv_in(x) * torch.cos(3 * c_noise).reshape(-1, 1, 1, 1) + c_noise.reshape(-1, 1, 1, 1))
        return self.conv_out(self.drop(h))


def test_trigflow_F_of_an_edm_network_gives_the_sigma_space_denoiser():
    torch.manual_seed(0)
    net = tiny_net()
    randomise(net)
    x_t = torch.randn(len(T), 1, 16, 16) * 0.5
    with torch.no_grad():
        f_trig = T.cos().reshape(-1, 1, 1, 1) * x_t - T.sin().reshape(-1, 1, 1, 1) * SD * trigflow_F(net, x_t, T, SD)
        D = EDMDenoiser(net, SD)(x_t / T.cos().reshape(-1, 1, 1, 1), sigma_of_t(T, SD))
        assert (f_trig - D).abs().max() < 1e-5 * (1 + D.abs().max())
        m = ContinuousConsistencyModule(net=net)
        x = torch.randn(3, 1, 16, 16)
        assert torch.equal(m.online(x, torch.zeros(3)), x)  # f(x, 0) = x exactly
    assert torch.allclose(t_of_sigma(sigma_of_t(T, SD), SD), T, atol=1e-6)
    assert t_of_sigma(torch.tensor(80.0), SD).item() == pytest.approx(math.atan(160))
    assert t_of_sigma(torch.tensor([80, 1]), SD).tolist() == pytest.approx([math.atan(160), math.atan(2)])  # integer σ


def test_jvp_matches_a_central_difference_in_float64_with_the_dropout_mask_shared():
    torch.manual_seed(0)
    net = SmoothNet().double().train()
    F = lambda x, t: trigflow_F(net, x, t, SD)  # noqa: E731
    x_t, v = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    t = T.double()
    s = t.cos() * t.sin()
    dx, dt = s.reshape(-1, 1, 1, 1) * v, s
    torch.manual_seed(5)
    F0, J = tangent_jvp(F, x_t, t, dx, dt)
    after = F(x_t, t)  # the RNG was left where it was: a following forward draws the JVP's mask
    assert torch.equal(F0, after)
    h = 1e-6

    def at(step):
        torch.manual_seed(5)
        return F(x_t + step * dx, t + step * dt)

    central = (at(h) - at(-h)) / (2 * h)
    assert (J - central).abs().max() < 1e-6 * (1 + central.abs().max())
    torch.manual_seed(5)
    F1, J_fd = tangent_jvp(F, x_t, t, dx, dt, mode="finite_difference")
    assert torch.equal(F1, F0)
    assert (J_fd - J).abs().max() < 1e-4 * (1 + J.abs().max())


def test_jvp_of_a_closed_form_F_is_its_hand_derivative():
    F = lambda x, t: torch.sin(t).reshape(-1, 1, 1, 1) * x.square()  # noqa: E731
    x, t = torch.randn(6, 1, 4, 4, dtype=torch.float64), T.double()
    dx, dt = torch.randn_like(x), torch.rand(6, dtype=torch.float64)
    hand = torch.cos(t).reshape(-1, 1, 1, 1) * x.square() * dt.reshape(-1, 1, 1, 1) + 2 * torch.sin(t).reshape(-1, 1, 1, 1) * x * dx
    for mode, tol in (("exact", 1e-12), ("finite_difference", 1e-5)):
        assert (tangent_jvp(F, x, t, dx, dt, mode)[1] - hand).abs().max() < tol


def test_tangent_is_cos_t_times_the_time_derivative_of_f_along_the_trajectory():
    """g (r = 1) = cos t · d/dt f⁻(x_t, t) with f = cos t · x_t − sin t · σ_d F, x_t = cos t x_0 + sin t z."""
    F = lambda x, t: torch.tanh(x) * (1 + t).reshape(-1, 1, 1, 1)  # noqa: E731
    g0 = torch.Generator().manual_seed(0)
    x0, z = torch.randn(6, 1, 4, 4, generator=g0, dtype=torch.float64), SD * torch.randn(6, 1, 4, 4, generator=g0, dtype=torch.float64)
    t = T.double()

    def f(tt):
        x = trajectory(x0, z, tt)
        return tt.cos().reshape(-1, 1, 1, 1) * x - tt.sin().reshape(-1, 1, 1, 1) * SD * F(x, tt)

    h = 1e-6
    expected = t.cos().reshape(-1, 1, 1, 1) * (f(t + h) - f(t - h)) / (2 * h)
    objective = ContinuousConsistency(sigma_data=SD)
    _, g = objective.tangent(F, trajectory(x0, z, t), t, ct_velocity(x0, z, t), 1.0)
    assert (g - expected).abs().max() < 1e-6
    # by hand at one point: −cos²t (σ_d F − v) − (cos t sin t x_t + σ_d J), J = cos t sin t dF/dt
    x_t, v = trajectory(x0, z, t), ct_velocity(x0, z, t)
    s = (t.cos() * t.sin()).reshape(-1, 1, 1, 1)
    J = s * (torch.tanh(x_t) + (1 + t).reshape(-1, 1, 1, 1) * (1 - torch.tanh(x_t).square()) * v)
    hand = -t.cos().reshape(-1, 1, 1, 1).square() * (SD * F(x_t, t) - v) - (s * x_t + SD * J)
    assert torch.allclose(consistency_tangent(F(x_t, t), J, x_t, v, t, SD, 1.0), hand)
    # warm-up: at r = 0 the second term (and so J) has no effect
    assert torch.equal(consistency_tangent(F(x_t, t), J, x_t, v, t, SD, 0.0), consistency_tangent(F(x_t, t), 7 * J, x_t, v, t, SD, 0.0))


S = 0.8  # the analytic data's spread, not σ_d: x_0 ~ N(0, S² I)


def gaussian_teacher_F(x_t, t):
    """The exact denoiser of N(0, S² I), D(x_σ, σ) = S² x_σ / (σ² + S²), as a TrigFlow F = (cos t x_t − D) / (σ_d sin t)."""
    cos, sin = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    sigma = SD * sin / cos
    return (cos * x_t - S**2 * (x_t / cos) / (sigma**2 + S**2)) / (SD * sin)


def gaussian_student_F(s):
    """F of the exact consistency function of N(0, s² I): the ODE x_σ ∝ √(σ² + s²) ends at f = s x_σ / √(σ² + s²)."""
    def F(x_t, t):
        cos, sin = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
        f = s * (x_t / cos) / ((SD * sin / cos) ** 2 + s**2).sqrt()
        return (cos * x_t - f) / (SD * sin)
    return F


def test_the_exact_consistency_function_of_gaussian_data_has_zero_scd_tangent():
    x_t, t = torch.randn(6, 1, 4, 4, dtype=torch.float64), T.double()
    objective = ContinuousConsistency(sigma_data=SD)
    v = SD * gaussian_teacher_F(x_t, t)
    _, g = objective.tangent(gaussian_student_F(S), x_t, t, v, 1.0)
    assert g.abs().max() < 1e-10
    _, wrong = objective.tangent(gaussian_student_F(0.6), x_t, t, v, 1.0)
    assert wrong.flatten(1).norm(dim=1).min() > 1e-4  # at every t (smallest at the ends, where cos t or sin t → 0)
    assert wrong.flatten(1).norm(dim=1).median() > 0.1
    # s = σ_d: the teacher's velocity vanishes and f is the identity, F* = −tan(t/2) x_t / σ_d
    F_identity = lambda x, t: -torch.tan(t / 2).reshape(-1, 1, 1, 1) * x / SD  # noqa: E731
    assert torch.allclose(gaussian_student_F(SD)(x_t, t), F_identity(x_t, t))


def test_the_sct_velocity_averages_to_the_exact_velocity_over_the_posterior():
    """E[cos t · z − sin t · x_0 | x_t] = σ_d F_teacher(x_t, t) for x_0 ~ N(0, S²), z ~ N(0, σ_d²)."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.2, 0.8, 1.3], dtype=torch.float64)
    x_t = torch.tensor([0.7, -1.1, 0.4], dtype=torch.float64).reshape(-1, 1, 1, 1)
    cos, sin = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    precision = cos**2 / (SD * sin) ** 2 + 1 / S**2  # of x_0 given x_t = cos t x_0 + sin t z
    mean, std = (cos / (SD * sin) ** 2) * x_t / precision, precision.rsqrt()
    x0 = mean + std * torch.randn(3, 1, 1, 200_000, generator=g, dtype=torch.float64)
    z = (x_t - cos * x0) / sin
    monte_carlo = ct_velocity(x0, z, t).mean(-1, keepdim=True)
    exact = SD * gaussian_teacher_F(x_t, t)
    assert torch.allclose(monte_carlo, exact, atol=0.01)


def test_tangent_normalisation_and_warmup():
    g = torch.randn(4, 1, 8, 8) * torch.tensor([0.01, 1.0, 10.0, 100.0]).reshape(-1, 1, 1, 1)
    norms = g.flatten(1).norm(dim=1)
    assert torch.allclose(normalise_tangent(g, 0.1).flatten(1).norm(dim=1), norms / (norms + 0.1))
    assert [tangent_warmup(k, 10) for k in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0] and tangent_warmup(0, 0) == 1.0


def test_training_levels_follow_the_truncated_log_normal():
    torch.manual_seed(0)
    t = draw_t(200_000, -1.0, 1.4, SD, 0.002, 80.0)
    log_sigma = sigma_of_t(t.double(), SD).log()
    assert t.min() >= math.atan(0.002 / SD) - 1e-6 and t.max() <= math.atan(80 / SD) + 1e-6
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.02)  # the truncation at ±3.6 σ moves it by < 0.01
    assert log_sigma.std().item() == pytest.approx(1.4, abs=0.02)
    narrow = sigma_of_t(draw_t(10_000, -1.0, 1.4, SD, 0.5, 1.0).double(), SD)
    assert narrow.min() >= 0.5 - 1e-5 and narrow.max() <= 1.0 + 1e-5


def test_loss_is_the_weighted_distance_to_the_normalised_tangent_and_trains_net_and_weight():
    torch.manual_seed(0)
    m = tiny(ContinuousConsistencyModule, tangent_warmup_steps=0, prior_weight=False)
    randomise(m.online)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    z, t = SD * torch.randn_like(x), T
    F = m.trigflow(m.online)
    terms = m.objective.loss(F, F, m.log_weight, x, z, t, step=0)
    _, g = m.objective.tangent(F, trajectory(x, z, t), t, ct_velocity(x, z, t), 1.0)
    assert torch.allclose(terms.loss, normalise_tangent(g, 0.1).flatten(1).square().mean(1), rtol=1e-4)  # w = 0, F = F⁻
    assert torch.allclose(terms.tangent_rms, g.flatten(1).square().mean(1).sqrt(), rtol=1e-4)
    terms.loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.log_weight.parameters())
    assert sum(p.grad.abs().sum() for p in m.online.parameters() if p.grad is not None) > 0
    prior = ContinuousConsistency(sigma_data=SD, warmup_steps=0).loss(F, F, m.log_weight, x, z, t, 0).loss
    assert torch.allclose(prior.detach(), terms.loss.detach() / sigma_of_t(t, SD), rtol=1e-4)


def test_bf16_loss_is_close_to_float32_and_its_jvp_and_every_gradient_stay_float32():
    """The JVP runs first, in float32 without autocast; the gradient forward after it must not reuse casts without
    grad (every trained parameter gets a finite gradient)."""
    torch.manual_seed(0)
    m = tiny(ContinuousConsistencyModule, dropout=0.2, tangent_warmup_steps=0)
    randomise(m.online)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z, t = SD * torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1)), T
    F = m.trigflow(m.online)
    seen = []

    def loss():
        torch.manual_seed(2)
        return m.objective.loss(F, F, m.log_weight, x, z, t, step=0)

    full = loss().loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F_minus, g = m.objective.tangent(F, trajectory(x, z, t), t, ct_velocity(x, z, t), 1.0)
        seen += [F_minus.dtype, g.dtype]
        mixed = loss().loss
    assert seen == [torch.float32, torch.float32] and mixed.dtype == torch.float32
    assert ((mixed - full).abs() / full).max() < 0.05
    mixed.mean().backward()
    named = [*m.online.named_parameters(), *m.log_weight.named_parameters()]
    assert not [n for n, p in named if p.grad is None or not torch.isfinite(p.grad).all()]


def test_unet_attention_has_a_forward_mode_path_equal_to_the_fused_one():
    q, k, v = (torch.randn(2, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    dq, dk, dv = (torch.randn_like(q) for _ in range(3))
    out, tangent = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    h = 1e-6
    central = (attention(q + h * dq, k + h * dk, v + h * dv) - attention(q - h * dq, k - h * dk, v - h * dv)) / (2 * h)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert (tangent - central).abs().max() < 1e-7


def test_sampling_uses_the_papers_second_level_and_the_sigma_space_samplers():
    m = tiny(ContinuousConsistencyModule)
    assert m.eval_samplers == [[80.0], [80.0, round(SD * math.tan(1.1), 4)]]
    torch.manual_seed(0)
    randomise(m.online)
    one = m.sample(2, sampler=[80.0], seed=3, weights="online")
    assert one.shape == (2, 1, 16, 16)
    assert torch.allclose(one, m.sample(2, sampler=[80.0], seed=3, weights="online"))


def test_a_resumed_sct_run_matches_the_straight_run(fake_mnist, tmp_path):
    """Dropout masks, noise, the tangent warm-up's position and the log-variance head all continue exactly (0.0)."""
    def args(save_dir, steps, *extra):
        return ["fit", *tiny_args(fake_mnist, "ContinuousConsistencyModule"), "--model.net.dropout=0.1",
                "--model.ema_decays=[0.9]", "--model.tangent_warmup_steps=6", f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0", "--checkpoint.every_n_train_steps=2",
                f"--trainer.logger.init_args.save_dir={save_dir}", *extra]

    main(args(tmp_path / "straight", 4))
    main(args(tmp_path / "split", 2))
    main(args(tmp_path / "split", 4, "--seed_everything=7", "--ckpt_path=last"))  # another relaunch seed
    straight, resumed = (torch.load(tmp_path / d / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                                    weights_only=True) for d in ("straight", "split"))
    assert resumed["global_step"] == 4 and any(k.startswith("log_weight.") for k in resumed["state_dict"])
    assert all(torch.equal(v, resumed["state_dict"][k]) for k, v in straight["state_dict"].items())


class FirstWeights(Callback):
    def on_train_start(self, trainer, m):
        self.online = {k: v.clone() for k, v in m.online.net.state_dict().items()}


def test_scd_starts_from_its_teacher_and_names_it_in_its_checkpoints(tmp_path):
    teacher = module_checkpoint(tmp_path / "teacher.ckpt")
    torch.manual_seed(0)
    m = tiny(ContinuousConsistencyModule, teacher=str(teacher), ema_decays=[0.9], tangent_warmup_steps=2)
    first = FirstWeights()
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[first], log_every_n_steps=1)
    trainer.fit(m, DataLoader(torch.rand(16, 1, 16, 16) * 2 - 1, batch_size=4))
    saved = torch.load(teacher, weights_only=True)["state_dict"]  # the student starts from the teacher's eval weights
    assert all(torch.equal(v, saved[f"ema.0.net.{k}"]) for k, v in first.online.items())
    assert all(torch.equal(v, saved[f"ema.0.net.{k}"]) for k, v in m._teacher.net.state_dict().items())
    assert not any("teacher" in k for k in m.state_dict())
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    assert torch.load(tmp_path / "student.ckpt", weights_only=True)["teacher_sha256"] == m._teacher_sha256
    assert torch.isfinite(trainer.callback_metrics["train/tangent_rms"])
