"""Easy consistency tuning: the r(t) mapping and the loss against independent values, the truncated t law,
the stage from the step, the start from a diffusion checkpoint and its refusals, exact resume."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from cli import main
from cm_lightning import ConsistencyTrainingModule, DiffusionModule, EasyConsistencyTuningModule
from cm_lightning.core.objectives import EasyConsistencyTuning
from tests.helpers import make_trainer, module_checkpoint, randomise, tiny, tiny_args

SIGMA_MIN = 0.002


def mapped_r(t: float, stage: int, q=2.0, k=8.0, b=1.0, mapping="sigmoid") -> float:
    """ECT's r(t), written out in plain floats."""
    adjust = 1 + k / (1 + math.exp(b * t)) if mapping == "sigmoid" else 1.0
    r = max(0.0, t * (1 - adjust / q ** (stage + 1)))
    return 0.0 if r < SIGMA_MIN else r


@pytest.mark.parametrize("mapping, q, k, b", [("sigmoid", 2.0, 8.0, 1.0), ("sigmoid", 4.0, 3.0, 0.5), ("const", 2.0, 8.0, 1.0)])
def test_r_of_t_matches_the_mapping_written_out(mapping, q, k, b):
    ect = EasyConsistencyTuning(mapping=mapping, q=q, k=k, b=b)
    t = torch.tensor([0.003, 0.05, 0.5, 2.0, 10.0, 80.0])
    for stage in (0, 1, 3, 7):
        want = [mapped_r(v, stage, q, k, b, mapping) for v in t.tolist()]
        assert ect.r_of_t(t, stage).tolist() == pytest.approx(want, rel=1e-5, abs=1e-9)
    # Spot values: stage 0, q = 2, t = 2 (sigmoid): r = 2 (1 − ½ (1 + 8/(1 + e²))) = 0.0460...
    assert EasyConsistencyTuning().r_of_t(torch.tensor([2.0]), 0).item() == pytest.approx(2 * (1 - 0.5 * (1 + 8 / (1 + math.e**2))), rel=1e-5)


def test_r_approaches_t_as_the_stage_grows_and_is_zero_for_small_t_early():
    ect = EasyConsistencyTuning()
    t = torch.logspace(-2.5, math.log10(80), 50)
    gaps = [((t - ect.r_of_t(t, s)) / t).max().item() for s in range(12)]
    assert all(a >= b for a, b in zip(gaps, gaps[1:]))  # the relative gap never widens
    assert gaps[-1] < 5 / 2**12  # (1 + k/2) / q^(s+1) at most
    early = ect.r_of_t(torch.tensor([0.01, 0.1, 1.0]), 0)
    assert early.tolist() == [0.0, 0.0, 0.0]  # stage 0: small t are denoised straight to the data
    assert (ect.r_of_t(t, 11) >= SIGMA_MIN).sum() > 40


def test_t_follows_the_truncated_log_normal():
    ect = EasyConsistencyTuning(p_mean=-1.1, p_std=2.0)
    torch.manual_seed(0)
    t = ect.draw_t(40000).double()
    assert t.min() >= SIGMA_MIN and t.max() <= 80.0
    phi = lambda v: 0.5 * math.erfc(-v / math.sqrt(2))  # noqa: E731
    lo, hi = phi((math.log(SIGMA_MIN) + 1.1) / 2), phi((math.log(80.0) + 1.1) / 2)
    for x in (0.01, 0.1, 0.33, 1.0, 5.0, 30.0):
        want = (phi((math.log(x) + 1.1) / 2) - lo) / (hi - lo)
        assert (t <= x).double().mean().item() == pytest.approx(want, abs=0.01)


