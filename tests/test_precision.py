"""bf16-mixed on CPU (the same code path as 16-mixed/bf16-mixed on GPUs) and torch.compile against eager."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from cm_lightning import ConsistencyDistillationModule, DiffusionModule, EasyConsistencyTuningModule
from cm_lightning.nets.unet import FourierEmbedding, PositionalEmbedding
from cm_lightning.core.compile import repeated_blocks
from tests.helpers import make_trainer, module_checkpoint, randomise, tiny


def loss_on_fixed_batch(m, autocast: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1, torch.randn(8, 1, 16, 16, generator=g)
    sigma_n, sigma_next = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 60.0]), torch.tensor([0.02, 0.15, 0.7, 1.3, 2.6, 6.5, 26.0, 80.0])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return m.consistency_loss(x, z, sigma_n, sigma_next)


def test_bf16_loss_is_float32_finite_and_close_to_float32():
    torch.manual_seed(0)
    m = tiny(recipe="ict")
    randomise(m.online)
    full, mixed = loss_on_fixed_batch(m, False), loss_on_fixed_batch(m, True)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert abs(mixed - full) / full < 0.01  # measured 7e-4 relative


def test_bf16_edm_loss_is_float32_and_close_to_float32():
    torch.manual_seed(0)
    m = tiny(DiffusionModule)
    randomise(m.online)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 60.0])
    noise = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    full = m.objective.loss(m.online, x, sigma, noise).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m.objective.loss(m.online, x, sigma, noise).mean()
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert abs(mixed - full) / full < 0.01


def test_bf16_tuning_loss_is_float32_and_close_to_float32():
    torch.manual_seed(0)
    m = tiny(EasyConsistencyTuningModule)
    randomise(m.online)
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1, torch.randn(8, 1, 16, 16, generator=g)
    t = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 60.0])
    r = m.objective.r_of_t(t, 2)
    full = m.objective.loss(m.online, m.online, x, z, t, r).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m.objective.loss(m.online, m.online, x, z, t, r).mean()
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert abs(mixed - full) / full < 0.01


def test_bf16_distillation_loss_evaluates_the_teacher_under_the_same_autocast(tmp_path):
    m = tiny(ConsistencyDistillationModule, teacher=str(module_checkpoint(tmp_path / "teacher.ckpt")), num_scales=8)
    randomise(m.online)
    m.load_teacher()
    seen = []
    m.teacher().net.register_forward_hook(lambda net, args, out: seen.append(out.dtype))
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma_n, sigma_next = m.objective.pair(torch.arange(8))
    full = m.objective.loss(m.online, m.online, m.teacher(), x, z, sigma_n, sigma_next).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m.objective.loss(m.online, m.online, m.teacher(), x, z, sigma_n, sigma_next).mean()
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2  # Heun: two teacher evaluations per loss
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert abs(mixed - full) / full < 0.05


@pytest.mark.parametrize("embedding", [FourierEmbedding(16), PositionalEmbedding(16)])
def test_noise_embedding_stays_float32_under_autocast(embedding):
    c = torch.linspace(-1.6, 1.1, 5)  # c_noise = ¼ ln σ over [0.002, 80]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = embedding(c)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, embedding(c))


@pytest.mark.slow
def test_bf16_mixed_trainer_steps_keep_float32_weights(tmp_path):
    torch.manual_seed(0)
    m = tiny(recipe="ct", ema_decays=[0.9])
    data = DataLoader(torch.rand(16, 1, 16, 16) * 2 - 1, batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=3, precision="bf16-mixed")
    trainer.fit(m, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for net in (m.online, m.target, m.ema["0"]):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "regional"])
def test_compiled_network_matches_eager(mode):
    torch.manual_seed(0)
    eager = tiny(recipe="ict", ema_decays=[], eval_weights="online")
    randomise(eager.online)
    compiled = tiny(recipe="ict", ema_decays=[], eval_weights="online", compile=mode)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    blocks = repeated_blocks(compiled.online.net)
    assert len(blocks) == len(compiled.online.net.down) + len(compiled.online.net.mid) + len(compiled.online.net.up)
    compiled_whole = compiled.online.net._compiled_call_impl is not None
    assert compiled_whole == (mode is True) and all((b._compiled_call_impl is not None) == (mode == "regional") for b in blocks)
    x, sigma = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([80.0, 0.5, 5.0, 0.01])
    torch.testing.assert_close(compiled.online(x, sigma), eager.online(x, sigma), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.sample(4, seed=1), eager.sample(4, seed=1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, max_backoffs", [("ct", 0), ("ict", 7 + 1)])
def test_float16_grad_scaler_backs_off_only_as_the_curriculum_grows(tmp_path, recipe, max_backoffs):
    """16-mixed (float16 autocast + Lightning's GradScaler; run here on CPU) skips a step only when the
    scale halves. CT: never. iCT: λ(σ) = 1/(σ_{n+1} − σ_n) doubles each time N doubles (7 times here),
    so the scaler settles one level lower each time (measured: 8 = 7 + one at the start); nothing else
    in the step overflows."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu")
    m = tiny(recipe=recipe)
    trainer = make_trainer(tmp_path, max_steps=48, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(m, DataLoader(torch.rand(192, 1, 16, 16) * 2 - 1, batch_size=4))
    backoffs = round(math.log2(65536.0 / scaler.get_scale()))
    assert backoffs <= max_backoffs, backoffs
    assert all(torch.isfinite(p).all() for p in m.parameters())
