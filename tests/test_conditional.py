"""Class-conditional models and classifier-free guidance: the label embedding, label dropout, guided sampling and
guided distillation against closed forms on two Gaussian classes, balanced ``predict``, grids, class accuracy."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import SampleGrid, SampleWriter
from callbacks.fid import Scores
from datamodules import MNISTDataModule
from cm_lightning import (ConsistencyDistillationModule, ConsistencyTrainingModule, ContinuousConsistencyModule,
                          DiffusionModule, EasyConsistencyTuningModule, UNet)
from cm_lightning.core.conditioning import NULL_LABEL, bind_labels, drop_labels, labels_for_indices
from cm_lightning.core.karras import c_in
from cm_lightning.core.noise import indexed_noise
from cm_lightning.core.losses import METRICS
from cm_lightning.nets.mnist_classifier import MNISTClassifier
from cm_lightning.nets.preconditioning import EDMDenoiser
from tests.helpers import TINY_NET, make_trainer, module_checkpoint, randomise, tiny

SIGMA_DATA, S, MEANS = 0.5, 0.3, (1.0, -1.0)  # two classes N(±1, S²) per pixel


def exact_denoisers(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x, σ, c) for both classes stacked, D(x, σ, ∅)) of the equal mixture of N(μ_c, S² I), in float64:
    D_c = μ_c + S²/(S² + σ²)(x − μ_c); D_∅ = Σ_c p(c | x) D_c, p(c | x) ∝ N(x; μ_c, (S² + σ²) I)."""
    x, var = x.double(), (S**2 + sigma.double().reshape(-1, 1, 1, 1) ** 2)
    d = torch.stack([m + S**2 / var * (x - m) for m in MEANS])
    log_p = torch.stack([-(x - m).square().flatten(1).sum(1) / (2 * var.flatten()) for m in MEANS])
    return d, (log_p.softmax(0).reshape(2, -1, 1, 1, 1) * d).sum(0)


def guided_exact(x, sigma, labels, w):
    d, d_null = exact_denoisers(x, sigma)
    d_cond = torch.where(labels.reshape(-1, 1, 1, 1) == 0, d[0], d[1])
    return d_null + w * (d_cond - d_null)


class TwoGaussians(nn.Module):
    """The exact denoiser of the two classes as a network of the contract: F such that the EDM parametrisation
    (σ_min = 0, σ_d = 0.5) gives D exactly; label −1 gives the unconditional (mixture) denoiser."""

    image_size, channels, num_classes = 16, 1, 2

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # a module with a parameter, as optimizers and EMAs expect

    def forward(self, net_in, c_noise, class_labels):
        sigma = (4 * c_noise.double()).exp()
        x = net_in.double() / c_in(sigma, SIGMA_DATA).reshape(-1, 1, 1, 1)
        d, d_null = exact_denoisers(x, sigma)
        lab = class_labels.reshape(-1, 1, 1, 1)
        out = torch.where(lab == 0, d[0], torch.where(lab == 1, d[1], d_null))
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
        return ((out - c_skip * x) / c_out).float()


