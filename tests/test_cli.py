"""The ``cm-lightning`` CLI end to end on fake MNIST: checkpoint, TensorBoard scalars, sampling from the file."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import build_cli, main
from cm_lightning import (ConsistencyDistillationModule, ConsistencyTrainingModule, ContinuousConsistencyModule, DiffusionModule, EasyConsistencyTuningModule,
                          SamplingModule)
from cm_lightning.core.recipes import ict_num_scales
from tests.helpers import MAX_STEPS, fit_args, tiny_args

@pytest.mark.slow
def test_fit_writes_checkpoint_and_scalars_following_the_ict_curriculum(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(trained_run)).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/num_scales", "train/target_ema", "val/loss"} <= set(tags)
    num_scales = {e.step: e.value for e in events.Scalars("train/num_scales")}
    assert sorted(num_scales) == list(range(MAX_STEPS))  # logged every step
    assert num_scales == {k: ict_num_scales(k, MAX_STEPS) for k in range(MAX_STEPS)}
    assert num_scales[0] == 11 and num_scales[MAX_STEPS - 1] == 1281
    assert {e.value for e in events.Scalars("train/target_ema")} == {0.0}
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))


@pytest.mark.slow
def test_sample_from_checkpoint_alone(trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    module = ConsistencyTrainingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert module.image_shape == (1, 32, 32)  # linked from the DataModule into the network
    one = module.sample(6, generator=torch.Generator().manual_seed(0))
    two = module.sample(6, sampler=(80.0, 0.8), generator=torch.Generator().manual_seed(0))
    for x in (one, two):
        assert x.shape == (6, 1, 32, 32) and x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    assert torch.load(ckpt, weights_only=True)["global_step"] == MAX_STEPS


def test_console_script_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "cli", "fit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--model CONFIG | CLASS_PATH_OR_NAME" in out and "--data CONFIG | CLASS_PATH_OR_NAME" in out
    script = shutil.which("cm-lightning")
    assert script, "the console script is missing: install the project with pip install -e ."
    assert "--model CONFIG" in subprocess.run([script, "fit", "--help"], capture_output=True, text=True, check=True).stdout


def test_config_typo_is_reported(fake_mnist, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(fake_mnist, tmp_path, "--model.recipie=ict"))
    assert "recipie" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_parse_and_build(config, fake_mnist):
    """Every preset parses and builds its model and DataModule: catches drift between the YAML and the code."""
    cli = build_cli(["--config", str(config), f"--data.data_dir={fake_mnist}", "--trainer.logger=false"], run=False)
    expected = {"edm": DiffusionModule, "cd": ConsistencyDistillationModule, "ect": EasyConsistencyTuningModule,
                "sct": ContinuousConsistencyModule, "scd": ContinuousConsistencyModule}.get(
                    config.stem.removesuffix("_cond").split("_")[-1], ConsistencyTrainingModule)
    assert type(cli.model) is expected and isinstance(cli.model, SamplingModule)  # the callbacks' contract
    assert cli.model.num_classes == (cli.datamodule.num_classes if config.stem.endswith("_cond") else 0)
    assert cli.model.image_shape == (cli.datamodule.channels, cli.datamodule.image_size, cli.datamodule.image_size)


@pytest.mark.slow
def test_validate_and_test_subcommands_on_the_checkpoint(trained_run, fake_mnist, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    common = [*tiny_args(fake_mnist), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={ckpt}"]
    main(["test", *common])
    main(["validate", *common])
    out = capsys.readouterr().out
    assert "test/loss" in out and "val/loss" in out


def predict(fake_mnist, tmp_path, ckpt, out: Path, *extra: str) -> None:
    main([
        "predict", *tiny_args(fake_mnist), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        f"--ckpt_path={ckpt}", "--data.predict_num_samples=20", f"--writer.output_dir={out}", *extra,
    ])


@pytest.mark.slow
def test_predict_writes_seeded_png_and_npz_independent_of_batch_size(trained_run, fake_mnist, tmp_path):
    import numpy as np
    from torchvision.io import decode_png, read_file

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    predict(fake_mnist, tmp_path, ckpt, tmp_path / "a", "--model.predict_sampler=[80.0, 0.8]", "--model.predict_seed=3")
    predict(fake_mnist, tmp_path, ckpt, tmp_path / "b", "--model.predict_sampler=[80.0, 0.8]", "--model.predict_seed=3",
            "--data.batch_size=3")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{i:06d}.png" for i in range(20)] + ["samples.npz"]  # no part or temporary file left
    for name in names:  # same seed, another batch size: byte-identical files
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    array = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    assert array.shape == (20, 32, 32, 1) and array.dtype == np.uint8
    assert torch.equal(decode_png(read_file(str(tmp_path / "a" / "000007.png"))), torch.from_numpy(array[7]).permute(2, 0, 1))
    module = ConsistencyTrainingModule.load_from_checkpoint(ckpt)  # the EMA weights, as in predict
    expected = ((module.sample(20, (80.0, 0.8), seed=3) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), expected)
    with pytest.raises(FileExistsError, match="already holds samples"):  # never overwrites earlier samples
        predict(fake_mnist, tmp_path, ckpt, tmp_path / "a")
    predict(fake_mnist, tmp_path, ckpt, tmp_path / "c", "--writer.formats=[npz]")  # seed 0, one step
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["samples.npz"]
    assert not np.array_equal(np.load(tmp_path / "c" / "samples.npz")["arr_0"], array)


@pytest.mark.slow
def test_fit_without_a_logger_runs(fake_mnist, tmp_path):
    """`--trainer.logger false` must not trip the LR monitor (Lightning's raises without a logger)."""
    main(["fit", *tiny_args(fake_mnist), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
          "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_default_root_dir_holds_the_whole_run(fake_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    main(["fit", *tiny_args(fake_mnist), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
          f"--trainer.default_root_dir={root}"])
    run = root / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert not (tmp_path / "runs").exists()
    out = capsys.readouterr().out  # the fit's last lines say where the run went
    assert f"Run folder: {run}\nLast checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in out


@pytest.mark.slow
def test_a_launch_that_fails_before_training_leaves_no_run_folder(fake_mnist, tmp_path):
    for _ in range(2):  # two mistakes in a row
        with pytest.raises(FileNotFoundError, match="MNIST is not in"):
            main(fit_args(tmp_path / "nowhere", tmp_path / "runs", "--data.download=false"))
    assert not (tmp_path / "runs").exists()
    main(fit_args(fake_mnist, tmp_path / "runs", "--trainer.max_steps=1"))
    assert [p.name for p in (tmp_path / "runs" / "lightning_logs").iterdir()] == ["version_0"]


@pytest.mark.slow
def test_test_and_predict_find_the_latest_run_and_leave_nothing_behind(trained_run, fake_mnist, tmp_path, monkeypatch,
                                                                       capsys, recwarn):
    monkeypatch.chdir(tmp_path / "runs")
    (tmp_path / "runs" / "lightning_logs" / "version_1").mkdir()  # a test run's folder: no checkpoint in it
    last = ["--ckpt_path=last", f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.logger=false"]
    main(["test", *tiny_args(fake_mnist), *last])
    main(["predict", *tiny_args(fake_mnist), *last, "--data.predict_num_samples=3", f"--writer.output_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert out.count(f"--ckpt_path last: {trained_run / 'checkpoints' / 'last.ckpt'}") == 2
    assert "test/loss" in out and f"Samples written to {tmp_path / 'out'}" in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lightning_logs"]  # no config.yaml
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    with pytest.raises(FileNotFoundError, match=f"no run under {tmp_path / 'empty'}/lightning_logs has checkpoints/last.ckpt"):
        main(["test", *tiny_args(fake_mnist), "--ckpt_path=last", f"--trainer.default_root_dir={tmp_path / 'empty'}"])


def test_help_stands_on_its_own_and_names_the_data_options():
    help_of = lambda *a: subprocess.run([sys.executable, "-m", "cli", *a], capture_output=True, text=True, check=True).stdout
    for model in ("ConsistencyTrainingModule", "DiffusionModule"):
        text = help_of("fit", "--model.help", model)
        assert "DESIGN" not in text and "--model.net NET" in text and "--model.ema_decays" in text
    assert "--model.recipe" in help_of("fit", "--model.help", "ConsistencyTrainingModule")
    data = help_of("fit", "--data.help", "MNISTDataModule")
    assert "--data.data_dir DATA_DIR" in data and "--data.batch_size BATCH_SIZE" in data


def test_sigma_data_from_the_data_is_computed_once_and_saved_as_a_number(fake_mnist, tmp_path):
    from datamodules import MNISTDataModule

    expected = round(MNISTDataModule(str(fake_mnist)).pixel_statistics()["rms"], 4)
    assert expected != 0.5
    main(fit_args(fake_mnist, tmp_path / "runs", "--model.sigma_data=data", "--trainer.max_steps=2"))
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["sigma_data"] == expected
    assert f"sigma_data: {expected}" in (run / "config.yaml").read_text()
    module = ConsistencyTrainingModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.online.sigma_data == expected  # the scalings use it
    with pytest.raises(ValueError, match=r"sigma_data='data' is resolved by the cm-lightning CLI .*pixel_statistics"):
        ConsistencyTrainingModule(sigma_data="data")
