"""The README's commands, run as a new user runs them (tiny network, fake data, a few steps)."""

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from cm_lightning.io import post_hoc_ema
from tests.helpers import TINY_NET

ROOT = Path(__file__).parents[1]
QUICK = [f"--model.net.init_args.{k}={v}" for k, v in TINY_NET.items()] + [
    "--trainer.max_steps=2", "--trainer.callbacks=[]", "--trainer.limit_val_batches=0", "--data.batch_size=4",
    "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


def readme_commands() -> list[list[str]]:
    """Every ``cm-lightning`` command in the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("cm-lightning ")]


def readme_fit(config: str) -> list[str]:
    """The README's first ``fit`` of the preset ``config`` (later ones show options on top of it)."""
    return [c for c in readme_commands() if c[1] == "fit" and c[2:4] == ["--config", f"configs/{config}.yaml"]][0][1:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_teacher_chain_works_after_the_quick_start_in_the_same_folder(fake_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for config in ("mnist_quickstart", "mnist_edm", "mnist_cd", "mnist_ect", "mnist_sct", "mnist_scd"):
        main([*readme_fit(config), f"--data.data_dir={fake_mnist}", *QUICK])
    quick = torch.load("runs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert quick["hyper_parameters"]["_class_path"].endswith("ConsistencyTrainingModule")
    teacher = Path("runs/mnist_edm/lightning_logs/version_0/checkpoints/last.ckpt")
    student = torch.load(next(Path("runs/mnist_cd").rglob("last.ckpt")), weights_only=True)
    tuned = torch.load(next(Path("runs/mnist_ect").rglob("last.ckpt")), weights_only=True)
    assert student["teacher_sha256"] == sha256(teacher) == tuned["init_from_sha256"]
    sct, scd = (torch.load(next(Path(f"runs/mnist_{m}").rglob("last.ckpt")), weights_only=True) for m in ("sct", "scd"))
    assert sct["init_from_sha256"] == scd["teacher_sha256"] == sha256(teacher)


@pytest.mark.slow
def test_the_post_hoc_ema_commands(fake_mnist, tmp_path, monkeypatch):
    """Fit with the callback, sweep σ_rel in ``test``, reconstruct one: as written, on a tiny net and fake data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    fit, sweep = [c[1:] for c in readme_commands() if "callbacks.PostHocEMA" in " ".join(c)
                  or "callbacks.PostHocEMASweep" in " ".join(c)]
    quick = [a for a in QUICK if not a.startswith("--trainer.callbacks")]  # keeps the callback the command adds
    main([*fit, f"--data.data_dir={fake_mnist}", *quick])
    main([*sweep, f"--data.data_dir={fake_mnist}", "--trainer.callbacks.num_samples=4", "--trainer.callbacks.batch_size=4",
          "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"])
    assert set(json.loads(Path("runs/phema_sweep.json").read_text())["fid"]["heun18"]) == {"0.05", "0.1", "0.15", "0.2"}
    block = re.search(r"python -m cm_lightning.io.post_hoc_ema .*?\n(?!    )", (ROOT / "README.md").read_text(), re.S)
    post_hoc_ema.main(shlex.split(block.group(0).replace("\\\n", " "))[3:])
    assert Path("runs/mnist_edm_phema/reconstructed/phema_0.150.ckpt").is_file()


@pytest.mark.slow
def test_the_conditional_commands(fake_mnist, tmp_path, monkeypatch):
    """The guided chain as the README writes it: conditional teacher, guided CD student, a hundred sevens."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    commands = [c[1:] for c in readme_commands() if "_cond.yaml" in " ".join(c)]
    assert [c[0] for c in commands] == ["fit", "fit", "predict"]
    swap = lambda c: [str(fake_mnist) if a == "../shared/data" else a for a in c]  # noqa: E731
    for command in commands[:2]:
        main([*swap(command), *QUICK])
    main([*swap(commands[2]), *[q for q in QUICK if q.startswith("--model.net")]])
    import numpy as np
    with np.load(tmp_path / "samples" / "sevens" / "samples.npz") as f:
        assert f["arr_0"].shape == (100, 32, 32, 1) and (f["arr_1"] == 7).all()
    student = torch.load(next(Path("runs/mnist_cd_cond").rglob("last.ckpt")), weights_only=True)
    preset = yaml.safe_load((ROOT / "configs" / "mnist_cd_cond.yaml").read_text())["model"]["init_args"]
    assert student["hyper_parameters"]["guidance_scale"] == preset["guidance_scale"] > 1
    assert student["teacher_sha256"] == sha256(Path("runs/mnist_edm_cond/lightning_logs/version_0/checkpoints/last.ckpt"))
