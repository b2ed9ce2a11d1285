"""Objectives outside any Trainer (EDM scalings and loss against float64 values; the same losses as the
modules' training steps), the DiffusionModule end to end, and a user's own network through the CLI."""

import math

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from callbacks import FID, SampleGrid
from cli import main
from cm_lightning import ConsistencyTrainingModule, DiffusionModule, EDMDenoiser
from cm_lightning.core.noise import seeded_rng, step_seed
from cm_lightning.core.objectives import EDMLoss
from datamodules import MNISTDataModule
from tests.helpers import make_trainer, randomise, tiny, tiny_args


class Constant(torch.nn.Module):
    image_size, channels = 4, 1

    def forward(self, x, c_noise):
        return torch.full_like(x, 0.3)


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
def test_edm_denoiser_uses_the_plain_edm_scalings(sigma):
    x = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    got = EDMDenoiser(Constant(), sigma_data=0.5)(x, torch.tensor([sigma]))
    s, d = sigma, 0.5  # EDM Table 1, in float64
    expected = d**2 / (s**2 + d**2) * x.double() + s * d / math.sqrt(s**2 + d**2) * 0.3
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_edm_loss_weight_and_noise_law():
    loss = EDMLoss()
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    expected = [(s**2 + 0.25) / (s * 0.5) ** 2 for s in sigma.tolist()]
    torch.testing.assert_close(loss.weight(sigma), torch.tensor(expected, dtype=torch.float64))
    torch.manual_seed(0)
    seen = []
    loss(lambda y, s: (seen.append(s), y)[1], torch.zeros(20000, 1, 1, 1))
    assert seen[0].log().mean().item() == pytest.approx(-1.2, abs=0.03)  # ln σ ~ N(−1.2, 1.2²)
    assert seen[0].log().std().item() == pytest.approx(1.2, abs=0.03)
    quantiles = loss.fixed_levels(4).log()
    torch.testing.assert_close(quantiles, -1.2 + 1.2 * torch.tensor([-1.1503, -0.3186, 0.3186, 1.1503], dtype=torch.float64),
                               rtol=0, atol=1e-3)


class FirstLoss(Callback):
    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.loss = outputs["loss"].detach()


def test_seeded_rng_draws_what_manual_seed_draws_and_leaves_the_generator_where_it_was():
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        expected = torch.randn(5), torch.rand(3)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    with seeded_rng(torch.device("cpu"), 1234):
        drawn = torch.randn(5), torch.rand(3)
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cls", [ConsistencyTrainingModule, DiffusionModule])
def test_an_objective_outside_the_trainer_gives_the_training_steps_loss(tmp_path, cls):
    torch.manual_seed(0)
    m = tiny(cls, **({"recipe": "ct"} if cls is ConsistencyTrainingModule else {}))
    randomise(m.online)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.random.fork_rng():  # the seed the module gives step 0, batch 0 on rank 0, and the objective alone
        torch.manual_seed(step_seed(torch.initial_seed(), 0, 0, 0))
        if cls is ConsistencyTrainingModule:
            expected = m.objective(m.online, m.target, x, 0, 1).mean()
        else:
            expected = m.objective(m.online, x).mean()
    first = FirstLoss()
    make_trainer(tmp_path, max_steps=1, callbacks=[first]).fit(m, DataLoader(x, batch_size=4))
    assert first.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.slow
def test_diffusion_module_trains_validates_and_is_scored_with_its_heun_sampler(tmp_path, fake_mnist):
    torch.manual_seed(0)
    m = tiny(DiffusionModule, image_size=32, channels=1, eval_weights="online", ema_decays=[0.9])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dm = MNISTDataModule(str(fake_mnist), batch_size=8, val_fraction=0.25)
    fid = FID(num_samples=16, batch_size=8, samplers=["heun3", "euler3"])
    grid = SampleGrid(every_n_steps=2, num_samples=4)  # the module's own sampler: heun18
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=[fid, grid])
    trainer.fit(m, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/fid_heun3", "val/fid_euler3"} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "val/fid_heun3"))
    assert not torch.equal(m.state_dict()["online.net.out.2.weight"], before["online.net.out.2.weight"])
    assert not torch.equal(m.state_dict()["ema.0.net.out.2.weight"], before["ema.0.net.out.2.weight"])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step0000002_heun18.png"]
    x = m.sample(3, "heun3", seed=0)
    assert x.shape == (3, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, m.sample(3, "heun3", seed=0))


@pytest.mark.slow
def test_a_users_own_network_trains_through_the_cli(fake_mnist, tmp_path):
    args = [a for a in tiny_args(fake_mnist) if not a.startswith("--model.net") and a != "cm_lightning.UNet"]
    main(["fit", *args, "--model.net=tests.helpers.PlainConvNet", "--model.net.width=4", "--trainer.max_steps=3",
          "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}"])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 3
    assert saved["hyper_parameters"]["net"] == {"class_path": "tests.helpers.PlainConvNet",
                                                "init_args": {"image_size": 32, "channels": 1, "width": 4}}
    module = ConsistencyTrainingModule.load_from_checkpoint(ckpt, weights_only=True)
    assert type(module.online.net).__name__ == "PlainConvNet" and module.sample(2, seed=0).shape == (2, 1, 32, 32)
