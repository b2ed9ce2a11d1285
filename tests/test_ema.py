"""Evaluation EMA: decay profile, one update per optimizer step, checkpoint round trip, bad arguments."""

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from cm_lightning import ConsistencyTrainingModule
from cm_lightning.core.ema import ema_decay
from tests.helpers import make_trainer, tiny


def test_ema_decay_warmup():
    assert ema_decay(0.999, 0, warmup=False) == 0.999
    assert [ema_decay(0.999, n, warmup=True) for n in (0, 1, 10, 10_000)] == pytest.approx([0.1, 2 / 11, 11 / 20, 0.999])


class EMASnapshots(Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        self.states.append(({k: v.clone() for k, v in m.online.state_dict().items()},
                            [{k: v.clone() for k, v in e.state_dict().items()} for e in m.ema.values()]))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_follows_the_formula_once_per_optimizer_step(tmp_path, accumulate):
    torch.manual_seed(0)
    m = tiny(ema_decays=[0.9, 0.5], ema_warmup=True, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    snaps = EMASnapshots()
    data = DataLoader(torch.rand(32, 1, 16, 16) * 2 - 1, batch_size=4)
    make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=accumulate, callbacks=[snaps]).fit(m, data)
    at_step = snaps.states[::accumulate] + [(m.online.state_dict(), [e.state_dict() for e in m.ema.values()])]
    for k in range(3):
        (_, ema_before), (online_after, ema_after) = at_step[k], at_step[k + 1]
        for i, decay in enumerate([0.9, 0.5]):
            beta = min(decay, (1 + k) / (10 + k))
            for name, value in ema_after[i].items():
                want = beta * ema_before[i][name] + (1 - beta) * online_after[name]
                torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7)


def test_ema_weights_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = tiny(ema_decays=[0.5], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(m, DataLoader(torch.rand(8, 1, 16, 16) * 2 - 1, batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ConsistencyTrainingModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    for a, b in zip(m.ema["0"].state_dict().values(), loaded.ema["0"].state_dict().values()):
        assert torch.equal(a, b)
    pairs = zip(m.ema["0"].parameters(), m.online.parameters())
    assert any(not torch.equal(e, o) for e, o in pairs)  # a real average, not a copy
    g = torch.Generator().manual_seed(0)
    assert torch.equal(loaded.sample(2, generator=g), m.sample(2, generator=torch.Generator().manual_seed(0)))


def test_sampling_weights_are_selectable():
    torch.manual_seed(0)
    m = tiny(ema_decays=[0.999, 0.9])
    with torch.no_grad():
        for p in m.online.parameters():
            p.normal_(0, 0.3)
    draw = lambda w: m.sample(2, generator=torch.Generator().manual_seed(0), weights=w)  # noqa: E731
    assert torch.equal(draw("ema"), draw("ema_0.999")) and torch.equal(draw(None), draw("ema"))
    assert not torch.equal(draw("online"), draw("ema"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ema_decays=[0.999, 1.0]), r"ema_decays must lie in \[0, 1\), got \[1.0\]"),
        (dict(eval_weights="swa"), r"unknown weights 'swa' \(eval_weights, .*\): choose one of \['ema', 'ema_0.9999', 'online'\]"),
        (dict(ema_decays=[], eval_weights="ema"), r"unknown weights 'ema' .*: choose one of \['online'\]"),
    ],
)
def test_bad_ema_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)
