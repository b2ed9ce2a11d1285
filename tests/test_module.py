"""ConsistencyTrainingModule: loss, dropout masks, target update, curriculum K, sampling, bad arguments."""

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from cm_lightning import ConsistencySampler, multistep_sample
from cm_lightning.core.losses import pseudo_huber, squared_l2
from cm_lightning.core.recipes import ct_num_scales, ct_target_ema
from tests.helpers import make_trainer, randomise, tiny


@pytest.mark.parametrize("recipe, metric, mu0", [("ict", pseudo_huber, 0.9), ("ct", squared_l2, 0.9), ("ct", squared_l2, 0.0)])
def test_consistency_loss_matches_definition(recipe, metric, mu0):
    torch.manual_seed(0)
    m = tiny(recipe=recipe, mu0=mu0)
    randomise(m.online)
    assert (m.target is not None) == (recipe == "ct" and mu0 > 0)  # μ0 = 0: the target is sg θ, no copy
    if m.target is not None:
        randomise(m.target)  # θ⁻ ≠ θ
    x, z = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    sn, snext = torch.tensor([0.002, 0.1, 1.0, 40.0]), torch.tensor([0.01, 0.2, 1.5, 80.0])
    target_fn = m.target if m.target is not None else m.online
    with torch.no_grad():
        student = m.online(x + snext.view(-1, 1, 1, 1) * z, snext)
        target = target_fn(x + sn.view(-1, 1, 1, 1) * z, sn)
    weight = 1 / (snext - sn) if recipe == "ict" else torch.ones(4)
    want = (weight * metric(student, target)).mean()
    got = m.consistency_loss(x, z, sn, snext)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert all(p.grad is None for p in target_fn.parameters()) if m.target is not None else True
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.online.parameters())


def test_student_and_target_share_the_dropout_mask():
    torch.manual_seed(0)
    m = tiny(recipe="ct", dropout=0.5)  # target is a copy of the online net at init
    randomise(m.online)
    m.target.load_state_dict(m.online.state_dict())
    m.train()
    x, z, s = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), torch.full((4,), 1.0)
    # dropout is live: two plain forwards differ ...
    assert not torch.equal(m.online(x, s), m.online(x, s))
    # ... but the loss at σ_n = σ_{n+1} with θ⁻ = θ is exactly zero: same mask in both branches
    assert m.consistency_loss(x, z, s, s).item() == 0.0


class Snapshots(Callback):
    """Online and target weights just before and just after each training step."""

    def __init__(self):
        self.before, self.after = [], []

    @staticmethod
    def _copy(m):
        return {k: v.clone() for k, v in m.online.state_dict().items()}, {k: v.clone() for k, v in m.target.state_dict().items()}

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        self.before.append(self._copy(m))

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        self.after.append(self._copy(m))


def test_training_updates_target_by_mu_of_the_step_and_sets_total_steps(tmp_path):
    torch.manual_seed(0)
    m = tiny(recipe="ct", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    snaps = Snapshots()
    data = DataLoader(torch.rand(12, 1, 16, 16) * 2 - 1, batch_size=4)
    make_trainer(tmp_path, max_steps=3, callbacks=[snaps]).fit(m, data)
    assert m._total_steps == 3 and m.global_step == 3
    for k in range(3):
        mu = ct_target_ema(ct_num_scales(k, 3))  # N(k) of K = 3: 2, 107-ish, ...
        (_, target0), (online1, target1) = snaps.before[k], snaps.after[k]
        for name, t in target1.items():
            torch.testing.assert_close(t, mu * target0[name] + (1 - mu) * online1[name], rtol=1e-5, atol=1e-7)
    assert ct_num_scales(0, 3) == 2 and ct_num_scales(2, 3) > 100  # the curriculum did move


def test_total_steps_from_max_epochs(tmp_path):
    m = tiny(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    data = DataLoader(torch.rand(12, 1, 16, 16) * 2 - 1, batch_size=4)
    make_trainer(tmp_path, max_epochs=2).fit(m, data)
    assert m._total_steps == 6 and m.global_step == 6


def test_unbounded_trainer_needs_total_steps(tmp_path):
    m = tiny()
    data = DataLoader(torch.rand(4, 1, 16, 16), batch_size=4)
    with pytest.raises(ValueError, match="the Trainer has no end.*--trainer.max_steps"):
        make_trainer(tmp_path, max_epochs=-1, max_steps=-1).fit(m, data)


def test_sample_shape_range_and_seed():
    torch.manual_seed(0)
    m = tiny()
    randomise(m.online)
    one = m.sample(5, generator=torch.Generator().manual_seed(1))
    again = m.sample(5, generator=torch.Generator().manual_seed(1))
    two = m.sample(5, sampler=(80.0, 0.8), generator=torch.Generator().manual_seed(1))
    assert one.shape == (5, 1, 16, 16) and one.min() >= -1 and one.max() <= 1
    assert torch.equal(one, again) and not torch.equal(one, two)
    assert m.online.training  # sampling restores the mode it found


@pytest.mark.parametrize(
    "sigmas, message",
    [((), "at least one noise level"), ((80.0, 80.0), "strictly decreasing"), ((0.8, 80.0), "strictly decreasing"),
     ((100.0,), r"must lie in \(sigma_min, sigma_max\]"), ((80.0, 0.002), r"must lie in \(sigma_min, sigma_max\]")],
)
def test_sample_rejects_bad_schedules(sigmas, message):
    with pytest.raises(ValueError, match=message):
        tiny().sample(2, sampler=sigmas)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma_min=80.0), "sigma_min < sigma_max"),
        (dict(rho=-1.0), "rho must be a finite number > 0, got -1.0"),
        (dict(recipe="ct", s0=5, s1=3), "s1 must be >= s0, got s0=5, s1=3"),
        (dict(recipe="cd"), "recipe must be one of"),
        (dict(loss="lpips"), "loss must be one of"),
        (dict(image_size=18, channel_mult=[1, 2, 2], attn_resolutions=[]), r"image_size=18 cannot be halved 2 times \(channel_mult=\[1, 2, 2\]\): it must be a multiple of 4"),
        (dict(attn_resolutions=[4]), r"attn_resolutions=\[4\] has \[4\], not in the net; resolutions present: \[16, 8\]"),
        (dict(channels=2), r"channels must be 1 or 3 \(greyscale or RGB images\), got 2"),
        (dict(embedding_type="learned"), "embedding_type must be one of"),
        (dict(dropout=1.0), r"dropout must lie in \[0, 1\), got 1.0"),
        (dict(predict_sampler=[0.8, 80.0]), r"sigmas=\[0.8, 80.0\] must be strictly decreasing"),
        (dict(predict_sampler=[100.0]), r"must lie in \(sigma_min, sigma_max\] = \(0.002, 80.0\]"),
        (dict(predict_seed=-1), r"predict_seed must lie in \[0, 2\*\*31\), got -1"),
        (dict(eval_weights="ema_0.5"), r"unknown weights 'ema_0.5'.*choose one of \['ema', 'ema_0.9999', 'online'\]"),
    ],
)
def test_bad_model_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_channels_mismatch_with_data_is_refused_before_training(tmp_path, fake_mnist):
    from datamodules import MNISTDataModule

    m = tiny(image_size=32, channels=3)
    with pytest.raises(ValueError, match="the data has channels=1 but the model's network has channels=3"):
        make_trainer(tmp_path, max_steps=1).fit(m, datamodule=MNISTDataModule(str(fake_mnist), batch_size=4))
    assert m.global_step == 0