def hand_heun(x, labels, w, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's Heun sampler (Algorithm 1, deterministic) written out on the closed-form guided denoiser, float64."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()
    x = x.double() * t[0]
    for a, b in zip(t[:-1], t[1:]):
        d = (x - guided_exact(x, torch.full((len(x),), a), labels, w)) / a
        x_next = x + (b - a) * d
        if b > 0:
            d2 = (x_next - guided_exact(x_next, torch.full((len(x),), b), labels, w)) / b
            x_next = x + (b - a) * (d + d2) / 2
        x = x_next
    return x


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_guided_heun_sampler_is_the_hand_computed_guided_ode_solution(w):
    module = DiffusionModule(net=TwoGaussians(), sigma_data=SIGMA_DATA, guidance_scale=w, ema_decays=[0.9])
    labels = torch.tensor([0, 1, 0, 1])
    noise = indexed_noise(3, range(4), 1, (1, 16, 16))
    out = module.sample_from_noise(noise, "heun12", labels=labels)
    want = hand_heun(noise[0], labels, w, 12).clamp(-1, 1).float()
    assert torch.allclose(out, want, atol=2e-4), (out - want).abs().max()
    if w == 1.0:  # the conditional sampler nears the closed-form ODE solution x = μ + (x_T − μ) S / √(S² + σ_max²)
        mu = torch.tensor(MEANS)[labels].reshape(-1, 1, 1, 1)
        exact = (mu + (80 * noise[0] - mu) * S / math.sqrt(S**2 + 80**2)).clamp(-1, 1)
        fine = module.sample_from_noise(noise, "heun40", labels=labels)  # Heun's error falls as N⁻²: 0.011 at N = 40
        assert torch.allclose(fine, exact, atol=0.02) and not torch.allclose(out, exact, atol=0.02)


def test_guidance_scale_one_is_the_conditional_sampler_and_larger_scales_differ():
    noise, labels = indexed_noise(0, range(6), 1, (1, 16, 16)), torch.tensor([0, 1] * 3)
    plain = DiffusionModule(net=TwoGaussians(), sigma_data=SIGMA_DATA, ema_decays=[0.9])
    one = DiffusionModule(net=TwoGaussians(), sigma_data=SIGMA_DATA, guidance_scale=1.0, ema_decays=[0.9])
    two = DiffusionModule(net=TwoGaussians(), sigma_data=SIGMA_DATA, guidance_scale=2.0, ema_decays=[0.9])
    a, b, c = (m.sample_from_noise(noise, "euler8", labels=labels) for m in (plain, one, two))
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)


def test_cd_target_takes_the_guided_teacher_step():
    torch.manual_seed(0)
    student = tiny(ConsistencyDistillationModule, num_classes=2, guidance_scale=3.0, sigma_data=SIGMA_DATA, num_scales=6,
                   ema_decays=[0.9])
    randomise(student.online)
    object.__setattr__(student, "_teacher", EDMDenoiser(TwoGaussians(), SIGMA_DATA))
    x, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 1, 0])
    torch.manual_seed(5)
    loss = student.losses(x, labels)
    torch.manual_seed(5)
    z, sigma_n, sigma_next = student.objective.draw(x)
    x_next = x + sigma_next.reshape(-1, 1, 1, 1) * z
    tc, tn = sigma_next.double().reshape(-1, 1, 1, 1), sigma_n.double().reshape(-1, 1, 1, 1)
    d = (x_next - guided_exact(x_next, sigma_next, labels, 3.0)) / tc  # Heun from σ_n+1 to σ_n, guided, by hand
    x_euler = x_next + (tn - tc) * d
    x_hat = x_next + (tn - tc) * (d + (x_euler - guided_exact(x_euler, sigma_n, labels, 3.0)) / tn) / 2
    f = bind_labels(student.online, labels)
    with torch.no_grad():
        want = METRICS["l2"](f(x_next, sigma_next), f(x_hat.float(), sigma_n))
    assert torch.allclose(loss, want, rtol=1e-4, atol=1e-7)
    student.hparams.guidance_scale = 1.0  # the unguided teacher gives another target
    torch.manual_seed(5)
    assert not torch.allclose(student.losses(x, labels), want, rtol=1e-3)