class Scale(torch.nn.Module):
    """f(x, σ) = x / (1 + σ): a stand-in consistency function whose outputs are known in closed form."""

    def forward(self, x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("c", [0.0, 0.3])
def test_the_loss_matches_independent_values_with_the_clean_image_where_r_is_zero(c):
    ect = EasyConsistencyTuning(c=c)
    x, z = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t, r = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64), torch.tensor([0.0, 1.5, 9.0], dtype=torch.float64)
    got = ect.loss(Scale(), Scale(), x, z, t, r)
    for i in range(3):
        out = (x[i] + t[i] * z[i]) / (1 + t[i])
        ref = x[i] if r[i] == 0 else (x[i] + r[i] * z[i]) / (1 + r[i])
        norm2 = (out - ref).square().sum().item()
        d = math.sqrt(norm2 + c * c) - c
        assert got[i].item() == pytest.approx(d / (t[i] - r[i]).item(), rel=1e-6)


def test_a_network_with_dropout_is_its_own_target_with_the_same_mask():
    """With r just below t the student and the target see almost the same input: their distance is tiny with
    the same dropout mask, and O(1) if the target drew its own mask."""
    torch.manual_seed(0)
    m = tiny(EasyConsistencyTuningModule, dropout=0.5)
    randomise(m)  # the UNet's zero-initialised output layer would hide any mask
    m.train()
    x, z = torch.rand(4, 1, 16, 16) * 2 - 1, torch.randn(4, 1, 16, 16)
    t = torch.tensor([0.5, 1.0, 2.0, 4.0])
    own_mask = lambda x, s: (torch.rand(1), m.online(x, s))[1]  # noqa: E731  advances the RNG: another mask
    with torch.no_grad():
        same = m.objective.loss(m.online, m.online, x, z, t, t - 1e-4) * 1e-4
        other = m.objective.loss(m.online, own_mask, x, z, t, t - 1e-4) * 1e-4
    assert same.max().item() < 0.01 * other.min().item()


class Record(Callback):
    def __init__(self):
        self.start, self.stages = None, []

    def on_train_start(self, trainer, m):
        self.start = {name: {k: v.clone() for k, v in f.net.state_dict().items()} for name, f in (("online", m.online), ("ema", m.ema["0"]))}

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        self.stages.append(m.stage())


def test_training_starts_from_the_diffusion_weights_and_the_stage_follows_the_step(tmp_path):
    path = module_checkpoint(tmp_path / "edm.ckpt")
    m = tiny(EasyConsistencyTuningModule, init_from=str(path), num_stages=4, ema_decays=[0.9])
    record = Record()
    make_trainer(tmp_path, max_steps=8, callbacks=[record]).fit(m, DataLoader(torch.rand(32, 1, 16, 16) * 2 - 1, batch_size=4))
    saved = torch.load(path, weights_only=True)["state_dict"]  # the diffusion model's eval_weights (its ema)
    want = {k.removeprefix("ema.0.net."): v for k, v in saved.items() if k.startswith("ema.0.net.")}
    for name in ("online", "ema"):
        assert all(torch.equal(v, want[k]) for k, v in record.start[name].items()), name
    assert any(not torch.equal(v, want[k]) for k, v in m.online.net.state_dict().items())  # and it trained
    assert record.stages == [0, 0, 1, 1, 2, 2, 3, 3]  # d = 8 steps / 4 stages
    assert m.target is None and not any(k.startswith("target.") for k in m.state_dict())  # sg(θ): no copy


def test_bad_starting_points_are_refused_by_name_before_any_step(tmp_path):
    data = DataLoader(torch.rand(4, 1, 16, 16), batch_size=4)

    def refuse(error, path, match, **kwargs):
        m = tiny(EasyConsistencyTuningModule, init_from=str(path), **kwargs)
        with pytest.raises(error, match=match):
            make_trainer(tmp_path, max_steps=1).fit(m, data)
        assert m.global_step == 0

    refuse(FileNotFoundError, tmp_path / "nowhere.ckpt", "init_from checkpoint '.*nowhere.ckpt' does not exist")
    ct = module_checkpoint(tmp_path / "ct.ckpt", ConsistencyTrainingModule)
    refuse(ValueError, ct, "ct.ckpt' is a ConsistencyTrainingModule checkpoint; the init_from must be a DiffusionModule")
    refuse(ValueError, module_checkpoint(tmp_path / "wide.ckpt", model_channels=16), "net.model_channels: teacher 16, student 8")
    for bad, match in ((dict(mapping="linear"), "mapping must be 'sigmoid' or 'const'"), (dict(q=1.0), "q must be > 1"),
                       (dict(stage_steps=0), "stage_steps must be >= 1"), (dict(num_stages=0), "num_stages must be >= 1"),
                       (dict(c=-1.0), "c must be >= 0")):
        with pytest.raises(ValueError, match=match):
            tiny(EasyConsistencyTuningModule, **bad)