def test_validation_loss_is_fixed_and_independent_of_batch_size(tmp_path):
    torch.manual_seed(0)
    m = tiny()
    randomise(m.online)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    losses = [
        make_trainer(tmp_path, limit_val_batches=1.0).validate(m, DataLoader(images, batch_size=bs), verbose=False)[0]["val/loss"]
        for bs in (4, 8, 4)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == losses[2]
    assert losses[0] > 0


def test_seeded_sampling_is_per_image_and_independent_of_batching():
    from cm_lightning import indexed_noise

    m = tiny(eval_weights="online")
    randomise(m.online)
    whole = m.sample(5, (80.0, 0.8), seed=3)
    parts = torch.cat([m.sample(2, (80.0, 0.8), seed=3), m.sample(3, (80.0, 0.8), seed=3, first_index=2)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)  # the same noise; convolutions round per batch size
    assert not torch.allclose(whole, m.sample(5, (80.0, 0.8), seed=4), atol=1e-2)
    z = indexed_noise(7, range(1000), 1, (4,))[0]
    assert len({tuple(row.tolist()) for row in z}) == 1000  # no two images share their noise
    assert torch.equal(indexed_noise(7, [5, 9], 2, (4,)), indexed_noise(7, range(10), 2, (4,))[:, [5, 9]])
    with pytest.raises(ValueError, match="either generator= or seed=, not both"):
        m.sample(2, generator=torch.Generator(), seed=0)


class Overshoot(torch.nn.Module):
    """f(x, σ) = 3 x / σ: a stand-in consistency function whose outputs leave [-1, 1]."""

    def forward(self, x, sigma):
        return 3 * x / sigma.reshape(-1, 1, 1, 1)


def test_clip_denoised_clamps_between_steps_and_leaves_one_step_alone():
    z = torch.randn(2, 4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    tau, sigma_min = 0.8, 0.002
    x1 = 3 * z[0]  # f(80 z_1, 80)
    by_hand = {clip: (3 * ((x1.clamp(-1, 1) if clip else x1) + (tau**2 - sigma_min**2) ** 0.5 * z[1]) / tau).clamp(-1, 1)
               for clip in (True, False)}
    for clip in (True, False):
        got = multistep_sample(Overshoot(), z, [80.0, tau], sigma_min, clip_denoised=clip)
        torch.testing.assert_close(got, by_hand[clip], rtol=0, atol=1e-6)
        torch.testing.assert_close(multistep_sample(Overshoot(), z[:1], [80.0], sigma_min, clip_denoised=clip), x1.clamp(-1, 1))
    assert not torch.equal(by_hand[True], by_hand[False])


class Loud(torch.nn.Module):
    """F = 4 x at σ = 80 (f ≈ 2 z, outside [-1, 1]) and 0.1 x at σ = 0.8 (inside): the clamp shows."""

    image_size, channels = 16, 1

    def forward(self, x, noise):
        return x * torch.where(noise > 0.5, 4.0, 0.1).reshape(-1, 1, 1, 1)


def test_module_sampling_clamps_between_steps_by_default():
    m = tiny()
    m.online.net = Loud()
    assert m.hparams.clip_denoised
    sample = lambda sigmas, clip: m.sample(3, sigmas if clip is None else ConsistencySampler(tuple(sigmas), clip),
                                           weights="online", seed=1)
    assert torch.equal(sample([80.0], None), sample([80.0], False))  # one step: unchanged
    assert torch.equal(sample([80.0, 0.8], None), sample([80.0, 0.8], True))
    assert not torch.equal(sample([80.0, 0.8], True), sample([80.0, 0.8], False))
