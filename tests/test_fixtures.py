"""Checkpoints written by cm-lightning 0.2 (``tests/fixtures/v0_2``, made by ``make_v0_2.py`` before the package
moved into wings) load every way a user can load them and sample the images they sampled then."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.sample_writer import to_uint8
from cli import build_cli
from cm_lightning import (ConsistencyDistillationModule, ConsistencyTrainingModule, DiffusionModule,
                          EasyConsistencyTuningModule)
from cm_lightning.core.noise import indexed_noise
from cm_lightning.sampling.samplers import ODESampler

FIXTURES = Path(__file__).parent / "fixtures" / "v0_2"
CLASSES = {"ict": ConsistencyTrainingModule, "ct": ConsistencyTrainingModule, "edm": DiffusionModule,
           "cd": ConsistencyDistillationModule, "ect": EasyConsistencyTuningModule}
STEPS = 20  # each file's global step
TOLERANCE = 1e-5
SAMPLERS_0_2 = {"1step": [80.0], "2step": [80.0, 0.8], "heun18": "heun18"}  # the references' (0.2's eval samplers)


def reference(name: str) -> dict[str, torch.Tensor]:
    """"<sampler>_<weights>" → the images of noise indices 0…3 (seed 0) that 0.2 sampled from the file."""
    return torch.load(FIXTURES / "samples.pt", weights_only=True)[name]


def saved(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.ckpt", map_location="cpu", weights_only=True)


def cli_args(subcommand: str, name: str, fake_mnist: Path, tmp_path: Path, ckpt: Path, *extra: str) -> list[str]:
    """A command a user types for a checkpoint: the method named, its network and settings taken from the file."""
    return [subcommand, f"--model={CLASSES[name].__name__}", "--data=MNISTDataModule", f"--data.data_dir={fake_mnist}", "--data.batch_size=4",
            f"--ckpt_path={ckpt}", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", *extra]


def test_the_files_name_their_classes_by_0_2_module_paths():
    """What the other tests rely on: the files are 0.2's, naming its module paths."""
    assert saved("ict")["hyper_parameters"]["_class_path"] == "cm_lightning.module.ConsistencyTrainingModule"
    assert {saved(n)["hyper_parameters"]["net"]["class_path"] for n in CLASSES} == {"cm_lightning.unet.UNet"}
    assert "target.net.out.2.weight" in saved("ct")["state_dict"]  # one file holds a target network θ⁻


@pytest.mark.parametrize("name", CLASSES)
def test_load_from_checkpoint_restores_every_weight_and_samples_the_same_images(name):
    model = CLASSES[name].load_from_checkpoint(FIXTURES / f"{name}.ckpt", map_location="cpu")
    assert type(model) is CLASSES[name]
    state, expected = model.state_dict(), saved(name)["state_dict"]
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    for key, images in reference(name).items():
        sampler, weights = key.split("_", 1)
        drawn = model.sample(len(images), sampler=SAMPLERS_0_2[sampler], seed=0, weights=weights)
        assert (drawn - images).abs().max() <= TOLERANCE, key


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSES)
def test_cli_predict_and_test_take_the_file(name, fake_mnist, tmp_path):
    model = CLASSES[name].load_from_checkpoint(FIXTURES / f"{name}.ckpt", map_location="cpu")
    images = reference(name)[f"{model.sampler(None).name}_{model.hparams.eval_weights}"]  # predict's default sampler
    build_cli(cli_args("predict", name, fake_mnist, tmp_path, FIXTURES / f"{name}.ckpt", "--trainer.logger=false",
                       f"--data.predict_num_samples={len(images)}", f"--writer.output_dir={tmp_path / 'out'}",
                       "--writer.formats=[npz]"))
    written = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert np.abs(written.astype(int) - to_uint8(images).permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1  # NHWC, uint8 rounding

    extra = [f"--model.teacher={FIXTURES / 'edm.ckpt'}"] if name == "cd" else []  # CD's test loss needs its teacher
    cli = build_cli(cli_args("test", name, fake_mnist, tmp_path, FIXTURES / f"{name}.ckpt", "--trainer.logger=false",
                             "--trainer.limit_test_batches=2", *extra))
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSES)
def test_cli_fit_resumes_the_file(name, fake_mnist, tmp_path):
    ckpt = tmp_path / f"{name}.ckpt"
    shutil.copy(FIXTURES / f"{name}.ckpt", ckpt)
    extra = [f"--model.teacher={FIXTURES / 'edm.ckpt'}"] if name == "cd" else []  # the file names it relatively
    cli = build_cli(cli_args("fit", name, fake_mnist, tmp_path, ckpt, f"--trainer.max_steps={STEPS + 2}",
                             "--trainer.limit_val_batches=0", *extra))
    assert cli.trainer.global_step == STEPS + 2
    written = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert written["hyper_parameters"]["_class_path"] == f"{CLASSES[name].__module__}.{CLASSES[name].__name__}"
    assert written["state_dict"].keys() == saved(name)["state_dict"].keys()


