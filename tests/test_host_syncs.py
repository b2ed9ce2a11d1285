"""Host–device synchronisations in a training step: every method's step (loss, backward, optimizer, EMAs, θ⁻,
its callbacks) reads a device value on the host only where the non-finite policy must decide before the weights
move. On a GPU each such read stalls the launch queue; a new ``.item()`` in a step fails here, on CPU."""

import csv
import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from cm_lightning import (ConsistencyDistillationModule, ConsistencyTrainingModule, ContinuousConsistencyModule,
                          DiffusionModule, EasyConsistencyTuningModule)
from tests.helpers import make_trainer, module_checkpoint, tiny

ROOT = Path(__file__).parents[1]
OURS = (str(ROOT / "cm_lightning"), str(ROOT / "callbacks"))
OPTIMIZERS = str(Path(torch.optim.__file__).parent)
# Tensor methods that wait for the device and copy to the host.
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
# The documented ones (``core.nonfinite``): is the loss finite (before backward), are the gradients (before the
# optimizer step). Both decide on the host whether the weights may move.
ALLOWED = {("nonfinite.py", "finite_on_all_ranks"), ("nonfinite.py", "on_before_optimizer_step")}


class HostReads(TorchFunctionMode):
    """Records (file, function) of the innermost frame of this project below every host read of a tensor."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            stack = traceback.extract_stack()[:-1]
            ours = [f for f in stack if f.filename.startswith(OURS)]
            # (torch's optimizers read their step counts, which live on the host unless capturable/fused)
            if ours and OPTIMIZERS not in stack[-1].filename:
                self.sites.append((Path(ours[-1].filename).name, ours[-1].name, ours[-1].lineno, func.__name__))
        return func(*args, **(kwargs or {}))


class CountFromSecondStep(Callback):
    """Counts from the start of step 2 to the end of training (the first step sets things up once)."""

    def __init__(self):
        self.mode = HostReads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 1:
            self.mode.__exit__(None, None, None)


@pytest.mark.parametrize("cls, source, conditional", [
    (ConsistencyTrainingModule, None, {}), (DiffusionModule, None, {}), (ConsistencyDistillationModule, "teacher", {}),
    (EasyConsistencyTuningModule, "init_from", {}), (ContinuousConsistencyModule, "init_from", {}),
    (ContinuousConsistencyModule, "teacher", {}),
    (DiffusionModule, None, {"label_dropout": 0.1}), (ConsistencyDistillationModule, "teacher", {"guidance_scale": 2.0}),
    (ContinuousConsistencyModule, "teacher", {"guidance_scale": 2.0}),
], ids=["ict", "edm", "cd", "ect", "sct", "scd", "edm_labels", "cd_guided", "scd_guided"])
def test_a_training_step_reads_the_device_only_for_the_nonfinite_policy(cls, source, conditional, tmp_path):
    net = {"num_classes": 3} if conditional else {}
    teacher = {**net, "label_dropout": 0.1} if conditional else {}  # (guidance needs a teacher trained with it)
    extra = {source: str(module_checkpoint(tmp_path / "teacher.ckpt", **teacher))} if source else {}
    torch.manual_seed(0)
    module = tiny(cls, ema_decays=[0.9], **extra, **net, **conditional)
    counter = CountFromSecondStep()
    images = torch.rand(16, 1, 16, 16) * 2 - 1
    data = DataLoader(TensorDataset(images, torch.arange(16) % 3) if conditional else images, batch_size=4)
    make_trainer(tmp_path, max_steps=4, log_every_n_steps=1000, callbacks=[counter]).fit(module, data)
    sites = counter.mode.sites
    assert {(f, fn) for f, fn, _, _ in sites} <= ALLOWED, [s for s in sites if s[:2] not in ALLOWED]
    assert len(sites) == 2 * 3  # the two checks, in each of the 3 counted steps: the counter sees them


@pytest.mark.parametrize("cls, source", [
    (ConsistencyTrainingModule, None), (DiffusionModule, None), (ConsistencyDistillationModule, "teacher"),
    (EasyConsistencyTuningModule, "init_from"), (ContinuousConsistencyModule, "teacher"),
], ids=["ict", "edm", "cd", "ect", "scd"])
def test_skip_on_device_reads_nothing_on_the_host(cls, source, tmp_path):
    """``on_nonfinite=skip_on_device`` with a fused optimizer: not one host read in a step (the host looks once per
    logging interval, here longer than the run)."""
    extra = {source: str(module_checkpoint(tmp_path / "teacher.ckpt"))} if source else {}
    torch.manual_seed(0)
    module = tiny(cls, ema_decays=[0.9], on_nonfinite="skip_on_device",
                  optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), **extra)
    counter = CountFromSecondStep()
    data = DataLoader(torch.rand(16, 1, 16, 16) * 2 - 1, batch_size=4)
    make_trainer(tmp_path, max_steps=4, log_every_n_steps=1000, callbacks=[counter]).fit(module, data)
    assert counter.mode.sites == []


@pytest.mark.parametrize("cls, source, names", [
    (ConsistencyTrainingModule, None, {"train/num_scales", "train/target_ema"}),
    (EasyConsistencyTuningModule, "init_from", {"train/stage", "train/mean_t_minus_r"}),
    (ContinuousConsistencyModule, "init_from", {"train/tangent_rms", "train/tangent_warmup", "train/log_weight"}),
], ids=["ict", "ect", "sct"])
def test_curriculum_values_are_logged_at_the_loggers_steps_only(cls, source, names, tmp_path):
    """Each ``self.log`` costs the host about a millisecond: a step's curriculum and diagnostic values are logged only
    at the steps the logger writes, and reach it at every one of them (``train/loss``, for the progress bar, every
    step)."""
    extra = {source: str(module_checkpoint(tmp_path / "teacher.ckpt"))} if source else {}
    torch.manual_seed(0)
    module = tiny(cls, ema_decays=[0.9], **extra)
    calls = []
    log = module.log
    module.log = lambda name, *args, **kwargs: (calls.append(name), log(name, *args, **kwargs))
    logger = CSVLogger(tmp_path, name="", version="")
    data = DataLoader(torch.rand(28, 1, 16, 16) * 2 - 1, batch_size=4)
    make_trainer(tmp_path, max_steps=7, logger=logger, log_every_n_steps=3).fit(module, data)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    written = {name: [int(r["step"]) for r in rows if r.get(name)] for name in names | {"train/loss"}}
    assert written["train/loss"] == [2, 5]
    assert all(written[name] == [2, 5] for name in names), written
    assert calls.count("train/loss") == 7
    assert all(calls.count(name) == 2 for name in names), calls
