"""FID callback: ~0 for real vs real, large for noise, logged per schedule in fit and test."""

import pytest
import torch

from callbacks.fid import FID, fid_function
from datamodules import MNISTDataModule
from tests.helpers import make_trainer, tiny


def digits(n: int, seed: int) -> torch.Tensor:
    """Bright strokes on a dark 32×32 background, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 32, 32), -1.0)
    for i in range(n):
        r, c = torch.randint(6, 20, (2,), generator=g).tolist()
        x[i, 0, r : r + 10, c : c + 3] = 1.0
    return x


def test_fid_and_kid_are_zero_for_identical_sets_and_large_for_noise():
    metric = FID(num_samples=64, kid_subset_size=100)._metric()
    real = digits(200, 0)
    metric.update(real, real=True)
    metric.update(real, real=False)
    same = metric.compute()
    metric.reset()  # keeps the real statistics
    metric.update(torch.rand(200, 1, 32, 32) * 2 - 1, real=False)
    noise = metric.compute()
    assert abs(same["fid"]) < 1e-3 and noise["fid"] > 100 * max(abs(same["fid"]), 1e-2) and noise["fid"] > 1.0
    # KID: the unbiased MMD estimate is ~0 (either sign) for one distribution, clearly positive for another
    assert abs(same["kid"]) < 0.02 * noise["kid"] and noise["kid"] > 10 * same["kid_std"] and noise["kid_std"] > 0
    again = FID(num_samples=64, kid_subset_size=100)._metric()
    again.update(real, real=True)
    again.update(torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1, real=False)
    metric.reset()
    metric.update(torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1, real=False)
    assert again.compute()["kid"] == metric.compute()["kid"]  # seeded subsets: the same images give the same KID


def test_fid_as_a_function_scores_samplers_reproducibly():
    torch.manual_seed(0)
    m = tiny(image_size=32, channels=1, eval_weights="online")
    score = fid_function(m, [digits(64, 0)], num_samples=32, batch_size=16, progress=False)
    one, two = score([80.0]), score([80.0, 0.8])
    assert torch.isfinite(torch.tensor(one)) and one > 0 and two != one
    assert score([80.0]) == one  # per-image seeded noise: the same samples, the same FID
    with pytest.raises(ValueError, match="at least 2 real images"):
        fid_function(m, [digits(1, 0)], num_samples=4, progress=False)


@pytest.mark.slow
def test_fid_is_logged_per_schedule_in_fit_and_test(tmp_path, fake_mnist):
    torch.manual_seed(0)
    m = tiny(image_size=32, channels=1, eval_weights="online")
    dm = MNISTDataModule(str(fake_mnist), batch_size=8, val_fraction=0.25)
    fid = FID(num_samples=40, test_num_samples=24, batch_size=16)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=[fid])
    trainer.fit(m, datamodule=dm)
    assert fid._metrics["1step"].real_count == 30  # the whole validation split
    for name in ("val/fid_1step", "val/fid_2step", "val/kid_1step", "val/kid_2step_std"):
        assert torch.isfinite(trainer.callback_metrics[name])
    assert trainer.callback_metrics["val/fid_1step"] > 0 and trainer.callback_metrics["val/kid_1step"] > 0
    assert fid._metrics["1step"].fake_count == 40
    results = trainer.test(m, datamodule=dm, verbose=False)[0]
    assert {"test/fid_1step", "test/fid_2step", "test/kid_1step", "test/kid_2step", "test/kid_1step_std", "test/loss"} <= set(results)
    assert fid._metrics["1step"].fake_count == 24


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=1), "num_samples must be >= 2 for FID"),
        (dict(test_num_samples=1), "test_num_samples must be >= 2 for FID .* got 1"),
        (dict(feature="clip"), r"feature must be one of \('mnist', 'inception'\) or an nn.Module, got 'clip'"),
        (dict(samplers=[[80.0], [40.0]]), "distinct lengths"),
    ],
)
def test_bad_fid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FID(**kwargs)


def test_fid_setup_leaves_the_training_rng_alone(fake_mnist):
    m = tiny(image_size=32, channels=1)
    state = torch.get_rng_state()
    FID().setup(None, m, "fit")
    assert torch.equal(torch.get_rng_state(), state)  # a run with FID trains exactly as one without


def test_mnist_features_need_one_channel(tmp_path, fake_mnist):
    m = tiny(image_size=32, channels=3)
    with pytest.raises(ValueError, match="feature='mnist' needs 1-channel images, the model has channels=3"):
        FID().setup(None, m, "fit")


@pytest.mark.slow
def test_test_samplers_replace_the_validation_ones_in_test(tmp_path, fake_mnist):
    from cm_lightning import DiffusionModule

    torch.manual_seed(0)
    m = tiny(DiffusionModule, image_size=32, channels=1, eval_weights="online", ema_decays=[])
    dm = MNISTDataModule(str(fake_mnist), batch_size=8, val_fraction=0.25)
    fid = FID(num_samples=8, batch_size=8, samplers=["heun2"], test_samplers=["heun3", "euler2"])
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=1, val_check_interval=1, callbacks=[fid])
    trainer.fit(m, datamodule=dm)
    assert "val/fid_heun2" in trainer.callback_metrics and "val/fid_heun3" not in trainer.callback_metrics
    results = trainer.test(m, datamodule=dm, verbose=False)[0]
    assert {"test/fid_heun3", "test/fid_euler2"} <= set(results) and "test/fid_heun2" not in results