@pytest.mark.slow
def test_a_value_the_user_gives_beats_the_files_even_the_default(fake_mnist, tmp_path):
    """The EDM file samples with its ``online`` weights (above); ``--model.eval_weights ema``, the default, is
    the user's choice all the same."""
    model = DiffusionModule.load_from_checkpoint(FIXTURES / "edm.ckpt", map_location="cpu")
    build_cli(cli_args("predict", "edm", fake_mnist, tmp_path, FIXTURES / "edm.ckpt", "--trainer.logger=false",
                       "--model.eval_weights=ema", "--data.predict_num_samples=2", f"--writer.output_dir={tmp_path / 'out'}",
                       "--writer.formats=[npz]"))
    written = np.load(tmp_path / "out" / "samples.npz")["arr_0"].astype(int)
    ema, online = (to_uint8(model.sample(2, seed=0, weights=w)).permute(0, 2, 3, 1).numpy().astype(int) for w in ("ema", "online"))
    assert np.abs(written - ema).max() <= 1 and (written != ema).mean() < 0.01  # uint8 rounding at most
    assert (written != online).mean() > 0.1  # (the two weights differ little after 20 steps, but they differ)


def student_net(name: str) -> dict:
    """The network of a 0.2 file, named as a user names it today (``cm_lightning.UNet``), not as the file does."""
    return {**saved(name)["hyper_parameters"]["net"], "class_path": "cm_lightning.UNet"}


def test_the_0_2_diffusion_file_is_a_teacher_that_samples_as_before(tmp_path):
    """``--model.teacher``: the CD student reads the file's network, which draws the 0.2 Heun images."""
    student = ConsistencyDistillationModule(net=student_net("cd"), teacher=str(FIXTURES / "edm.ckpt"))
    student.load_teacher()
    images = reference("edm")["heun18_online"]
    noise = indexed_noise(0, range(len(images)), 1, images.shape[1:])
    drawn = ODESampler(18)(student.teacher(), noise, 0.002, 80.0, 7.0)
    assert (drawn - images).abs().max() <= TOLERANCE


