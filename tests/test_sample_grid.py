"""SampleGrid: PNG files and TensorBoard image events, from fixed noise."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from torchvision.io import read_image
from torchvision.utils import make_grid

from callbacks import SampleGrid
from cm_lightning import ConsistencyTrainingModule
from tests.helpers import make_trainer, tiny


def fit_with_grid(tmp_path, lr: float, **grid_kwargs):
    torch.manual_seed(0)
    m = tiny(eval_weights="online", optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    logger = TensorBoardLogger(tmp_path, name="run")
    grid = SampleGrid(every_n_steps=2, num_samples=4, samplers=[[80.0], [80.0, 0.8]], **grid_kwargs)
    make_trainer(tmp_path, max_steps=5, logger=logger, callbacks=[grid]).fit(m, DataLoader(torch.rand(24, 1, 16, 16) * 2 - 1, batch_size=4))
    return logger.log_dir


def test_grids_are_written_to_png_and_tensorboard(tmp_path):
    log_dir = fit_with_grid(tmp_path, lr=0.1)
    pngs = sorted(p.name for p in (tmp_path / "run" / "version_0" / "samples").iterdir())
    assert pngs == sorted(f"step{s:07d}_sigmas_{n}.png" for s in (2, 4, 5) for n in ("80", "80-0.8"))
    events = EventAccumulator(log_dir, size_guidance={"images": 0}).Reload()
    assert set(events.Tags()["images"]) == {"samples/sigmas_80", "samples/sigmas_80-0.8"}
    assert [e.step for e in events.Images("samples/sigmas_80")] == [2, 4, 5]
    assert events.Images("samples/sigmas_80")[0].width == 2 * 16 + 3 * 2  # 2 × 2 grid of 16 px, 2 px padding


def test_identical_noise_gives_identical_grids(tmp_path):
    fit_with_grid(tmp_path / "a", lr=0.0)  # weights never change: every grid must be the same image
    folder = tmp_path / "a" / "run" / "version_0" / "samples"
    one_step = [(folder / f"step{s:07d}_sigmas_80.png").read_bytes() for s in (2, 4, 5)]
    assert one_step[0] == one_step[1] == one_step[2]
    fit_with_grid(tmp_path / "b", lr=0.0, seed=1)
    assert (tmp_path / "b" / "run" / "version_0" / "samples" / "step0000002_sigmas_80.png").read_bytes() != one_step[0]


def test_grid_of_step_n_shows_the_ema_weights_of_step_n(tmp_path):
    torch.manual_seed(0)
    m = tiny(ema_decays=[0.5], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    grid = SampleGrid(every_n_steps=2, num_samples=4, samplers=[[80.0]], weights="ema")
    saves = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[grid, saves])
    trainer.fit(m, DataLoader(torch.rand(24, 1, 16, 16) * 2 - 1, batch_size=4))
    at_2 = ConsistencyTrainingModule.load_from_checkpoint(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    expected = make_grid(at_2.sample(4, [80.0], weights="ema", seed=0), nrow=2, normalize=True, value_range=(-1, 1))
    written = read_image(str(tmp_path / "samples" / "step0000002_sigmas_80.png")).float() / 255
    assert written.shape == expected.shape
    assert (written - expected).abs().max() <= 1 / 255 + 1e-6  # PNG rounding; without step 2's EMA update: off


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(every_n_steps=0), "every_n_steps must be >= 1, got 0"), (dict(num_samples=0), "num_samples must be >= 1, got 0"),
     (dict(samplers=[]), "samplers must hold at least one sampler")],
)
def test_bad_grid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleGrid(**kwargs)


def test_bad_schedule_is_refused_before_training(tmp_path):
    m = tiny()
    grid = SampleGrid(samplers=[[0.8, 80.0]])
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_trainer(tmp_path, max_steps=1, callbacks=[grid]).fit(m, DataLoader(torch.rand(4, 1, 16, 16), batch_size=4))
    assert m.global_step == 0
