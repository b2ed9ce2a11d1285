"""Faults never cost a run: non-finite losses stop cleanly or are skipped and counted."""

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from cm_lightning import ConsistencyTrainingModule
from tests.helpers import make_trainer, tiny, tiny_net


class NaNAt(ConsistencyTrainingModule):
    """A module whose training loss is NaN at the given global steps (first try only)."""

    def __init__(self, nan_steps: list[int] = [], **kwargs):
        super().__init__(net=tiny_net(), **kwargs)
        self.nan_steps = set(nan_steps)

    def consistency_loss(self, x, z, sigma_n, sigma_next, f=None):
        loss = super().consistency_loss(x, z, sigma_n, sigma_next, f)
        if f is None and self.global_step in self.nan_steps:
            self.nan_steps.discard(self.global_step)
            return loss * float("nan")
        return loss


def data() -> DataLoader:
    return DataLoader(torch.rand(32, 1, 16, 16) * 2 - 1, batch_size=4)


def test_nonfinite_loss_stops_with_step_sigmas_and_hint_and_keeps_the_checkpoint(tmp_path):
    m = NaNAt([3], recipe="ct")
    ckpt = ModelCheckpoint(tmp_path, save_last=True, every_n_train_steps=1)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at global step 3, with σ_n in .*learning rate"):
        make_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[ckpt]).fit(m, data())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in m.parameters())  # not even the live weights moved


def test_nonfinite_loss_can_be_skipped_and_is_counted(tmp_path):
    m = NaNAt([2, 4], on_nonfinite="skip", ema_decays=[0.9])
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1).fit(m, data())
    assert m.global_step == 6  # six real optimizer steps; the two NaN batches did not count
    assert all(torch.isfinite(p).all() for p in m.parameters())
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    skipped = [r.split(",")[header.index("train/skipped_steps")] for r in rows[1:]]
    assert sorted({float(v) for v in skipped if v}) == [1.0, 2.0]


def test_on_nonfinite_names_the_accepted_values():
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('stop', 'skip', 'skip_on_device'\), got 'ignore'"):
        NaNAt(on_nonfinite="ignore")


def test_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(tiny(recipe="ct"), data())
    path = tmp_path / "checkpoints" / "epoch=0-step=1.ckpt"
    other = tiny(model_channels=16, recipe="ict", ema_decays=[0.9, 0.99])
    pattern = (r"net.model_channels: checkpoint 8, model 16; number of ema_decays: checkpoint 1, model 2; "
               r"target network \(recipe ct, mu0 > 0\): checkpoint True, model False")
    with pytest.raises(ValueError, match=pattern):
        make_trainer(tmp_path, max_steps=2).fit(other, data(), ckpt_path=path)
    loaded = ConsistencyTrainingModule.load_from_checkpoint(path, weights_only=True)  # the file alone suffices
    assert loaded.hparams.net["init_args"]["model_channels"] == 8 and loaded.target is not None


class InfGradAt(NaNAt):
    """A finite loss whose gradients are infinite at the given global steps."""

    def __init__(self, inf_steps: list[int], **kwargs):
        super().__init__(**kwargs)
        self.inf_steps = set(inf_steps)

    def on_after_backward(self):
        if self.global_step in self.inf_steps:
            self.inf_steps.discard(self.global_step)
            next(self.online.parameters()).grad.fill_(float("inf"))


def test_nonfinite_gradients_stop_before_the_weights_move(tmp_path):
    m = InfGradAt([2], recipe="ct")
    ckpt = ModelCheckpoint(tmp_path, save_last=True, every_n_train_steps=1)
    with pytest.raises(FloatingPointError, match="non-finite gradients at global step 2 .*checkpoints on disk are intact"):
        make_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[ckpt]).fit(m, data())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_nonfinite_gradients_can_be_skipped(tmp_path):
    m = InfGradAt([1, 3], on_nonfinite="skip", optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    before = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before[trainer.global_step] = torch.nn.utils.parameters_to_vector(pl_module.online.parameters()).detach().clone()

    make_trainer(tmp_path, max_steps=5, callbacks=[Watch()]).fit(m, data())
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert torch.equal(before[1], before[2]) and not torch.equal(before[2], before[3])  # step 1 left the weights alone
    assert m._skipped_steps == 2


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    m = NaNAt(recipe="ct")
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(m, data())
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        m.target.net.out[2].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"refusing to save a checkpoint at global step 1: non-finite values in target.net.out.2.weight"):
        trainer.save_checkpoint(tmp_path / "good.ckpt")
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "good.ckpt", weights_only=True)["state_dict"].values())


def fused_adam(params):
    return torch.optim.Adam(params, lr=1e-3, fused=True)


def test_skip_on_device_drops_a_nonfinite_step_without_moving_weights_moments_or_averages(tmp_path):
    m = InfGradAt([2], on_nonfinite="skip_on_device", optimizer=fused_adam, ema_decays=[0.9])
    seen = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            vector = torch.nn.utils.parameters_to_vector
            seen[trainer.global_step] = (vector(pl_module.online.parameters()).detach().clone(),
                                         vector(pl_module.ema["0"].parameters()).detach().clone())

    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[Watch()], log_every_n_steps=100)
    trainer.fit(m, data())
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert torch.equal(seen[2][0], seen[3][0]) and torch.equal(seen[2][1], seen[3][1])  # step 2: nothing moved
    assert not torch.equal(seen[1][0], seen[2][0]) and not torch.equal(seen[3][1], seen[4][1])  # the others did
    state = trainer.optimizers[0].state[next(m.online.parameters())]
    assert state["step"].item() == 4 and torch.isfinite(state["exp_avg_sq"]).all()  # 5 steps, 1 dropped
    assert m.skipped_on_device.item() == 1


def test_skip_on_device_stops_when_a_whole_logging_interval_was_dropped(tmp_path):
    m = InfGradAt(list(range(2, 20)), on_nonfinite="skip_on_device", optimizer=fused_adam)
    with pytest.raises(FloatingPointError, match=r"every one of the last 3 steps \(to global step 6\) had non-finite"):
        make_trainer(tmp_path, max_steps=20, log_every_n_steps=3).fit(m, data())
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_skip_on_device_refuses_an_optimizer_that_cannot_skip_on_the_device(tmp_path):
    m = NaNAt(on_nonfinite="skip_on_device", optimizer=lambda p: torch.optim.RAdam(p, lr=1e-3))
    with pytest.raises(ValueError, match=r"needs an optimizer that skips a step on the device .*fused true.*RAdam is not"):
        make_trainer(tmp_path, max_steps=2).fit(m, data())
