"""CosineDecay: the formula, its state, and a CLI run whose LR schedule lasts exactly as long as max_steps."""

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import main
from cm_lightning.core.lr_schedules import CosineDecay
from tests.helpers import tiny_args


def lrs(scheduler: CosineDecay, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_decay_follows_the_formula_then_stays_at_eta_min():
    got = lrs(CosineDecay(optimizer(0.1), total_steps=10, eta_min=0.01), 15)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * min(k, 10) / 10)) / 2 for k in range(15)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[10:] == pytest.approx([0.01] * 5)  # torch's CosineAnnealingLR would climb again here


def test_cosine_decay_without_a_length_takes_the_one_it_is_given_and_does_not_store_it():
    scheduler = CosineDecay(optimizer())
    assert scheduler.follows_run and scheduler.optimizer.param_groups[0]["lr"] == 0.1
    scheduler.total_steps = 4  # what the module does in configure_optimizers
    assert lrs(scheduler, 5)[-1] == 0.0
    assert "total_steps" not in scheduler.state_dict()  # a resumed run takes its own length
    assert CosineDecay(optimizer(), total_steps=4).state_dict()["total_steps"] == 4
    with pytest.raises(ValueError, match="total_steps must be >= 1 or None"):
        CosineDecay(optimizer(), total_steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("max_steps", [40, 80])
def test_the_presets_lr_schedule_lasts_as_long_as_the_run(fake_mnist, tmp_path, max_steps):
    main([
        "fit", *tiny_args(fake_mnist), f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
        "--model.optimizer=torch.optim.Adam", "--model.optimizer.lr=0.001",
        "--model.lr_scheduler=cm_lightning.CosineDecay",
    ])
    run = tmp_path / "lightning_logs" / "version_0"
    logged = {e.step: e.value for e in EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Scalars("lr-Adam")}
    assert sorted(logged) == list(range(max_steps))
    values = [logged[k] for k in range(max_steps)]
    assert values[0] == pytest.approx(1e-3) and all(b <= a for a, b in zip(values, values[1:]))  # never rises
    assert values[-1] == pytest.approx(1e-3 * (1 + math.cos(math.pi * (max_steps - 1) / max_steps)) / 2, rel=1e-5)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == max_steps and saved["lr_schedulers"][0]["_last_lr"] == [0.0]  # 0 at the last step