def test_unconditional_unet_is_unchanged_and_a_conditional_one_adds_only_the_label_embedding():
    torch.manual_seed(0)
    old = UNet(image_size=16, channels=1, **TINY_NET)
    torch.manual_seed(0)
    zero = UNet(image_size=16, channels=1, num_classes=0, **TINY_NET)
    torch.manual_seed(0)
    cond = UNet(image_size=16, channels=1, num_classes=10, **TINY_NET)
    assert list(zero.state_dict()) == list(old.state_dict())
    assert set(cond.state_dict()) - set(old.state_dict()) == {"map_label.weight"}
    randomise(old)
    zero.load_state_dict(old.state_dict())
    cond.load_state_dict(old.state_dict(), strict=False)
    x, c = torch.randn(4, 1, 16, 16), torch.randn(4)
    assert torch.equal(zero(x, c), old(x, c))
    assert torch.equal(cond(x, c, torch.full((4,), NULL_LABEL)), old(x, c))  # "no label" adds nothing


def test_the_label_reaches_the_output():
    torch.manual_seed(0)
    net = UNet(image_size=16, channels=1, num_classes=3, **TINY_NET)
    randomise(net)
    x, c = torch.randn(2, 1, 16, 16), torch.randn(2)
    a, b = net(x, c, torch.tensor([0, 0])), net(x, c, torch.tensor([2, 2]))
    assert torch.equal(a, net(x, c, torch.tensor([0, 0]))) and not torch.allclose(a, b, atol=1e-3)
    assert torch.equal(net(x, c, torch.tensor([0, 2]))[1], b[1])  # per image


def test_label_dropout_gives_the_unconditional_branch_at_its_rate():
    torch.manual_seed(0)
    module = tiny(DiffusionModule, num_classes=10, label_dropout=0.3, ema_decays=[0.9])
    seen = []
    forward = module.online.net.forward
    module.online.net.forward = lambda x, c, labels: seen.append(labels) or forward(x, c, labels)
    labels = torch.arange(2000) % 10
    module.losses(torch.zeros(2000, 1, 16, 16), labels)
    got = seen[0]
    dropped = got == NULL_LABEL
    assert abs(dropped.float().mean().item() - 0.3) < 0.04  # 4 standard deviations at n = 2000
    assert torch.equal(got[~dropped], labels[~dropped])  # the others keep their class
    assert drop_labels(labels, 0.0) is labels and (drop_labels(labels, 1.0) == NULL_LABEL).all()


