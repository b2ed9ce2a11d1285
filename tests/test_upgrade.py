"""Checkpoints of cm-lightning 0.1 (UNet settings as flat module arguments) load, or are refused with the way out."""

import subprocess
import sys

import pytest
import torch

from cli import main
from cm_lightning import ConsistencyTrainingModule
from cm_lightning.io.upgrade import UNET_ARGS
from tests.helpers import tiny_args


def as_version_0_1(new_path, old_path) -> None:
    """The 0.1 layout of a checkpoint: the UNet's arguments flat among the module's, ``predict_sigmas``."""
    checkpoint = torch.load(new_path, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    hparams.update({k: v for k, v in hparams.pop("net")["init_args"].items() if k in UNET_ARGS})  # 0.1's UNet had these
    hparams["predict_sigmas"] = hparams.pop("predict_sampler") or [80.0]
    hparams.pop("_class_path")
    torch.save(checkpoint, old_path)


@pytest.mark.slow
def test_a_0_1_checkpoint_loads_in_python_and_is_converted_for_the_cli(trained_run, fake_mnist, tmp_path):
    new = trained_run / "checkpoints" / "last.ckpt"
    old = tmp_path / "old.ckpt"
    as_version_0_1(new, old)
    loaded = ConsistencyTrainingModule.load_from_checkpoint(old, weights_only=True)
    expected = ConsistencyTrainingModule.load_from_checkpoint(new, weights_only=True)
    assert torch.equal(loaded.sample(3, [80.0, 0.8], seed=0), expected.sample(3, [80.0, 0.8], seed=0))

    with pytest.raises(ValueError, match=f"{old} was written by cm-lightning 0.1.*python -m cm_lightning.io.upgrade {old}"):
        main(["test", *tiny_args(fake_mnist), f"--ckpt_path={old}", "--trainer.logger=false"])
    converted = tmp_path / "converted.ckpt"
    subprocess.run([sys.executable, "-m", "cm_lightning.io.upgrade", str(old), str(converted)], check=True, capture_output=True)
    assert torch.load(converted, weights_only=True)["hyper_parameters"]["net"]["init_args"]["model_channels"] == 8
    assert old.is_file()  # never lost
    main(["test", *tiny_args(fake_mnist), f"--ckpt_path={converted}", "--trainer.logger=false"])
    refused = subprocess.run([sys.executable, "-m", "cm_lightning.io.upgrade", str(old), str(converted)], capture_output=True, text=True)
    assert refused.returncode != 0 and "exists or is the old file" in refused.stderr