def ect_args(data_dir: Path, init: Path, save_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", *tiny_args(data_dir, "EasyConsistencyTuningModule"), f"--model.init_from={init}",
            "--model.stage_steps=3", "--model.net.dropout=0.1", "--model.ema_decays=[0.9]",
            f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=4",
            "--checkpoint.every_n_train_steps=4", f"--trainer.logger.init_args.save_dir={save_dir}", *extra]


@pytest.mark.slow
def test_a_resumed_tuning_run_matches_the_straight_run_without_its_starting_file(fake_mnist, tmp_path):
    main(["fit", *tiny_args(fake_mnist, "DiffusionModule"), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
          f"--trainer.logger.init_args.save_dir={tmp_path / 'edm'}"])
    init = tmp_path / "edm" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    main(ect_args(fake_mnist, init, tmp_path / "straight", 8))
    main(ect_args(fake_mnist, init, tmp_path / "split", 4))
    init.rename(init.with_suffix(".moved"))  # a resumed run takes its weights from its own checkpoint
    main(ect_args(fake_mnist, init, tmp_path / "split", 8, "--seed_everything=7", "--ckpt_path=last"))
    straight, resumed = (tmp_path / d / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt" for d in ("straight", "split"))
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["global_step"] == b["global_step"] == 8 and a["state_dict"].keys() == b["state_dict"].keys()
    assert max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]) == 0.0
    assert a["init_from_sha256"] == b["init_from_sha256"] and len(a["init_from_sha256"]) == 64


def test_edm_training_scalings_make_f_the_diffusion_models_denoiser_and_leave_sampling_alone(tmp_path):
    """``train_scalings="edm"`` (ECT's code): in training f = D of the starting diffusion model exactly; sampling and
    validation keep the σ_min-shifted f with f(x, σ_min) = x."""
    teacher = module_checkpoint(tmp_path / "edm.ckpt")
    ect, shifted = (tiny(EasyConsistencyTuningModule, init_from=str(teacher), train_scalings=s) for s in ("edm", "consistency"))
    for m in (ect, shifted):
        m.on_fit_start()  # load the starting weights
    denoiser = DiffusionModule.load_from_checkpoint(teacher).network("ema")
    x, sigma = torch.randn(3, 1, 16, 16), torch.tensor([0.002, 0.5, 20.0])
    with torch.no_grad():
        assert torch.equal(ect.training_function()(x, sigma), denoiser(x, sigma))
        assert torch.equal(shifted.training_function()(x, sigma[:1].expand(3)), x)  # the boundary condition
        assert not torch.allclose(ect.training_function()(x, sigma), shifted.training_function()(x, sigma))
        assert torch.equal(ect.sample(2, seed=0, weights="online"), shifted.sample(2, seed=0, weights="online"))


def test_edm_training_scalings_train_the_online_network(tmp_path):
    m = tiny(EasyConsistencyTuningModule, train_scalings="edm", stage_steps=1)
    before = [p.detach().clone() for p in m.online.parameters()]
    make_trainer(tmp_path, max_steps=2).fit(m, DataLoader(torch.rand(8, 1, 16, 16) * 2 - 1, batch_size=4))
    assert any(not torch.equal(a, b) for a, b in zip(before, m.online.parameters()))
    assert list(m.state_dict()) == list(tiny(EasyConsistencyTuningModule, train_scalings="consistency").state_dict())


def test_train_scalings_names_the_accepted_values():
    with pytest.raises(ValueError, match="train_scalings must be 'edm' or 'consistency', got 'karras'"):
        tiny(EasyConsistencyTuningModule, train_scalings="karras")