def test_predict_writes_the_asked_number_of_images_per_class_with_their_labels(tmp_path):
    torch.manual_seed(0)
    module = tiny(ConsistencyTrainingModule, num_classes=3, predict_labels=2, ema_decays=[0.9])
    randomise(module.online)
    module.ema["0"].load_state_dict(module.online.state_dict())
    writer = SampleWriter(output_dir=str(tmp_path / "out"), formats=["npz"])
    make_trainer(tmp_path, callbacks=[writer]).predict(module, DataLoader(torch.arange(6), batch_size=4))
    with np.load(tmp_path / "out" / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (6, 16, 16, 1) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    want = module.sample(1, seed=0, first_index=5, labels=2)  # image 5 is the second of class 2
    assert np.array_equal(images[5], ((want[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    with pytest.raises(ValueError, match=r"predict_labels=2 \(images per class\) covers 6 images.*predict_num_samples 6"):
        module.labels_for_indices([6])


def test_label_choices_for_predict():
    assert labels_for_indices(range(7), 3, "all").tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert labels_for_indices(range(4), 3, [7 % 3]).tolist() == [1, 1, 1, 1]
    assert labels_for_indices(range(5), 10, [3, 7]).tolist() == [3, 7, 3, 7, 3]


def test_grid_has_one_row_per_class(tmp_path):
    torch.manual_seed(0)
    module = tiny(ConsistencyTrainingModule, num_classes=3, ema_decays=[0.9])
    randomise(module.ema["0"])
    images, per_row = SampleGrid(num_samples=7)._images(module, [80.0])
    assert per_row == 2 and len(images) == 6
    for c in range(3):
        for j in range(2):  # row c, column j: image j·K + c, of class c
            want = module.sample(1, [80.0], seed=0, first_index=j * 3 + c, labels=c)[0]
            assert torch.allclose(images[c * 2 + j], want, atol=1e-5)  # (batch sizes round differently)


def test_class_accuracy_and_confidence_of_the_mnist_classifier():
    classifier = MNISTClassifier.pretrained()
    images = torch.rand(40, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        probs = classifier.logits(images).softmax(1)
    calls = probs.argmax(1)
    scores = Scores(classifier, classifier.num_features, kid=False)
    scores.update(images, real=True)
    scores.update(images, real=False, labels=calls)
    out = scores.compute()
    assert out["class_acc"].item() == 1.0
    assert out["class_confidence"].item() == pytest.approx(probs.max(1).values.mean().item(), rel=1e-5)
    scores.reset()
    scores.update(images, real=False, labels=(calls + 1) % 10)
    assert scores.compute()["class_acc"].item() == 0.0


@pytest.mark.parametrize("cls, extra", [
    (DiffusionModule, {"label_dropout": 0.1}), (ConsistencyTrainingModule, {}), (EasyConsistencyTuningModule, {}),
    (ConsistencyDistillationModule, {"guidance_scale": 2.0}), (ContinuousConsistencyModule, {}),
    (ContinuousConsistencyModule, {"guidance_scale": 2.0}),
], ids=["edm", "ict", "ect", "cd", "sct", "scd"])
def test_every_method_trains_on_the_labels(cls, extra, tmp_path):
    """A few steps on labelled data: the label embedding receives gradients, and a model saved and loaded samples
    the same class-conditional images."""
    if cls is ConsistencyDistillationModule or extra.get("guidance_scale"):
        extra = {**extra, "teacher": str(module_checkpoint(tmp_path / "t.ckpt", num_classes=3, label_dropout=0.1))}
    torch.manual_seed(0)
    module = tiny(cls, num_classes=3, ema_decays=[0.9], **extra)
    randomise(module.online.net)
    before = module.online.net.map_label.weight.detach().clone()
    data = TensorDataset(torch.rand(16, 1, 16, 16) * 2 - 1, torch.arange(16) % 3)
    trainer = make_trainer(tmp_path, max_steps=3, log_every_n_steps=1000)
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert not torch.equal(module.online.net.map_label.weight, before)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = cls.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.num_classes == 3
    assert torch.equal(loaded.sample(3, seed=1, labels=[2, 1, 0]), module.sample(3, seed=1, labels=[2, 1, 0]))


@pytest.mark.parametrize("make, message", [
    (lambda: tiny(DiffusionModule, label_dropout=0.1), r"label_dropout=0.1 .* need a class-conditional network.*num_classes"),
    (lambda: tiny(DiffusionModule, guidance_scale=2.0), r"guidance_scale=2.0 need a class-conditional network"),
    (lambda: tiny(ConsistencyDistillationModule, guidance_scale=2.0), r"guidance_scale=2.0 guides a class-conditional teacher"),
    (lambda: tiny(ConsistencyTrainingModule, predict_labels=[7]), r"predict_labels=\[7\] needs a class-conditional network"),
    (lambda: tiny(ConsistencyTrainingModule, num_classes=3, predict_labels=[3]), r"classes in \[0, 3\), got \[3\]"),
    (lambda: tiny(ConsistencyTrainingModule, num_classes=3, predict_labels=0), r"images per class must be >= 1, got 0"),
    (lambda: tiny(DiffusionModule, num_classes=2, label_dropout=1.0), r"label_dropout must lie in \[0, 1\), got 1.0"),
    (lambda: UNet(num_classes=-1), r"num_classes must be an int >= 0"),
    (lambda: tiny(ConsistencyTrainingModule).sample(2, labels=1), r"labels= was given to an unconditional model"),
    (lambda: tiny(ConsistencyTrainingModule, num_classes=3).sample(2, labels=[0, 5]), r"lie in \[0, 3\) .* got values from 0 to 5"),
    (lambda: tiny(ConsistencyTrainingModule, num_classes=3).sample(2, labels=[0]), r"holds 1 labels for 2 images"),
    (lambda: UNet(image_size=16, channels=1, **TINY_NET)(torch.zeros(1, 1, 16, 16), torch.zeros(1), torch.zeros(1).long()),
     r"class labels were given to an unconditional UNet"),
])
def test_conditional_misuse_is_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_sct_refuses_a_guidance_scale_without_a_teacher_when_fit_starts(tmp_path):
    module = tiny(ContinuousConsistencyModule, num_classes=2, guidance_scale=2.0, ema_decays=[0.9])
    data = DataLoader(TensorDataset(torch.rand(4, 1, 16, 16), torch.arange(4) % 2), batch_size=2)
    with pytest.raises(ValueError, match=r"guidance_scale=2.0 guides sCD's teacher, and this run has none \(sCT\)"):
        make_trainer(tmp_path, max_steps=1).fit(module, data)


def test_a_conditional_model_refuses_unlabelled_data_or_another_class_count(tmp_path, fake_mnist):
    module = tiny(DiffusionModule, num_classes=3, ema_decays=[0.9])
    with pytest.raises(ValueError, match=r"num_classes=3\) but the data yields no labels"):
        make_trainer(tmp_path, max_steps=1).fit(module, DataLoader(torch.rand(4, 1, 16, 16), batch_size=2))
    module = tiny(DiffusionModule, num_classes=3, image_size=32, ema_decays=[0.9])
    with pytest.raises(ValueError, match=r"num_classes=3 but the data has 10 classes: set --model.net.init_args.num_classes 10"):
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=MNISTDataModule(str(fake_mnist)))
    module = tiny(DiffusionModule, num_classes=3, ema_decays=[0.9])
    one_hot = torch.nn.functional.one_hot(torch.arange(4) % 3, 3)
    with pytest.raises(ValueError, match=r"must be integers of shape \(4,\), one per image; got torch.int64 of shape \(4, 3\)"):
        module.batch_of([torch.rand(4, 1, 16, 16), one_hot])
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(4,\)"):
        module.batch_of([torch.rand(4, 1, 16, 16), torch.zeros(4)])


def test_guidance_is_combined_in_float32_under_bf16():
    """w > 1 extrapolates: the branches are combined in float32, not in the network's bf16 output."""
    from cm_lightning.core.conditioning import call_network
    conditional, unconditional = torch.tensor([1.0 + 2 ** -7]), torch.tensor([1.0])  # both exact in bf16

    def net(x, c_noise, labels):
        return torch.where(labels >= 0, conditional, unconditional).to(torch.bfloat16).expand(len(x))

    out = call_network(net, torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), guidance_scale=1.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((2,), 1.0 + 3 * 2 ** -8))  # bf16 arithmetic rounds 1 + 3·2⁻⁸ (8 fraction bits)


@pytest.mark.slow
def test_cli_fits_a_guided_teacher_and_predicts_the_asked_class(fake_mnist, tmp_path):
    from cli import main
    from tests.helpers import tiny_args

    main(["fit", *tiny_args(fake_mnist, "DiffusionModule"), "--trainer.max_steps=4", "--model.net.num_classes=10",
          "--model.label_dropout=0.2", f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.limit_val_batches=0"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    with pytest.warns(UserWarning, match=r"--model.label_dropout=0.5 is ignored: .*last.ckpt was trained with label_dropout=0.2"):
        main(["predict", *tiny_args(fake_mnist, "DiffusionModule"), "--trainer.logger=false", f"--ckpt_path={ckpt}",
              "--data.predict_num_samples=5", f"--writer.output_dir={tmp_path / 'sevens'}", "--model.predict_labels=[7]",
              "--model.guidance_scale=2.0", "--model.predict_sampler=heun3", "--model.label_dropout=0.5"])
    with np.load(tmp_path / "sevens" / "samples.npz") as f:
        assert f["arr_0"].shape == (5, 32, 32, 1) and f["arr_1"].tolist() == [7] * 5


def test_fid_callback_logs_class_accuracy_of_a_conditional_mnist_model(tmp_path, fake_mnist):
    from callbacks import FID

    torch.manual_seed(0)
    m = tiny(DiffusionModule, image_size=32, num_classes=10, label_dropout=0.1, eval_weights="online")
    dm = MNISTDataModule(str(fake_mnist), batch_size=8, val_fraction=0.25)
    fid = FID(num_samples=20, samplers=["euler2"], batch_size=10, kid=False)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=[fid])
    trainer.fit(m, datamodule=dm)
    acc, confidence = (trainer.callback_metrics[f"val/class_{k}_euler2"].item() for k in ("acc", "confidence"))
    assert 0 <= acc <= 1 and 0 < confidence < 1
    assert fid._metrics["euler2"].classified[0].item() == 20  # every generated image classified once


def test_guiding_a_teacher_trained_without_label_dropout_is_refused(tmp_path):
    teacher = module_checkpoint(tmp_path / "t.ckpt", num_classes=3)  # label_dropout 0: D_∅ never trained
    student = tiny(ConsistencyDistillationModule, num_classes=3, guidance_scale=2.0, teacher=str(teacher))
    with pytest.raises(ValueError, match=r"guidance_scale=2.0 guides the teacher .* trained without label dropout"):
        student.load_teacher()
    with pytest.warns(UserWarning, match=r"guidance_scale=2.0 with label_dropout=0: .* never trained its unconditional"):
        tiny(DiffusionModule, num_classes=3, guidance_scale=2.0)


def test_guidance_with_one_noise_level_for_the_batch_and_a_single_label():
    torch.manual_seed(0)
    module = tiny(DiffusionModule, num_classes=3, label_dropout=0.1, ema_decays=[0.9])
    randomise(module.online)
    x, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    shared = module.online(x, torch.tensor([2.0]), class_labels=labels, guidance_scale=2.0)
    assert torch.allclose(shared, module.online(x, torch.full((4,), 2.0), class_labels=labels, guidance_scale=2.0))
    assert torch.equal(module.sample(2, seed=0, labels=torch.tensor(1)), module.sample(2, seed=0, labels=[1, 1]))
    assert torch.equal(module.sample(2, seed=0, labels=np.int64(2)), module.sample(2, seed=0, labels=2))


def test_predict_refuses_a_count_per_class_that_is_not_the_number_of_images(tmp_path, fake_mnist):
    module = tiny(ConsistencyTrainingModule, num_classes=10, image_size=32, predict_labels=3, ema_decays=[0.9])
    dm = MNISTDataModule(str(fake_mnist), predict_num_samples=20)
    with pytest.raises(ValueError, match=r"predict_labels=3 asks for 3 images of each of 10 classes.*set it to 30"):
        make_trainer(tmp_path).predict(module, datamodule=dm)


def test_class_accuracy_is_only_for_models_of_the_ten_digits(tmp_path):
    from callbacks import FID
    from datamodules import ImageFolderDataModule
    from tests.helpers import write_images

    for name in ("a", "b", "c"):
        write_images(tmp_path / "data" / name, 4, (32, 32), mode="L")
    dm = ImageFolderDataModule(str(tmp_path / "data"), image_size=32, channels=1, batch_size=4, num_workers=0, val_fraction=0.25)
    m = tiny(DiffusionModule, image_size=32, num_classes=3, eval_weights="online")
    fid = FID(num_samples=6, samplers=["euler2"], batch_size=6, kid=False)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=1, val_check_interval=1, callbacks=[fid])
    trainer.fit(m, datamodule=dm)
    assert "val/fid_euler2" in trainer.callback_metrics and "val/class_acc_euler2" not in trainer.callback_metrics