@pytest.mark.parametrize("cls", [EasyConsistencyTuningModule, ConsistencyTrainingModule])
def test_the_0_2_diffusion_file_starts_a_student(cls):
    """``--model.init_from``: every network of a new student starts from the file's F weights."""
    edm = saved("edm")
    student = cls(net=student_net("edm"), init_from=str(FIXTURES / "edm.ckpt"), ema_decays=[0.9])
    state = student.starting_state()
    expected = {k.removeprefix("online.net."): v for k, v in edm["state_dict"].items() if k.startswith("online.net.")}
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_a_config_naming_0_2_module_paths_trains(fake_mnist, tmp_path):
    """A user's own config may name the method, the network and the LR schedule by their 0.2 module paths."""
    config = tmp_path / "old.yaml"
    config.write_text(
        "model:\n  class_path: cm_lightning.module.ConsistencyTrainingModule\n  init_args:\n"
        "    net:\n      class_path: cm_lightning.unet.UNet\n"
        "      init_args: {model_channels: 8, channel_mult: [1, 2], num_res_blocks: 1, attn_resolutions: []}\n"
        "    lr_scheduler:\n      class_path: cm_lightning.lr_schedules.CosineDecay\n"
        "trainer:\n  plugins:\n    class_path: cm_lightning.checkpoint_io.AtomicCheckpointIO\n"
    )
    cli = build_cli(["fit", f"--config={config}", "--data=MNISTDataModule", f"--data.data_dir={fake_mnist}",
                     "--data.batch_size=4", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                     "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.model) is ConsistencyTrainingModule and cli.trainer.global_step == 2
    written = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert written["hyper_parameters"]["_class_path"] == "cm_lightning.methods.consistency_training.ConsistencyTrainingModule"
    assert type(ConsistencyTrainingModule.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path)) is ConsistencyTrainingModule


@pytest.mark.parametrize("name", CLASSES)
def test_a_model_that_names_its_network_today_takes_the_0_2_file(name):
    """The checkpoint guard compares classes, not the names a file and a config give them."""
    hparams = saved(name)["hyper_parameters"]
    model = CLASSES[name](**{k: v for k, v in hparams.items() if not k.startswith("_")} | {"net": student_net(name)})
    model.on_load_checkpoint(saved(name))
    model.load_state_dict(saved(name)["state_dict"])
    other = CLASSES[name](**{k: v for k, v in hparams.items() if not k.startswith("_")} | {"net": student_net(name) | {
        "init_args": {**student_net(name)["init_args"], "model_channels": 16}}})
    with pytest.raises(ValueError, match="net.model_channels: checkpoint 8, model 16"):
        other.on_load_checkpoint(saved(name))


@pytest.mark.parametrize("module", ["cm_lightning.upgrade", "cm_lightning.io.upgrade"])
def test_the_upgrade_command_runs_by_its_0_2_and_its_own_name(module):
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "cm-lightning 0.1" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method, argument", [(EasyConsistencyTuningModule, "init_from"),
                                              (ConsistencyDistillationModule, "teacher")])
def test_cli_fit_starts_a_new_student_from_the_0_2_diffusion_file(method, argument, fake_mnist, tmp_path):
    net = {k: v for k, v in saved("edm")["hyper_parameters"]["net"]["init_args"].items() if k not in ("image_size", "channels")}
    cli = build_cli(["fit", f"--model={method.__name__}", "--model.net=cm_lightning.UNet",
                     *[f"--model.net.init_args.{k}={v}" for k, v in net.items()], f"--model.{argument}={FIXTURES / 'edm.ckpt'}",
                     "--data=MNISTDataModule", f"--data.data_dir={fake_mnist}", "--data.batch_size=4", "--trainer.max_steps=1",
                     "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={tmp_path}"])
    written = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert written[f"{argument}_sha256"] == hashlib.sha256((FIXTURES / "edm.ckpt").read_bytes()).hexdigest()


def test_arguments_the_0_2_file_predates_count_as_their_defaults():
    """The 0.2 EDM file names no ``fourier_scale``: it was built with 16, so a student at 16 takes it as its teacher
    and a student at iCT's 0.02 is refused by name."""
    net = student_net("edm")
    for scale, accepted in ((16.0, True), (0.02, False)):
        init_args = {**net["init_args"], "fourier_scale": scale, "embedding_channels": None}
        student = ConsistencyDistillationModule(net={**net, "init_args": init_args}, teacher=str(FIXTURES / "edm.ckpt"))
        if accepted:
            student.load_teacher()
        else:
            with pytest.raises(ValueError, match="net.fourier_scale: teacher 16.0, student 0.02"):
                student.load_teacher()


def test_a_0_2_tuning_run_resumes_with_the_scalings_it_trained_with(tmp_path):
    """0.2's ECT trained with the σ_min-shifted scalings; today's default is ECT's plain EDM ones."""
    assert EasyConsistencyTuningModule.load_from_checkpoint(FIXTURES / "ect.ckpt").hparams.train_scalings == "consistency"
    model = EasyConsistencyTuningModule(net=student_net("ect"))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": saved("ect")["pytorch-lightning_version"]}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "today.ckpt")
    assert EasyConsistencyTuningModule.load_from_checkpoint(tmp_path / "today.ckpt").hparams.train_scalings == "edm"
